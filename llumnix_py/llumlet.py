"""The llumlet: one per engine instance; the threaded driver of ``LlumletCore``.

The decisions (admission, token routing, leases, aborts and their tombstones,
migration limits, fencing) are the sans-IO ``llumnix_py.llumlet_core.LlumletCore``;
this class gives it a clock, threads, a migration server and a token sink. The
same class runs inside a Ray actor and in-process; the simulator drives the same
core on its virtual clock.

Threads (all started in ``start``, joined in ``stop``)::

    engine loop ──── lock ──── admit; step() unless a hold is in force (a stop-and-copy
                               coming in, or one of its own requests frozen for one);
                               expire stale incoming migrations and leases
    migration server ─ lock ── LlumletCore.handle (pre_alloc / write_blocks / commit_dst)
                    (no lock)  LlumletCore.hold: a source's stop-and-copy is next, so the
                               loop starts no step until it activates or aborts (bounded);
                               answered once the step in progress ended (lock taken, let go)
    migration workers ─ lock ─ incremental_blocks / freeze / free_src / unfreeze
                      (no lock) read_blocks of full or frozen blocks, sending
                               (``llumnix_py.llumlet_migration.OutgoingMigrations``)
    ownership claims ── claim lock, then lock ── ask the arbiter (``ownership``), apply
                               its answer; ``held`` and ``resume_request`` wait for a
                               claim in flight, so a census never misses a copy that
                               the arbiter just gave to this instance

Faults: a frontend renews a lease on its ``reply_to`` address (``renew_lease``,
about every second); when a lease is not renewed for ``lease_timeout_s`` the
frontend is presumed gone and its requests are aborted here (their blocks freed).
A request whose instance died is continued by ``resume_request`` (recomputation
from its prompt and the tokens already delivered, at the right output index).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

from llumnix_py.engines.base import EngineAdapter
from llumnix_py.engines.types import MigrationRequestState, Request, RequestOutput, StepOutput
from llumnix_py.llumlet_core import LlumletCore
from llumnix_py.llumlet_migration import OutgoingMigrations
from llumnix_py.llumlet_types import LlumletConfig, TokenSink
from llumnix_py.load import InstanceLoad
from migration import wire
from migration.driver import MigrationResult
from migration.ownership import Owner, OwnershipPort, ask
from migration.protocol import MigrationConfig
from migration.transports import get_transport


class Llumlet:
    """Runs one engine instance and its migrations: the threaded driver of a ``LlumletCore``.

    ``ownership`` reaches the global scheduler's ownership arbiter (``migration.ownership``);
    without one (a llumlet outside a cluster), a migration whose commit outcome stays
    unknown keeps its request frozen, and a parked copy stays parked.
    """

    def __init__(self, config: LlumletConfig, engine: EngineAdapter, sink: TokenSink,
                 clock: Callable[[], float] = time.monotonic, ownership: Optional[OwnershipPort] = None) -> None:
        self.config = config
        self.engine = engine
        self.sink = sink
        self.clock = clock
        self.instance_id = config.instance_id
        # This process's life as that instance: an id may be used again by a later instance
        # (a replacement, a restarted scheduler), an incarnation never.
        self.incarnation = uuid.uuid4().hex[:12]
        self._inbox_lock = threading.Lock()
        self.core = LlumletCore(config, engine, self._inbox_lock)
        self.stats = self.core.stats
        self.dest = self.core.dest
        self.results: deque[MigrationResult] = deque(maxlen=10_000)
        self.on_migration_done: Optional[Callable[[MigrationResult], None]] = None
        self._lock = PriorityLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._snapshot: Optional[InstanceLoad] = None  # the load after the latest step
        self.ownership = ownership
        self._claim_lock = threading.Lock()
        self._claims: Optional[ThreadPoolExecutor] = None
        self._outgoing = OutgoingMigrations(self.core, self._locked, self._migration_done, self._claim_port,
                                            clock=lambda: self.clock())
        self._thread: Optional[threading.Thread] = None
        self._server = None
        self.address = ""

    # ----- lifecycle -----------------------------------------------------------------------
    def start(self) -> str:
        """Start the migration server and the engine loop; returns the migration address."""
        server_cls, _ = get_transport(self.config.transport)
        self._server = server_cls(self._handle_migration_message, host=self.config.host, secret=self.config.secret)
        self.address = self._server.start()
        self._outgoing.start()
        self._claims = ThreadPoolExecutor(1, thread_name_prefix=f"claims-{self.instance_id}")
        self._thread = threading.Thread(target=self._loop, name=f"engine-{self.instance_id}", daemon=True)
        self._thread.start()
        return self.address

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._outgoing.stop()
        if self._claims is not None:
            self._claims.shutdown(wait=True, cancel_futures=True)
        if self._server is not None:
            self._server.stop()
        self.sink.close()

    def crash(self) -> None:
        """Die abruptly, as if the process were killed (fault-injection tests): no more
        steps, tokens, or migration messages; nothing is cleaned up. ``stop`` still
        releases the threads afterwards."""
        self.core.crash()
        self._stop.set()
        self._wake.set()
        if self._server is not None:
            self._server.stop()

    @property
    def dead(self) -> bool:
        return self.core.dead

    def _locked(self) -> PriorityLock:
        """The engine lock, taken with priority over the engine loop's next step."""
        return self._lock

    # ----- serving -------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request for the next iteration. Raises ``InvalidRequestError`` now for a
        request the engine can never run or an id already in use here."""
        self.core.submit(request)
        self._wake.set()

    def resume_request(self, state: MigrationRequestState) -> bool:
        """Continue a request whose instance died: it joins the waiting queue with its
        prompt and the tokens already delivered (``state.status`` WAITING, nothing
        computed), is recomputed, and emits from output index ``len(output_token_ids)``.

        Returns False if the request is already here (a migration brought it in).
        Raises ``InvalidRequestError`` if it was aborted here or does not fit.
        """
        with self._claim_lock, self._locked():
            resumed = self.core.resume(state, self.clock())
        if resumed:
            self._wake.set()
        return resumed

    def held(self, request_ids: Sequence[str]) -> list[str]:
        """Those of ``request_ids`` that are here (running, waiting, or migrating out)."""
        with self._claim_lock, self._locked():
            return self.core.held(request_ids)

    def renew_lease(self, reply_to: str) -> None:
        """The frontend at ``reply_to`` is alive; its requests keep running."""
        if reply_to:
            with self._locked():
                self.core.renew_lease(reply_to, self.clock())

    def abort(self, request_id: str) -> bool:
        """Abort wherever the request is here; True if it was here. Remembered for a while."""
        with self._locked():
            return self.core.abort(request_id, self.clock())

    def load(self) -> InstanceLoad:
        """A fresh snapshot when the engine is between steps, else the one taken after the
        latest step or, when that step admitted requests, the one taken just before it, with
        them in the queue (so the prompts a step in progress prefills count in the load): a
        poll (the scheduler's heartbeat) never waits for a long step."""
        if self._lock.lock.acquire(blocking=False):
            try:
                self._snapshot = self.engine.load()
            finally:
                self._lock.lock.release()
        if self._snapshot is None:
            with self._locked():
                self._snapshot = self.engine.load()
        return self.core.load(self._snapshot)

    def has_request(self, request_id: str) -> bool:
        with self._locked():
            return self.core.has_request(request_id)

    def is_idle(self) -> bool:
        with self._locked():
            return self.core.is_idle()

    def _loop(self) -> None:
        core = self.core
        while not self._stop.is_set():
            out: Optional[StepOutput] = None
            groups: dict[str, list[RequestOutput]] = {}
            self._wake.clear()  # before looking at the state: a wake-up from now on is not lost
            with self._lock.lock:
                refused: dict[str, list[RequestOutput]] = {}
                if core.has_inbox():
                    refused = core.admit(self.clock())
                    self._snapshot = self.engine.load()  # a poll during the step sees what it admitted
                held_until = core.holding(self.clock())  # a migration's stop-and-copy is coming in
                if held_until is None and core.step_due():
                    out, groups = core.step(now=self.clock())
                lapsed = core.on_timer(self.clock())
                claims = core.claims_due(self.clock()) if self.ownership is not None and (
                    core.dest.parked or core.has_unresolved()) else []
                if out is not None or refused:  # idle: a poll finds the lock free and reads a fresh load
                    self._snapshot = self.engine.load()
            for target, outs in list(lapsed.items()) + list(refused.items()):
                if not core.dead:
                    self.sink.emit(self.instance_id, target, outs)
            for mid, side in claims:
                if self._claims is not None:
                    self._claims.submit(self._claim, mid, side)
            if out is None:
                wait = self.config.idle_wait_s
                if held_until is not None:  # its Activate or Abort wakes the loop; else the deadline
                    wait = min(wait, max(0.0, held_until - self.clock()))
                self._wake.wait(wait)
                continue
            self._publish(out, groups)
            if self._lock.has_waiters:
                time.sleep(0.0005)  # let a waiting migration or request take the lock

    def _publish(self, out: StepOutput, groups: dict[str, list[RequestOutput]]) -> None:
        if self.core.dead:
            return
        self.core.on_published(out)
        for target, outs in groups.items():
            self.sink.emit(self.instance_id, target, outs)

    # ----- migration -----------------------------------------------------------------------
    def _handle_migration_message(self, msg: Any, payload: Any) -> dict:
        """Serve one message from a source (the migration server's handler); the reply header."""
        if self.core.dead:
            return self.core.handle(msg, payload, self.clock()).to_header()
        if isinstance(msg, wire.Hold):
            # Set without the lock (the loop starts no step from now on), decided and answered
            # once the step in progress ended: held, the source freezes knowing this engine is
            # between steps; refused (its freeze comes too late to idle for), the loop steps on.
            arrived = self.clock()
            reply = self.core.hold(msg, arrived, boundary=False)
            if reply.ok:
                with self._locked():  # between steps now: the hold's time counts from here
                    reply = self.core.hold(msg, self.clock(), arrived=arrived)
                if not reply.ok:
                    self._wake.set()  # not held after all: the next step starts now
            return reply.to_header()
        with self._locked():
            reply = self.core.handle(msg, payload, self.clock())
        if isinstance(msg, (wire.Activate, wire.Abort)) or not reply.ok:
            self._wake.set()  # the request runs from the next step on (a commit only parked it); a hold ends
        return reply.to_header()

    def migrate_out(self, request_id: str, dst_address: str, migration_id: str, waiting: bool = False,
                    config: Optional[MigrationConfig] = None) -> bool:
        """Start migrating ``request_id`` to the instance at ``dst_address`` in the background.

        Returns False (and does nothing) if the request is not here, is already
        migrating, or ``max_outgoing`` migrations are in flight.
        """
        return self._outgoing.submit(request_id, dst_address, migration_id, waiting, config)

    def migrate_now(self, request_id: str, dst_address: str, migration_id: str, waiting: bool = False,
                    config: Optional[MigrationConfig] = None) -> MigrationResult:
        """Migrate in the caller's thread and return the result (benchmarks, tests)."""
        return self._outgoing.run_now(request_id, dst_address, migration_id, waiting, config)

    def _claim_port(self, migration_id: str, side: Owner) -> Owner:
        """The arbiter, as this instance reaches it; nothing once crashed (as if gone)."""
        if self.core.dead or self.ownership is None:
            raise ConnectionError(f"instance {self.instance_id} cannot reach the ownership arbiter")
        return self.ownership(migration_id, side)

    def _claim(self, migration_id: str, side: Owner) -> None:
        """One claim (a claims thread) and its answer applied; unanswered, it is due again later."""
        with self._claim_lock:
            owner = ask(self._claim_port, migration_id, side)
            with self._locked():
                woke = self.core.on_owner(migration_id, side, owner, self.clock())
        if woke:
            self._wake.set()

    def _migration_done(self, result: MigrationResult) -> None:
        self.results.append(result)
        self._wake.set()
        if self.on_migration_done is not None:
            self.on_migration_done(result)

    def set_role(self, role: str) -> None:
        """The scheduler's role for this instance (``LlumletCore.set_role``)."""
        with self._locked():
            self.core.set_role(role, self.clock())
        self._wake.set()  # a released hold runs from the next step on

    def set_fair_offsets(self, offsets: dict[str, float]) -> None:
        """The global scheduler's cluster-wide fairness view, for the engine's decisions."""
        with self._locked():
            self.engine.set_fair_offsets(offsets)

    def pop_results(self) -> list[MigrationResult]:
        """Take the results of the migrations that ended since the last call, oldest first."""
        out = []
        while self.results:
            out.append(self.results.popleft())
        return out


class PriorityLock:
    """The engine lock, which callers take with priority over the engine loop's next
    step (the loop yields for a moment after a step while someone waits)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # the engine loop takes this one directly
        self._waiters = 0
        self._waiters_lock = threading.Lock()

    @property
    def has_waiters(self) -> bool:
        return self._waiters > 0

    def __enter__(self) -> "PriorityLock":
        with self._waiters_lock:
            self._waiters += 1
        self.lock.acquire()
        with self._waiters_lock:
            self._waiters -= 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
