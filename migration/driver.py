"""Carries out a ``SourceMigration``'s actions against a source engine and a destination.

The driver owns the clock and the wires; the protocol machine owns the decisions.
``SourcePort`` is the source engine (the llumlet hands in a view that takes its
engine lock per call); ``DestinationPort`` is the destination, reached through a
transport (``TransportPort``) or directly (``LocalPort``, for tests and the simulator).
``ownership`` reaches the arbiter (``migration.ownership``) for the rare migration
whose commit reply and aborts were all lost.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

from llumnix_py.engines.types import MigrationRequestState
from llumnix_py.errors import LlumnixError
from migration import protocol as p
from migration import wire
from migration.ownership import Owner, OwnershipPort, ask
from migration.transports.base import MigrationTransport, TransportError


class SourcePort(Protocol):
    def incremental_blocks(self, request_id: str, num_sent: int, include_last: bool) -> Optional[list[int]]: ...
    def read_blocks(self, block_ids: Sequence[int]) -> object: ...
    def freeze(self, request_id: str) -> Optional[MigrationRequestState]: ...
    def unfreeze(self, request_id: str) -> None: ...
    def free_src(self, request_id: str) -> None: ...


class DestinationPort(Protocol):
    def pre_alloc(self, migration_id: str, request_id: str, n: int) -> tuple[Optional[tuple[int, ...]], str]: ...
    def copy(self, migration_id: str, src_block_ids: Sequence[int], dst_block_ids: Sequence[int]) -> None: ...
    def commit(self, migration_id: str, state: MigrationRequestState) -> tuple[bool, str]: ...
    def activate(self, migration_id: str) -> tuple[bool, str]: ...
    def hold(self, migration_id: str, hold_s: float) -> tuple[bool, str]: ...
    # True: the destination runs the request (ALREADY_COMMITTED); False: it does not
    # (any parked copy dropped); None: no answer.
    def abort(self, migration_id: str, reason: str, attempts: int = 3) -> Optional[bool]: ...


def _hold(src: object, migration_id: str, hold_s: float) -> wire.Hold:
    """``wire.Hold`` with the source's timing: ``freeze_in()`` (how soon it could freeze the
    request: the rest of its step in progress) and ``step_s()`` (how long its steps take); 0
    for a source that does not tell (an engine used directly, between steps by construction)."""
    freeze_in, step_s = getattr(src, "freeze_in", None), getattr(src, "step_s", None)
    return wire.Hold(migration_id, hold_s, float(freeze_in()) if freeze_in is not None else 0.0,
                     float(step_s()) if step_s is not None else 0.0)


class TransportPort:
    """The destination behind a ``MigrationTransport``; KV data is read and sent chunk by
    chunk, so packing chunk k+1 overlaps sending chunk k."""

    def __init__(self, transport: MigrationTransport, src: SourcePort) -> None:
        self.transport = transport
        self.src = src

    def pre_alloc(self, migration_id, request_id, n):
        reply = self.transport.call(wire.PreAlloc(migration_id, request_id, n))
        return (tuple(reply.block_ids), "") if reply.ok else (None, reply.error or "refused")

    def copy(self, migration_id, src_ids, dst_ids):
        step = self.transport.chunk_blocks
        for s in range(0, len(dst_ids), step):
            data = self.src.read_blocks(src_ids[s:s + step])
            self.transport.send_blocks(migration_id, dst_ids[s:s + step], data)
        self.transport.flush()

    def commit(self, migration_id, state):
        reply = self.transport.call(wire.Commit(migration_id, state))
        return reply.ok, reply.error or ""

    def activate(self, migration_id):
        reply = self.transport.call(wire.Activate(migration_id))
        return reply.ok, reply.error or ""

    def hold(self, migration_id, hold_s):
        reply = self.transport.call(_hold(self.src, migration_id, hold_s))
        return reply.ok, reply.error or ""

    ABORT_ATTEMPTS = 3

    def abort(self, migration_id, reason, attempts=ABORT_ATTEMPTS):
        # After a lost commit reply only the destination knows whether it committed (a
        # parked copy is dropped by the abort), so try more than once; with no answer at
        # all the caller asks the ownership arbiter (``None``).
        for _ in range(attempts):
            try:
                reply = self.transport.call(wire.Abort(migration_id, reason[: wire.MAX_TEXT_LEN]))
            except TransportError:
                continue
            return reply.is_already_committed
        return None  # unreachable: it frees a reservation after its timeout, claims a parked copy


class MessageHandler(Protocol):
    """Serves migration messages: ``DestinationMigrations``, or a llumlet core in front of one."""

    def handle(self, msg: wire.Message, payload: object, now: float) -> wire.Reply: ...


class LocalPort:
    """The destination in the same process: calls its message handler directly."""

    def __init__(self, dst: MessageHandler, src: SourcePort, now: Callable[[], float] = time.monotonic,
                 lock=None) -> None:
        self.dst = dst
        self.src = src
        self.now = now
        self.lock = lock

    def _handle(self, msg, payload=None) -> wire.Reply:
        if self.lock is None:
            return self.dst.handle(msg, payload, self.now())
        with self.lock:
            return self.dst.handle(msg, payload, self.now())

    def pre_alloc(self, migration_id, request_id, n):
        reply = self._handle(wire.PreAlloc(migration_id, request_id, n))
        return (tuple(reply.block_ids), "") if reply.ok else (None, reply.error or "refused")

    def copy(self, migration_id, src_ids, dst_ids):
        data = self.src.read_blocks(src_ids)
        torch = sys.modules.get("torch")  # KV data is a tensor only where torch is already loaded
        if torch is not None and isinstance(data, torch.Tensor):
            dtype, shape = wire.dtype_name(data.dtype), tuple(data.shape)
        else:  # an engine without KV data (the simulated one): the message carries only block ids
            dtype, shape = "uint8", (len(dst_ids),)
        reply = self._handle(wire.Blocks(migration_id, tuple(dst_ids), dtype, shape), data)
        if not reply.ok:
            raise TransportError(reply.error or "copy failed")

    def commit(self, migration_id, state):
        reply = self._handle(wire.Commit(migration_id, state))
        return reply.ok, reply.error or ""

    def activate(self, migration_id):
        reply = self._handle(wire.Activate(migration_id))
        return reply.ok, reply.error or ""

    def hold(self, migration_id, hold_s):
        reply = self._handle(_hold(self.src, migration_id, hold_s))
        return reply.ok, reply.error or ""

    def abort(self, migration_id, reason, attempts=1):
        reply = self._handle(wire.Abort(migration_id, reason))
        return reply.is_already_committed


@dataclass(frozen=True)
class MigrationResult:
    """How one migration went (times in seconds on the driver's clock)."""

    migration_id: str
    request_id: str
    status: p.MigrationStatus
    reason: str
    mode: str
    stages: int
    blocks: int
    total_s: float
    downtime_s: float  # from freeze to activation on the destination: the request made no progress
    committed_at: float = 0.0  # when the destination was activated (the end of the downtime)
    unresolved: bool = False  # kept frozen: the ownership arbiter did not answer (the llumlet keeps asking)


class MigrationDriver:
    """Runs one migration to completion, or executes its actions one at a time.

    Args:
        src, dst: the source engine and the destination.
        clock: for the downtime and the claim deadline.
        ownership: the arbiter, for a migration whose commit outcome stays unknown.
        claim_timeout_s: how long a claim is retried (``claim_retry_s`` apart, with
            ``sleep``) before the migration ends with the request kept frozen.
    """

    def __init__(self, src: SourcePort, dst: DestinationPort, clock: Callable[[], float] = time.perf_counter,
                 ownership: Optional[OwnershipPort] = None, claim_timeout_s: float = 10.0,
                 claim_retry_s: float = 0.2, sleep: Callable[[float], None] = time.sleep) -> None:
        self.src = src
        self.dst = dst
        self.clock = clock
        self.ownership = ownership
        self.claim_timeout_s = claim_timeout_s
        self.claim_retry_s = claim_retry_s
        self.sleep = sleep
        self._frozen_at: Optional[float] = None
        self._committed_at: Optional[float] = None

    def run(self, m: p.SourceMigration) -> MigrationResult:
        t0 = self.clock()
        self._frozen_at = self._committed_at = None  # a driver may be reused
        action = m.start()
        while not isinstance(action, p.Done):
            action = m.on(self.execute(m, action))
        end = self.clock()
        frozen = self._frozen_at
        committed = self._committed_at
        downtime = (committed - frozen) if (frozen is not None and committed is not None) else 0.0
        return MigrationResult(m.migration_id, m.request_id, m.status, m.reason, m.config.mode.value,
                               m.stages, m.blocks_sent, end - t0, downtime, committed or 0.0, m.unresolved)

    def execute(self, m: p.SourceMigration, action: p.Action) -> p.Event:
        rid, mid = m.request_id, m.migration_id
        if isinstance(action, p.QueryBlocks):
            ids = self.src.incremental_blocks(rid, action.num_sent, action.include_last)
            return p.BlocksQueried(None if ids is None else tuple(ids))
        if isinstance(action, p.PreAllocate):
            try:
                ids, err = self.dst.pre_alloc(mid, rid, action.num_blocks)
            except (TransportError, LlumnixError) as exc:
                ids, err = None, str(exc)
            return p.PreAllocated(ids, err)
        if isinstance(action, p.CopyBlocks):
            try:
                self.dst.copy(mid, list(action.src_block_ids), list(action.dst_block_ids))
            except (TransportError, LlumnixError, ValueError) as exc:
                return p.Copied(False, str(exc))
            return p.Copied(True)
        if isinstance(action, p.HoldDestination):
            try:
                ok, err = self.dst.hold(mid, action.hold_s)
            except (TransportError, LlumnixError) as exc:
                ok, err = False, str(exc)
            return p.HoldReplied(ok, err)
        if isinstance(action, p.Freeze):
            state = self.src.freeze(rid)  # waits for the current step: the request still progresses
            self._frozen_at = self.clock()
            return p.Frozen(state)
        if isinstance(action, p.Commit):
            try:
                ok, err = self.dst.commit(mid, action.state)
            except TransportError as exc:  # no reply: it may have committed (and parked) or not
                return p.Committed(False, str(exc), uncertain=True)
            except LlumnixError as exc:
                ok, err = False, str(exc)
            return p.Committed(ok, err)
        if isinstance(action, p.FreeSrc):
            self.src.free_src(rid)
            return p.SrcFreed()
        if isinstance(action, p.Activate):
            try:
                ok, err = self.dst.activate(mid)
            except (TransportError, LlumnixError) as exc:
                ok, err = False, str(exc)
            self._committed_at = self.clock()
            return p.Activated(ok, err)
        if isinstance(action, p.ClaimOwnership):
            return p.OwnershipDecided(self._claim(mid))
        if isinstance(action, p.Rollback):
            return self._rollback(rid, mid, action)
        raise TypeError(f"unknown action {action!r}")

    def _claim(self, mid: str) -> Optional[str]:
        """Claim the request for the source until the arbiter answers or the deadline passes."""
        deadline = self.clock() + self.claim_timeout_s
        while True:
            owner = ask(self.ownership, mid, Owner.SOURCE)
            if owner is not None:
                return owner.value
            if self.ownership is None or self.clock() >= deadline:
                return None
            self.sleep(self.claim_retry_s)

    def _rollback(self, rid: str, mid: str, action: p.Rollback) -> p.Event:
        if action.best_effort:  # the arbiter decided for the source: run on, then tell the destination
            self.src.unfreeze(rid)
            try:
                self.dst.abort(mid, action.reason, attempts=1)
            except (TransportError, LlumnixError):
                pass
            return p.RolledBack()
        try:
            committed = self.dst.abort(mid, action.reason) if action.abort_dst else False
        except (TransportError, LlumnixError):
            committed = None
        if committed:
            self._committed_at = self.clock()
            return p.RolledBack(committed_on_dst=True)
        if committed is None and action.uncertain:
            return p.RolledBack(unanswered=True)  # still frozen: only the arbiter may decide now
        if action.unfreeze:
            self.src.unfreeze(rid)
        else:
            try:  # end an aborted pre-copy: the request must not stay marked as migrating
                self.src.unfreeze(rid)
            except LlumnixError:
                pass  # the request left the source, or never started a pre-copy
        return p.RolledBack()
