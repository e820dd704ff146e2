"""The Python library API: start or attach to a cluster, submit, stream, abort, inspect.

    cluster = Cluster.start(ClusterConfig(num_instances=2, runtime="local"))
    handle = cluster.submit(cluster.tokenizer.encode("Hello"), SamplingParams(max_tokens=16))
    async for event in handle:          # or handle.result() from synchronous code
        print(event.token_ids, event.instance_id)
    cluster.stop()

A frontend (the HTTP server, or your code) owns a ``Cluster``: it dispatches each
request through the global scheduler, sends it to the chosen llumlet, and
reassembles the tokens that arrive from whichever instance holds the request,
dropping duplicates and reordering by position across migrations.

The cluster is composed of three parts: the frontend's ``RequestTable`` (active
requests, their ordered streams), a ``Supervisor`` (faults, leases; its own thread)
and, on Ray, a ``TokenReceiver`` (the socket llumlets push tokens to). Tokenizer,
detokenizer and context limit come from the engine kind (``frontend_info``).

Faults (``llumnix_py.frontend.supervision``: a supervisor thread, started with the
cluster, every ``Supervisor.interval_s``):

- an instance dies: the scheduler removes it and lists it in ``membership()["dead"]``;
  each request whose owner (the last instance that sent it tokens, or its dispatch
  target) died is resumed on a live instance by recomputation from its prompt and
  the tokens already delivered, so its stream goes on with nothing lost or repeated.
  With no instance left, the request ends with ``error`` set (``RequestFailedError``
  from ``result()``).
- the scheduler is unreachable (Ray): the frontend dispatches on its own from the
  last load snapshots it saw, polls the llumlets itself, and keeps serving; the
  frontend that started the deployment restarts the scheduler (its control plane's
  watchdog; ``restart_scheduler`` by hand), which attaches the running instances and
  launches the missing ones. Meanwhile ``state()`` answers from the last-known view
  (``stale``) and ``health()`` says ``degraded``.
- an instance dies: the scheduler launches a replacement to keep the configured count.
- the frontend dies: it renews a lease on every instance (``renew_lease``) about
  every second; llumlets abort the requests of a frontend whose lease lapsed.

``RequestHandle``, ``TokenEvent``, ``NoInstanceError`` and ``RequestFailedError`` live in
``llumnix_py.frontend.handles``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import Any, Optional, Sequence

from llumnix_py.config import ClusterConfig
from llumnix_py.engines.jit_batch import with_objective
from llumnix_py.engines.registry import frontend_info
from llumnix_py.engines.threads import ThreadClaim, claim_process_threads
from llumnix_py.engines.tokenizer import FrontendInfo, IncrementalDecoder
from llumnix_py.engines.types import FinishReason, Objective, Request, RequestOutput, SamplingParams
from llumnix_py.errors import InvalidRequestError, SchedulerUnavailableError, UnknownRequestError
from llumnix_py.frontend.handles import NoInstanceError, RequestHandle
from llumnix_py.frontend.health import Health, HealthView, assess
from llumnix_py.frontend.receiver import TokenReceiver
from llumnix_py.frontend.requests import RequestTable
from llumnix_py.frontend.supervision import Supervisor
from llumnix_py.instance import InstanceDiedError
from llumnix_py.load import RequestLoad
from llumnix_py.runtime.control import ControlPlane, LocalControlPlane, RayControlPlane
from llumnix_py.scheduler.frontends import FrontendRecord
from llumnix_py.tokens import CallbackSink
from policies.roles import parse_role

log = logging.getLogger(__name__)


class Cluster:
    """A running llumnix-py deployment, seen from a frontend.

    Attributes:
        requests: this frontend's active requests (``RequestTable``).
        supervisor: its fault supervision (``Supervisor``; ``supervise_once``,
            ``start_supervisor`` and ``stop_supervisor`` here drive it).
        reply_to: the address llumlets send this frontend's tokens to (also its id in the
            scheduler's list of frontends).
        api_url: where this frontend's HTTP API listens, as reported to the scheduler
            ("" until ``advertise``).
        misrouted: outputs an instance sent to another frontend's address (in-process runtime).
    """

    def __init__(self, config: ClusterConfig, control: ControlPlane, info: FrontendInfo, *, reply_to: str = "",
                 receiver: Optional[TokenReceiver] = None) -> None:
        self.config = config
        self.control = control
        self.info = info  # the engine kind's tokenizer, detokenizer and context limit
        self.tokenizer = info.tokenizer
        self.max_model_len = info.max_model_len
        self.model_name = config.model_name
        self._receiver = receiver
        self.reply_to = receiver.address if receiver else reply_to
        self.requests = RequestTable()
        self.api_url = ""
        self.supervisor = Supervisor(control, self.requests, reply_to=self.reply_to,
                                     lease_timeout_s=config.llumlet.lease_timeout_s,
                                     block_size=config.engine.engine.block_size,
                                     presence=self.presence)
        self.misrouted = 0
        self._last_state: Optional[tuple[float, dict[str, Any]]] = None  # (when, the scheduler's last state)
        policy = config.scheduler.policy
        self._configured = policy.min_instances if config.scheduler.enable_scaling else config.num_instances
        self._threads = ThreadClaim(None)  # the process's torch threads, held by a local cluster

    # ----- construction ----------------------------------------------------------------
    @classmethod
    def start(cls, config: ClusterConfig, **ray_init_kw: Any) -> "Cluster":
        """Start a deployment: the scheduler and ``config.num_instances`` instances."""
        info = frontend_info(config.engine)
        if config.runtime == "local":
            from llumnix_py.runtime.local import LocalLauncher
            from llumnix_py.scheduler.daemon import SchedulerDaemon

            holder: dict[str, Cluster] = {}
            address = f"local://frontend-{uuid.uuid4().hex[:8]}"

            def deliver(iid: str, reply_to: str, outs: Sequence[RequestOutput]) -> None:
                # Honour reply_to exactly as the ZeroMQ path does, so routing bugs show up in-process too.
                if reply_to == address:
                    holder["c"].on_outputs(iid, outs)
                else:
                    holder["c"].misrouted += len(outs)

            sink = lambda: CallbackSink(deliver)  # noqa: E731
            daemon = SchedulerDaemon(config.scheduler, LocalLauncher(config.engine, config.llumlet, sink),
                                     seed=config.seed)
            cluster = cls(config, LocalControlPlane(daemon), info, reply_to=address)
            holder["c"] = cluster
            # Every instance runs in this process: one torch thread count for all of them, until stop.
            cluster._threads = claim_process_threads(config.engine.num_threads, "this local cluster")
            try:
                daemon.launch(config.num_instances)
                daemon.keep(config.num_instances)
                daemon.start()
            except BaseException:
                daemon.stop()
                cluster._threads.release()
                raise
            cluster.start_supervisor()
            return cluster
        from llumnix_py.runtime import ray_runtime

        ray_runtime.init_ray(config.ray_address, config.ray_namespace, **ray_init_kw)
        actor = ray_runtime.start_scheduler(config)
        return cls._with_receiver(config, RayControlPlane(actor, config), info)

    @classmethod
    def attach(cls, config: ClusterConfig, **ray_init_kw: Any) -> "Cluster":
        """A new frontend for a running Ray deployment (its scheduler actor by name)."""
        from llumnix_py.runtime import ray_runtime

        ray_runtime.init_ray(config.ray_address, config.ray_namespace, **ray_init_kw)
        actor = ray_runtime.get_scheduler(config.ray_namespace)
        info = frontend_info(config.engine)
        return cls._with_receiver(config, RayControlPlane(actor, config, owner=False), info)

    @classmethod
    def _with_receiver(cls, config, control, info) -> "Cluster":
        holder: dict[str, Cluster] = {}
        receiver = TokenReceiver(lambda iid, outs: holder["c"].on_outputs(iid, outs), host=config.host,
                                 secret=config.secret)
        receiver.start()
        cluster = cls(config, control, info, receiver=receiver)
        holder["c"] = cluster
        control.start()
        cluster.start_supervisor()
        return cluster

    def stop(self) -> None:
        """Stop the deployment (when this frontend started it) and the token receiver."""
        self.stop_supervisor()
        try:
            self.control.frontend_left(self.reply_to)
        except Exception as exc:  # the scheduler is gone: it forgets this frontend by itself
            log.debug("could not tell the scheduler this frontend left: %s", exc)
        try:
            self.control.stop()
        finally:
            self._threads.release()
        if self._receiver is not None:
            self._receiver.stop()

    def presence(self) -> FrontendRecord:
        """This frontend as the scheduler lists it."""
        return FrontendRecord(frontend_id=self.reply_to, api_url=self.api_url, host=socket.gethostname(),
                              pid=os.getpid(), active_requests=len(self.requests))

    def advertise(self, api_url: str) -> None:
        """Report ``api_url`` as where this frontend's API listens, to the scheduler at once
        (then with every heartbeat)."""
        self.api_url = api_url
        self.supervisor.report_presence()

    def start_supervisor(self) -> None:
        """Start watching for dead instances and renewing this frontend's leases."""
        self.supervisor.start()

    def stop_supervisor(self) -> None:
        """Stop it (``stop`` does; tests also use it to play a frontend that died)."""
        self.supervisor.stop()

    def supervise_once(self) -> None:
        """One round: learn dead instances, resume their requests, renew leases."""
        self.supervisor.supervise_once()

    def restart_scheduler(self) -> None:
        """Start the global scheduler again if it is gone; it attaches the running instances
        (requests keep running meanwhile). ``llumnix-py scheduler`` run again does the same."""
        self.control.restart_scheduler()

    # ----- requests ----------------------------------------------------------------------
    async def submit_async(self, prompt_token_ids: Sequence[int], sampling: Optional[SamplingParams] = None,
                           priority: int = 0, request_id: Optional[str] = None,
                           objective: Optional[Objective] = None, client_id: str = "",
                           conversation_id: str = "") -> RequestHandle:
        """``submit`` for event-loop code: the dispatch and placement calls (blocking remote
        calls on Ray) run in a worker thread, so a burst of requests is placed concurrently
        and the loop keeps streaming meanwhile. The handle iterates on the caller's loop."""
        loop = asyncio.get_running_loop()
        return await asyncio.to_thread(self.submit, prompt_token_ids, sampling, priority, request_id, loop,
                                       objective, client_id, conversation_id)

    def submit(self, prompt_token_ids: Sequence[int], sampling: Optional[SamplingParams] = None,
               priority: int = 0, request_id: Optional[str] = None,
               loop: Optional[asyncio.AbstractEventLoop] = None,
               objective: Optional[Objective] = None, client_id: str = "",
               conversation_id: str = "") -> RequestHandle:
        """Dispatch a request; raises ``InvalidRequestError`` or ``NoInstanceError``.
        ``client_id`` and ``conversation_id``: see ``Request``.

        The handle's async iteration runs on ``loop`` (default: the running loop, if any);
        ``objective`` (``Objective``, None for none) travels with the request everywhere."""
        sampling = sampling or SamplingParams()
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        prompt = tuple(prompt_token_ids)
        if len(prompt) + 1 > self.max_model_len:
            raise InvalidRequestError(f"prompt of {len(prompt)} tokens leaves no room for output "
                                      f"(max_model_len {self.max_model_len})")
        request = Request(rid, prompt, sampling, priority, time.time(), reply_to=self.reply_to, objective=objective,
                          client_id=client_id, conversation_id=conversation_id)
        block = self.config.engine.engine.block_size
        view = with_objective(RequestLoad.queued(rid, prompt_len=len(prompt), block_size=block, priority=priority,
                                                 arrival_time=request.arrival_time,
                                                 conversation_id=request.conversation_id, client_id=client_id),
                              objective)
        iid = self.control.dispatch(view)
        if iid is None:
            raise NoInstanceError("no instance can take requests")
        handle = RequestHandle(rid, iid, request)
        handle.bind_loop(loop)
        self.requests.add(handle)
        try:
            for _ in range(4):  # the chosen instance may have died since the scheduler last heard of it
                inst = self.control.instance(iid)
                try:
                    if inst is None:
                        raise InstanceDiedError(f"instance {iid} is gone")
                    inst.add_request(request)
                    self.requests.placed(handle)
                    break
                except InstanceDiedError:
                    self.supervisor.mark_dead(iid)
                    iid = self.supervisor.pick_other(view)
                    if iid is None:
                        raise NoInstanceError("no live instance can take requests") from None
                    self.requests.redirect(handle, iid)
            else:
                raise NoInstanceError("no live instance took the request")
        except Exception:
            self.requests.remove(rid)
            raise
        return handle

    def abort(self, request_id: str) -> None:
        """Abort a request wherever it is (broadcast: it may be migrating)."""
        handle = self.requests.remove(request_id)
        if handle is None:
            raise UnknownRequestError(f"request {request_id} is not active")
        for iid in self.control.instance_ids():
            inst = self.control.instance(iid)
            if inst is not None:
                try:
                    inst.abort(request_id)
                except Exception:
                    pass
        self.requests.end(handle, FinishReason.ABORT)

    def on_outputs(self, instance_id: str, outputs: Sequence[RequestOutput]) -> None:
        """Token batches from llumlets (any thread): the token receiver's (or the in-process
        sink's) entry into this frontend."""
        self.requests.on_outputs(instance_id, outputs, sender_dead=self.supervisor.is_dead(instance_id))

    def detokenizer(self) -> IncrementalDecoder:
        """A new incremental detokenizer for one request's tokens (the engine kind's)."""
        return self.info.detokenizer()

    def active_requests(self) -> list[str]:
        return self.requests.ids()

    @property
    def duplicates_dropped(self) -> int:
        """Tokens that arrived twice (a migration or a resume re-sent them) and were dropped."""
        return self.requests.duplicates_dropped

    # ----- state -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Instances (load, freeness), migrations by outcome, downtimes, scale events.

        While the scheduler is unreachable: its last answer, marked ``stale`` (with its age,
        ``stale_s``), less the instances found dead since."""
        try:
            s = self.control.state()
            self._last_state = (time.monotonic(), s)
            s = dict(s, stale=False)
        except SchedulerUnavailableError:
            s = self._stale_state()
        s["active_requests"] = len(self.requests)
        s["duplicates_dropped"] = self.requests.duplicates_dropped
        s["misrouted_outputs"] = self.misrouted
        s["resumed_requests"] = self.supervisor.resumed
        s["failed_requests"] = self.requests.failed
        return s

    def _stale_state(self) -> dict[str, Any]:
        when, last = self._last_state or (None, {"instances": [], "migrations": {}, "migration_downtime_ms": []})
        live = set(self.control.instance_ids())  # the frontend's own view: it polls them meanwhile
        s = dict(last, stale=True, stale_s=None if when is None else time.monotonic() - when)
        s["instances"] = [i for i in last.get("instances", []) if i.get("instance_id") in live]
        return s

    def health(self) -> Health:
        """ok, degraded (the scheduler is down, or fewer instances than configured are live)
        or unavailable (no instance), with the reasons (``llumnix_py.frontend.health``)."""
        try:
            m = self.control.membership()
        except Exception:  # the frontend's own probe failed too
            m = None
        up = self.control.scheduler_up and m is not None
        healing = (m or {}).get("healing") or {}
        if healing.get("target") is not None:
            self._configured = int(healing["target"])
        live = len(m["instances"]) if m else 0
        watchdog = self.control.healing()
        restarts = {"scheduler": watchdog["restarts"] if watchdog else 0, "instance": healing.get("replaced", 0)}
        return assess(HealthView(scheduler_up=up, live=live, configured=self._configured,
                                 scheduler_restart=watchdog["phase"] if watchdog else None,
                                 instance_restart=healing.get("phase"), restarts=restarts))

    def instance_ids(self) -> list[str]:
        return self.control.instance_ids()

    def drain(self, instance_id: str) -> None:
        """Scale in one instance: it migrates its requests away, then stops."""
        self.control.drain(instance_id)

    def launch(self, n: int = 1) -> list[str]:
        """Scale out by hand: start ``n`` more instances; returns their ids."""
        return self.control.launch(n)

    def set_role(self, instance_id: str, role: str) -> None:
        """Flip an instance's role at run time (``prefill``, ``decode`` or ``both``): the
        requests of the phase it no longer runs leave it by migration, nothing is dropped.

        Raises:
            UnknownRoleError: ``role`` is not a role (checked here, before any call).
            UnknownInstanceError: the scheduler does not know ``instance_id``.
        """
        self.control.set_role(instance_id, parse_role(role).value)

