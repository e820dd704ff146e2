"""How a frontend reaches the scheduler and the instances: one small interface, two runtimes.

``ControlPlane`` is the scheduler's interface (``SchedulerAPI``, served through its
method table) plus the instances' handles. ``LocalControlPlane`` calls a
``SchedulerDaemon`` in this process; ``RayControlPlane`` calls the named scheduler
actor's generic ``call`` and the llumlet actors, with a fallback (dispatch by
last-known loads, direct llumlet calls) while the scheduler is unreachable, and,
in the frontend that started the deployment, a ``SchedulerWatchdog`` that restarts
a dead scheduler (``llumnix_py.runtime.watchdog``).
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from llumnix_py.config import ClusterConfig
from llumnix_py.errors import LlumnixError, SchedulerUnavailableError
from llumnix_py.load import InstanceLoad, RequestLoad
from llumnix_py.proxy import forwards
from llumnix_py.runtime.watchdog import SchedulerWatchdog
from llumnix_py.scheduler.api import SchedulerAPI
from policies.dispatch import DispatchState
from policies.dispatch import dispatch as dispatch_policy

if TYPE_CHECKING:
    from llumnix_py.instance import InstanceHandle
    from llumnix_py.scheduler.daemon import SchedulerDaemon

log = logging.getLogger(__name__)


class ControlPlane(SchedulerAPI):
    """The scheduler and the instances as a frontend sees them."""

    @abc.abstractmethod
    def instance(self, instance_id: str) -> Optional[InstanceHandle]: ...

    def forget(self, instance_id: str) -> None:
        """The frontend found ``instance_id`` dead: stop using it."""

    def start(self) -> None:
        """Start what runs beside the calls (the Ray scheduler's watchdog)."""

    @property
    def scheduler_up(self) -> bool:
        """The scheduler answered the last call made to it."""
        return True

    def healing(self) -> Optional[dict[str, Any]]:
        """The scheduler watchdog's report (``SchedulerWatchdog.report``); None without one."""
        return None

    def restart_scheduler(self) -> None:
        raise NotImplementedError("this runtime's scheduler runs in the frontend's process")


@forwards(SchedulerAPI)
class LocalControlPlane(ControlPlane):
    """Every ``SchedulerAPI`` method is a direct call on the daemon in this process."""

    def __init__(self, daemon: SchedulerDaemon) -> None:
        self.daemon = daemon

    def _invoke(self, method: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        return getattr(self.daemon, method)(*args, **kwargs)

    def instance(self, instance_id: str) -> Optional[InstanceHandle]:
        return self.daemon.handle(instance_id)


@forwards(SchedulerAPI)
class RayControlPlane(ControlPlane):
    """The scheduler actor and the llumlet actors, with a fallback while the scheduler is gone.

    Every successful ``membership`` call (the frontend's supervisor makes one about
    ten times a second) refreshes a local copy of the instance ids and loads. When a
    scheduler call fails, the frontend dispatches with the same policy over that
    copy, polls the llumlets' loads itself, and calls the llumlets directly by
    name; it tries the scheduler again (by name: a restarted one is found) every
    ``retry_s`` seconds. The deployment's owner (``owner``) also runs a
    ``SchedulerWatchdog`` from ``start`` on, which restarts a dead scheduler and
    switches this control plane back to it at once.
    """

    retry_s = 1.0
    call_timeout_s = 10.0
    slow_call_timeouts_s = {"launch": 300.0}  # methods that may take longer than ``call_timeout_s``

    def __init__(self, actor, config: ClusterConfig, owner: bool = True) -> None:
        self.actor = actor
        self.config = config
        self.namespace = config.ray_namespace
        self.owner = owner
        self._instances: dict[str, InstanceHandle] = {}
        self._lock = threading.Lock()
        self._ids: list[str] = []  # last known live instances
        self._loads: dict[str, InstanceLoad] = {}  # their last known loads
        self._dead: list[str] = []  # instances found dead while the scheduler was away
        self._dispatch_state = DispatchState(config.seed)
        self._down_until = float("-inf")
        self._generation = 0
        self._up = True  # the last scheduler call was answered
        self._watchdog: Optional[SchedulerWatchdog] = None

    # ----- the scheduler, or the fallback -------------------------------------------------
    @property
    def scheduler_reachable(self) -> bool:
        return time.monotonic() >= self._down_until

    @property
    def scheduler_up(self) -> bool:
        return self._up and (self._watchdog is None or self._watchdog.up)

    def start(self) -> None:
        """The deployment's owner watches its scheduler and restarts it when it dies."""
        if self.owner and self.config.scheduler_restart.enabled and self._watchdog is None:
            self._watchdog = SchedulerWatchdog.for_ray(self.config, on_restart=self._switch_back)
            self._watchdog.start()

    def _switch_back(self, actor) -> None:
        """A restarted scheduler: use it from the next call on (no waiting for ``retry_s``)."""
        self.actor = actor
        self._down_until = float("-inf")

    def healing(self) -> Optional[dict[str, Any]]:
        return self._watchdog.report() if self._watchdog is not None else None

    def _invoke(self, method: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """One ``call`` on the scheduler actor; ``SchedulerUnavailableError`` if it does not answer."""
        import ray

        from llumnix_py.runtime.ray_runtime import SCHEDULER_NAME

        if not self.scheduler_reachable:
            raise SchedulerUnavailableError("the scheduler is unreachable")
        try:
            if self.actor is None:
                self.actor = ray.get_actor(SCHEDULER_NAME, namespace=self.namespace)
            timeout = self.slow_call_timeouts_s.get(method, self.call_timeout_s)
            result = ray.get(self.actor.call.remote(method, tuple(args), dict(kwargs)), timeout=timeout)
            self._up = True
            return result
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            self._up = not isinstance(cause, SchedulerUnavailableError)  # a restarted one still starting
            raise (cause if isinstance(cause, LlumnixError) else exc) from None
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ValueError) as exc:
            # ValueError: no actor of that name (not restarted yet)
            self._down_until = time.monotonic() + self.retry_s
            self._up = False
            self.actor = None  # look it up by name next time: a restarted scheduler is a new actor
            raise SchedulerUnavailableError(f"the scheduler is unreachable: {type(exc).__name__}") from None

    def dispatch(self, request: RequestLoad) -> Optional[str]:
        try:
            return self._invoke("dispatch", (request,), {})
        except SchedulerUnavailableError:
            return self._fallback_dispatch(request)

    def _fallback_dispatch(self, request: RequestLoad) -> Optional[str]:
        with self._lock:
            loads = [self._loads[i] for i in self._ids if i in self._loads]
            choice = dispatch_policy(loads, request, self.config.scheduler.policy, self._dispatch_state)
            if choice is None:
                return None
            self._dispatch_state.on_dispatch(choice.instance_id, request)
            return choice.instance_id

    def membership(self) -> dict[str, Any]:
        try:
            m = self._invoke("membership", (), {})
        except SchedulerUnavailableError:
            m = None
        if m is None:  # unreachable, or restarting and not ready
            self._up = False
            return self._probe()
        with self._lock:
            self._ids = list(m["instances"])
            self._loads = {x.instance_id: x for x in m["loads"]}
            for iid in self._ids:
                self._dispatch_state.on_poll(iid)
        return m

    def _probe(self) -> dict[str, Any]:
        """Membership without the scheduler: poll the known instances directly."""
        from llumnix_py.runtime.ray_runtime import probe_loads
        from llumnix_py.scheduler.core import to_instance_load

        handles = [h for h in (self.instance(i) for i in list(self._ids)) if h is not None]
        loads, died = probe_loads(handles, timeout_s=2.0) if handles else ({}, [])
        with self._lock:
            for iid, load in loads.items():
                self._loads[iid] = to_instance_load(iid, load)
                self._dispatch_state.on_poll(iid)
            for iid in died:
                self._forget_locked(iid)
                self._dead.append(iid)
            if died:
                self._generation += 1
            return {"generation": -self._generation, "instances": list(self._ids), "dead": list(self._dead),
                    "loads": [self._loads[i] for i in self._ids if i in self._loads]}

    def forget(self, instance_id: str) -> None:
        with self._lock:
            self._forget_locked(instance_id)

    def _forget_locked(self, instance_id: str) -> None:
        self._instances.pop(instance_id, None)
        if instance_id in self._ids:
            self._ids.remove(instance_id)
        self._loads.pop(instance_id, None)
        self._dispatch_state.forget(instance_id)

    def restart_scheduler(self) -> None:
        from llumnix_py.runtime.ray_runtime import restart_scheduler

        actor = restart_scheduler(self.config)
        if self._watchdog is not None:
            self._watchdog.restarted(actor)  # a fresh restart budget
        self._switch_back(actor)

    # ----- instances ----------------------------------------------------------------------
    def instance(self, instance_id: str) -> Optional[InstanceHandle]:
        with self._lock:
            handle = self._instances.get(instance_id)
        if handle is None:
            import ray

            from llumnix_py.runtime.ray_runtime import INSTANCE_PREFIX, RayInstance

            try:
                actor = ray.get_actor(INSTANCE_PREFIX + instance_id, namespace=self.namespace)
            except ValueError:
                return None
            handle = RayInstance(instance_id, "", "", actor)  # a frontend needs neither address nor incarnation
            with self._lock:
                self._instances[instance_id] = handle
        return handle

    def instance_ids(self) -> list[str]:
        try:
            ids = self._invoke("instance_ids", (), {})
        except SchedulerUnavailableError:
            with self._lock:
                return list(self._ids)
        with self._lock:
            self._ids = list(ids)
        return ids

    def stop(self, terminate_instances: bool = True) -> None:
        if not self.owner:
            return
        import ray

        from llumnix_py.runtime.ray_runtime import kill_instances

        if self._watchdog is not None:
            self._watchdog.stop()  # the scheduler is stopped on purpose: not restarted
            self._watchdog = None
        try:
            self._down_until = float("-inf")
            self._invoke("stop", (terminate_instances,), {})
        except SchedulerUnavailableError:
            kill_instances(self.namespace)  # nobody else will stop them (they are detached)
        finally:
            if self.actor is not None:
                ray.kill(self.actor)
