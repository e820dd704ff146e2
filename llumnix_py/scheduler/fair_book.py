"""The global scheduler's fairness book: one virtual token counter per client over the cluster.

Each fair engine keeps its own VTC counters over the clients it serves, so a client with
requests on every instance gets a share of each. This book adds up what every instance
served each client (the ``client_served`` books in the polled loads: charges only, so a
migrated request's service counts once, where it was given) and applies VTC's lift when a
client gets its first request anywhere in the cluster::

    poll of instance i:  arriving = its clients active nowhere before   -> cluster_lift
                         counters += served_delta(last book of i, this book of i)

The math is ``policies.fairness``' (``served_delta``, ``cluster_lift``); this is the state
between polls. Sans-IO: loads in, counters out. A removed instance's service stays counted.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping

from policies import fairness


class ClusterFairBook:
    """Cluster-wide VTC counters, fed by the instances' polled loads."""

    def __init__(self) -> None:
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
            self.counters = fairness.cluster_lift(self.counters, arriving, self._refs)
        self._set_clients(instance_id, clients)
        delta = fairness.served_delta(self._last.get(instance_id, {}), served)
        for c, d in delta.items():
            self.counters[c] = self.counters.get(c, 0.0) + d
        self._last[instance_id] = dict(served)

    def forget(self, instance_id: str) -> None:
        """The instance is gone: its clients leave it; what it served stays counted."""
        self._set_clients(instance_id, frozenset())
        self._clients.pop(instance_id, None)
        self._last.pop(instance_id, None)

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

    def view(self, clients: Iterable[str]) -> tuple[tuple[str, float], ...]:
        """The counters of ``clients`` (sorted), as a snapshot field."""
        return tuple((c, self.counters.get(c, 0.0)) for c in sorted(set(clients)))

    def gap(self) -> float:
        """The cluster-wide fairness metric: the largest difference of service between the
        clients active in the cluster."""
        return fairness.max_service_gap(self.counters, self._refs)
