"""The llumlet: one per engine instance.

It runs the engine loop, publishes load snapshots, forwards output tokens to
whoever holds each request's ``reply_to``, serves incoming migrations and runs
outgoing ones. The same class runs inside a Ray actor and in-process.

Threads (all started in ``start``, joined in ``stop``)::

    engine loop ──── lock ──── step(); expire stale incoming migrations
    migration server ─ lock ── pre_alloc / write_blocks / commit_dst (DestinationMigrations)
    migration workers ─ lock ─ incremental_blocks / freeze / free_src / unfreeze
                      (no lock) read_blocks of full or frozen blocks, sending

Aborts are broadcast to every llumlet and remembered for a while (tombstones):
a migration that would bring an aborted request in is refused, and a request
aborted while it was migrating out is aborted once the migration ends.

Faults: a frontend renews a lease on its ``reply_to`` address (``renew_lease``,
about every second); when a lease is not renewed for ``lease_timeout_s`` the
frontend is presumed gone and its requests are aborted here (their blocks freed).
A request whose instance died is continued by ``resume_request`` (recomputation
from its prompt and the tokens already delivered, at the right output index).

Layout: this module holds the engine loop, request bookkeeping and the engine lock;
the migration methods are in ``llumnix_py.llumlet_migration`` (a mixin ``Llumlet``
inherits) and the settings, counters and ``TokenSink`` in ``llumnix_py.llumlet_types``.
All of them stay importable from here.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

from llumnix_py.engines.base import EngineAdapter
from llumnix_py.engines.types import (FinishReason, MigrationRequestState, Request, RequestOutput, SeqStatus,
                                      StepOutput)
from llumnix_py.errors import InvalidRequestError, LlumnixError, UnknownRequestError
from llumnix_py.llumlet_migration import LlumletMigration
from llumnix_py.load import InstanceLoad, RequestLoad
from llumnix_py.llumlet_migration import _LockedSource as _LockedSource  # re-export
from llumnix_py.llumlet_migration import _UnlessCrashed as _UnlessCrashed  # re-export
from llumnix_py.llumlet_types import LlumletConfig as LlumletConfig
from llumnix_py.llumlet_types import LlumletStats as LlumletStats
from llumnix_py.llumlet_types import TokenSink as TokenSink
from migration import wire
from migration.destination import DestinationMigrations
from migration.driver import MigrationResult
from migration.transports import MigrationTransport, get_transport

log = logging.getLogger(__name__)

_TOMBSTONE_TTL_S = 300.0
_TOMBSTONE_MAX = 100_000


class Llumlet(LlumletMigration):
    """Runs one engine instance and its migrations (the migration methods are in
    ``llumnix_py.llumlet_migration.LlumletMigration``)."""

    def __init__(self, config: LlumletConfig, engine: EngineAdapter, sink: TokenSink,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.engine = engine
        self.sink = sink
        self.clock = clock
        self.instance_id = config.instance_id
        self.stats = LlumletStats()
        self.dest = DestinationMigrations(engine, config.max_incoming, config.migration_timeout_s)
        self.results: deque[MigrationResult] = deque(maxlen=10_000)
        self.on_migration_done: Optional[Callable[[MigrationResult], None]] = None
        self._lock = threading.Lock()
        self._lock_waiters = 0
        self._waiters_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reply_to: dict[str, str] = {}
        # New requests wait here (validated) until the engine loop's next iteration, so a
        # burst arriving during a step is admitted together and callers never wait for a step.
        self._inbox: deque[Request] = deque()
        self._inbox_lock = threading.Lock()
        self._snapshot: Optional[InstanceLoad] = None  # the load after the latest step
        self._leases: dict[str, float] = {}  # reply_to -> last renewal (or first request)
        self._dead = False
        self._tombstones: "OrderedDict[str, float]" = OrderedDict()
        self._outgoing: dict[str, str] = {}  # request id -> migration id
        self._transports: dict[str, MigrationTransport] = {}
        self._thread: Optional[threading.Thread] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._server = None
        self.address = ""

    # ----- lifecycle -----------------------------------------------------------------------
    def start(self) -> str:
        """Start the migration server and the engine loop; returns the migration address."""
        server_cls, _ = get_transport(self.config.transport)
        self._server = server_cls(self._handle_migration_message, host=self.config.host, secret=self.config.secret)
        self.address = self._server.start()
        self._pool = ThreadPoolExecutor(self.config.max_outgoing, thread_name_prefix=f"mig-{self.instance_id}")
        self._thread = threading.Thread(target=self._loop, name=f"engine-{self.instance_id}", daemon=True)
        self._thread.start()
        return self.address

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._server is not None:
            self._server.stop()
        for t in self._transports.values():
            t.close()
        self._transports.clear()
        self.sink.close()

    def crash(self) -> None:
        """Die abruptly, as if the process were killed (fault-injection tests): no more
        steps, tokens, or migration messages; nothing is cleaned up. ``stop`` still
        releases the threads afterwards."""
        self._dead = True
        self._stop.set()
        self._wake.set()
        if self._server is not None:
            self._server.stop()

    @property
    def dead(self) -> bool:
        return self._dead

    def _locked(self):
        return _Priority(self)

    # ----- serving -------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request for the next iteration. Raises ``InvalidRequestError`` now for a
        request the engine can never run or an id already in use here."""
        self.engine.check_request(request)
        with self._inbox_lock:
            rid = request.request_id
            if rid in self._reply_to or any(r.request_id == rid for r in self._inbox):
                raise InvalidRequestError(f"request {rid} already exists on this instance")
            self._inbox.append(request)
        self._wake.set()

    def _admit_inbox(self) -> dict[str, list[RequestOutput]]:
        """Move queued requests into the engine (engine lock held); error outputs for any
        that it refuses after all (a race with a migration bringing the same id in)."""
        with self._inbox_lock:
            batch = list(self._inbox)
            self._inbox.clear()
        refused: dict[str, list[RequestOutput]] = {}
        for request in batch:
            try:
                self.engine.add_request(request)
            except LlumnixError as exc:
                log.warning("request %s refused: %s", request.request_id, exc)
                refused.setdefault(request.reply_to, []).append(
                    RequestOutput(request.request_id, (), 0, FinishReason.ABORT))
                continue
            self._track(request.request_id, request.reply_to)
        return refused

    def _in_inbox(self, request_id: str) -> bool:
        with self._inbox_lock:
            return any(r.request_id == request_id for r in self._inbox)

    def _drop_from_inbox(self, request_id: str) -> bool:
        with self._inbox_lock:
            for r in self._inbox:
                if r.request_id == request_id:
                    self._inbox.remove(r)
                    return True
        return False

    def resume_request(self, state: MigrationRequestState) -> bool:
        """Continue a request whose instance died: it joins the waiting queue with its
        prompt and the tokens already delivered (``state.status`` WAITING, nothing
        computed), is recomputed, and emits from output index ``len(output_token_ids)``.

        Returns False if the request is already here (a migration brought it in).
        Raises ``InvalidRequestError`` if it was aborted here or does not fit.
        """
        if state.status != SeqStatus.WAITING or state.num_computed_tokens != 0:
            raise InvalidRequestError("a resumed request is recomputed: status WAITING, no computed tokens")
        rid = state.request_id
        with self._locked():
            if rid in self._reply_to:
                return False
            if rid in self._tombstones:
                raise InvalidRequestError(f"request {rid} was aborted")
            # A half-done migration of this request from the dead instance: its reservation goes now.
            for mid, rec in list(self.dest.incoming.items()):
                if rec.request_id == rid:
                    self.dest.handle(wire.Abort(mid, "request resumed by recomputation"), None, self.clock())
            self.engine.commit_dst(state)
            self._track(rid, state.reply_to)
            self.stats.resumed += 1
        self._wake.set()
        return True

    def held(self, request_ids: Sequence[str]) -> list[str]:
        """Those of ``request_ids`` that are here (running, waiting, or migrating out)."""
        with self._locked():
            return [r for r in request_ids if r in self._reply_to or self._in_inbox(r)]

    def renew_lease(self, reply_to: str) -> None:
        """The frontend at ``reply_to`` is alive; its requests keep running."""
        if reply_to:
            with self._locked():
                self._leases[reply_to] = self.clock()

    def _track(self, request_id: str, reply_to: str) -> None:
        """Remember where a request's tokens go (engine lock held)."""
        self._reply_to[request_id] = reply_to
        if reply_to and reply_to not in self._leases:
            self._leases[reply_to] = self.clock()  # a first request starts its frontend's lease

    def _expire_leases(self, now: float) -> dict[str, list[RequestOutput]]:
        """Abort the requests of frontends whose lease ran out (engine lock held); the abort
        outputs to send, in case such a frontend is only slow."""
        timeout = self.config.lease_timeout_s
        if timeout is None or not self._leases:
            return {}
        expired = {rt for rt, t in self._leases.items() if now - t > timeout}
        if not expired:
            return {}
        outputs: dict[str, list[RequestOutput]] = {}
        position = {r.request_id: r.output_len for r in self._load_requests()}
        for rid, rt in list(self._reply_to.items()):
            if rt not in expired:
                continue
            log.warning("lease of %s expired: aborting request %s", rt, rid)
            self._remember_abort(rid)
            self.stats.lease_aborts += 1
            outputs.setdefault(rt, []).append(RequestOutput(rid, (), position.get(rid, 0), FinishReason.ABORT))
            if rid in self._outgoing:
                continue  # aborted when its migration ends (see _after_migration)
            try:
                self.engine.abort_request(rid)
            except UnknownRequestError:
                pass
            self._reply_to.pop(rid, None)
        for rt in expired:
            del self._leases[rt]
        return outputs

    def _load_requests(self):
        load = self.engine.load()
        return load.running + load.waiting

    def abort(self, request_id: str) -> bool:
        """Abort wherever the request is here; True if it was here. Remembered for a while."""
        with self._locked():
            self._remember_abort(request_id)
            if self._drop_from_inbox(request_id):
                return True
            if request_id in self._outgoing:
                return True  # aborted when its migration ends (see _after_migration)
            try:
                self.engine.abort_request(request_id)
            except UnknownRequestError:
                return False
            self._reply_to.pop(request_id, None)
            return True

    def load(self) -> InstanceLoad:
        """A fresh snapshot when the engine is between steps, else the one taken after the
        latest step: a poll (the scheduler's heartbeat) never waits for a long step."""
        if self._lock.acquire(blocking=False):
            try:
                self._snapshot = self.engine.load()
            finally:
                self._lock.release()
        if self._snapshot is None:
            with self._locked():
                self._snapshot = self.engine.load()
        return self._with_inbox(self._snapshot)

    def _with_inbox(self, load: InstanceLoad) -> InstanceLoad:
        """Requests accepted but not yet admitted count as waiting (the dispatcher's view)."""
        with self._inbox_lock:
            queued = list(self._inbox)
        if not queued:
            return load
        bs = load.block_size
        extra = tuple(RequestLoad.queued(r.request_id, prompt_len=len(r.prompt_token_ids), block_size=bs,
                                         priority=r.priority, arrival_time=r.arrival_time) for r in queued)
        return dataclasses.replace(load, waiting=load.waiting + extra)

    def has_request(self, request_id: str) -> bool:
        with self._locked():
            return request_id in self._reply_to or self._in_inbox(request_id)

    def _loop(self) -> None:
        while not self._stop.is_set():
            out: Optional[StepOutput] = None
            groups: dict[str, list[RequestOutput]] = {}
            with self._lock:
                refused = self._admit_inbox() if self._inbox else {}
                if self.engine.has_unfinished():
                    out = self.engine.step()
                    # Resolve destinations under the same lock as the step: once it is released a
                    # migration may commit elsewhere and forget the request here.
                    groups = self._route(out)
                now = self.clock()
                self.dest.expire(now)
                lapsed = self._expire_leases(now)
                if out is not None or refused:  # idle: a poll finds the lock free and reads a fresh load
                    self._snapshot = self.engine.load()
            for target, outs in list(lapsed.items()) + list(refused.items()):
                if not self._dead:
                    self.sink.emit(self.instance_id, target, outs)
            if out is None:
                self._wake.wait(self.config.idle_wait_s)
                self._wake.clear()
                continue
            self._publish(out, groups)
            if self._lock_waiters:
                time.sleep(0.0005)  # let a waiting migration or request take the lock

    def _route(self, out: StepOutput) -> dict[str, list[RequestOutput]]:
        groups: dict[str, list[RequestOutput]] = {}
        for o in out.outputs:
            groups.setdefault(self._reply_to.get(o.request_id, ""), []).append(o)
            if o.finished:
                self._reply_to.pop(o.request_id, None)
        return groups

    def _publish(self, out: StepOutput, groups: dict[str, list[RequestOutput]]) -> None:
        if self._dead:
            return
        self.stats.steps += 1
        self.stats.tokens += len(out.outputs)
        self.stats.preemptions += len(out.preempted)
        self.stats.last_step_ms = out.duration_s * 1e3
        self.stats.busy_s += out.duration_s
        for target, outs in groups.items():
            self.sink.emit(self.instance_id, target, outs)

    def _remember_abort(self, request_id: str) -> None:
        now = self.clock()
        self._tombstones[request_id] = now
        self._tombstones.move_to_end(request_id)
        while self._tombstones and (len(self._tombstones) > _TOMBSTONE_MAX or
                                    now - next(iter(self._tombstones.values())) > _TOMBSTONE_TTL_S):
            self._tombstones.popitem(last=False)

    def is_idle(self) -> bool:
        with self._locked():
            return not self.engine.has_unfinished() and not self._outgoing and not self.dest.incoming


class _Priority:
    """The engine lock, taken with priority over the engine loop's next step."""

    def __init__(self, llumlet: Llumlet) -> None:
        self._l = llumlet

    def __enter__(self):
        with self._l._waiters_lock:
            self._l._lock_waiters += 1
        self._l._lock.acquire()
        with self._l._waiters_lock:
            self._l._lock_waiters -= 1
        return self

    def __exit__(self, *exc):
        self._l._lock.release()
