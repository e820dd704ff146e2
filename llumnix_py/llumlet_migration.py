"""Outgoing migrations of a threaded llumlet: worker threads that run ``SourceMigration``s.

``OutgoingMigrations`` belongs to one ``llumnix_py.llumlet.Llumlet``; it asks the
llumlet's ``LlumletCore`` whether a migration may start and tells it how each one
ended, and runs the migration itself on a ``MigrationDriver`` over a transport of its
own: each migration checks one out of a per-destination pool of idle connections
(opening one when none is idle) and returns it when it ends, or closes it when the
migration failed on it. Transports are used from one thread at a time (a zmq DEALER's
pending block replies and sequence numbers belong to one conversation), so two
migrations to the same destination (``max_outgoing`` > 1) never share one. Locking::

    migration workers ─ lock ─ incremental_blocks / freeze / free_src / unfreeze
                      (no lock) read_blocks of full or frozen blocks, sending

From the freeze of a live migration to its end, the engine loop starts no step
(``LlumletCore.hold_out``, ``commit_hold_s`` at most): the downtime's messages do
not share the interpreter with a step. A crashed core sends nothing more, as if its process were gone.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, ContextManager, Optional

from llumnix_py.errors import LlumnixError
from llumnix_py.llumlet_core import LlumletCore
from migration.driver import MigrationDriver, MigrationResult, TransportPort
from migration.ownership import OwnershipPort
from migration.protocol import MAX_HOLD_S, MigrationConfig, MigrationMode, MigrationStatus, SourceMigration
from migration.transports import MigrationTransport, TransportError, get_transport

log = logging.getLogger(__name__)

Locked = Callable[[], ContextManager[Any]]


class LockedSource:
    """The engine as a migration source: primitives under the engine lock, except
    ``read_blocks`` of full or frozen blocks, which never change under a step.

    ``hold_s`` > 0: a request frozen for its stop-and-copy holds this engine's steps until
    it is freed or unfrozen (``LlumletCore.hold_out``), ``hold_s`` at most.
    """

    def __init__(self, core: LlumletCore, locked: Locked, hold_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._core = core
        self._locked = locked
        self._hold_s = hold_s
        self._clock = clock

    def freeze_in(self) -> float:
        """How soon ``freeze`` could take a request out of this engine's batch (the rest of
        its step in progress, ``LlumletCore.freeze_in``), ``MAX_HOLD_S`` at most."""
        return min(self._core.freeze_in(self._clock()), MAX_HOLD_S)

    def step_s(self) -> float:
        """How long this engine's steps take: the latest one, ``MAX_HOLD_S`` at most (0: none yet,
        or none under way: a frozen request holds them, ``LlumletCore.held_out``, so a hold asked
        for now finds this source at a standstill however late it is answered)."""
        if self._core.held_out(self._clock()):
            return 0.0
        return min(self._core.stats.last_step_ms / 1e3, MAX_HOLD_S)

    def _alive(self) -> None:
        if self._core.dead:  # a crashed instance sends nothing more (as if its process were gone)
            raise TransportError(f"instance {self._core.instance_id} crashed")

    def incremental_blocks(self, request_id, num_sent, include_last):
        self._alive()
        with self._locked():
            return self._core.engine.incremental_blocks(request_id, num_sent, include_last)

    def read_blocks(self, block_ids):
        self._alive()
        return self._core.engine.read_blocks(block_ids)

    def freeze(self, request_id):
        self._alive()
        with self._locked():
            state = self._core.engine.freeze(request_id)
            if state is not None and self._hold_s > 0:
                self._core.hold_out(request_id, self._hold_s, self._clock())
            return state

    def unfreeze(self, request_id):
        with self._locked():
            self._core.release_out(request_id)
            self._core.engine.unfreeze(request_id)

    def free_src(self, request_id):
        with self._locked():
            self._core.release_out(request_id)
            self._core.engine.free_src(request_id)


class UnlessCrashed:
    """A transport that sends nothing once its core crashed (as if its process were gone)."""

    _SENDS = ("call", "send_blocks", "flush")

    def __init__(self, core: LlumletCore, inner: MigrationTransport) -> None:
        self._core = core
        self._inner = inner

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if name not in self._SENDS:
            return attr

        def send(*args, **kw):
            if self._core.dead:
                raise TransportError(f"instance {self._core.instance_id} crashed")
            return attr(*args, **kw)

        return send


class OutgoingMigrations:
    """Runs a llumlet's migrations as source: in the background (``submit``) or in the
    caller's thread (``run_now``); ``on_done`` gets every result.

    Args:
        core: the llumlet's core (admission of migrations, and their end).
        locked: the llumlet's engine lock, as a context manager factory.
        on_done: called with each result, without the lock.
        ownership: the arbiter, for a commit whose outcome stays unknown (claimed for
            ``migration_timeout_s``, then by the engine loop while the request stays frozen).
        clock: the llumlet's clock (a request admitted from the inbox to leave starts its
            frontend's lease then).
    """

    def __init__(self, core: LlumletCore, locked: Locked, on_done: Callable[[MigrationResult], None],
                 ownership: Optional[OwnershipPort] = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._core = core
        self._clock = clock
        self._ownership = ownership
        self._locked = locked
        self._on_done = on_done
        self._config = core.config
        self._idle: dict[str, list[MigrationTransport]] = {}  # destination -> connections no migration uses
        self._idle_lock = threading.Lock()
        self._pool: Optional[ThreadPoolExecutor] = None

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self._config.max_outgoing, thread_name_prefix=f"mig-{self._core.instance_id}")

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        with self._idle_lock:
            idle, self._idle = self._idle, {}
        for ts in idle.values():
            for t in ts:
                t.close()

    def submit(self, request_id: str, dst_address: str, migration_id: str, waiting: bool,
               config: Optional[MigrationConfig]) -> bool:
        """Start a migration in the background; False (nothing done) if the core refuses it."""
        with self._locked():
            if not self._core.begin_migration(request_id, migration_id, now=self._clock()):
                return False
        assert self._pool is not None, "start() the llumlet first"
        self._pool.submit(self._run, request_id, dst_address, migration_id, waiting, config or self._config.migration)
        return True

    def run_now(self, request_id: str, dst_address: str, migration_id: str, waiting: bool,
                config: Optional[MigrationConfig]) -> MigrationResult:
        """Migrate in the caller's thread (no ``max_outgoing`` bound); the result."""
        with self._locked():
            if self._core.migrating_out(request_id):
                raise LlumnixError(f"request {request_id} is already migrating")
            self._core.begin_migration(request_id, migration_id, bounded=False, now=self._clock())
        return self._run(request_id, dst_address, migration_id, waiting, config or self._config.migration)

    def _checkout(self, address: str) -> MigrationTransport:
        """An idle connection to ``address``, or a new one: this migration's alone until
        ``_checkin``."""
        with self._idle_lock:
            idle = self._idle.get(address)
            if idle:
                return idle.pop()
        _, transport_cls = get_transport(self._config.transport)
        t = transport_cls(address, timeout_s=self._config.migration_timeout_s, secret=self._config.secret,
                          chunk_blocks=self._config.chunk_blocks)
        t.connect()
        return t

    def _checkin(self, address: str, t: MigrationTransport, healthy: bool) -> None:
        """Back to the idle pool, or closed when the migration failed on it (the next one
        to ``address`` reconnects)."""
        if healthy:
            with self._idle_lock:
                self._idle.setdefault(address, []).append(t)
        else:
            t.close()

    def _run(self, request_id: str, dst_address: str, migration_id: str, waiting: bool,
             config: MigrationConfig) -> MigrationResult:
        machine = SourceMigration(migration_id, request_id, waiting=waiting, config=config)
        # A live stop-and-copy (a few messages) holds this engine's steps; a blocking copy
        # or a waiting request's move does not (the rest of the batch runs on meanwhile).
        hold_s = config.commit_hold_s if config.mode == MigrationMode.LIVE and not waiting else 0.0
        source = LockedSource(self._core, self._locked, hold_s, self._clock)
        conn: Optional[MigrationTransport] = None
        healthy = True
        try:
            conn = self._checkout(dst_address)
            port = TransportPort(UnlessCrashed(self._core, conn), source)  # type: ignore[arg-type]
            driver = MigrationDriver(source, port, ownership=self._ownership,
                                     claim_timeout_s=self._config.migration_timeout_s,
                                     claim_retry_s=self._config.claim_retry_s)
            result = driver.run(machine)
        except Exception as exc:  # a bug or a broken connection: never leave the request frozen
            log.exception("migration %s of %s failed", migration_id, request_id)
            healthy = False
            result = self._recover(machine, exc)
        if conn is not None:
            self._checkin(dst_address, conn, healthy and result.status != MigrationStatus.ABORTED_DST)
        with self._locked():
            self._core.release_out(request_id)
            self._core.end_migration(result, dst_address)
        self._on_done(result)  # wakes the engine loop: a hold of this migration is over
        return result

    def _recover(self, machine: SourceMigration, exc: Exception) -> MigrationResult:
        # Once a commit was sent, only the arbiter may unfreeze the request (the destination
        # may hold it parked): keep it frozen and let the engine loop claim it.
        if machine.handed_over:  # the destination runs it: this copy only has to go
            with self._locked():
                try:
                    self._core.engine.free_src(machine.request_id)
                except LlumnixError:
                    pass
            return MigrationResult(machine.migration_id, machine.request_id, MigrationStatus.FINISHED,
                                   f"{type(exc).__name__}: {exc}", machine.config.mode.value, machine.stages,
                                   machine.blocks_sent, 0.0, 0.0)
        unresolved = machine.frozen and machine.commit_sent
        if not unresolved:
            with self._locked():
                try:
                    if machine.frozen:
                        self._core.engine.unfreeze(machine.request_id)
                except LlumnixError:
                    pass
        return MigrationResult(machine.migration_id, machine.request_id, MigrationStatus.ABORTED_DST,
                               f"{type(exc).__name__}: {exc}", machine.config.mode.value, machine.stages,
                               machine.blocks_sent, 0.0, 0.0, unresolved=unresolved)
