"""Virtual usage and freeness (Llumnix paper, Section 4.4).

The one formula every policy reads (blocks are KV-cache blocks; instance ``i``)::

    V_i = +inf                                  if i is terminating (the "fake request")
    V_i = P_i + D_i + H_i                       otherwise

    P_i = max(used_blocks, sum of r.num_blocks over running r)
          Physical blocks. ``used_blocks`` already holds the blocks reserved for
          incoming migrations and those of outgoing migrations still in flight; the
          max keeps a stale ``used_blocks`` from under-counting the running batch.
    D_i = demand of queued requests (their ``blocks_needed``):
          purpose "migration": the head of the waiting queue only (de-fragmentation:
                               an instance whose head request cannot fit looks busy);
          purpose "dispatch":  every waiting request, every ``pending_dispatch``
                               request and the dispatcher's not-yet-polled ones.
    H_i = sum of h(p) over priorities p present on i with headroom h(p) > 0 and
          p != for_priority.
          Each request of priority p carries h(p) / n_p, n_p = requests of priority p
          on i (running + waiting, + pending for dispatch), so the shares add up to
          h(p) once whenever the class is present and to 0 when it is absent. The
          headroom of the priority we compute freeness *for* is not charged: it is
          reserved for exactly that request (the paper applies headroom only to
          requests of other priorities). ``for_priority=0`` charges every headroom.

    freeness_i = (M_i - V_i) / B_i,  M_i = total_blocks,  B_i = max(1, n_i)
    n_i = len(running)                             purpose "migration"
    n_i = len(running) + queued requests of D_i    purpose "dispatch"

Freeness is "decode steps the batch can take before memory runs out": higher is
freer, negative is overloaded, ``-inf`` is terminating. An empty instance has
``B_i = 1``, so its freeness is its unreserved blocks (finite).

For dispatch, every request counted in ``D_i`` (waiting, pending, not yet polled)
also counts in the batch it is about to join, as in Llumnix's own dispatch load
(``num_running_requests + num_waiting_requests``). With the running batch alone, the
blocks of a burst's requests would enter ``V_i`` but not ``B_i``: an instance whose
poll does not show its new requests yet looks about twice as free per request as
one that shows a single running request, and it keeps receiving the burst until its
next poll (seen: 6 of 9 burst requests on one of three instances). Migration keeps
the running batch, the steps before the *running* requests run out of memory.

Dispatch ranks instances by the freeness they would have *with the new request
``r`` on them* (``freeness_with_request``): ``r`` is added virtually, its demand to
``V_i`` and itself to the batch::

    room_i(r)     = M_i - V_i - r.blocks_needed                   (V_i for r's priority)
    freeness_i(r) = room_i(r) / (n_i + 1)      if room_i(r) >= 0  (r fits: steps left)
                  = room_i(r)                  otherwise          (blocks short)

Without ``r``'s own term, an instance running one huge request looks freest
(``(M - V) / 1`` is large) even when ``r``'s prompt does not fit in what is left,
and a long prompt would be queued where it cannot run. With it, an instance where
``r`` does not fit has negative freeness and loses to every instance where it fits.
Among instances where it does not fit, the one short of the fewest blocks wins:
dividing a deficit by the batch would make the *busiest* batch look least
overloaded (``-100 / 20 > -10 / 1``) and pile new requests onto it. For an
instance where ``r`` fits, this is the paper's freeness with ``r`` counted in.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, Mapping, NamedTuple, Sequence

from policies.config import PolicyConfig

if TYPE_CHECKING:
    from llumnix_py.load import InstanceLoad, RequestLoad

Purpose = Literal["migration", "dispatch"]
PURPOSES: tuple[str, ...] = ("migration", "dispatch")


class UsageSummary(NamedTuple):
    """The parts of ``V_i`` for one snapshot, computed once and reused (a cheap tuple).

    Attributes:
        total_blocks: ``M_i``.
        physical: ``P_i``.
        demand: ``D_i`` for the summary's purpose.
        batch: ``n_i``, ``B_i`` before the ``max(1, .)``: running requests, plus for
            dispatch every queued request counted in ``demand``.
        class_counts: priority -> requests of that priority, for priorities with headroom.
        headroom_total: ``sum h(p)`` over ``class_counts`` (``H_i`` for ``for_priority=0``).
        terminating: the instance is draining (``V_i = +inf``).
    """

    total_blocks: int
    physical: int
    demand: int
    batch: int
    class_counts: Mapping[int, int]
    headroom_total: int
    terminating: bool

    def virtual_usage(self, cfg: PolicyConfig, for_priority: int = 0) -> float:
        if self.terminating:
            return math.inf
        v = self.physical + self.demand + self.headroom_total
        if for_priority in self.class_counts:
            v -= cfg.headroom(for_priority)
        return float(v)

    def freeness(self, cfg: PolicyConfig, for_priority: int = 0) -> float:
        if self.terminating:
            return -math.inf
        return (self.total_blocks - self.virtual_usage(cfg, for_priority)) / (self.batch or 1)


def summarize(
    inst: InstanceLoad,
    cfg: PolicyConfig,
    *,
    purpose: Purpose = "migration",
    extra_pending: Sequence[RequestLoad] = (),
) -> UsageSummary:
    """Compute the parts of ``V_i`` (see the module docstring) for one snapshot."""
    running = inst.running
    waiting = inst.waiting
    physical = sum([r.num_blocks for r in running])
    if inst.used_blocks > physical:
        physical = inst.used_blocks
    batch = len(running)
    if purpose == "migration":
        demand = waiting[0].blocks_needed if waiting else 0
        queued: tuple[Sequence[RequestLoad], ...] = (waiting,)
    elif purpose == "dispatch":
        pending = inst.pending_dispatch
        demand = sum([r.blocks_needed for r in waiting]) + sum([r.blocks_needed for r in pending])
        if extra_pending:
            demand += sum([r.blocks_needed for r in extra_pending])
        queued = (waiting, pending, extra_pending)
        batch += len(waiting) + len(pending) + len(extra_pending)
    else:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    counts: dict[int, int] = {}
    headroom_total = 0
    hmap = cfg.headroom_map
    if hmap:
        # One comprehension per group, then list.count (in C) per configured priority.
        priorities = [r.priority for r in running]
        for group in queued:
            if group:
                priorities += [r.priority for r in group]
        for p, h in hmap.items():
            n = priorities.count(p)
            if n:
                counts[p] = n
                headroom_total += h
    return UsageSummary(
        inst.total_blocks, physical, demand, batch, counts, headroom_total, inst.terminating
    )


def virtual_usage(
    inst: InstanceLoad,
    cfg: PolicyConfig,
    *,
    for_priority: int = 0,
    purpose: Purpose = "migration",
    extra_pending: Sequence[RequestLoad] = (),
) -> float:
    """``V_i`` of the module docstring; ``+inf`` for a terminating instance.

    Args:
        inst: the instance's load snapshot.
        cfg: supplies the headroom per priority.
        for_priority: priority of the request the value is computed for; the headroom
            of that priority is not charged.
        purpose: ``"migration"`` (queued demand: head of line only) or ``"dispatch"``
            (every queued and pending request).
        extra_pending: requests dispatched to ``inst`` since its last poll that the
            snapshot does not show yet (dispatch only).
    """
    return summarize(inst, cfg, purpose=purpose, extra_pending=extra_pending).virtual_usage(cfg, for_priority)


def freeness(
    inst: InstanceLoad,
    cfg: PolicyConfig,
    *,
    for_priority: int = 0,
    purpose: Purpose = "migration",
    extra_pending: Sequence[RequestLoad] = (),
) -> float:
    """``(M_i - V_i) / B_i`` (see the module docstring); ``-inf`` when terminating."""
    return summarize(inst, cfg, purpose=purpose, extra_pending=extra_pending).freeness(cfg, for_priority)


def freeness_with_request(
    inst: InstanceLoad,
    cfg: PolicyConfig,
    request: RequestLoad,
    *,
    extra_pending: Sequence[RequestLoad] = (),
) -> float:
    """Dispatch freeness of ``inst`` with ``request`` virtually added (module docstring).

    ``room = M_i - V_i - request.blocks_needed`` with ``V_i`` the dispatch virtual
    usage for ``request.priority`` (``extra_pending`` included); ``room / (n_i + 1)``
    when ``room >= 0``, else ``room``; ``-inf`` when terminating. This is the
    reference the dispatcher's cached fast path (``DispatchState.dispatch_freeness``)
    must equal.
    """
    s = summarize(inst, cfg, purpose="dispatch", extra_pending=extra_pending)
    if s.terminating:
        return -math.inf
    room = s.total_blocks - s.virtual_usage(cfg, request.priority) - request.blocks_needed
    return room / (s.batch + 1) if room >= 0 else room


# --- freeness after a migration, for pairing (purpose "migration", for_priority 0) ---


def freeness_after_removal(
    inst: InstanceLoad, s: UsageSummary, cfg: PolicyConfig, req: RequestLoad, *, waiting: bool
) -> float:
    """Migration freeness of ``inst`` once ``req`` has left it (``s`` = its summary).

    A running request frees its physical blocks and leaves the batch; a waiting one
    changes the demand only if it was the head (the next request becomes the head).
    """
    if s.terminating:
        return -math.inf
    physical, demand, batch = s.physical, s.demand, s.batch
    if waiting:
        if inst.waiting and inst.waiting[0].request_id == req.request_id:
            demand = inst.waiting[1].blocks_needed if len(inst.waiting) > 1 else 0
    else:
        physical -= req.num_blocks
        batch -= 1
    headroom = s.headroom_total
    if s.class_counts.get(req.priority) == 1:
        headroom -= cfg.headroom(req.priority)
    return (s.total_blocks - (physical + demand + headroom)) / (batch or 1)


def freeness_after_addition(
    inst: InstanceLoad, s: UsageSummary, cfg: PolicyConfig, req: RequestLoad, *, waiting: bool
) -> float:
    """Migration freeness of ``inst`` once ``req`` has arrived (``s`` = its summary).

    A running request joins the batch with its blocks; a waiting one joins the tail
    of the queue, so it adds demand only if the queue was empty.
    """
    if s.terminating:
        return -math.inf
    physical, demand, batch = s.physical, s.demand, s.batch
    if waiting:
        if not inst.waiting:
            demand = req.blocks_needed
    else:
        physical += req.num_blocks
        batch += 1
    headroom = s.headroom_total
    if req.priority not in s.class_counts:
        headroom += cfg.headroom(req.priority)
    return (s.total_blocks - (physical + demand + headroom)) / (batch or 1)
