"""Fair sharing between clients: virtual token counters (VTC) and priority adjustment.

The Virtual Token Counter ("Fairness in Serving Large Language Models", Sheng et al.,
OSDI 2024) keeps one counter per client: the service it received, in weighted
tokens (``prompt_weight`` per prompt token computed, ``output_weight`` per token
generated; the paper's weights are 1 and 2). The scheduler serves the client with
the smallest counter first; a client that (re)appears after an idle spell is lifted
to the smallest counter of the clients still active, so idling earns no credit. The books
also keep a floor that never falls (that smallest counter, remembered while nobody is
active): a client returning to an empty engine is lifted to it, and an idle client at or
below it carries no information and may be forgotten (``lift_point``, ``forgettable``).

FastSwitch (Shen, Li and Gao, arXiv:2411.18424, Section 2.2) evaluates a scheduler
that adjusts priorities at run time and preempts: when a waiting client is under its
share and cannot be admitted, the most-served running client yields a request.
``switch_victim`` is that decision; how the victim leaves (swap or recompute) is the
preemption-mode policy's (``policies.switching``), and across instances a migration.

Across instances, a context switch has a third option: migrate the request to an
instance with room. ``select_most_served`` is the ``migrate_out`` policy for it: a
migration source moves out a request of its most-served client (by the counters in
``InstanceLoad.client_service``), so the client over its share is the one that moves.

Across instances, each engine's counters see only the clients it serves: a client with
requests on every instance gets a share of each. The global scheduler keeps one VTC
over the cluster (``llumnix_py.scheduler.fair_book``): it adds up the service each
instance reports (``served_delta`` of its ``client_served`` book between polls) and lifts
a client that becomes active anywhere in the cluster (``cluster_lift``).
``select_most_served_cluster`` moves out a request of the instance's client that is most
served cluster-wide (``InstanceLoad.cluster_service``).

All functions are pure over plain mappings and frozen views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

from llumnix_py.load import InstanceLoad
from policies.types import MigrateOut


@dataclass(frozen=True)
class VtcWeights:
    """Service per token: ``prompt`` per prompt token computed, ``output`` per token generated."""

    prompt: float = 1.0
    output: float = 2.0

    def __post_init__(self) -> None:
        if not (self.prompt >= 0 and self.output >= 0):
            raise ValueError(f"VTC weights must be non-negative, got {self}")


@dataclass(frozen=True)
class FairItem:
    """A request as the fairness policy sees it."""

    request_id: str
    client_id: str
    priority: int = 0
    arrival_time: float = 0.0


def charge(counters: Mapping[str, float], prompt_tokens: Mapping[str, int], output_tokens: Mapping[str, int],
           weights: VtcWeights = VtcWeights()) -> dict[str, float]:
    """The counters after a step that computed ``prompt_tokens`` and generated ``output_tokens``
    per client."""
    out = dict(counters)
    for c, n in prompt_tokens.items():
        out[c] = out.get(c, 0.0) + weights.prompt * n
    for c, n in output_tokens.items():
        out[c] = out.get(c, 0.0) + weights.output * n
    return out


def lift_point(counters: Mapping[str, float], client: str, active: Iterable[str], floor: float = 0.0) -> float:
    """Where VTC lifts a returning ``client``: the smallest counter of the other active clients,
    or ``floor`` when that is smaller or nobody else is active. ``floor`` is the book's lift
    point that never falls (``FairShare.floor``): with it, a client idle at or below it carries
    no information (it would return at the lift point anyway), so the book may drop it."""
    others = [counters.get(a, 0.0) for a in set(active) if a != client]
    return max(floor, min(others)) if others else floor


def lift(counters: Mapping[str, float], client: str, active: Iterable[str], floor: float = 0.0) -> dict[str, float]:
    """A request of ``client`` arrived. If the client was idle (not in ``active``), its counter
    rises to the lift point (``lift_point``: the smallest counter among the active clients, VTC's
    counter lift), never falls."""
    out = dict(counters)
    active = set(active)
    if client in active and client in out:
        return out  # still active: no lift
    out[client] = max(out.get(client, 0.0), lift_point(out, client, active, floor))
    return out


def forgettable(counters: Mapping[str, float], idle: Iterable[str], floor: float) -> list[str]:
    """The idle clients a book may drop without changing any decision: those whose counter is at
    or below ``floor``, the lift point that never falls. Proof: such a client returns, if ever,
    lifted to a lift point at least ``floor``, so ``max(counter, point) == max(0, point)``;
    while idle, no decision reads its counter (orders, victims and leads range over active
    clients), and counters are never negative."""
    return sorted(c for c in idle if counters.get(c, 0.0) <= floor)


def lead(counters: Mapping[str, float], client: str, active: Iterable[str]) -> float:
    """How far ``client``'s counter stands above the least-served active client's (the floor
    ``lift`` would raise a returning client to); 0 for the least served. What a migrating
    request carries to its destination, so its client's standing travels with it."""
    floor = min((counters.get(a, 0.0) for a in set(active) | {client}), default=0.0)
    return max(0.0, counters.get(client, 0.0) - floor)


def lift_migrated(counters: Mapping[str, float], client: str, active: Iterable[str],
                  lead_: float = 0.0, floor: float = 0.0) -> dict[str, float]:
    """A migrated request of ``client`` commits here. VTC's lift for an arrival, keeping the
    client's lead from the source: an idle client's counter rises to the smallest counter of
    the active clients plus ``lead_`` (never falls); an active client's stands (its counter
    already measures its service here). With ``lead_`` 0 this is ``lift``; ``floor`` as there."""
    if not lead_ >= 0:
        raise ValueError(f"lead must be >= 0, got {lead_!r}")
    out = dict(counters)
    active = set(active)
    if client in active and client in out:
        return out
    out[client] = max(out.get(client, 0.0), lift_point(out, client, active, floor) + lead_)
    return out


def fair_key(item: FairItem, counters: Mapping[str, float]) -> tuple:
    """Serve order: higher priority first, then the least-served client, then arrival, then id."""
    return (-item.priority, counters.get(item.client_id, 0.0), item.arrival_time, item.request_id)


def fair_order(items: Sequence[FairItem], counters: Mapping[str, float]) -> list[str]:
    """Request ids in the order a fair scheduler admits them."""
    return [i.request_id for i in sorted(items, key=lambda i: fair_key(i, counters))]


def fair_victim(items: Sequence[FairItem], counters: Mapping[str, float]) -> str:
    """The running request to preempt: lowest priority, most-served client, latest arrival."""
    if not items:
        raise ValueError("fair_victim needs at least one running request")
    return max(items, key=lambda i: (-i.priority, counters.get(i.client_id, 0.0), i.arrival_time,
                                     i.request_id)).request_id


def switch_victim(head: FairItem, running: Sequence[FairItem], counters: Mapping[str, float],
                  margin: float) -> Optional[str]:
    """Priority adjustment: the running request that yields to the waiting ``head`` (which cannot
    be admitted as things are), or ``None``. A request yields when its client has received more
    than ``margin`` weighted tokens more service than the head's client, at no higher priority."""
    if not running:
        return None
    victim_id = fair_victim(running, counters)
    victim = next(i for i in running if i.request_id == victim_id)
    if victim.priority > head.priority or victim.client_id == head.client_id:
        return None
    gap = counters.get(victim.client_id, 0.0) - counters.get(head.client_id, 0.0)
    return victim_id if gap > margin else None


def max_service_gap(counters: Mapping[str, float], clients: Iterable[str]) -> float:
    """The fairness metric: the largest difference of service between the given clients."""
    values = [counters.get(c, 0.0) for c in clients]
    return max(values) - min(values) if values else 0.0


def select_most_served(inst: InstanceLoad) -> Optional[MigrateOut]:
    """``migrate_out`` policy: the running request of the instance's most-served client (highest
    counter in ``inst.client_service``), the fewest blocks among that client's (it moves
    fastest), then arrival and id; ``None`` when every running request is migrating."""
    return _most_served(inst, dict(inst.client_service))


def _most_served(inst: InstanceLoad, service: Mapping[str, float]) -> Optional[MigrateOut]:
    """The running request (not migrating) of the client with the highest ``service``, the
    fewest blocks among that client's, then arrival and id; ``None`` when there is none."""
    candidates = [r for r in inst.running if not r.migrating]
    if not candidates:
        return None
    pick = min(candidates, key=lambda r: (-service.get(r.client_id, 0.0), r.num_blocks, r.arrival_time,
                                          r.request_id))
    return MigrateOut(pick.request_id, waiting=False)


def served_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """Service an instance gave each client between two polls of its ``client_served`` book.
    A book never falls; a value below the last one means the book restarted (a new engine
    behind the same id), so all of it is new. Only positive amounts are returned."""
    out: dict[str, float] = {}
    for client, now in after.items():
        prev = before.get(client, 0.0)
        d = now - prev if now >= prev else now
        if d > 0:
            out[client] = d
    return out


def cluster_lift(counters: Mapping[str, float], arriving: Iterable[str], active: Iterable[str],
                 floor: float = 0.0) -> dict[str, float]:
    """VTC's lift over a cluster: each client in ``arriving`` (it had no request anywhere and
    now has one) rises to the smallest counter of the clients ``active`` before it, or to
    ``floor`` (the book's lift point that never falls, as in ``lift_point``) when that is
    larger or no client was active before (never falls)."""
    out = dict(counters)
    arriving = set(arriving)
    before = [out.get(a, 0.0) for a in set(active) - arriving]
    if not before and floor <= 0:
        return out  # nobody active before and no floor yet: nothing moves
    point = max(floor, min(before)) if before else floor
    for c in arriving:
        out[c] = max(out.get(c, 0.0), point)
    return out


def under_served(standing: float, active: Mapping[str, float], margin: float) -> bool:
    """Fair dispatch: whether a client whose cluster-wide counter is ``standing`` is under its
    share, i.e. more than ``margin`` weighted tokens below the mean counter of the other
    ``active`` clients (none: not under-served). Such a client's request goes to the freest
    instance, where it starts soonest; everyone else's follows the usual dispatch."""
    if not active:
        return False
    return standing + margin < sum(active.values()) / len(active)


def select_most_served_cluster(inst: InstanceLoad) -> Optional[MigrateOut]:
    """``migrate_out`` policy: as ``select_most_served``, by the cluster-wide counters the
    global scheduler puts on its copy of the snapshot (``inst.cluster_service``), so the
    request that leaves belongs to the client most over its share of the whole cluster."""
    return _most_served(inst, dict(inst.cluster_service))


def cluster_offsets(cluster: Mapping[str, float], local: Mapping[str, float]) -> dict[str, float]:
    """Global fairness: per client of an instance, its cluster-wide counter minus the instance's
    own counter, both as of the same poll. The engine adds it to its counters
    (``in_cluster_frame``), so it orders its clients by their service over the whole cluster."""
    return {c: cluster.get(c, 0.0) - v for c, v in local.items()}


def in_cluster_frame(local: Mapping[str, float], offsets: Mapping[str, float]) -> dict[str, float]:
    """An engine's counters seen cluster-wide: its counter plus the client's offset, i.e. the
    cluster counter at the last poll plus the service given here since. A client without an
    offset (it arrived after the poll) takes the smallest offset, so it counts as no more
    served than the least-served client here did at that poll; no offsets: ``local``."""
    if not offsets:
        return dict(local)
    default = min(offsets.values())
    return {c: v + offsets.get(c, default) for c, v in local.items()}
