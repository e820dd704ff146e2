"""The migration side of the llumlet: serving incoming migrations and running outgoing ones.

``LlumletMigration`` is a mixin that ``llumnix_py.llumlet.Llumlet`` inherits; it uses
the host's engine, engine lock (``_locked``), request bookkeeping (``_reply_to``,
``_track``, ``_tombstones``, ``_outgoing``), transports and stats. Locking::

    migration server ─ lock ── pre_alloc / write_blocks / commit_dst (DestinationMigrations)
    migration workers ─ lock ─ incremental_blocks / freeze / free_src / unfreeze
                      (no lock) read_blocks of full or frozen blocks, sending

A crashed llumlet (``_dead``) sends and serves nothing more, as if its process were gone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

from llumnix_py.errors import LlumnixError, UnknownRequestError
from migration import wire
from migration.driver import MigrationDriver, MigrationResult, TransportPort
from migration.protocol import MigrationConfig, MigrationStatus, SourceMigration
from migration.transports import MigrationTransport, TransportError, get_transport

if TYPE_CHECKING:
    from llumnix_py.llumlet import Llumlet

# The llumlet's own logger: these records keep the name they had before the split.
log = logging.getLogger("llumnix_py.llumlet")


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


class LlumletMigration:
    """Migration methods of ``Llumlet`` (a mixin; not usable on its own).

    Destination side: ``_handle_migration_message`` is the migration server's handler.
    Source side: ``migrate_out`` (background) and ``migrate_now`` (caller's thread) run
    a ``SourceMigration`` over a cached transport; results are kept in ``results``
    (``pop_results``) and passed to ``on_migration_done``.
    """

    # ----- migration: destination side -----------------------------------------------------
    def _handle_migration_message(self, msg: Any, payload: Any) -> dict:
        """Serve one message from a source (the migration server's handler); the reply header.

        Refuses everything once crashed, and any message but ``Abort`` for a request
        aborted here (its reservation is freed); a committed request is tracked here.
        """
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
        """Take the results of the migrations that ended since the last call, oldest first."""
        out = []
        while self.results:
            out.append(self.results.popleft())
        return out
