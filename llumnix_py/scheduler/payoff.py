"""Whether migrations pay off, sans-IO: one ledger shared by the daemon and the simulator.

The global scheduler owns a ``MigrationLedger`` and feeds it what it already sees:
the orders it issues (with both ends' freeness at that moment), the load snapshots
it polls, and the end of each migration (the driver reports results). From these
alone, with no clock and no engine access, it records for every migration::

    order ──────────── end (finished) ──── one interval ────► closed
    freeness before    blocks copied,      first snapshot of each end at or after
    (src, dst)         returned?           ended_at + interval: freeness after;
                                           dst preempted anything in the window?

* **returned**: the migration took the request to an instance it had left earlier
  (ping-pong); the earlier migration that left that instance is marked
  ``returned_later``.
* **caused preemption**: a request on the destination has more preemptions in a
  snapshot inside the window than in the destination's last snapshot before the
  end (requests first seen inside the window count from their first value). The
  resolution is the poll interval: a preemption between that last snapshot and the
  end is counted too, one inside the window but after the closing snapshot is not.

Per request it counts finished migrations (bounded: the oldest requests are
forgotten past ``max_requests``, so a long-lived daemon does not grow).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import numpy as np

if TYPE_CHECKING:
    from llumnix_py.load import InstanceLoad


@dataclass(eq=False)
class MigrationRecord:
    """One migration as the scheduler saw it (freeness in decode steps, times on its clock)."""

    migration_id: str
    request_id: str
    src: str
    dst: str
    ordered_at: float
    src_freeness_before: Optional[float] = None
    dst_freeness_before: Optional[float] = None
    ended_at: Optional[float] = None
    finished: bool = False
    blocks: int = 0
    returned: bool = False  # to an instance the request had left earlier
    returned_later: bool = False  # the request later came back to ``src``
    src_freeness_after: Optional[float] = None
    dst_freeness_after: Optional[float] = None
    caused_preemption: bool = False
    closed: bool = False  # the window after the end is over (or an end was removed)
    _baseline: dict[str, int] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        """The public fields; a non-finite freeness (a terminating end) becomes None (JSON)."""
        out = {}
        for k, v in self.__dict__.items():
            if not k.startswith("_"):
                out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        return out


def per_request_stats(counts: Iterable[int], num_requests: int) -> tuple[int, float]:
    """``(max, P99)`` of migrations per request over ``num_requests`` requests, of which
    those not in ``counts`` migrated 0 times."""
    values = [int(c) for c in counts]
    if num_requests <= 0 and not values:
        return 0, 0.0
    zeros = max(0, num_requests - len(values))
    if not values:
        return 0, 0.0
    a = np.concatenate([np.asarray(values, dtype=np.float64), np.zeros(zeros)])
    return int(a.max()), float(np.percentile(a, 99))


class MigrationLedger:
    """Per-migration payoff records and per-request migration counts.

    Args:
        interval_s: the window after a migration's end (one migration interval).
        freeness_of: a load snapshot -> its migration freeness (the scheduler's policy).
        keep_records: keep every closed record in ``records`` (the simulator); a daemon
            keeps only the counters.
        max_requests: per-request state kept for at most this many requests.
    """

    def __init__(self, interval_s: float, freeness_of: Callable[["InstanceLoad"], float],
                 keep_records: bool = False, max_requests: int = 100_000) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.interval_s = interval_s
        self._freeness_of = freeness_of
        self.keep_records = keep_records
        self.max_requests = max_requests
        self.records: list[MigrationRecord] = []  # every ended migration, if keep_records
        self._ordered: dict[str, MigrationRecord] = {}  # in flight, by migration id
        self._open: list[MigrationRecord] = []  # finished, window not over
        self._last: dict[str, "InstanceLoad"] = {}  # last snapshot per instance
        self._per_request: OrderedDict[str, int] = OrderedDict()
        self.last_moved: dict[str, float] = {}  # request -> end of its last finished migration
        self._left: dict[str, dict[str, MigrationRecord]] = {}  # request -> instance it left -> that migration
        self.finished = 0
        self.aborted = 0
        self.returns = 0
        self.caused_preemptions = 0
        self.blocks_copied = 0

    # ----- events -------------------------------------------------------------------------
    def on_order(self, migration_id: str, request_id: str, src: str, dst: str, now: float) -> None:
        """An order was issued; both ends' freeness is taken from their last snapshots."""
        rec = MigrationRecord(migration_id, request_id, src, dst, now,
                              self._freeness(src), self._freeness(dst))
        self._ordered[migration_id] = rec

    @property
    def watching(self) -> bool:
        """Whether a migration is in flight or inside its window (its snapshots matter)."""
        return bool(self._ordered or self._open)

    def due(self, now: float) -> set[str]:
        """Instances whose "after" snapshot is due at ``now`` (a window is over) and not yet
        taken. A driver that polls only changed instances feeds these their unchanged
        snapshot again (the simulator), so every window closes."""
        out: set[str] = set()
        for rec in self._open:
            if now >= rec.ended_at + self.interval_s - 1e-9:
                if rec.src_freeness_after is None:
                    out.add(rec.src)
                if rec.dst_freeness_after is None:
                    out.add(rec.dst)
        return out

    def moved_since(self, since: float) -> dict[str, float]:
        """Requests whose last finished migration ended at or after ``since`` (and when);
        entries older than that are dropped, so the table stays as small as the window."""
        stale = [rid for rid, t in self.last_moved.items() if t < since]
        for rid in stale:
            del self.last_moved[rid]
        return dict(self.last_moved)

    def drop_order(self, migration_id: str) -> None:
        """Forget an order whose end will not be reported (expired, or an end was removed)."""
        self._ordered.pop(migration_id, None)

    def on_load(self, instance_id: str, load: "InstanceLoad", now: float) -> None:
        """A snapshot of ``instance_id`` was polled at ``now``."""
        self._last[instance_id] = load
        if not self._open:
            return
        closing = False
        for rec in self._open:
            if instance_id not in (rec.src, rec.dst):
                continue
            over = now >= rec.ended_at + self.interval_s - 1e-9
            if instance_id == rec.dst and not rec.caused_preemption:
                if _preempted_since(rec._baseline, load):
                    rec.caused_preemption = True
                    self.caused_preemptions += 1
            if over:
                f = self._freeness_of(load)
                if instance_id == rec.src and rec.src_freeness_after is None:
                    rec.src_freeness_after = f
                if instance_id == rec.dst and rec.dst_freeness_after is None:
                    rec.dst_freeness_after = f
                if rec.src_freeness_after is not None and rec.dst_freeness_after is not None:
                    rec.closed = closing = True
        if closing:
            self._close_done()

    def on_end(self, migration_id: str, request_id: str, finished: bool, blocks: int, now: float,
               src: str = "", dst: str = "") -> None:
        """A migration ended (``finished``: committed on the destination).

        ``src``/``dst`` name the ends of a migration this ledger never saw ordered
        (a driver's own order); otherwise they come from the order.
        """
        rec = self._ordered.pop(migration_id, None)
        if rec is None:
            rec = MigrationRecord(migration_id, request_id, src, dst, now)
        rec.ended_at = now
        rec.finished = finished
        rec.blocks = blocks
        if self.keep_records:
            self.records.append(rec)
        if not finished:
            self.aborted += 1
            rec.closed = True
            return
        self.finished += 1
        self.blocks_copied += blocks
        self._count(request_id)
        self.last_moved[request_id] = now
        left = self._left.setdefault(request_id, {})
        earlier = left.get(rec.dst)
        if earlier is not None:
            rec.returned = True
            earlier.returned_later = True
            self.returns += 1
        left[rec.src] = rec
        last = self._last.get(rec.dst)
        rec._baseline = _preemptions(last) if last is not None else {}
        self._open.append(rec)

    def on_remove(self, instance_id: str) -> None:
        """An instance left: windows that need its snapshots close as they stand."""
        self._last.pop(instance_id, None)
        for rec in self._open:
            if instance_id in (rec.src, rec.dst):
                rec.closed = True
        self._close_done()

    def _close_done(self) -> None:
        """Drop closed records from the open list, and their baselines (records stay
        referenced by the per-request paths, so they must not keep snapshots alive)."""
        still = []
        for rec in self._open:
            if rec.closed:
                rec._baseline = {}
            else:
                still.append(rec)
        self._open = still

    # ----- results --------------------------------------------------------------------------
    def migrations_of(self, request_id: str) -> int:
        """Finished migrations of ``request_id`` (0 if never migrated or forgotten)."""
        return self._per_request.get(request_id, 0)

    def stats(self, num_requests: int = 0) -> dict:
        """Counters, and migrations per request over ``num_requests`` requests (those this
        ledger does not know migrated 0 times; default: only the migrated ones)."""
        mx, p99 = per_request_stats(self._per_request.values(), max(num_requests, len(self._per_request)))
        return {
            "migrations_finished": self.finished,
            "migrations_aborted": self.aborted,
            "migration_returns": self.returns,
            "migration_return_rate": self.returns / self.finished if self.finished else 0.0,
            "migration_caused_preemptions": self.caused_preemptions,
            "migration_blocks_copied": self.blocks_copied,
            "migrations_per_request_max": mx,
            "migrations_per_request_p99": p99,
            "requests_migrated": len(self._per_request),
        }

    # ----- helpers --------------------------------------------------------------------------
    def _freeness(self, instance_id: str) -> Optional[float]:
        load = self._last.get(instance_id)
        if load is None:
            return None
        f = self._freeness_of(load)
        return f if math.isfinite(f) else None

    def _count(self, request_id: str) -> None:
        per = self._per_request
        per[request_id] = per.pop(request_id, 0) + 1  # most recent last
        while len(per) > self.max_requests:
            old, _ = per.popitem(last=False)
            self._left.pop(old, None)
            self.last_moved.pop(old, None)


def _preemptions(load: "InstanceLoad") -> dict[str, int]:
    return {r.request_id: r.num_preemptions for r in load.running + load.waiting}


def _preempted_since(baseline: dict[str, int], load: "InstanceLoad") -> bool:
    """Whether a request in ``load`` has more preemptions than in ``baseline``; requests
    new to the baseline are added with their current count."""
    grew = False
    for r in load.running + load.waiting:
        seen = baseline.setdefault(r.request_id, r.num_preemptions)
        if r.num_preemptions > seen:
            grew = True
    return grew
