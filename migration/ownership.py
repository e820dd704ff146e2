"""Who owns a migrating request when messages were lost: one arbiter, first claim wins.

A destination's commit is provisional: it parks the request (blocks and state
adopted, nothing scheduled) until the source activates it. Normally the source
decides by itself (commit ok: ``Activate``; an ``Abort`` answered: it keeps the
request). Only when neither side can learn the other's state (a lost commit reply
and unanswered aborts on the source; a parked copy never activated on the
destination) does a side *claim* the request from the ``OwnershipArbiter``. The
first claim for a migration id decides; every later claim gets the same answer::

    source: commit reply lost, aborts unanswered ──claim(SOURCE)──►  arbiter ──► SOURCE: unfreeze
                                                                             └─► DESTINATION: free_src
    destination: parked past its timeout       ──claim(DESTINATION)─►        ──► DESTINATION: activate
                                                                             └─► SOURCE: drop the copy

The arbiter is sans-IO (``now`` passed in) and bounded: decisions are remembered
for ``ttl_s``, at most ``max_entries`` of them. The global scheduler owns one (it
orders every migration) and reaches llumlets through an ``OwnershipPort``. An
instance found dead settles its open migrations in favour of the source side
(``settle_dead``): the frontend resumes a dead source's requests by recomputation,
and a dead destination's parked copy is gone, so the source keeps its own.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from typing import Callable, Optional

log = logging.getLogger(__name__)


class Owner(str, enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"


OwnershipPort = Callable[[str, Owner], Owner]
"""``claim(migration_id, side) -> Owner``: reach the arbiter; raises when it cannot be reached."""


def ask(port: Optional[OwnershipPort], migration_id: str, side: Owner) -> Optional[Owner]:
    """One claim through ``port``; ``None`` when there is no port or it does not answer."""
    if port is None:
        return None
    try:
        return Owner(port(migration_id, side))
    except Exception as exc:  # unreachable, timed out, restarting: the caller stays put and retries
        log.warning("ownership claim of %s by the %s failed: %s", migration_id, side.value, exc)
        return None


class OwnershipArbiter:
    """First claim wins, once per migration id (see the module docstring).

    Args:
        ttl_s: how long a decision (or an open migration) is remembered.
        max_entries: decisions remembered at most (the oldest go first).
    """

    def __init__(self, ttl_s: float = 3600.0, max_entries: int = 100_000) -> None:
        if ttl_s <= 0 or max_entries < 1:
            raise ValueError("ttl_s must be positive and max_entries >= 1")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._decided: "OrderedDict[str, tuple[Owner, float]]" = OrderedDict()  # id -> (owner, decided at)
        self._open: "OrderedDict[str, tuple[str, str, float]]" = OrderedDict()  # id -> (src, dst, opened at)

    def claim(self, migration_id: str, side: Owner, now: float) -> Owner:
        """The owner of ``migration_id``: the first claim's side, for every claim within ``ttl_s``."""
        side = Owner(side)
        self._expire(now)
        got = self._decided.get(migration_id)
        if got is not None:
            return got[0]
        self._decided[migration_id] = (side, now)
        self._open.pop(migration_id, None)
        while len(self._decided) > self.max_entries:
            self._decided.popitem(last=False)
        return side

    def decided(self, migration_id: str) -> Optional[Owner]:
        got = self._decided.get(migration_id)
        return None if got is None else got[0]

    def open(self, migration_id: str, src: str, dst: str, now: float) -> None:
        """A migration was ordered from ``src`` to ``dst`` (for ``settle_dead``)."""
        self._expire(now)
        self._open[migration_id] = (src, dst, now)
        while len(self._open) > self.max_entries:
            self._open.popitem(last=False)

    def settle_dead(self, instance_id: str, now: float) -> list[str]:
        """``instance_id`` died: claim every open migration it took part in for the source
        side (a parked copy on a live destination is then dropped, and the frontend's
        recomputation, or the live source, keeps the request). Returns the ids settled."""
        self._expire(now)
        ids = [m for m, (s, d, _) in self._open.items() if instance_id in (s, d)]
        for m in ids:
            self.claim(m, Owner.SOURCE, now)
        return ids

    def __len__(self) -> int:
        return len(self._decided)

    def _expire(self, now: float) -> None:
        for table in (self._decided, self._open):
            while table and now - next(iter(table.values()))[-1] > self.ttl_s:
                table.popitem(last=False)
