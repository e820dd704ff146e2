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
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

from llumnix_py.engines.base import EngineAdapter
from llumnix_py.engines.types import (EngineLoad, FinishReason, MigrationRequestState, Request, RequestLoad,
                                      RequestOutput, SeqStatus, StepOutput)
from llumnix_py.errors import InvalidRequestError, LlumnixError, UnknownRequestError
from migration import wire
from migration.destination import DestinationMigrations
from migration.driver import MigrationDriver, MigrationResult, TransportPort
from migration.protocol import MigrationConfig, MigrationStatus, SourceMigration
from migration.transports import MigrationTransport, TransportError, get_transport

log = logging.getLogger(__name__)

_TOMBSTONE_TTL_S = 300.0
_TOMBSTONE_MAX = 100_000


class TokenSink(Protocol):
    """Where a llumlet sends the tokens of one step (grouped by ``reply_to``)."""

    def emit(self, instance_id: str, reply_to: str, outputs: Sequence[RequestOutput]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class LlumletConfig:
    """Settings of one llumlet.

    Attributes:
        instance_id: the instance's id.
        transport: migration transport name (``zmq``, ``gloo``, ``nccl``, ``inproc``).
        host: address the migration server binds (loopback by default).
        migration: stages, last-stage threshold, mode.
        max_outgoing / max_incoming: concurrent migrations as source / destination.
        migration_timeout_s: transport timeout; a silent source's reservation is freed after it.
        chunk_blocks: blocks per KV message (pipelining granularity).
        idle_wait_s: engine loop sleep when there is nothing to run.
        gil_switch_interval_s: the Python thread switch interval a process running a
            llumlet should use (``sys.setswitchinterval``; Python's default is 5 ms). The
            runtime that owns the process applies it: a migration message waiting up to
            5 ms for the engine thread to yield the interpreter would otherwise dominate
            the stop-and-copy downtime.
        secret: shared secret that migration connections must present (CURVE or HMAC,
            ``migration.security``); needed when ``host`` is not loopback.
        lease_timeout_s: abort the requests of a frontend (``reply_to``) that has not
            renewed its lease for this long (the first request of an address starts
            its lease); None never expires leases.
    """

    instance_id: str
    transport: str = "zmq"
    host: str = "127.0.0.1"
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    max_outgoing: int = 1
    max_incoming: int = 1
    migration_timeout_s: float = 10.0
    chunk_blocks: int = 256
    idle_wait_s: float = 0.01
    lease_timeout_s: Optional[float] = 30.0
    gil_switch_interval_s: Optional[float] = 0.0005
    secret: Optional[str] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.instance_id:
            raise ValueError("instance_id must be non-empty")
        if self.lease_timeout_s is not None and self.lease_timeout_s <= 0:
            raise ValueError("lease_timeout_s must be positive (or None)")
        get_transport(self.transport)
        if self.max_outgoing < 1 or self.max_incoming < 1:
            raise ValueError("max_outgoing and max_incoming must be >= 1")


@dataclass
class LlumletStats:
    steps: int = 0
    tokens: int = 0
    preemptions: int = 0
    migrations: dict[str, int] = field(default_factory=dict)  # status -> count (as source)
    migrations_in: int = 0
    resumed: int = 0  # requests continued here after their instance died
    lease_aborts: int = 0  # requests aborted because their frontend's lease expired
    last_step_ms: float = 0.0
    busy_s: float = 0.0  # engine step time, summed: busy_s / uptime is the engine's utilisation


class _LockedSource:
    """The engine as a migration source: primitives under the engine lock, except
    ``read_blocks`` of full or frozen blocks, which never change under a step."""

    def __init__(self, llumlet: "Llumlet") -> None:
        self._l = llumlet

    def _alive(self) -> None:
        if self._l._dead:  # a crashed instance sends nothing more (as if its process were gone)
            raise TransportError(f"instance {self._l.instance_id} crashed")

    def incremental_blocks(self, request_id, num_sent, include_last):
        self._alive()
        with self._l._locked():
            return self._l.engine.incremental_blocks(request_id, num_sent, include_last)

    def read_blocks(self, block_ids):
        self._alive()
        return self._l.engine.read_blocks(block_ids)

    def freeze(self, request_id):
        self._alive()
        with self._l._locked():
            return self._l.engine.freeze(request_id)

    def unfreeze(self, request_id):
        with self._l._locked():
            self._l.engine.unfreeze(request_id)

    def free_src(self, request_id):
        with self._l._locked():
            self._l.engine.free_src(request_id)


class _UnlessCrashed:
    """A transport that sends nothing once its llumlet crashed (as if its process were gone)."""

    _SENDS = ("call", "send_blocks", "flush")

    def __init__(self, llumlet: "Llumlet", inner: MigrationTransport) -> None:
        self._l = llumlet
        self._inner = inner

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if name not in self._SENDS:
            return attr

        def send(*args, **kw):
            if self._l._dead:
                raise TransportError(f"instance {self._l.instance_id} crashed")
            return attr(*args, **kw)

        return send


class Llumlet:
    """Runs one engine instance and its migrations."""

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
        self._snapshot: Optional[EngineLoad] = None  # the load after the latest step
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

    def load(self) -> EngineLoad:
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

    def _with_inbox(self, load: EngineLoad) -> EngineLoad:
        """Requests accepted but not yet admitted count as waiting (the dispatcher's view)."""
        with self._inbox_lock:
            queued = list(self._inbox)
        if not queued:
            return load
        bs = load.block_size
        extra = tuple(RequestLoad(r.request_id, 0, -(-len(r.prompt_token_ids) // bs), len(r.prompt_token_ids), 0,
                                  r.priority, r.arrival_time, 0) for r in queued)
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

    # ----- migration: destination side -----------------------------------------------------
    def _handle_migration_message(self, msg: Any, payload: Any) -> dict:
        rid = getattr(msg, "request_id", None) or getattr(getattr(msg, "state", None), "request_id", None)
        if self._dead:
            return wire.Reply(ok=False, error=f"instance {self.instance_id} crashed").to_header()
        with self._locked():
            if rid is not None and rid in self._tombstones and not isinstance(msg, wire.Abort):
                self.dest.handle(wire.Abort(getattr(msg, "migration_id", ""), "aborted"), None, self.clock())
                return wire.Reply(ok=False, error=f"request {rid} was aborted").to_header()
            reply = self.dest.handle(msg, payload, self.clock())
            if reply.ok and isinstance(msg, wire.Commit):
                self._track(msg.state.request_id, msg.state.reply_to)
                self.stats.migrations_in += 1
        if reply.ok and isinstance(msg, wire.Commit):
            self._wake.set()
        return reply.to_header()

    # ----- migration: source side ----------------------------------------------------------
    def migrate_out(self, request_id: str, dst_address: str, migration_id: str, waiting: bool = False,
                    config: Optional[MigrationConfig] = None) -> bool:
        """Start migrating ``request_id`` to the instance at ``dst_address`` in the background.

        Returns False (and does nothing) if the request is not here, is already
        migrating, or ``max_outgoing`` migrations are in flight.
        """
        with self._locked():
            if request_id in self._outgoing or len(self._outgoing) >= self.config.max_outgoing \
                    or request_id not in self._reply_to:
                return False
            self._outgoing[request_id] = migration_id
        assert self._pool is not None, "start() the llumlet first"
        self._pool.submit(self._run_migration, request_id, dst_address, migration_id, waiting,
                          config or self.config.migration)
        return True

    def migrate_now(self, request_id: str, dst_address: str, migration_id: str, waiting: bool = False,
                    config: Optional[MigrationConfig] = None) -> MigrationResult:
        """Migrate in the caller's thread and return the result (benchmarks, tests)."""
        with self._locked():
            if request_id in self._outgoing:
                raise LlumnixError(f"request {request_id} is already migrating")
            self._outgoing[request_id] = migration_id
        return self._run_migration(request_id, dst_address, migration_id, waiting, config or self.config.migration)

    def _transport(self, address: str) -> MigrationTransport:
        t = self._transports.get(address)
        if t is None:
            _, transport_cls = get_transport(self.config.transport)
            t = transport_cls(address, timeout_s=self.config.migration_timeout_s, secret=self.config.secret,
                              chunk_blocks=self.config.chunk_blocks)
            t.connect()
            self._transports[address] = t
        return t

    def _run_migration(self, request_id: str, dst_address: str, migration_id: str, waiting: bool,
                       config: MigrationConfig) -> MigrationResult:
        machine = SourceMigration(migration_id, request_id, waiting=waiting, config=config)
        try:
            transport = _UnlessCrashed(self, self._transport(dst_address))
            port = TransportPort(transport, _LockedSource(self))  # type: ignore[arg-type]
            result = MigrationDriver(_LockedSource(self), port).run(machine)
        except Exception as exc:  # a bug or a broken connection: never leave the request frozen
            log.exception("migration %s of %s failed", migration_id, request_id)
            self._drop_transport(dst_address)
            result = self._recover(machine, exc)
        if result.status == MigrationStatus.ABORTED_DST:
            self._drop_transport(dst_address)
        self._after_migration(result)
        return result

    def _recover(self, machine: SourceMigration, exc: Exception) -> MigrationResult:
        with self._locked():
            try:
                if machine.frozen:
                    self.engine.unfreeze(machine.request_id)
            except LlumnixError:
                pass
        return MigrationResult(machine.migration_id, machine.request_id, MigrationStatus.ABORTED_DST,
                               f"{type(exc).__name__}: {exc}", machine.config.mode.value, machine.stages,
                               machine.blocks_sent, 0.0, 0.0)

    def _drop_transport(self, address: str) -> None:
        t = self._transports.pop(address, None)
        if t is not None:
            t.close()

    def _after_migration(self, result: MigrationResult) -> None:
        rid = result.request_id
        with self._locked():
            self._outgoing.pop(rid, None)
            if result.status == MigrationStatus.FINISHED:
                self._reply_to.pop(rid, None)
            elif rid in self._tombstones:
                try:
                    self.engine.abort_request(rid)
                except UnknownRequestError:
                    pass
                self._reply_to.pop(rid, None)
            key = result.status.value
            self.stats.migrations[key] = self.stats.migrations.get(key, 0) + 1
        self.results.append(result)
        self._wake.set()
        if self.on_migration_done is not None:
            self.on_migration_done(result)

    def pop_results(self) -> list[MigrationResult]:
        out = []
        while self.results:
            out.append(self.results.popleft())
        return out

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
