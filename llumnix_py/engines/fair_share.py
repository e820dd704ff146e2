"""One engine's per-client service counters, and the fairness policy's decisions over its queues.

Mechanism only: the counters are books (charged after every step, lifted when an idle
client returns or a migrated request of an idle client commits here; ``served`` holds the
charges alone, so a client's service summed over instances counts every token once);
which request is admitted first, which one is preempted and when a running request
yields to a waiting one are ``policies.fairness``' pure functions.

Bounded books. A client with no request here is *idle*. The book keeps ``floor``, VTC's lift
point that never falls (the smallest counter of the active clients, remembered while none is
active), and forgets:

- an idle client whose counter is at or below ``floor``, at once: it would return lifted to
  the floor anyway, so every decision is the same as with it kept (``fairness.forgettable``);
- the longest-idle client once more than ``max_idle_clients`` are idle in a book (from
  ``counters``, and from ``served``, which must keep an idle client's last service until the
  global scheduler has polled it). This one is not exact: a client over its share returns
  lifted to the floor, its excess forgiven; the global scheduler's book misses service only
  if more than ``max_idle_clients`` clients go idle on this instance between two polls.

So a book holds at most the active clients plus ``max_idle_clients`` idle ones.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Iterable, Optional, Sequence as Seq

from llumnix_py.engines.sequence import Sequence
from policies import fairness
from policies.fairness import FairItem, VtcWeights


def _item(seq: Sequence) -> FairItem:
    return FairItem(seq.request_id, seq.client_id, seq.priority, seq.arrival_time)


class FairShare:
    """Virtual token counters of one engine's clients.

    Args:
        weights: service per prompt token and per generated token.
        margin: weighted tokens of extra service after which a running client yields to a
            waiting one (FastSwitch's priority adjustment; larger: fewer context switches).
        max_idle_clients: idle clients a book keeps at most (the longest idle go first);
            ``None``: no cap.
        forget_at_floor: drop idle clients at or below the floor at once (exact; off only to
            compare against a book that keeps everything).
    """

    def __init__(self, weights: VtcWeights = VtcWeights(), margin: float = 64.0,
                 max_idle_clients: Optional[int] = 4096, forget_at_floor: bool = True) -> None:
        if max_idle_clients is not None and max_idle_clients < 0:
            raise ValueError(f"max_idle_clients must be >= 0 or None, got {max_idle_clients!r}")
        self.weights = weights
        self.margin = margin
        self.max_idle_clients = max_idle_clients
        self.forget_at_floor = forget_at_floor
        self.counters: dict[str, float] = {}
        self.served: dict[str, float] = {}  # weighted tokens served here per client: charges only, no lifts
        self.floor = 0.0  # VTC's lift point; never falls
        self._active: set[str] = set()  # clients with a request here, as last settled
        self._idle: OrderedDict[str, None] = OrderedDict()  # idle clients in a book, longest idle first
        self._low: list[tuple[float, str]] = []  # (counter, client) of idle clients, a heap (stale entries skipped)
        self.switches = 0  # running requests that yielded to a waiting one
        # Global fairness: per client, cluster counter minus this engine's counter at the
        # scheduler's last poll (``policies.fairness.cluster_offsets``); empty: local only.
        self.offsets: dict[str, float] = {}

    def set_offsets(self, offsets: dict[str, float]) -> None:
        """The global scheduler's view: decisions order clients by cluster-wide service."""
        self.offsets = dict(offsets)

    def view(self) -> dict[str, float]:
        """The counters decisions read: this engine's, in the cluster's frame when it has one."""
        return fairness.in_cluster_frame(self.counters, self.offsets) if self.offsets else self.counters

    def settle(self, active: Iterable[str]) -> None:
        """The clients with a request here now: raise the floor to the smallest counter of the
        clients active until now or now (each at least the floor, so every later lift point
        is too), note who went idle, and forget what the book may (see the module)."""
        active = set(active)
        stood = active | self._active  # those leaving now were active until now: their counters count
        if stood:
            self.floor = max(self.floor, min(self.counters.get(c, 0.0) for c in stood))
        for c in self._active - active:
            self._idle[c] = None
            self._idle.move_to_end(c)
            if c in self.counters:
                heapq.heappush(self._low, (self.counters[c], c))
        for c in active - self._active:
            self._idle.pop(c, None)
        self._active = active
        self._forget()

    def _forget(self) -> None:
        if self.forget_at_floor:
            while self._low and self._low[0][0] <= self.floor:
                value, c = heapq.heappop(self._low)
                if c in self._idle and self.counters.get(c) == value:
                    del self.counters[c]
                    if c not in self.served:
                        del self._idle[c]
        cap = self.max_idle_clients
        while cap is not None and len(self._idle) > cap:
            c, _ = self._idle.popitem(last=False)
            self.counters.pop(c, None)
            self.served.pop(c, None)

    def size(self) -> int:
        """Clients in either book (what the bound above limits)."""
        return len(self.counters.keys() | self.served.keys())

    def _became_active(self, client: str) -> None:
        self._active.add(client)
        self._idle.pop(client, None)

    def on_arrival(self, client: str, active: Iterable[str]) -> None:
        active = set(active)
        self.settle(active)
        self.counters = fairness.lift(self.counters, client, active, self.floor)
        self._became_active(client)

    def lead_of(self, client: str, active: Iterable[str]) -> float:
        """The client's lead over the least-served active client (what a migration carries)."""
        return fairness.lead(self.counters, client, active)

    def on_migrated_in(self, client: str, active: Iterable[str], lead: float) -> float:
        """A migrated request of ``client`` committed here: lift its counter (``lift_migrated``);
        returns how much it rose, for ``undo_lift`` should the copy be dropped unrun."""
        active = set(active)
        self.settle(active)
        before = self.counters.get(client, 0.0)
        self.counters = fairness.lift_migrated(self.counters, client, active, lead, self.floor)
        self._became_active(client)
        return self.counters[client] - before

    def undo_lift(self, client: str, rise: float) -> None:
        """Take back a migrated-in request's lift (its copy was dropped before it ran); charges
        since then stay, so the counter is what it would be had the migration not come (the
        client goes idle, if it has no other request, at the next ``settle``)."""
        self.counters[client] = self.counters.get(client, 0.0) - rise

    def on_step(self, prompt_tokens: dict[str, int], output_tokens: dict[str, int]) -> None:
        self.counters = fairness.charge(self.counters, prompt_tokens, output_tokens, self.weights)
        self.served = fairness.charge(self.served, prompt_tokens, output_tokens, self.weights)

    def order(self, waiting: Seq[Sequence]) -> list[Sequence]:
        by_id = {s.request_id: s for s in waiting}
        return [by_id[r] for r in fairness.fair_order([_item(s) for s in waiting], self.view())]

    def victim(self, running: Seq[Sequence]) -> Sequence:
        rid = fairness.fair_victim([_item(s) for s in running], self.view())
        return next(s for s in running if s.request_id == rid)

    def switch_victim(self, head: Sequence, running: Seq[Sequence]) -> Optional[Sequence]:
        rid = fairness.switch_victim(_item(head), [_item(s) for s in running], self.view(), self.margin)
        if rid is None:
            return None
        self.switches += 1
        return next(s for s in running if s.request_id == rid)
