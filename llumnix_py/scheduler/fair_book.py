"""The global scheduler's fairness book: one virtual token counter per client over the cluster.

Each fair engine keeps its own VTC counters over the clients it serves, so a client with
requests on every instance gets a share of each. This book adds up what every instance
served each client (the ``client_served`` books in the polled loads: charges only, so a
migrated request's service counts once, where it was given) and applies VTC's lift when a
client gets its first request anywhere in the cluster::

    poll of instance i:  arriving = its clients active nowhere before   -> cluster_lift
                         passing  = served by i, but active nowhere before or now
                                    (a request came and went between polls)  -> cluster_lift
                         counters += served_delta(last book of i, this book of i)

The math is ``policies.fairness``' (``served_delta``, ``cluster_lift``); this is the state
between polls. Sans-IO: loads in, counters out. A removed instance's service stays counted.

Bounded, as an engine's books are (``engines.fair_share``): ``floor`` is the lift point that
never falls (the smallest counter of the active clients, kept while none is); an idle
client (no request anywhere) at or below it is forgotten at once, which changes no counter
any decision reads (it would return lifted to the floor anyway: ``fairness.forgettable``),
and beyond ``max_idle_clients`` idle clients the longest idle go (not exact: an over-served
client returns lifted to the floor). The book holds the active clients plus at most
``max_idle_clients``.
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from typing import Iterable, Mapping, Optional

from policies import fairness


class ClusterFairBook:
    """Cluster-wide VTC counters, fed by the instances' polled loads.

    Args:
        max_idle_clients: idle clients kept at most (the longest idle go first); ``None``: no cap.
        forget_at_floor: drop idle clients at or below the floor at once (exact; off only to
            compare against a book that keeps everything).
    """

    def __init__(self, max_idle_clients: Optional[int] = 4096, forget_at_floor: bool = True) -> None:
        if max_idle_clients is not None and max_idle_clients < 0:
            raise ValueError(f"max_idle_clients must be >= 0 or None, got {max_idle_clients!r}")
        self.max_idle_clients = max_idle_clients
        self.forget_at_floor = forget_at_floor
        self.floor = 0.0  # the lift point; never falls
        self._was_active: set[str] = set()  # active clients as of the last settle
        self._idle: OrderedDict[str, None] = OrderedDict()  # idle clients in the book, longest idle first
        self._low: list[tuple[float, str]] = []  # (counter, client) of idle clients, a heap (stale entries skipped)
        self.counters: dict[str, float] = {}
        self._last: dict[str, dict[str, float]] = {}  # instance -> its served book at the last poll
        self._clients: dict[str, frozenset[str]] = {}  # instance -> clients with requests there
        self._refs: Counter[str] = Counter()  # client -> instances where it has requests

    def __bool__(self) -> bool:
        return bool(self._last)

    @property
    def active(self) -> set[str]:
        """Clients with a request somewhere in the cluster (as last polled)."""
        return set(self._refs)

    def observe(self, instance_id: str, served: Mapping[str, float], clients: Iterable[str]) -> None:
        """One poll of an instance: its ``client_served`` book and the clients of its requests."""
        clients = frozenset(clients)
        arriving = [c for c in clients if c not in self._refs]
        if arriving:
            self.counters = fairness.cluster_lift(self.counters, arriving, self._refs, self.floor)
        before = set(self._refs) | set(arriving)
        self._set_clients(instance_id, clients)
        delta = fairness.served_delta(self._last.get(instance_id, {}), served)
        passing = [c for c in delta if c not in before and c not in self._refs]
        if passing:  # arrived and left between two polls: an arrival all the same
            self.counters = fairness.cluster_lift(self.counters, passing, self._refs, self.floor)
        for c, d in delta.items():
            self.counters[c] = self.counters.get(c, 0.0) + d
        self._last[instance_id] = dict(served)
        self._settle(passing)

    def forget(self, instance_id: str) -> None:
        """The instance is gone: its clients leave it; what it served stays counted."""
        self._set_clients(instance_id, frozenset())
        self._clients.pop(instance_id, None)
        self._last.pop(instance_id, None)
        self._settle(())

    def _settle(self, passing: Iterable[str]) -> None:
        """Raise the floor, note who went idle, forget what the book may (see the module)."""
        active = set(self._refs)
        stood = active | self._was_active  # those leaving now were active until now: their counters count
        if stood:
            self.floor = max(self.floor, min(self.counters.get(c, 0.0) for c in stood))
        for c in (self._was_active - active) | set(passing):
            self._idle[c] = None
            self._idle.move_to_end(c)
            heapq.heappush(self._low, (self.counters.get(c, 0.0), c))
        for c in active - self._was_active:
            self._idle.pop(c, None)
        self._was_active = active
        if self.forget_at_floor:
            while self._low and self._low[0][0] <= self.floor:
                value, c = heapq.heappop(self._low)
                if c in self._idle and self.counters.get(c, 0.0) == value:
                    del self._idle[c]
                    self.counters.pop(c, None)
        cap = self.max_idle_clients
        while cap is not None and len(self._idle) > cap:
            c, _ = self._idle.popitem(last=False)
            self.counters.pop(c, None)

    def _set_clients(self, instance_id: str, clients: frozenset[str]) -> None:
        old = self._clients.get(instance_id, frozenset())
        self._refs.update(clients - old)
        self._refs.subtract(old - clients)
        for c in old - clients:
            if self._refs[c] <= 0:
                del self._refs[c]
        self._clients[instance_id] = clients

    def clients_of(self, instance_id: str) -> frozenset[str]:
        """The clients with requests on ``instance_id`` as last polled (empty: none, or not fair)."""
        return self._clients.get(instance_id, frozenset())

    def standing(self, client: str) -> float:
        """A client's counter; for an idle one, where it would return (``max(counter, floor)``),
        which is the same whether the book forgot it or not."""
        v = self.counters.get(client, 0.0)
        return v if client in self._refs else max(v, self.floor)

    def view(self, clients: Iterable[str]) -> tuple[tuple[str, float], ...]:
        """The counters of ``clients`` (sorted), as a snapshot field."""
        return tuple((c, self.counters.get(c, 0.0)) for c in sorted(set(clients)))

    def gap(self) -> float:
        """The cluster-wide fairness metric: the largest difference of service between the
        clients active in the cluster."""
        return fairness.max_service_gap(self.counters, self._refs)
