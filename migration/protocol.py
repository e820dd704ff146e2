"""The live-migration protocol as sans-IO state machines (Llumnix, OSDI'24, Section 4.3).

``SourceMigration`` decides, a driver acts. The machine never touches an engine,
a socket or a clock: it returns an action, the driver carries it out (an engine
primitive, a message to the destination) and feeds the outcome back as an event.
The same machine runs under the real llumlet, the in-process runtime and the
simulator; only the drivers differ.

Stages of a running request (``n`` = blocks of the request on the source)::

    stage 1       stage 2 ...          stop-and-copy               release
    |-- full blocks --|-- increment --|-- freeze, last blocks + state, commit --|-- free_src
    ^ request keeps decoding on S ^   ^ downtime: only this part ^

    QueryBlocks(sent, last=False) -> PreAlloc(k) -> CopyBlocks -> ... (at most ``max_stages``)
    [HoldDestination] -> Freeze -> QueryBlocks(sent, last=True) -> PreAlloc(k) -> CopyBlocks
        -> Commit -> Activate -> FreeSrc

``HoldDestination`` (live mode, once a pre-copy reserved blocks there, ``commit_hold_s`` >
0) asks the destination to start no engine step until the migration activates or
aborts, ``commit_hold_s`` at most; the destination answers once its step in progress
ended. It goes out before the freeze, while the request still decodes here, so the
destination's step ends outside the downtime; the stop-and-copy's messages then find
the destination between steps instead of each waiting for one of its steps, and the
request joins the destination's very next step. A destination refuses it when the
source's freeze is more than a fraction of the destination's step away (it steps on
rather than idle that long); the source then asks again once frozen
(Freeze -> HoldDestination -> QueryBlocks ...), and the destination, answering at the end of
the step it started, idles for the rest. A refusal only costs latency::

    source     step k ──────────┤ freeze, last blocks, commit, activate ├ FreeSrc
    dest.      step j ───┤ held (no step) ···························┤ step j+1 (with the request)
                  ^ Hold arrives: answered here   ^ downtime: round trips only

A waiting request has no KV: Freeze -> Commit(state) -> Activate -> FreeSrc. A waiting
turn of a conversation whose earlier turn's KV the source keeps (``ConversationStore``)
carries that prefix: the source's ``freeze`` lends it to the migration and says so with
``num_computed_tokens`` (whole blocks), and its blocks go, read from the source's host
pool, as a stop-and-copy stage:
Freeze -> QueryBlocks(0, last=True) -> PreAlloc(k) -> CopyBlocks -> Commit -> Activate ->
FreeSrc. The prefix only saves a prefill: a destination that refuses the pre-allocation
gets the turn without it (Commit with ``num_computed_tokens`` 0), as in ``RECOMPUTE`` mode.

The destination's commit parks the request; ``Activate`` lets it run there. The
source sends it once it knows the commit went through (its copy stays frozen for
good, then is freed), so at no time do both run it. A commit whose reply was
lost is settled by an ``Abort``: answered ``ALREADY_COMMITTED`` (the destination
runs it: FreeSrc) or ok (the parked copy is dropped: roll back). When no abort is
answered either, the source claims the request from the ownership arbiter
(``ClaimOwnership``, ``migration.ownership``) and stays frozen until it has an answer.

Rollback is one path: unfreeze on the source if frozen, tell the destination to
free its reservation, and report which side aborted (``ABORTED_SRC``: the request
finished, was preempted or aborted on the source; ``ABORTED_DST``: the destination
refused, failed or timed out).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Optional, Union

from llumnix_py.engines.types import MigrationRequestState, SeqStatus


MAX_HOLD_S = 1.0  # the longest step hold a source may ask of a destination (which may cap it lower)


class MigrationStatus(str, enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"  # committed on the destination, freed on the source
    ABORTED_SRC = "aborted_src"
    ABORTED_DST = "aborted_dst"

    @property
    def done(self) -> bool:
        return self is not MigrationStatus.RUNNING


class MigrationMode(str, enum.Enum):
    LIVE = "live"  # multi-stage KV copy (default)
    BLOCKING = "blocking"  # freeze first, copy everything, commit (baseline)
    RECOMPUTE = "recompute"  # move token ids only; the destination re-prefills (engines without KV access)


@dataclass(frozen=True)
class MigrationConfig:
    """Knobs of one migration.

    Attributes:
        max_stages: pre-copy stages at most before stop-and-copy (>= 1).
        last_stage_max_blocks: stop-and-copy once the increment is this small.
        mode: live, blocking or recompute.
        commit_hold_s: how long the destination may hold its engine steps for the
            stop-and-copy (``HoldDestination``; live mode); 0 sends no hold. It bounds
            what the destination's other requests can lose: the rest of the source's
            current step plus the downtime, this long at most, once per migration.
    """

    max_stages: int = 3
    last_stage_max_blocks: int = 16
    mode: MigrationMode = MigrationMode.LIVE
    commit_hold_s: float = 0.05

    def __post_init__(self) -> None:
        if self.max_stages < 1:
            raise ValueError("max_stages must be >= 1")
        if self.last_stage_max_blocks < 0:
            raise ValueError("last_stage_max_blocks must be >= 0")
        if not 0 <= self.commit_hold_s <= MAX_HOLD_S:
            raise ValueError(f"commit_hold_s must be in [0, {MAX_HOLD_S}], got {self.commit_hold_s}")
        object.__setattr__(self, "mode", MigrationMode(self.mode))


# ----- actions (machine -> driver) -------------------------------------------------------------
@dataclass(frozen=True)
class QueryBlocks:
    """Source engine: ``incremental_blocks(request_id, num_sent, include_last)``; reply ``BlocksQueried``."""

    num_sent: int
    include_last: bool


@dataclass(frozen=True)
class PreAllocate:
    """Destination: reserve ``num_blocks``; reply ``PreAllocated``."""

    num_blocks: int


@dataclass(frozen=True)
class CopyBlocks:
    """Read ``src_block_ids`` on the source, write them into ``dst_block_ids``; reply ``Copied``."""

    src_block_ids: tuple[int, ...]
    dst_block_ids: tuple[int, ...]


@dataclass(frozen=True)
class HoldDestination:
    """Destination: start no step until this migration activates or aborts, ``hold_s`` at
    most (the stop-and-copy comes next); reply ``HoldReplied``."""

    hold_s: float


@dataclass(frozen=True)
class Freeze:
    """Source engine: ``freeze(request_id)`` at an iteration boundary; reply ``Frozen``."""


@dataclass(frozen=True)
class Commit:
    """Destination: adopt the request with ``state``; reply ``Committed``."""

    state: MigrationRequestState


@dataclass(frozen=True)
class FreeSrc:
    """Source engine: ``free_src(request_id)``. Then the migration is FINISHED."""


@dataclass(frozen=True)
class Activate:
    """Destination: run the parked request; reply ``Activated``. The source's copy is
    frozen for good from here on (``FreeSrc`` follows)."""


@dataclass(frozen=True)
class ClaimOwnership:
    """Ask the ownership arbiter for the request (the commit's outcome is unknown); reply
    ``OwnershipDecided``. The source stays frozen meanwhile."""


@dataclass(frozen=True)
class Rollback:
    """Undo: ``unfreeze`` on the source if ``unfreeze``, and ``Abort`` to the destination
    if ``abort_dst`` (it holds a reservation). Then the migration ends with ``status``.

    ``uncertain``: the commit's reply was lost, so an unanswered abort leaves the
    outcome open: the driver must not unfreeze then (``RolledBack(unanswered=True)``).
    ``best_effort``: the arbiter gave the request to the source: unfreeze first, then
    one abort whose answer does not matter."""

    unfreeze: bool
    abort_dst: bool
    status: MigrationStatus
    reason: str
    uncertain: bool = False
    best_effort: bool = False


@dataclass(frozen=True)
class Done:
    status: MigrationStatus
    reason: str = ""


Action = Union[QueryBlocks, PreAllocate, CopyBlocks, HoldDestination, Freeze, Commit, FreeSrc, Activate,
               ClaimOwnership, Rollback, Done]


# ----- events (driver -> machine) --------------------------------------------------------------
@dataclass(frozen=True)
class BlocksQueried:
    block_ids: Optional[tuple[int, ...]]  # None: the request is not running any more


@dataclass(frozen=True)
class PreAllocated:
    block_ids: Optional[tuple[int, ...]]  # None: refused
    error: str = ""


@dataclass(frozen=True)
class Copied:
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class HoldReplied:
    ok: bool  # False: refused or unanswered (the stop-and-copy goes ahead all the same)
    error: str = ""


@dataclass(frozen=True)
class Frozen:
    state: Optional[MigrationRequestState]


@dataclass(frozen=True)
class Committed:
    ok: bool
    error: str = ""
    uncertain: bool = False  # no reply: the destination may have committed (parked) or not


@dataclass(frozen=True)
class SrcFreed:
    pass


@dataclass(frozen=True)
class Activated:
    ok: bool  # False: no answer; the destination activates after its own claim
    error: str = ""


@dataclass(frozen=True)
class OwnershipDecided:
    owner: Optional[str]  # ``Owner`` value; None: the arbiter could not be reached in time


@dataclass(frozen=True)
class RolledBack:
    committed_on_dst: bool = False  # the destination had committed after all (a lost reply)
    unanswered: bool = False  # an uncertain rollback's aborts got no answer: still frozen


Event = Union[BlocksQueried, PreAllocated, Copied, HoldReplied, Frozen, Committed, SrcFreed, Activated,
              OwnershipDecided, RolledBack]


@dataclass
class SourceMigration:
    """One migration of ``request_id``, driven from the source.

    Use: ``action = m.start()``; then repeatedly carry out ``action`` and call
    ``action = m.on(event)`` until ``action`` is a ``Done``.
    """

    migration_id: str
    request_id: str
    waiting: bool = False  # a waiting request: no KV to copy
    config: MigrationConfig = field(default_factory=MigrationConfig)

    status: MigrationStatus = MigrationStatus.RUNNING
    stages: int = 0  # KV copy stages done (pre-copy and stop-and-copy)
    blocks_sent: int = 0
    frozen: bool = False
    reserved: int = 0  # blocks the destination holds for us
    state: Optional[MigrationRequestState] = None
    reason: str = ""
    commit_sent: bool = False  # a Commit went out: from now on only its answer (or the arbiter) unfreezes
    handed_over: bool = False  # the destination runs it (Activate or FreeSrc issued): never unfreeze again
    unresolved: bool = False  # ended frozen: the arbiter never answered (the llumlet keeps claiming)
    hold_refused: bool = False  # the hold before the freeze was refused: asked again once frozen
    _pending: Optional[Action] = None
    _src_ids: tuple[int, ...] = ()

    def start(self) -> Action:
        if self.waiting or self.config.mode in (MigrationMode.BLOCKING, MigrationMode.RECOMPUTE):
            return self._expect(Freeze())
        return self._expect(QueryBlocks(0, include_last=False))

    @property
    def last_stage(self) -> bool:
        return self.frozen

    def on(self, event: Event) -> Action:
        pending = self._pending
        if isinstance(pending, QueryBlocks) and isinstance(event, BlocksQueried):
            return self._on_blocks(event)
        if isinstance(pending, PreAllocate) and isinstance(event, PreAllocated):
            return self._on_prealloc(event)
        if isinstance(pending, CopyBlocks) and isinstance(event, Copied):
            return self._on_copied(event)
        if isinstance(pending, HoldDestination) and isinstance(event, HoldReplied):
            if self.frozen:  # the hold asked again at the freeze: the last blocks next
                return self._expect(QueryBlocks(self.blocks_sent, include_last=True))
            self.hold_refused = not event.ok
            return self._expect(Freeze())
        if isinstance(pending, Freeze) and isinstance(event, Frozen):
            return self._on_frozen(event)
        if isinstance(pending, Commit) and isinstance(event, Committed):
            if not event.ok:
                why = f"commit failed: {event.error}"
                return self._expect(Rollback(unfreeze=True, abort_dst=True, status=MigrationStatus.ABORTED_DST,
                                             reason=why, uncertain=event.uncertain))
            return self._expect(Activate())
        if isinstance(pending, Activate) and isinstance(event, Activated):
            if not event.ok:
                self.reason = f"activation unanswered ({event.error}): the destination claims it"
            return self._expect(FreeSrc())
        if isinstance(pending, FreeSrc) and isinstance(event, SrcFreed):
            return self._finish(MigrationStatus.FINISHED, self.reason)
        if isinstance(pending, ClaimOwnership) and isinstance(event, OwnershipDecided):
            return self._on_owner(event)
        if isinstance(pending, Rollback) and isinstance(event, RolledBack):
            if event.committed_on_dst and self.frozen:  # ALREADY_COMMITTED: it runs there already
                self.reason = ""
                return self._expect(FreeSrc())  # the commit went through; only its reply was lost
            if event.unanswered and pending.uncertain and self.frozen:
                self.reason = pending.reason
                return self._expect(ClaimOwnership())
            return self._finish(pending.status, pending.reason)
        raise RuntimeError(f"migration {self.migration_id}: event {event!r} does not answer {pending!r}")

    # ----- transitions -------------------------------------------------------------------
    def _on_blocks(self, event: BlocksQueried) -> Action:
        if event.block_ids is None:
            return self._rollback(MigrationStatus.ABORTED_SRC, "request left the running batch on the source")
        ids = event.block_ids
        if not self.frozen:
            # Stop-and-copy when nothing (more) is worth pre-copying: no full block, the
            # increment is small, or only the last of ``max_stages`` stages is left.
            out_of_stages = self.stages >= self.config.max_stages - 1
            small = self.stages > 0 and len(ids) <= self.config.last_stage_max_blocks
            if not ids or out_of_stages or small:
                return self._stop_and_copy()
        elif not ids:
            return self._after_copy()
        self._src_ids = ids
        return self._expect(PreAllocate(len(ids)))

    def _stop_and_copy(self) -> Action:
        """Freeze next; first ask the destination to hold its steps, if it holds a reservation
        of ours (the hold is tied to the migration there) and the config allows it."""
        if self.reserved > 0 and self.config.commit_hold_s > 0:
            return self._expect(HoldDestination(self.config.commit_hold_s))
        return self._expect(Freeze())

    def _on_prealloc(self, event: PreAllocated) -> Action:
        if event.block_ids is None or len(event.block_ids) != len(self._src_ids):
            if self.waiting and self.frozen and self.state is not None:  # the prefix stays behind
                self._src_ids = ()
                self.state = _without_prefix(self.state)
                return self._expect(Commit(self.state))
            why = event.error or "destination refused the pre-allocation"
            return self._rollback(MigrationStatus.ABORTED_DST, why)
        self.reserved += len(event.block_ids)
        return self._expect(CopyBlocks(self._src_ids, tuple(event.block_ids)))

    def _on_copied(self, event: Copied) -> Action:
        if not event.ok:
            return self._rollback(MigrationStatus.ABORTED_DST, f"copy failed: {event.error}")
        self.blocks_sent += len(self._src_ids)
        self.stages += 1
        self._src_ids = ()
        return self._after_copy()

    def _after_copy(self) -> Action:
        if self.frozen:
            assert self.state is not None
            return self._expect(Commit(self.state))
        return self._expect(QueryBlocks(self.blocks_sent, include_last=False))

    def _on_frozen(self, event: Frozen) -> Action:
        state = event.state
        if state is None:
            return self._rollback(MigrationStatus.ABORTED_SRC, "request finished or left the source before freezing")
        self.frozen = True
        expect = SeqStatus.WAITING if self.waiting else SeqStatus.RUNNING
        if state.status != expect:
            return self._rollback(MigrationStatus.ABORTED_SRC, f"request became {state.status.value} on the source")
        if self.waiting:
            if state.num_computed_tokens and self.config.mode != MigrationMode.RECOMPUTE:
                self.state = state  # a conversation's stored prefix travels with the turn
                return self._expect(QueryBlocks(self.blocks_sent, include_last=True))
            self.state = _without_prefix(state)
            return self._expect(Commit(self.state))
        if self.config.mode == MigrationMode.RECOMPUTE:
            self.state = _as_waiting(state)
            return self._expect(Commit(self.state))
        self.state = state
        if self.hold_refused:
            # The destination would not idle for a freeze more than a fraction of its step away,
            # and stepped on; now the freeze is here, ask once more, or each message of the
            # stop-and-copy would wait for one of its steps (about three steps of downtime).
            self.hold_refused = False
            return self._expect(HoldDestination(self.config.commit_hold_s))
        return self._expect(QueryBlocks(self.blocks_sent, include_last=True))

    def _on_owner(self, event: OwnershipDecided) -> Action:
        if event.owner is None:  # keep it frozen: consistency over availability
            self.unresolved = True
            return self._finish(MigrationStatus.ABORTED_DST, f"{self.reason}; ownership unresolved, kept frozen")
        if event.owner == "destination":
            self.reason = ""
            return self._expect(Activate())  # it may still be parked there
        return self._expect(Rollback(unfreeze=True, abort_dst=True, status=MigrationStatus.ABORTED_DST,
                                     reason=f"{self.reason}; the arbiter gave it to the source", best_effort=True))

    def _rollback(self, status: MigrationStatus, reason: str) -> Action:
        return self._expect(Rollback(unfreeze=self.frozen, abort_dst=True, status=status, reason=reason))

    def _finish(self, status: MigrationStatus, reason: str) -> Action:
        self.status = status
        self.reason = reason
        self._pending = None
        return Done(status, reason)

    def _expect(self, action: Action) -> Action:
        if isinstance(action, Commit):
            self.commit_sent = True
        if isinstance(action, (Activate, FreeSrc)) and self.frozen:
            self.handed_over = True
        self._pending = action
        return action


def _without_prefix(state: MigrationRequestState) -> MigrationRequestState:
    """A waiting turn that moves without its conversation's stored prefix: recomputed there."""
    return dataclasses.replace(state, num_computed_tokens=0) if state.num_computed_tokens else state


def _as_waiting(state: MigrationRequestState) -> MigrationRequestState:
    """Migration by recomputation: the destination re-prefills prompt + outputs so far."""
    return MigrationRequestState(
        request_id=state.request_id,
        prompt_token_ids=state.prompt_token_ids,
        output_token_ids=state.output_token_ids,
        sampling=state.sampling,
        priority=state.priority,
        arrival_time=state.arrival_time,
        num_preemptions=state.num_preemptions,
        status=SeqStatus.WAITING,
        num_computed_tokens=0,
        reply_to=state.reply_to,
        objective=state.objective,
    )
