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

Faults (a supervisor thread, started with the cluster, every ``supervise_interval_s``):

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
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Sequence

from llumnix_py.config import ClusterConfig
from llumnix_py.engines.types import (FinishReason, MigrationRequestState, Request, RequestOutput, SamplingParams,
                                      SeqStatus)
from llumnix_py.errors import InvalidRequestError, LlumnixError, UnknownRequestError
from llumnix_py.runtime.base import InstanceDiedError
from llumnix_py.runtime.control import ControlPlane, LocalControlPlane, RayControlPlane
from llumnix_py.tokens import CallbackSink, OrderedStream, TokenReceiver
from policies.types import RequestView

log = logging.getLogger(__name__)


class NoInstanceError(LlumnixError):
    """No instance can take a request (none running, or all terminating)."""


class RequestFailedError(LlumnixError):
    """A request ended with an error (its instance died and no other could continue it)."""


@dataclass(frozen=True)
class TokenEvent:
    """Tokens of one request that became deliverable, in order."""

    request_id: str
    token_ids: tuple[int, ...]
    index: int  # output position of token_ids[0]
    instance_id: str  # the instance that sent them
    finish_reason: Optional[FinishReason] = None
    error: Optional[str] = None  # set (with finish_reason ABORT) when the request failed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestHandle:
    """One submitted request: iterate its ``TokenEvent``s (async) or wait for ``result``."""

    def __init__(self, cluster: "Cluster", request_id: str, instance_id: str,
                 request: Optional[Request] = None) -> None:
        self.cluster = cluster
        self.request = request  # kept to resume it elsewhere if its instance dies
        self.request_id = request_id
        self.instance_id = instance_id  # where it was dispatched
        self.stream = OrderedStream(owner=instance_id)
        self.submitted_at = time.monotonic()
        self.first_token_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self.instances_seen: list[str] = [instance_id]
        self._q: "queue.SimpleQueue[TokenEvent]" = queue.SimpleQueue()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._aq: Optional[asyncio.Queue] = None
        self.token_ids: list[int] = []
        self.finish_reason: Optional[FinishReason] = None
        self.error: Optional[str] = None
        self.resumes = 0  # times it was resumed by recomputation after its instance died
        self.placed = False  # an instance accepted it (before that, submit handles faults itself)

    def _bind_loop(self, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._loop = None
                return
        self._loop = loop
        self._aq = asyncio.Queue()  # binds to the loop at first use, so it may be made in any thread

    def _deliver(self, ev: TokenEvent) -> None:
        if self._loop is not None and self._aq is not None:
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, ev)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        else:
            self._q.put(ev)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[TokenEvent]:
        if self._aq is None:
            raise RuntimeError("submit() the request from a running event loop to iterate it asynchronously")
        while True:
            ev = await self._aq.get()
            yield ev
            if ev.finished:
                return

    def events(self, timeout: Optional[float] = None):
        """Synchronous iteration (for requests submitted outside an event loop)."""
        while True:
            ev = self._q.get(timeout=timeout)
            yield ev
            if ev.finished:
                return

    def result(self, timeout: Optional[float] = 60.0) -> list[int]:
        """Block until the request finishes; returns all its tokens.

        Raises ``RequestFailedError`` if it ended with an error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                self._q.get(timeout=left)
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s") from None
        if self.error is not None:
            raise RequestFailedError(f"request {self.request_id} failed: {self.error}")
        return list(self.token_ids)


class Cluster:
    """A running llumnix-py deployment, seen from a frontend."""

    supervise_interval_s = 0.1  # membership checks (dead instances) and lease renewals
    census_window_s = 3.0  # after a death, look for requests no live instance holds for this long
    census_confirm_s = 0.3  # ... and resume one missing from two censuses this far apart

    def __init__(self, config: ClusterConfig, control: ControlPlane, tokenizer, max_model_len: int,
                 receiver: Optional[TokenReceiver] = None) -> None:
        self.config = config
        self.control = control
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
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
        self._dead: set[str] = set()  # instances known dead
        self._supervisor: Optional[threading.Thread] = None
        self._stop_supervisor = threading.Event()
        self._last_lease = float("-inf")
        self._dead_seen = 0
        self._members: set[str] = set()  # live instances in the last membership
        self._census_until = float("-inf")
        self._suspects: dict[str, float] = {}  # request id -> first census that missed it

    # ----- construction ----------------------------------------------------------------
    @classmethod
    def start(cls, config: ClusterConfig, **ray_init_kw: Any) -> "Cluster":
        """Start a deployment: the scheduler and ``config.num_instances`` instances."""
        tokenizer, max_len = _frontend_model_info(config)
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
            cluster = cls(config, LocalControlPlane(daemon), tokenizer, max_len)
            cluster.reply_to = address
            holder["c"] = cluster
            daemon.launch(config.num_instances)
            daemon.start()
            cluster.start_supervisor()
            return cluster
        from llumnix_py.runtime import ray_runtime

        ray_runtime.init_ray(config.ray_address, config.ray_namespace, **ray_init_kw)
        actor = ray_runtime.start_scheduler(config)
        return cls._with_receiver(config, RayControlPlane(actor, config), tokenizer, max_len)

    @classmethod
    def attach(cls, config: ClusterConfig, **ray_init_kw: Any) -> "Cluster":
        """A new frontend for a running Ray deployment (its scheduler actor by name)."""
        from llumnix_py.runtime import ray_runtime

        ray_runtime.init_ray(config.ray_address, config.ray_namespace, **ray_init_kw)
        actor = ray_runtime.get_scheduler(config.ray_namespace)
        tokenizer, max_len = _frontend_model_info(config)
        return cls._with_receiver(config, RayControlPlane(actor, config, owner=False), tokenizer, max_len)

    @classmethod
    def _with_receiver(cls, config, control, tokenizer, max_len) -> "Cluster":
        holder: dict[str, Cluster] = {}
        receiver = TokenReceiver(lambda iid, outs: holder["c"].on_outputs(iid, outs), host=config.host,
                                 secret=config.secret)
        receiver.start()
        cluster = cls(config, control, tokenizer, max_len, receiver)
        holder["c"] = cluster
        cluster.start_supervisor()
        return cluster

    def stop(self) -> None:
        """Stop the deployment (when this frontend started it) and the token receiver."""
        self.stop_supervisor()
        self.control.stop()
        if self._receiver is not None:
            self._receiver.stop()

    def start_supervisor(self) -> None:
        """Start watching for dead instances and renewing this frontend's leases."""
        if self._supervisor is not None:
            return
        self._stop_supervisor.clear()
        self._supervisor = threading.Thread(target=self._supervise, name="frontend-supervisor", daemon=True)
        self._supervisor.start()

    def stop_supervisor(self) -> None:
        """Stop it (``stop`` does; tests also use it to play a frontend that died)."""
        self._stop_supervisor.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=10)
        self._supervisor = None

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
        view = RequestView(rid, 0, -(-len(prompt) // block), priority, request.arrival_time, len(prompt), 0)
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

    def active_requests(self) -> list[str]:
        with self._lock:
            return list(self._handles)

    # ----- faults ------------------------------------------------------------------------
    def _supervise(self) -> None:
        while not self._stop_supervisor.is_set():
            try:
                self.supervise_once()
            except Exception:
                log.exception("frontend supervision failed")
            self._stop_supervisor.wait(self.supervise_interval_s)

    def supervise_once(self) -> None:
        """One round: learn dead instances, resume their requests, renew leases."""
        m = self.control.membership()
        now = time.monotonic()
        members = set(m["instances"])
        # Dead, or gone without the scheduler saying so (it restarted meanwhile, or drained
        # it: then its requests are held elsewhere and nothing is resumed).
        for iid in set(m["dead"]) | (self._members - members):
            if iid not in self._dead:
                self._mark_dead(iid)
        self._members = members
        if len(self._dead) != self._dead_seen:  # someone died: look for its requests for a while
            self._dead_seen = len(self._dead)
            self._census_until = now + self.census_window_s
        live = [i for i in m["instances"] if i not in self._dead]
        census = now < self._census_until
        if not census:
            self._suspects.clear()
        self._resume_orphans(live, census, now)
        lease = self.config.llumlet.lease_timeout_s
        if self.reply_to and lease is not None and now - self._last_lease >= min(1.0, lease / 4):
            self._last_lease = now
            for iid in live:
                inst = self.control.instance(iid)
                try:
                    if inst is not None:
                        inst.renew_lease(self.reply_to)
                except InstanceDiedError:
                    self._mark_dead(iid)
                except Exception as exc:
                    log.warning("lease renewal on %s failed: %s", iid, exc)

    def _mark_dead(self, instance_id: str) -> None:
        with self._lock:
            self._dead.add(instance_id)
        self.control.forget(instance_id)

    def _resume_orphans(self, live: Sequence[str], census: bool, now: float) -> None:
        """Requests that no live instance holds continue elsewhere (or end with an error).

        Fast path: the request's owner (last sender, or dispatch target) died. Census
        (for ``census_window_s`` after a death): a request may have moved to the dead
        instance before sending anything from there (its owner is then a live former
        source), so every live instance is asked which requests it holds; a request
        missing from two censuses ``census_confirm_s`` apart (a migration between two
        live instances can hide it from one census) is resumed.
        """
        with self._lock:
            active = [h for h in self._handles.values() if h.placed and not h.finished]
        orphans = [h for h in active if h.stream.owner in self._dead]
        others = [h for h in active if h.stream.owner not in self._dead] if census else []
        if not orphans and not others:
            return
        ids = [h.request_id for h in orphans + others]
        holders: dict[str, str] = {}
        for iid in live:
            inst = self.control.instance(iid)
            try:
                for rid in (inst.held(ids) if inst is not None else ()):
                    holders[rid] = iid
            except InstanceDiedError:
                self._mark_dead(iid)
            except Exception as exc:  # unknown whether it holds them: decide next round
                log.warning("asking %s for orphaned requests failed: %s", iid, exc)
                return
        for h in orphans:
            if h.request_id in holders:
                with self._lock:
                    h.stream.owner = holders[h.request_id]
            else:
                self._resume(h)
        for h in others:
            rid = h.request_id
            if rid in holders:
                self._suspects.pop(rid, None)
            elif now - self._suspects.setdefault(rid, now) >= self.census_confirm_s:
                self._suspects.pop(rid, None)
                self._resume(h)

    def _resume(self, handle: RequestHandle) -> None:
        """Continue ``handle``'s request on a live instance by recomputation from its prompt
        and the tokens delivered so far; fail it if no instance can."""
        req = handle.request
        if req is None:
            self._fail(handle, "its instance died and the request cannot be resumed")
            return
        with self._lock:
            if handle.finished:
                return
            delivered = tuple(handle.token_ids)
            dead_owner = handle.stream.owner
        state = MigrationRequestState(req.request_id, req.prompt_token_ids, delivered, req.sampling, req.priority,
                                      req.arrival_time, 0, SeqStatus.WAITING, 0, req.reply_to)
        block = self.config.engine.engine.block_size
        n = len(req.prompt_token_ids) + len(delivered)
        view = RequestView(req.request_id, 0, -(-n // block), req.priority, req.arrival_time,
                           len(req.prompt_token_ids), len(delivered))
        tried: set[str] = set(self._dead)
        while True:
            iid = self._pick_other(view, exclude=tried)
            if iid is None:
                break
            tried.add(iid)
            inst = self.control.instance(iid)
            if inst is None:
                continue
            try:
                inst.resume_request(state)
            except InstanceDiedError:
                self._mark_dead(iid)
                continue
            except Exception as exc:  # refused (aborted there, does not fit) or unreachable
                log.warning("resuming %s on %s failed: %s", req.request_id, iid, exc)
                continue
            with self._lock:
                if handle.stream.owner == dead_owner:
                    handle.stream.owner = iid
                handle.resumes += 1
                self.resumed += 1
            log.info("request %s resumed on %s after %d tokens (%s died)", req.request_id, iid, len(delivered),
                     dead_owner)
            return
        self._fail(handle, f"its instance died ({dead_owner} last sent its tokens) and no other instance "
                           f"could continue the request")

    def _pick_other(self, view: RequestView, exclude: set[str]) -> Optional[str]:
        """The dispatcher's choice if it is not excluded, else any other live instance."""
        try:
            iid = self.control.dispatch(view)
        except Exception as exc:
            log.warning("dispatch failed: %s", exc)
            iid = None
        if iid is not None and iid not in exclude:
            return iid
        try:
            ids = self.control.instance_ids()
        except Exception:
            ids = []
        others = [i for i in ids if i not in exclude]
        return others[0] if others else None

    def _fail(self, handle: RequestHandle, message: str) -> None:
        with self._lock:
            if handle.finished:
                return
            handle.finish_reason = FinishReason.ABORT
            handle.error = message
            handle.finished_at = time.monotonic()
            self._handles.pop(handle.request_id, None)
            self.failed += 1
            ev = TokenEvent(handle.request_id, (), handle.stream.next_index, handle.stream.owner,
                            FinishReason.ABORT, error=message)
        log.warning("request %s failed: %s", handle.request_id, message)
        handle._deliver(ev)

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


def _frontend_model_info(config: ClusterConfig):
    """The tokenizer and the context limit a frontend validates requests against."""
    from llumnix_py.engines.torch_engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(config.engine.checkpoint)
    spec = config.engine
    limit = spec.max_model_len
    if spec.kind == "vllm" and spec.checkpoint:
        import json
        from pathlib import Path

        positions = json.loads((Path(spec.checkpoint) / "config.json").read_text()).get("max_position_embeddings")
        limit = min(limit or positions, positions) if positions else limit
    if spec.kind == "torch":
        if spec.checkpoint:
            import json
            from pathlib import Path

            positions = json.loads((Path(spec.checkpoint) / "config.json").read_text()).get(
                "max_position_embeddings", 2048)
        else:
            from llumnix_py.engines.torch_engine.model import ModelConfig

            positions = ModelConfig(**dict(spec.model)).max_position_embeddings
        limit = min(limit or positions, positions)
    return tokenizer, limit or 1 << 20


def _put_all(items: list[tuple[asyncio.Queue, TokenEvent]]) -> None:
    for q, ev in items:
        q.put_nowait(ev)
