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

Faults (``llumnix_py.supervision``: a supervisor thread, started with the cluster, every
``supervise_interval_s``):

- an instance dies: the scheduler removes it and lists it in ``membership()["dead"]``;
  each request whose owner (the last instance that sent it tokens, or its dispatch
  target) died is resumed on a live instance by recomputation from its prompt and
  the tokens already delivered, so its stream goes on with nothing lost or repeated.
  With no instance left, the request ends with ``error`` set (``RequestFailedError``
  from ``result()``).
- the scheduler is unreachable (Ray): the frontend dispatches on its own from the
  last load snapshots it saw, polls the llumlets itself, and keeps serving; a
  restarted scheduler (``restart_scheduler``) attaches the running instances.
- the frontend dies: it renews a lease on every instance (``renew_lease``) about
  every second; llumlets abort the requests of a frontend whose lease lapsed.

``RequestHandle``, ``TokenEvent``, ``NoInstanceError`` and ``RequestFailedError`` live in
``llumnix_py.handles`` and are importable from here too.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from typing import Any, Optional, Sequence

from llumnix_py.config import ClusterConfig
from llumnix_py.engines.registry import frontend_info
from llumnix_py.engines.threads import ThreadClaim, claim_process_threads
from llumnix_py.engines.tokenizer import FrontendInfo, IncrementalDecoder
from llumnix_py.engines.types import FinishReason, Request, RequestOutput, SamplingParams
from llumnix_py.errors import InvalidRequestError, UnknownRequestError
from llumnix_py.handles import RequestFailedError  # noqa: F401  (re-exported: part of this module's API)
from llumnix_py.handles import NoInstanceError, RequestHandle, TokenEvent, _put_all
from llumnix_py.instance import InstanceDiedError
from llumnix_py.load import RequestLoad
from llumnix_py.runtime.control import ControlPlane, LocalControlPlane, RayControlPlane
from llumnix_py.supervision import FaultSupervision
from llumnix_py.tokens import CallbackSink, TokenReceiver


class Cluster(FaultSupervision):
    """A running llumnix-py deployment, seen from a frontend.

    Fault supervision (``supervise_once``, ``start_supervisor``, ``stop_supervisor`` and the
    ``supervise_interval_s`` / ``census_*`` settings) comes from ``FaultSupervision``.
    """

    def __init__(self, config: ClusterConfig, control: ControlPlane, info: FrontendInfo,
                 receiver: Optional[TokenReceiver] = None) -> None:
        self.config = config
        self.control = control
        self.info = info  # the engine kind's tokenizer, detokenizer and context limit
        self.tokenizer = info.tokenizer
        self.max_model_len = info.max_model_len
        self.model_name = config.model_name
        self._receiver = receiver
        self.reply_to = receiver.address if receiver else ""
        self._handles: dict[str, RequestHandle] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.duplicates_dropped = 0
        self.misrouted = 0  # outputs an instance sent to another frontend address (in-process runtime)
        self.resumed = 0  # requests resumed on another instance after theirs died
        self.failed = 0  # requests ended with an error
        self._threads = ThreadClaim(None)  # the process's torch threads, held by a local cluster
        self._init_supervision()

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
            cluster = cls(config, LocalControlPlane(daemon), info)
            cluster.reply_to = address
            holder["c"] = cluster
            # Every instance runs in this process: one torch thread count for all of them, until stop.
            cluster._threads = claim_process_threads(config.engine.num_threads, "this local cluster")
            try:
                daemon.launch(config.num_instances)
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
        cluster = cls(config, control, info, receiver)
        holder["c"] = cluster
        cluster.start_supervisor()
        return cluster

    def stop(self) -> None:
        """Stop the deployment (when this frontend started it) and the token receiver."""
        self.stop_supervisor()
        try:
            self.control.stop()
        finally:
            self._threads.release()
        if self._receiver is not None:
            self._receiver.stop()


    def restart_scheduler(self) -> None:
        """Start the global scheduler again if it is gone; it attaches the running instances
        (requests keep running meanwhile). ``llumnix-py scheduler`` run again does the same."""
        self.control.restart_scheduler()

    # ----- requests ----------------------------------------------------------------------
    async def submit_async(self, prompt_token_ids: Sequence[int], sampling: Optional[SamplingParams] = None,
                           priority: int = 0, request_id: Optional[str] = None) -> RequestHandle:
        """``submit`` for event-loop code: the dispatch and placement calls (blocking remote
        calls on Ray) run in a worker thread, so a burst of requests is placed concurrently
        and the loop keeps streaming meanwhile. The handle iterates on the caller's loop."""
        loop = asyncio.get_running_loop()
        return await asyncio.to_thread(self.submit, prompt_token_ids, sampling, priority, request_id, loop)

    def submit(self, prompt_token_ids: Sequence[int], sampling: Optional[SamplingParams] = None,
               priority: int = 0, request_id: Optional[str] = None,
               loop: Optional[asyncio.AbstractEventLoop] = None) -> RequestHandle:
        """Dispatch a request; raises ``InvalidRequestError`` or ``NoInstanceError``.

        The handle's async iteration runs on ``loop`` (default: the running loop, if any)."""
        sampling = sampling or SamplingParams()
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        prompt = tuple(prompt_token_ids)
        if len(prompt) + 1 > self.max_model_len:
            raise InvalidRequestError(f"prompt of {len(prompt)} tokens leaves no room for output "
                                      f"(max_model_len {self.max_model_len})")
        request = Request(rid, prompt, sampling, priority, time.time(), reply_to=self.reply_to)
        block = self.config.engine.engine.block_size
        view = RequestLoad.queued(rid, prompt_len=len(prompt), block_size=block, priority=priority,
                                  arrival_time=request.arrival_time)
        iid = self.control.dispatch(view)
        if iid is None:
            raise NoInstanceError("no instance can take requests")
        handle = RequestHandle(self, rid, iid, request)
        handle._bind_loop(loop)
        with self._lock:
            if rid in self._handles:
                raise InvalidRequestError(f"request id {rid} is in use")
            self._handles[rid] = handle
        try:
            for _ in range(4):  # the chosen instance may have died since the scheduler last heard of it
                inst = self.control.instance(iid)
                try:
                    if inst is None:
                        raise InstanceDiedError(f"instance {iid} is gone")
                    inst.add_request(request)
                    with self._lock:
                        handle.placed = True
                    break
                except InstanceDiedError:
                    self._mark_dead(iid)
                    iid = self._pick_other(view, exclude=self._dead)
                    if iid is None:
                        raise NoInstanceError("no live instance can take requests") from None
                    with self._lock:
                        handle.instance_id = handle.stream.owner = iid
                        handle.instances_seen = [iid]
            else:
                raise NoInstanceError("no live instance took the request")
        except Exception:
            with self._lock:
                self._handles.pop(rid, None)
            raise
        return handle

    def abort(self, request_id: str) -> None:
        """Abort a request wherever it is (broadcast: it may be migrating)."""
        with self._lock:
            handle = self._handles.pop(request_id, None)
        if handle is None:
            raise UnknownRequestError(f"request {request_id} is not active")
        for iid in self.control.instance_ids():
            inst = self.control.instance(iid)
            if inst is not None:
                try:
                    inst.abort(request_id)
                except Exception:
                    pass
        if not handle.finished:
            handle.finish_reason = FinishReason.ABORT
            handle._deliver(TokenEvent(request_id, (), handle.stream.next_index, handle.stream.owner,
                                       FinishReason.ABORT))

    def on_outputs(self, instance_id: str, outputs: Sequence[RequestOutput]) -> None:
        """Token batches from llumlets (any thread). Events for consumers on one event loop
        are handed over in one call per batch, not one wake-up per request."""
        now = time.monotonic()
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, TokenEvent]]] = {}
        for out in outputs:
            with self._lock:
                handle = self._handles.get(out.request_id)
                if handle is None:
                    continue
                before = handle.stream.duplicates
                owner = handle.stream.owner
                ready, done = handle.stream.push(instance_id, out)
                if instance_id in self._dead:  # late tokens of a dead instance: welcome, but it owns nothing
                    handle.stream.owner = owner
                self.duplicates_dropped += handle.stream.duplicates - before
                if instance_id != handle.instances_seen[-1]:
                    handle.instances_seen.append(instance_id)
                if not ready and not done:
                    continue
                index = handle.stream.next_index - len(ready)
                handle.token_ids.extend(ready)
                if ready and handle.first_token_at is None:
                    handle.first_token_at = now
                reason = handle.stream.finish_reason if done else None
                if done:
                    handle.finish_reason = reason
                    handle.finished_at = now
                    self._handles.pop(out.request_id, None)
            ev = TokenEvent(out.request_id, tuple(ready), index, instance_id, reason)
            if handle._loop is not None and handle._aq is not None:
                batches.setdefault(handle._loop, []).append((handle._aq, ev))
            else:
                handle._q.put(ev)
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def detokenizer(self) -> IncrementalDecoder:
        """A new incremental detokenizer for one request's tokens (the engine kind's)."""
        return self.info.detokenizer()

    def active_requests(self) -> list[str]:
        with self._lock:
            return list(self._handles)

    # ----- state -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Instances (load, freeness), migrations by outcome, downtimes, scale events."""
        s = self.control.state()
        s["active_requests"] = len(self._handles)
        s["duplicates_dropped"] = self.duplicates_dropped
        s["misrouted_outputs"] = self.misrouted
        s["resumed_requests"] = self.resumed
        s["failed_requests"] = self.failed
        return s

    def instance_ids(self) -> list[str]:
        return self.control.instance_ids()

    def drain(self, instance_id: str) -> None:
        """Scale in one instance: it migrates its requests away, then stops."""
        self.control.drain(instance_id)

    def launch(self, n: int = 1) -> list[str]:
        """Scale out by hand: start ``n`` more instances; returns their ids."""
        return self.control.launch(n)

