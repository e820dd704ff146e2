"""Ray runtime: each llumlet + engine is a Ray actor; the scheduler daemon is a named actor.

The same ``Llumlet`` and ``SchedulerDaemon`` code as in-process; only the handles
differ. Actors are named (``llumnix-instance-<id>``, ``llumnix-scheduler``) in one
namespace, so frontends and a restarted scheduler find them by name.

Fate sharing: Ray kills the actors an actor created when their creator dies, so
instance actors are always detached: they outlive a killed scheduler, whose
replacement (``restart_scheduler``, or ``llumnix-py scheduler`` run again) attaches
them by name. They are stopped by the scheduler's ``stop`` (``Cluster.stop``), or,
if it is gone, by ``kill_instances``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import ray

from llumnix_py.engines.registry import build_engine
from llumnix_py.engines.threads import apply_process_threads
from llumnix_py.errors import LlumnixError, SchedulerUnavailableError
from llumnix_py.instance import InstanceDiedError, InstanceHandle, InstanceLauncher
from llumnix_py.llumlet import Llumlet
from llumnix_py.proxy import Endpoint, forwards, is_oneway
from llumnix_py.runtime.local import LocalInstance
from llumnix_py.scheduler.api import SchedulerAPI
from llumnix_py.scheduler.daemon import SchedulerDaemon
from llumnix_py.tokens import ZmqTokenSink
from migration.ownership import Owner

if TYPE_CHECKING:
    from llumnix_py.load import InstanceLoad

log = logging.getLogger(__name__)

SCHEDULER_NAME = "llumnix-scheduler"
INSTANCE_PREFIX = "llumnix-instance-"
CALL_TIMEOUT_S = 30.0


def _unwrap(exc: Exception) -> Exception:
    """The llumnix-py error inside a Ray task error, if there is one."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, LlumnixError) else exc


def actor_died(exc: BaseException) -> bool:
    """The actor is gone for good (killed, crashed), not just slow or briefly unreachable."""
    return isinstance(exc, ray.exceptions.RayActorError) and not isinstance(exc, ray.exceptions.ActorUnavailableError)


class LlumletActor:
    """A llumlet and its engine in one Ray worker process.

    Serves ``InstanceHandle`` through one generic ``call`` (the method table of
    ``llumnix_py.proxy``) on a ``LocalInstance``, so the calls run the same code as
    in-process; ``start`` and ``address`` are the actor's own lifecycle.
    """

    def __init__(self, config) -> None:  # config: ClusterConfig-like with .engine and .llumlet
        self._engine_spec = config.engine
        self._llumlet_cfg = config.llumlet
        self._namespace = config.ray_namespace
        self._endpoint: Optional[Endpoint] = None

    def start(self, instance_id: str) -> tuple[str, str]:
        """Build and start the llumlet; its migration address and incarnation."""
        cfg = dataclasses.replace(self._llumlet_cfg, instance_id=instance_id)
        if cfg.gil_switch_interval_s:
            sys.setswitchinterval(cfg.gil_switch_interval_s)  # this worker process runs one llumlet
        apply_process_threads(self._engine_spec.num_threads)  # ... so its torch threads are the instance's
        llumlet = Llumlet(cfg, build_engine(self._engine_spec), ZmqTokenSink(secret=self._llumlet_cfg.secret),
                          ownership=SchedulerOwnership(self._namespace))
        address = llumlet.start()
        self._endpoint = Endpoint(InstanceHandle, LocalInstance(llumlet))
        return address, llumlet.incarnation

    def identity(self) -> tuple[str, str]:
        """The migration address and the incarnation (empty until started)."""
        target = self._endpoint.target if self._endpoint else None
        return (target.address, target.incarnation) if target else ("", "")

    def call(self, method: str, args: Sequence[Any] = (), kwargs: Optional[Mapping[str, Any]] = None) -> Any:
        if self._endpoint is None:
            raise LlumnixError("the instance is not started")
        return self._endpoint.call(method, args, kwargs)


class SchedulerOwnership:
    """The ownership arbiter as a llumlet actor reaches it: ``claim_ownership`` on the named
    scheduler actor (looked up per claim, so a restarted scheduler is found); raises when
    it does not answer within ``timeout_s`` (the llumlet then stays put and retries)."""

    timeout_s = 5.0

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    def __call__(self, migration_id: str, side: Owner) -> Owner:
        actor = ray.get_actor(SCHEDULER_NAME, namespace=self.namespace)
        ref = actor.call.remote("claim_ownership", (migration_id, Owner(side).value), {})
        return Owner(ray.get(ref, timeout=self.timeout_s))


@forwards(InstanceHandle)
class RayInstance(InstanceHandle):
    """A ``LlumletActor`` seen through blocking calls: every method of ``InstanceHandle``
    is one ``call`` on the actor, with the llumnix-py error unwrapped, a timeout, and
    ``InstanceDiedError`` once the actor is gone. ``oneway`` methods do not wait."""

    def __init__(self, instance_id: str, address: str, incarnation: str, actor) -> None:
        self.instance_id = instance_id
        self.address = address
        self.incarnation = incarnation
        self.actor = actor

    def _invoke(self, method: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        ref = self.actor.call.remote(method, tuple(args), dict(kwargs))
        if is_oneway(InstanceHandle, method):
            return None
        try:
            return ray.get(ref, timeout=CALL_TIMEOUT_S)
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc) from None
        except ray.exceptions.RayActorError as exc:
            if actor_died(exc):
                raise InstanceDiedError(f"instance {self.instance_id} died: {type(exc).__name__}") from None
            raise

    def stop(self) -> None:
        try:
            self._invoke("stop", (), {})
        finally:
            ray.kill(self.actor)


# Ray starts worker processes at niceness 15, so that they yield the CPU to its own daemons and
# to anything else on the node. An engine instance and the global scheduler are the serving path,
# not background work: they run at the driver's priority (Ray's job supervisor does the same).
SERVING_RUNTIME_ENV: dict[str, Any] = {"env_vars": {"RAY_worker_niceness": "0"}}


class RayLauncher(InstanceLauncher):
    def __init__(self, config) -> None:
        self.config = config

    def launch(self, instance_id: str) -> InstanceHandle:
        # Always detached: an actor created by the scheduler actor would die with it.
        opts: dict[str, Any] = dict(name=INSTANCE_PREFIX + instance_id, namespace=self.config.ray_namespace,
                                    num_cpus=0, max_concurrency=16, lifetime="detached",
                                    runtime_env=SERVING_RUNTIME_ENV)
        actor = ray.remote(LlumletActor).options(**opts).remote(self.config)
        address, incarnation = ray.get(actor.start.remote(instance_id), timeout=120)
        return RayInstance(instance_id, address, incarnation, actor)

    def terminate(self, handle: InstanceHandle) -> None:
        handle.stop()

    def fence(self, handle: InstanceHandle) -> None:
        if isinstance(handle, RayInstance):
            ray.kill(handle.actor, no_restart=True)

    def attach(self, instance_id: str) -> Optional[InstanceHandle]:
        try:
            actor = ray.get_actor(INSTANCE_PREFIX + instance_id, namespace=self.config.ray_namespace)
            address, incarnation = ray.get(actor.identity.remote(), timeout=CALL_TIMEOUT_S)
        except Exception:
            return None
        return RayInstance(instance_id, address, incarnation, actor) if address else None


class SchedulerActor:
    """The global scheduler daemon as a named Ray actor.

    Serves ``SchedulerAPI`` on the daemon through one generic ``call``; ``start`` and
    ``ping`` are the actor's own lifecycle.
    """

    def __init__(self, config) -> None:
        self.config = config
        self.daemon = SchedulerDaemon(config.scheduler, RayLauncher(config), seed=config.seed)
        self._endpoint = Endpoint(SchedulerAPI, self.daemon)
        self._ready = False  # start() has attached and launched every instance

    def start(self, num_instances: int, launch_missing: bool = True) -> list[str]:
        """Attach the running instances, launch the missing ones up to ``num_instances``
        (or, with ``launch_missing`` False, leave that to the daemon's replenisher, in the
        background: a restart answers sooner), and hold that count from now on."""
        self._attach_existing()
        if launch_missing:
            self.daemon.launch(max(0, num_instances - len(self.daemon.handles)))
        self.daemon.keep(num_instances)
        self.daemon.start()
        self._ready = True
        return self.daemon.instance_ids()

    def _attach_existing(self) -> None:
        """A restarted scheduler rebuilds its instance table from the named llumlet actors."""
        names = instance_actor_names(self.config.ray_namespace)
        launcher = self.daemon.launcher
        for name in sorted(names):
            handle = launcher.attach(name[len(INSTANCE_PREFIX):])
            if handle is None:
                if _half_launched(name, self.config.ray_namespace):  # by the scheduler that died: nobody
                    _kill_named(name, self.config.ray_namespace)     # else would ever start or stop it
                continue
            try:
                self.daemon.add_instance(handle)
            except Exception as exc:  # died meanwhile: leave it out
                log.warning("could not attach %s: %s", handle.instance_id, exc)
                continue
            suffix = handle.instance_id.rsplit("-", 1)[-1]
            n = int(suffix) if suffix.isdigit() else 0
            self.daemon._next_id = max(self.daemon._next_id, n + 1)

    def call(self, method: str, args: Sequence[Any] = (), kwargs: Optional[Mapping[str, Any]] = None) -> Any:
        if not self._ready:  # until ``start`` is done: a partial instance table would look like deaths
            if method == "membership":
                return None
            if method != "stop":  # and dispatching over it would refuse requests: the frontend falls back
                raise SchedulerUnavailableError("the scheduler is starting")
        return self._endpoint.call(method, args, kwargs)

    def ping(self) -> str:
        return "pong"


def init_ray(address: Optional[str], namespace: str, **kw: Any) -> None:
    """Join ``address`` or start a local Ray (idempotent)."""
    if not ray.is_initialized():
        ray.init(address=address, namespace=namespace, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True, **kw)


_STOPPED_KEY = b"llumnix-py/stopped-on-purpose"


def mark_stopped(namespace: str, stopped: bool = True) -> None:
    """Record in the Ray cluster (its internal key-value store) that the daemon of ``namespace``
    was stopped on purpose (``llumnix-py scheduler --stop``), so no watchdog restarts it;
    a new start clears it."""
    from ray.experimental import internal_kv

    if stopped:
        internal_kv._internal_kv_put(_STOPPED_KEY, b"1", namespace=namespace)
    else:
        internal_kv._internal_kv_del(_STOPPED_KEY, namespace=namespace)


def stopped_on_purpose(namespace: str) -> bool:
    from ray.experimental import internal_kv

    return bool(internal_kv._internal_kv_exists(_STOPPED_KEY, namespace=namespace))


def start_scheduler(config) -> Any:
    """Create the named scheduler actor and its instances (attaching running ones); returns the actor."""
    mark_stopped(config.ray_namespace, False)
    actor = ray.remote(SchedulerActor).options(**_scheduler_options(config)).remote(config)
    ray.get(actor.start.remote(config.num_instances), timeout=300)
    return actor


def get_scheduler(namespace: str) -> Any:
    return ray.get_actor(SCHEDULER_NAME, namespace=namespace)


def scheduler_alive(namespace: str, timeout_s: float = 5.0) -> bool:
    """The named scheduler actor exists and has not died (a slow answer counts as alive)."""
    try:
        actor = get_scheduler(namespace)
    except ValueError:
        return False
    try:
        ray.get(actor.ping.remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        return True
    except ray.exceptions.RayActorError as exc:
        return not actor_died(exc)
    return True


def restart_scheduler(config, timeout_s: float = 60.0) -> Any:
    """The scheduler actor, created again if it is gone; it attaches the running instances
    by name and answers at once (the missing ones, up to ``config.num_instances``, are
    launched in the background by its replenisher). Returns the actor handle."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            actor = get_scheduler(config.ray_namespace)
        except ValueError:
            actor = None
        if actor is not None:
            try:
                ray.get(actor.ping.remote(), timeout=5)
                return actor  # alive: nothing to restart
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass  # dead, its name not released yet
        else:
            try:
                actor = ray.remote(SchedulerActor).options(**_scheduler_options(config)).remote(config)
                ray.get(actor.start.remote(config.num_instances, False), timeout=300)
                return actor
            except ValueError:  # the old one's name is still taken
                pass
        if time.monotonic() > deadline:
            raise LlumnixError(f"could not restart the scheduler within {timeout_s} s")
        time.sleep(0.2)


def _scheduler_options(config) -> dict[str, Any]:
    opts: dict[str, Any] = dict(name=SCHEDULER_NAME, namespace=config.ray_namespace, num_cpus=0,
                                max_concurrency=32, runtime_env=SERVING_RUNTIME_ENV)
    if config.detached:
        opts["lifetime"] = "detached"
    return opts


def instance_actor_names(namespace: str) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a.get("namespace") == namespace and a["name"].startswith(INSTANCE_PREFIX))


def kill_instances(namespace: str) -> None:
    """Kill every instance actor of ``namespace`` (when their scheduler cannot stop them)."""
    for name in instance_actor_names(namespace):
        _kill_named(name, namespace)


def _half_launched(name: str, namespace: str) -> bool:
    """The named instance actor answers but was never started (its launcher died)."""
    try:
        return ray.get(ray.get_actor(name, namespace=namespace).identity.remote(), timeout=CALL_TIMEOUT_S)[0] == ""
    except Exception:  # gone, or not answering: leave it to the heartbeat of whoever holds it
        return False


def _kill_named(name: str, namespace: str) -> None:
    try:
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    except ValueError:  # gone already
        pass


def probe_loads(handles: Sequence["RayInstance"], timeout_s: float) -> tuple[dict[str, InstanceLoad], list[str]]:
    """Poll instances' loads concurrently: (loads of those that answered, ids of those that died)."""
    refs = {h.actor.call.remote("load"): h.instance_id for h in handles}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    loads, died = {}, []
    for ref in ready:
        try:
            loads[refs[ref]] = ray.get(ref)
        except ray.exceptions.RayError as exc:
            if actor_died(exc):
                died.append(refs[ref])
    return loads, died
