"""One engine's per-client service counters, and the fairness policy's decisions over its queues.

Mechanism only: the counters are books (charged after every step, lifted when an idle
client returns or a migrated request of an idle client commits here; ``served`` holds the
charges alone, so a client's service summed over instances counts every token once);
which request is admitted first, which one is preempted and when a running request
yields to a waiting one are ``policies.fairness``' pure functions.
"""

from __future__ import annotations

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
    """

    def __init__(self, weights: VtcWeights = VtcWeights(), margin: float = 64.0) -> None:
        self.weights = weights
        self.margin = margin
        self.counters: dict[str, float] = {}
        self.served: dict[str, float] = {}  # weighted tokens served here per client: charges only, no lifts
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

    def on_arrival(self, client: str, active: Iterable[str]) -> None:
        self.counters = fairness.lift(self.counters, client, active)

    def lead_of(self, client: str, active: Iterable[str]) -> float:
        """The client's lead over the least-served active client (what a migration carries)."""
        return fairness.lead(self.counters, client, active)

    def on_migrated_in(self, client: str, active: Iterable[str], lead: float) -> float:
        """A migrated request of ``client`` committed here: lift its counter (``lift_migrated``);
        returns how much it rose, for ``undo_lift`` should the copy be dropped unrun."""
        before = self.counters.get(client, 0.0)
        self.counters = fairness.lift_migrated(self.counters, client, active, lead)
        return self.counters[client] - before

    def undo_lift(self, client: str, rise: float) -> None:
        """Take back a migrated-in request's lift (its copy was dropped before it ran); charges
        since then stay, so the counter is what it would be had the migration not come."""
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
