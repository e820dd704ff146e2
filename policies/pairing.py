"""Migration pairing: which instances exchange a request this round.

``freeness`` (default; ``balanced`` is an alias), the paper's load balancing:

1. Compute every instance's migration freeness once (``virtual_usage.summarize``).
2. Sources: terminating instances that still hold requests (freeness ``-inf``, so
   always first), then instances with freeness < ``cfg.migrate_out_threshold``.
   Destinations: non-terminating instances with freeness > the threshold. An instance
   exactly at the threshold is neither, so no instance is on both sides. With
   ``cfg.migrate_in_threshold`` set (``cfg.destination_threshold``, never below the
   source threshold), only a draining source may move a request to a destination at or
   below it: the others leave that room to the requests dispatched there. Not even a
   source's blocked queued request may take it: allowing that (rule 5a into the kept
   room) made S-L's P99 prefill 7x worse at its knee and its migrations' return rate
   3.7x higher (experiments/RESULTS.md, session 12).
3. Sources sorted ascending by (freeness, instance_id); destinations descending by
   freeness, ties by instance_id ascending.
4. Walk the sources in order, each against the freest destination still unused. The
   source's request is chosen by the ``migrate_out`` policy (``select_fn``). The pair
   is kept iff the source is terminating, or moving that request narrows the gap
   without flipping it::

       f_src_after <= f_dst_after  and  f_dst_after - f_src_after < f_dst - f_src

   A rejected or request-less source is skipped and the destination stays available
   for the next source. Each instance appears at most once per round; O(n log n).
5. De-fragmentation exception. A source whose head-of-line waiting request is
   *blocked* (its ``blocks_needed`` exceed the source's free blocks above the
   watermark) is what the head's virtual demand is there to relieve, and moving
   work off it may legitimately flip the order (a long prompt stuck behind one big
   request makes a source look worst, yet it is free once the blocker leaves). When
   rule 4 rejects such a source's move, the pair is kept for the first of:

   a. the head itself (a waiting request: no KV to copy), if it fits on the
      destination now, behind the destination's own head::

          dst.free - dst.watermark - dst_head_need >= head.blocks_needed

   b. the ``migrate_out`` choice, if it is running, its departure unblocks the head
      and it fits on the destination behind the destination's own head::

          src.free - src.watermark + b >= head.blocks_needed
          dst.free - dst.watermark - dst_head_need >= b          (b = its blocks)

   Either move lands where it fits, so the destination does not become blocked
   by it, and the request does not bounce back as a de-fragmentation move.

   With ``cfg.blocked_heads_first`` rule 5a comes first instead: a (non-draining) source
   whose blocked head fits on its destination moves that head, whatever rule 4 would
   have said about the ``migrate_out`` choice. Off by default.

``defrag``: sources are terminating instances with requests, then instances whose
head-of-line waiting request does not fit in their free blocks (most short of blocks
first); destinations are the other non-terminating instances by free blocks
descending. With ``b_out`` the blocks the move frees on the source (0 for a waiting
request) and ``b_in`` the blocks it takes on the destination (its blocks, or
``blocks_needed`` for a waiting request), a pair is kept iff the source is terminating,
or the destination keeps room for its own head-of-line request and, for a running
request, stays at least as free as the source (no ping-pong)::

       dst.free - b_in >= dst_head_need  and  (waiting or dst.free - b_in >= src.free + b_out)

A waiting request moved this way fits where it lands, so it cannot bounce back.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

from llumnix_py.load import InstanceLoad, RequestLoad
from policies.config import PolicyConfig
from policies.registry import PAIRING
from policies.selection import SelectFn, find_request, make_selector
from policies.types import MigrateOut, MigrationPair
from policies.virtual_usage import freeness_after_addition, freeness_after_removal, summarize

PairingFn = Callable[[Sequence[InstanceLoad], PolicyConfig, SelectFn], "list[PlannedMigration]"]


class PlannedMigration(NamedTuple):
    """A kept pair, the request to move, and the metric before and after the move.

    For ``freeness`` pairing the metric is migration freeness; for ``defrag`` it is
    free blocks. (A named tuple: hundreds are built per round at scale.)
    """

    pair: MigrationPair
    request: MigrateOut
    src_before: float
    dst_before: float
    src_after: float
    dst_after: float


def plan_migrations(
    instances: Sequence[InstanceLoad], cfg: PolicyConfig, select_fn: Optional[SelectFn] = None
) -> list[PlannedMigration]:
    """Pairs for this round with the request each source moves (policy ``cfg.pairing``).

    Args:
        instances: load snapshots; instance ids must be unique.
        cfg: pairing policy, threshold and headroom.
        select_fn: picks the request a source moves; default: ``cfg.migrate_out``.

    Raises:
        UnknownPolicyError: ``cfg.pairing`` or ``cfg.migrate_out`` is not registered.
        ValueError: two snapshots share an instance id.
    """
    policy = PAIRING.get(cfg.pairing)
    select = select_fn if select_fn is not None else make_selector(cfg.migrate_out)
    if len({inst.instance_id for inst in instances}) != len(instances):
        raise ValueError("instance ids must be unique within one pairing round")
    return policy(instances, cfg, select)


def pair_migrations(
    instances: Sequence[InstanceLoad], cfg: PolicyConfig, select_fn: Optional[SelectFn] = None
) -> list[MigrationPair]:
    """The ``MigrationPair`` of each ``plan_migrations`` entry, in pairing order."""
    return [p.pair for p in plan_migrations(instances, cfg, select_fn)]


def _has_requests(inst: InstanceLoad) -> bool:
    return bool(inst.running or inst.waiting)


def pair_by_freeness(
    instances: Sequence[InstanceLoad], cfg: PolicyConfig, select: SelectFn
) -> list[PlannedMigration]:
    """Balance freeness: lowest source with highest destination (module docstring)."""
    threshold = cfg.migrate_out_threshold
    dst_threshold = cfg.destination_threshold
    sources = []
    dests = []
    for inst in instances:
        s = summarize(inst, cfg, purpose="migration")
        # s.freeness(cfg), inlined: this loop runs over the whole cluster every round.
        f = (s.total_blocks - s.physical - s.demand - s.headroom_total) / (s.batch or 1)
        if inst.terminating:
            f = -math.inf
            if _has_requests(inst):
                sources.append((f, inst.instance_id, inst, s))
        elif f < threshold:
            sources.append((f, inst.instance_id, inst, s))
        elif f > threshold:
            dests.append((-f, inst.instance_id, inst, s))
    if not sources or not dests:
        return []
    # Tuples compare by (freeness, id) and ids are unique, so the rest never compares.
    sources.sort()
    dests.sort()
    plans: list[PlannedMigration] = []
    j = 0
    for fs, _, src, ss in sources:
        if j >= len(dests):
            break
        neg_fd, _, dst, sd = dests[j]
        fd = -neg_fd
        if fd <= dst_threshold and not src.terminating:
            break  # the freest destination left keeps its room; draining sources came first
        head = src.waiting[0] if (cfg.blocked_heads_first and not src.terminating and head_blocked(src)
                                  and _head_fits(src.waiting[0], dst)) else None
        if head is not None:
            choice, req = MigrateOut(head.request_id, waiting=True), head
        else:
            choice = select(src)
            req = find_request(src, choice) if choice is not None else None
            if req is None:
                continue
        fs_after = freeness_after_removal(src, ss, cfg, req, waiting=choice.waiting)
        fd_after = freeness_after_addition(dst, sd, cfg, req, waiting=choice.waiting)
        if head is None and not (src.terminating or (fs_after <= fd_after and fd_after - fs_after < fd - fs)):
            defrag = _defrag_move(src, dst, choice, req)
            if defrag is None:
                continue
            choice, req = defrag
            fs_after = freeness_after_removal(src, ss, cfg, req, waiting=choice.waiting)
            fd_after = freeness_after_addition(dst, sd, cfg, req, waiting=choice.waiting)
        plans.append(
            PlannedMigration(MigrationPair(src.instance_id, dst.instance_id), choice, fs, fd, fs_after, fd_after)
        )
        j += 1
    return plans


def head_blocked(inst: InstanceLoad) -> bool:
    """The head of the waiting queue needs more blocks than are free above the watermark."""
    return bool(inst.waiting) and inst.waiting[0].blocks_needed > inst.free_blocks - inst.watermark_blocks


def room_behind_head(inst: InstanceLoad) -> int:
    """Blocks free above the watermark once the instance's own head request is admitted."""
    return inst.free_blocks - inst.watermark_blocks - _head_need(inst)


def _head_fits(head: RequestLoad, dst: InstanceLoad) -> bool:
    """A source's blocked head may move to ``dst``: not moving already, and it fits there
    behind ``dst``'s own head (rule 5a)."""
    return not head.migrating and head.blocks_needed <= room_behind_head(dst)


def _defrag_move(
    src: InstanceLoad, dst: InstanceLoad, choice: MigrateOut, req: RequestLoad
) -> Optional[tuple[MigrateOut, RequestLoad]]:
    """The de-fragmentation move of rule 5 (module docstring), or ``None``."""
    if not head_blocked(src):
        return None
    head = src.waiting[0]
    if _head_fits(head, dst):
        return MigrateOut(head.request_id, waiting=True), head
    room = room_behind_head(dst)
    if not choice.waiting and req.num_blocks <= room:
        if src.free_blocks - src.watermark_blocks + req.num_blocks >= head.blocks_needed:
            return choice, req
    return None


def _head_need(inst: InstanceLoad) -> int:
    return inst.waiting[0].blocks_needed if inst.waiting else 0


def pair_by_defrag(
    instances: Sequence[InstanceLoad], cfg: PolicyConfig, select: SelectFn
) -> list[PlannedMigration]:
    """Relieve instances whose head-of-line request is blocked (module docstring)."""
    draining = []
    blocked = []
    dests = []
    for inst in instances:
        if inst.terminating:
            if _has_requests(inst):
                draining.append((-math.inf, inst.instance_id, inst))
        elif inst.waiting and _head_need(inst) > inst.free_blocks:
            blocked.append((inst.free_blocks - _head_need(inst), inst.instance_id, inst))
        else:
            dests.append((-inst.free_blocks, inst.instance_id, inst))
    draining.sort(key=lambda t: t[1])
    blocked.sort(key=lambda t: (t[0], t[1]))
    dests.sort(key=lambda t: (t[0], t[1]))
    plans: list[PlannedMigration] = []
    j = 0
    for _, _, src in draining + blocked:
        if j >= len(dests):
            break
        choice = select(src)
        req = find_request(src, choice) if choice is not None else None
        if req is None:
            continue
        dst = dests[j][2]
        b_out = 0 if choice.waiting else req.num_blocks
        b_in = req.blocks_needed if choice.waiting else req.num_blocks
        src_after = src.free_blocks + b_out
        dst_after = dst.free_blocks - b_in
        fits = dst_after >= _head_need(dst)
        if src.terminating or (fits and (choice.waiting or dst_after >= src_after)):
            plans.append(
                PlannedMigration(
                    MigrationPair(src.instance_id, dst.instance_id),
                    choice,
                    float(src.free_blocks),
                    float(dst.free_blocks),
                    float(src_after),
                    float(dst_after),
                )
            )
            j += 1
    return plans
