"""Destination-side bookkeeping of incoming migrations.

One record per migration id: the request it brings, the blocks reserved for it,
which of them were written, and when the source was last heard from. Every
message is checked against that record (a source may only write blocks reserved
for its own migration), and any failure frees the reservation, so a bad or
vanished source never leaks blocks. The caller serializes calls with engine steps
(the llumlet holds its engine lock) and passes the time in: no clock inside.

A commit is provisional: the request is adopted (``commit_dst``) and parked at once
(``freeze``: it holds its blocks but is not scheduled and emits nothing) until the
source sends ``Activate`` (``unfreeze``). An ``Abort`` drops a parked copy
(``free_src``) and answers ok; once activated, it answers ``ALREADY_COMMITTED``. A
copy parked for ``timeout_s`` is due for an ownership claim (``claims_due``); the
caller asks the arbiter and applies the answer (``settle``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

from llumnix_py.engines.base import EngineAdapter
from llumnix_py.engines.types import SeqStatus
from llumnix_py.errors import LlumnixError, ProtocolError
from migration import wire
from migration.ownership import Owner

_REMEMBER_COMMITTED = 4096


@dataclass
class Incoming:
    request_id: str
    reserved: list[int] = field(default_factory=list)
    written: set[int] = field(default_factory=set)
    last_seen: float = 0.0


@dataclass
class Parked:
    """A committed request waiting for ``Activate`` (or for the arbiter)."""

    request_id: str
    reply_to: str
    since: float
    next_claim: float


class DestinationMigrations:
    """Handles ``PreAlloc``/``Blocks``/``Commit``/``Activate``/``Abort`` for one engine.

    Args:
        engine: the destination engine adapter.
        max_incoming: concurrent incoming migrations at most (more are refused).
        timeout_s: a migration whose source is silent this long is aborted by ``expire``.
    """

    def __init__(self, engine: EngineAdapter, max_incoming: int = 1, timeout_s: float = 10.0) -> None:
        self.engine = engine
        self.max_incoming = max_incoming
        self.timeout_s = timeout_s
        self.incoming: dict[str, Incoming] = {}
        self.committed: "OrderedDict[str, str]" = OrderedDict()  # migration id -> request id (parked or active)
        self.parked: dict[str, Parked] = {}  # committed, not activated yet
        self.num_committed = 0
        self.num_aborted = 0

    def handle(self, msg: wire.Message, payload: object, now: float) -> wire.Reply:
        """Apply one validated message; never raises for bad input (returns an error reply)."""
        try:
            if isinstance(msg, wire.Ping):
                return wire.Reply(ok=True)
            if isinstance(msg, wire.PreAlloc):
                return self._pre_alloc(msg, now)
            if isinstance(msg, wire.Blocks):
                return self._blocks(msg, payload, now)
            if isinstance(msg, wire.Commit):
                return self._commit(msg, now)
            if isinstance(msg, wire.Activate):
                return self._activate(msg)
            if isinstance(msg, wire.Abort):
                return self._abort(msg)
            return wire.Reply(ok=False, error=f"unexpected message {type(msg).__name__}")
        except (LlumnixError, ValueError, TypeError) as exc:
            self._drop(getattr(msg, "migration_id", None))
            return wire.Reply(ok=False, error=f"{type(exc).__name__}: {exc}")

    def _pre_alloc(self, msg: wire.PreAlloc, now: float) -> wire.Reply:
        rec = self.incoming.get(msg.migration_id)
        if rec is None:
            if msg.migration_id in self.committed:
                if msg.migration_id in self.parked:
                    return wire.Reply(ok=False, error="committed, waiting for activation")
                return wire.Reply.already_committed()
            if len(self.incoming) >= self.max_incoming:
                return wire.Reply(ok=False, error="destination is full of migrations")
            if any(r.request_id == msg.request_id for r in self.incoming.values()):
                return wire.Reply(ok=False, error=f"request {msg.request_id} is already migrating in")
            rec = Incoming(msg.request_id)
        elif rec.request_id != msg.request_id:
            raise ProtocolError("pre_alloc names another request than its migration")
        got = self.engine.pre_alloc(msg.request_id, msg.num_blocks)
        if got is None:
            if not rec.reserved:
                self.incoming.pop(msg.migration_id, None)
            return wire.Reply(ok=False, error="not enough free blocks above the watermark")
        rec.reserved.extend(got)
        rec.last_seen = now
        self.incoming[msg.migration_id] = rec
        return wire.Reply(ok=True, block_ids=tuple(got))

    def _blocks(self, msg: wire.Blocks, payload: object, now: float) -> wire.Reply:
        rec = self._record(msg.migration_id)
        ids = set(msg.dst_block_ids)
        if not ids <= set(rec.reserved):
            raise ProtocolError("blocks message names blocks not reserved for this migration")
        self.engine.write_blocks(list(msg.dst_block_ids), payload)
        rec.written |= ids
        rec.last_seen = now
        return wire.Reply(ok=True)

    def _commit(self, msg: wire.Commit, now: float) -> wire.Reply:
        if msg.migration_id in self.committed:
            return wire.Reply(ok=True)  # a retried commit
        state = msg.state
        rec = self.incoming.get(msg.migration_id)
        if rec is not None and rec.request_id != state.request_id:
            raise ProtocolError("commit names another request than its migration")
        if state.status == SeqStatus.RUNNING or state.num_computed_tokens:  # its KV came in reserved blocks
            if rec is None:
                raise ProtocolError("commit of a request with computed tokens without reserved blocks")
            if rec.written != set(rec.reserved):
                raise ProtocolError(
                    f"commit before all reserved blocks were written ({len(rec.written)}/{len(rec.reserved)})")
        self.engine.commit_dst(state)
        if self.engine.freeze(state.request_id) is None:  # parked: no step, no token until activated
            raise ProtocolError(f"request {state.request_id} could not be parked")
        self.incoming.pop(msg.migration_id, None)
        self.parked[msg.migration_id] = Parked(state.request_id, state.reply_to, now, now + self.timeout_s)
        self.committed[msg.migration_id] = state.request_id
        while len(self.committed) > _REMEMBER_COMMITTED:
            old, _ = self.committed.popitem(last=False)
            if old in self.parked:  # never forget a parked copy: put it back at the young end
                self.committed[old] = self.parked[old].request_id
                break
        self.num_committed += 1
        return wire.Reply(ok=True)

    def _activate(self, msg: wire.Activate) -> wire.Reply:
        if msg.migration_id in self.parked:
            self.activate(msg.migration_id)
            return wire.Reply(ok=True)
        if msg.migration_id in self.committed:
            return wire.Reply(ok=True)  # a retried activation
        return wire.Reply(ok=False, error=f"no parked request for migration {msg.migration_id!r}")

    def _abort(self, msg: wire.Abort) -> wire.Reply:
        if msg.migration_id in self.parked:
            self.drop_parked(msg.migration_id)  # it never ran here: the source keeps the request
            return wire.Reply(ok=True)
        if msg.migration_id in self.committed:
            return wire.Reply.already_committed()
        self._drop(msg.migration_id)
        return wire.Reply(ok=True)

    # ----- parked copies -------------------------------------------------------------------
    def activate(self, migration_id: str) -> Parked:
        """The parked request joins the batch (``Activate``, or the arbiter said so)."""
        rec = self.parked.pop(migration_id)
        self.engine.unfreeze(rec.request_id)
        return rec

    def drop_parked(self, migration_id: str) -> Parked:
        """Forget a parked copy and free its blocks (an ``Abort``, or the source owns it)."""
        rec = self.parked.pop(migration_id)
        self.committed.pop(migration_id, None)
        self.engine.free_src(rec.request_id)
        self.num_aborted += 1
        return rec

    def parked_for(self, request_id: str) -> list[str]:
        return [m for m, r in self.parked.items() if r.request_id == request_id]

    def claims_due(self, now: float, retry_s: float) -> list[tuple[str, str]]:
        """``(migration id, request id)`` of copies parked too long, each at most once per
        ``retry_s`` (a claim in flight is not repeated until then)."""
        due = [(m, r.request_id) for m, r in self.parked.items() if now - r.since > self.timeout_s
               and now >= r.next_claim]
        for m, _ in due:
            self.parked[m].next_claim = now + retry_s
        return due

    def settle(self, migration_id: str, owner: Owner) -> Optional[Parked]:
        """Apply the arbiter's answer to a parked copy: activated (returned) or dropped.
        Nothing if it is not parked any more (an ``Abort`` or ``Activate`` came meanwhile)."""
        if migration_id not in self.parked:
            return None
        if owner == Owner.DESTINATION:
            return self.activate(migration_id)
        self.drop_parked(migration_id)
        return None

    def _record(self, migration_id: str) -> Incoming:
        rec = self.incoming.get(migration_id)
        if rec is None:
            raise ProtocolError(f"unknown migration {migration_id!r}")
        return rec

    def _drop(self, migration_id: Optional[str]) -> None:
        rec = self.incoming.pop(migration_id, None) if migration_id else None
        if rec is not None:
            self.engine.free_pre_alloc(rec.request_id)
            self.num_aborted += 1

    def expire(self, now: float) -> list[str]:
        """Abort migrations whose source has been silent for ``timeout_s``; returns their ids."""
        stale = [m for m, r in self.incoming.items() if now - r.last_seen > self.timeout_s]
        for m in stale:
            self._drop(m)
        return stale

    def abort_all(self) -> None:
        for m in list(self.incoming):
            self._drop(m)
