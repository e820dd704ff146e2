"""Dispatch: which instance a new request goes to.

=============  ===============================================================
``freeness``   (default) highest dispatch freeness computed for the request's
               priority, queued and pending requests included (in the usage
               and in the batch they will join), *with the request itself
               virtually added* (``virtual_usage.freeness_with_request``:
               ``(M - V - need) / (n + 1)`` where it fits, the blocks short
               (negative) where it does not, so an instance where the prompt
               does not fit ranks below every instance where it does); order
               (freeness desc, instance_id asc), then a seeded random pick among
               the top ``cfg.dispatch_top_k``
``load``       INFaaS++: least KV demand (physical + every queued and pending
               request) as a fraction of total blocks; ties by instance_id
``queue``      fewest queued requests (waiting + pending); ties by instance_id
``prefill_queue`` fewest prompt tokens still to prefill (``prefill_backlog``:
               queued and pending requests, and running ones with no output
               yet), so a prompt does not queue behind prompts elsewhere less
               loaded; ties by ``freeness`` with the request added, then
               instance_id. For objectives on time to first token with
               plentiful memory, where ``freeness`` (memory per request) does
               not see the prefill queue
``round_robin`` next instance_id after the previous pick, in id order
``random``     seeded uniform choice
=============  ===============================================================

A terminating instance is never a target; ``dispatch`` returns ``None`` when no
instance is eligible. ``DispatchState`` belongs to the caller (one per scheduler):
record each sent request with ``on_dispatch`` and clear it with ``on_poll`` when that
instance's fresh load arrives (the fresh load includes it). ``dispatch`` itself does
not record anything, so a request that could not be sent is not counted.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from typing import Callable, Collection, Optional, Sequence

from llumnix_py.load import InstanceLoad, RequestLoad
from policies.config import PolicyConfig
from policies.registry import DISPATCH
from policies.roles import takes_new_requests
from policies.types import Dispatch
from policies.virtual_usage import UsageSummary, summarize

DispatchFn = Callable[[Sequence[InstanceLoad], RequestLoad, PolicyConfig, "DispatchState"], str]


class _Pending:
    """Requests dispatched to one instance since its last poll, aggregated."""

    __slots__ = ("requests", "blocks", "prefill_tokens", "classes")

    def __init__(self) -> None:
        self.requests: list[RequestLoad] = []
        self.blocks = 0
        self.prefill_tokens = 0  # ``_to_prefill`` summed
        self.classes: dict[int, int] = {}  # priority -> count, every priority


class DispatchState:
    """The dispatcher's memory between decisions; owned by the caller, not global.

    Holds requests dispatched but not yet visible in a polled load, the round-robin
    cursor, the seeded random generator, and a per-snapshot cache of usage summaries
    (keyed by snapshot identity, so a new snapshot object is always re-read).
    """

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.last_round_robin: Optional[str] = None
        self._pending: dict[str, _Pending] = {}
        self._unseen: dict[str, dict[str, int]] = {}  # instance -> pending request -> polls not seeing it
        self._cache: dict[str, tuple[InstanceLoad, PolicyConfig, UsageSummary]] = {}
        self._backlog: dict[str, tuple[InstanceLoad, int]] = {}  # per snapshot: ``prefill_backlog``

    def on_dispatch(self, instance_id: str, request: RequestLoad) -> None:
        """Count ``request`` into ``instance_id``'s load until its next poll."""
        p = self._pending.get(instance_id)
        if p is None:
            p = self._pending[instance_id] = _Pending()
        p.requests.append(request)
        p.blocks += request.blocks_needed
        p.prefill_tokens += _to_prefill(request)
        p.classes[request.priority] = p.classes.get(request.priority, 0) + 1

    def on_poll(self, instance_id: str, seen: Optional[Collection[str]] = None,
                max_unseen_polls: int = 3) -> None:
        """A fresh load of ``instance_id`` arrived.

        Without ``seen`` it is taken to include every pending request. With ``seen``
        (the request ids the load shows), only those stop being pending: a request
        dispatched just before the poll may reach the instance just after it, and
        counting it as gone would send the next request to the same instance. A request
        still unseen after ``max_unseen_polls`` polls (it finished, or never arrived) is
        dropped.
        """
        if seen is None:
            self._pending.pop(instance_id, None)
            return
        p = self._pending.get(instance_id)
        if p is None:
            return
        keep = [r for r in p.requests if r.request_id not in seen]
        ages = self._unseen.setdefault(instance_id, {})
        kept = []
        for r in keep:
            ages[r.request_id] = ages.get(r.request_id, 0) + 1
            if ages[r.request_id] < max_unseen_polls:
                kept.append(r)
        live = {r.request_id for r in kept}
        for rid in list(ages):
            if rid not in live:
                del ages[rid]
        self._pending.pop(instance_id, None)
        for r in kept:
            self.on_dispatch(instance_id, r)

    def forget(self, instance_id: str) -> None:
        """Drop everything kept about an instance that left the cluster."""
        self._pending.pop(instance_id, None)
        self._unseen.pop(instance_id, None)
        self._cache.pop(instance_id, None)
        self._backlog.pop(instance_id, None)
        if self.last_round_robin == instance_id:
            self.last_round_robin = None

    def pending(self, instance_id: str) -> tuple[RequestLoad, ...]:
        """Requests dispatched to ``instance_id`` since its last poll."""
        p = self._pending.get(instance_id)
        return () if p is None else tuple(p.requests)

    def num_pending(self, instance_id: str) -> int:
        p = self._pending.get(instance_id)
        return 0 if p is None else len(p.requests)

    def pending_blocks(self, instance_id: str) -> int:
        """Sum of ``blocks_needed`` of the pending requests of ``instance_id``."""
        p = self._pending.get(instance_id)
        return 0 if p is None else p.blocks

    def summary(self, inst: InstanceLoad, cfg: PolicyConfig) -> UsageSummary:
        """Dispatch summary of the snapshot alone (pending requests not included)."""
        hit = self._cache.get(inst.instance_id)
        if hit is not None and hit[0] is inst and hit[1] is cfg:
            return hit[2]
        s = summarize(inst, cfg, purpose="dispatch")
        self._cache[inst.instance_id] = (inst, cfg, s)
        return s

    def prefill_backlog(self, inst: InstanceLoad) -> int:
        """``prefill_backlog(inst, pending)``: the snapshot's part read once per snapshot (by
        identity, like ``summary``), the pending dispatches' added each time."""
        hit = self._backlog.get(inst.instance_id)
        if hit is None or hit[0] is not inst:
            hit = self._backlog[inst.instance_id] = (inst, prefill_backlog(inst))
        p = self._pending.get(inst.instance_id)
        return hit[1] + (0 if p is None else p.prefill_tokens)

    def dispatch_freeness(
        self, inst: InstanceLoad, cfg: PolicyConfig, for_priority: int = 0, request: Optional[RequestLoad] = None
    ) -> float:
        """``freeness(inst, purpose="dispatch", extra_pending=pending)``, from caches.

        With ``request`` (whose priority then replaces ``for_priority``), the request
        is virtually added: ``freeness_with_request(inst, cfg, request,
        extra_pending=pending)``, i.e. its ``blocks_needed`` joins ``V`` and the batch
        grows by one (a deficit is returned undivided). ``-inf`` for a terminating instance (never a target).
        """
        if inst.terminating:
            return -math.inf
        if request is not None:
            for_priority = request.priority
        s = self.summary(inst, cfg)
        p = self._pending.get(inst.instance_id)
        v = s.physical + s.demand + s.headroom_total
        batch = s.batch
        present = s.class_counts
        if p is not None:
            v += p.blocks
            batch += len(p.requests)
            hmap = cfg.headroom_map
            if hmap:
                for prio in p.classes:
                    if prio in hmap and prio not in present:
                        v += hmap[prio]
                if for_priority in p.classes and for_priority not in present:
                    v -= cfg.headroom(for_priority)
        if for_priority in present:
            v -= cfg.headroom(for_priority)
        if request is not None:
            room = s.total_blocks - v - request.blocks_needed
            return room / (batch + 1) if room >= 0 else room
        return (s.total_blocks - v) / (batch or 1)


def dispatch(
    instances: Sequence[InstanceLoad], request: RequestLoad, cfg: PolicyConfig, state: DispatchState
) -> Optional[Dispatch]:
    """Choose the instance for ``request`` with policy ``cfg.dispatch``.

    Returns:
        ``Dispatch(instance_id)``, or ``None`` when no instance is eligible (the list
        is empty or every instance is terminating or a ``decode`` instance).

    Raises:
        UnknownPolicyError: ``cfg.dispatch`` is not registered.
        ValueError: a policy returned an instance that is not eligible.
    """
    policy = DISPATCH.get(cfg.dispatch)
    eligible = [inst for inst in instances if not inst.terminating and takes_new_requests(inst)]
    if not eligible:
        return None
    chosen = policy(eligible, request, cfg, state)
    if not any(inst.instance_id == chosen for inst in eligible):
        raise ValueError(f"dispatch policy {cfg.dispatch!r} chose ineligible instance {chosen!r}")
    return Dispatch(chosen)


# --- built-in policies: (eligible, request, cfg, state) -> instance_id -----------------


def by_freeness(
    eligible: Sequence[InstanceLoad], request: RequestLoad, cfg: PolicyConfig, state: DispatchState
) -> str:
    """Highest freeness with the request virtually added; seeded pick among the top k."""
    f = state.dispatch_freeness
    prio = request.priority
    k = cfg.dispatch_top_k
    if k == 1 or len(eligible) == 1:
        best_id = ""
        best_f = 0.0
        first = True
        for inst in eligible:
            fi = f(inst, cfg, prio, request)
            iid = inst.instance_id
            if first or fi > best_f or (fi == best_f and iid < best_id):
                best_id, best_f, first = iid, fi, False
        return best_id
    keyed = [(-f(inst, cfg, prio, request), inst.instance_id) for inst in eligible]
    top = heapq.nsmallest(k, keyed)
    return top[state.rng.randrange(len(top))][1]


def by_load(eligible: Sequence[InstanceLoad], request: RequestLoad, cfg: PolicyConfig, state: DispatchState) -> str:
    """INFaaS++: least (physical + queued + pending demand) / total_blocks."""

    def key(inst: InstanceLoad) -> tuple[float, str]:
        s = state.summary(inst, cfg)
        demand = s.physical + s.demand + state.pending_blocks(inst.instance_id)
        return (demand / inst.total_blocks if inst.total_blocks > 0 else float("inf"), inst.instance_id)

    return min(eligible, key=key).instance_id


def by_queue(eligible: Sequence[InstanceLoad], request: RequestLoad, cfg: PolicyConfig, state: DispatchState) -> str:
    """Fewest queued requests (waiting + pending dispatch)."""
    return min(eligible, key=lambda i: (i.num_waiting + state.num_pending(i.instance_id), i.instance_id)).instance_id


def _to_prefill(r: RequestLoad) -> int:
    """Tokens a queued request's next prefill computes: its prompt and its outputs so far (a
    preempted request is prefilled again)."""
    return r.prompt_len + r.output_len


def prefill_backlog(inst: InstanceLoad, pending: Sequence[RequestLoad] = ()) -> int:
    """Tokens ``inst`` must prefill before a request dispatched now: every waiting request's
    (``_to_prefill``), the prompt of every running request with no output yet (admitted, its
    first token not out; a chunked prompt counts whole), those of the step in progress that
    the snapshot no longer shows (``prefill_in_flight``), and every ``pending`` dispatch's."""
    waiting = sum(_to_prefill(r) for r in inst.waiting)
    admitted = sum(r.prompt_len for r in inst.running if r.output_len == 0)
    return waiting + admitted + inst.prefill_in_flight + sum(_to_prefill(r) for r in pending)


def by_prefill_queue(
    eligible: Sequence[InstanceLoad], request: RequestLoad, cfg: PolicyConfig, state: DispatchState
) -> str:
    """Fewest tokens to prefill first (``prefill_backlog``); ties by freeness with the request
    added, then the lower instance_id."""
    f = state.dispatch_freeness

    def key(inst: InstanceLoad) -> tuple[int, float, str]:
        return (state.prefill_backlog(inst), -f(inst, cfg, request=request), inst.instance_id)

    return min(eligible, key=key).instance_id


def by_round_robin(
    eligible: Sequence[InstanceLoad], request: RequestLoad, cfg: PolicyConfig, state: DispatchState
) -> str:
    """The next instance_id after the previous pick (wrapping), so membership may change."""
    ids = sorted(inst.instance_id for inst in eligible)
    last = state.last_round_robin
    i = 0 if last is None else bisect.bisect_right(ids, last)
    chosen = ids[i % len(ids)]
    state.last_round_robin = chosen
    return chosen


def by_random(eligible: Sequence[InstanceLoad], request: RequestLoad, cfg: PolicyConfig, state: DispatchState) -> str:
    """Uniform choice with the state's seeded generator (ids sorted first)."""
    ids = sorted(inst.instance_id for inst in eligible)
    return ids[state.rng.randrange(len(ids))]
