"""Across instances: SLO-aware dispatch and rescue migration, pure.

JITServe (arXiv 2504.20068) schedules inside one instance. Across instances a request
that will miss its objective where it is can still meet it elsewhere, if another
instance's batch steps faster and moving it costs less than it gains. The engine's JIT
policy publishes, per request, its margins on its instance (``RequestLoad.slo_margin_*``,
``slo_remaining``) and, per instance, its predicted step times (``InstanceLoad.step_s``
now, ``step_s_next`` with one more request), its queue (``queue_s``) and its prefill
rate. From those alone:

* **rescue** (``plan_rescues``): each migration round, a running request whose margin has
  gone negative on its instance, but whose margin predicted on another instance after
  the migration's cost is non-negative, migrates there; the destination must have room
  for its blocks and none of the destination's own requests may be pushed from a
  non-negative margin to a negative one by the added request.

      margin there = min(next - cost, end + (remaining - 1) * (step_src - step_dst_next) - cost)

  (``cost``: a conservative migration time: the request's blocks over the bandwidth the
  source measured on its link to that destination (``policies.bandwidth``, ``links``), or
  ``copy_s_per_block`` per block held where that link is not measured yet.)
  A stream whose *next* token is already late stays late wherever it goes, so it is not
  moved; a request whose last token is late gains from a faster batch.
* **dispatch** (``by_slo``, registered as dispatch policy ``slo``): a request with an
  objective goes where its predicted first token and token rate leave the most margin;
  one without goes by freeness, as today.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional, Sequence

from llumnix_py.load import InstanceLoad, RequestLoad
from policies.bandwidth import copy_time_s
from policies.config import PolicyConfig
from policies.dispatch import DispatchState, by_freeness

DEFAULT_EXPECTED_LEN = 256  # tokens assumed at dispatch when nothing better is known


@dataclass(frozen=True)
class Rescue:
    """Migrate ``request_id`` from ``src`` to ``dst``: its margin goes from ``margin_here_s`` to
    ``margin_there_s`` (predicted)."""

    request_id: str
    src: str
    dst: str
    margin_here_s: float
    margin_there_s: float


def rescue_cost(r: RequestLoad, src: InstanceLoad, copy_s_per_block: float, gbps: Optional[float] = None) -> float:
    """Predicted seconds to migrate ``r`` out of ``src``: over the measured link (``gbps``) when
    it and the block size are known, else ``copy_s_per_block`` per block."""
    blocks = max(1, r.num_blocks)
    measured = copy_time_s(blocks, src.kv_block_bytes, gbps)
    return measured if measured is not None else copy_s_per_block * blocks


def margin_there(r: RequestLoad, src: InstanceLoad, dst: InstanceLoad, copy_s_per_block: float,
                 gbps: Optional[float] = None) -> float:
    """``r``'s predicted margin once migrated from ``src`` to ``dst`` over a link of ``gbps`` GB/s
    (None: not measured) (see the module docstring)."""
    cost = rescue_cost(r, src, copy_s_per_block, gbps)
    gain = max(0, r.slo_remaining - 1) * (src.step_s - dst.step_s_next)
    return min(r.slo_margin_next_s - cost, r.slo_margin_end_s + gain - cost)


def _room(dst: InstanceLoad, r: RequestLoad) -> bool:
    return dst.free_blocks - dst.watermark_blocks >= r.num_blocks + 1 and (
        not dst.max_batch_size or dst.num_running < dst.max_batch_size)


def _harms(dst: InstanceLoad) -> bool:
    """Whether one more request in ``dst``'s batch pushes one of its met requests to a miss."""
    slower = dst.step_s_next - dst.step_s
    for q in dst.running:
        if q.slo_margin_s >= 0 and q.slo_margin_end_s - max(0, q.slo_remaining - 1) * slower < 0:
            return True
    return False


def plan_rescues(instances: Sequence[InstanceLoad], copy_s_per_block: float,
                 busy: frozenset[str] = frozenset(),
                 links: Mapping[tuple[str, str], float] = MappingProxyType({})) -> list[Rescue]:
    """Rescue migrations for this round: at most one per source and one per destination,
    best predicted margin first; instances in ``busy`` (at their migration limit) take no part.

    Args:
        instances: the load snapshots (those without step-time predictions, ``step_s_next`` 0,
            are ignored: a measured ``step_s`` alone predicts nothing about one more request).
        copy_s_per_block: predicted migration time per KV block the request holds, where the
            link is not measured.
        busy: instance ids that may neither send nor receive this round.
        links: measured GB/s by ``(src id, dst id)`` (``policies.bandwidth``; the scheduler's
            ``links``).
    """
    live = [i for i in instances if i.step_s_next > 0 and i.instance_id not in busy]
    targets = [i for i in live if not i.terminating and not _harms(i)]
    options = []
    for src in live:
        for r in src.running:
            if r.migrating or not r.slo_margin_s < 0:
                continue
            best: Optional[tuple[float, str]] = None
            for dst in targets:
                if dst.instance_id == src.instance_id or not _room(dst, r):
                    continue
                m = margin_there(r, src, dst, copy_s_per_block, links.get((src.instance_id, dst.instance_id)))
                if m >= 0 and (best is None or (m, dst.instance_id) > best):
                    best = (m, dst.instance_id)
            if best is not None:
                options.append(Rescue(r.request_id, src.instance_id, best[1], r.slo_margin_s, best[0]))
    options.sort(key=lambda x: (-x.margin_there_s, x.request_id))
    used_src: set[str] = set()
    used_dst: set[str] = set()
    chosen = []
    for o in options:
        if o.src in used_src or o.dst in used_dst or o.src in used_dst or o.dst in used_src:
            continue
        used_src.add(o.src)
        used_dst.add(o.dst)
        chosen.append(o)
    return chosen


def dispatch_margin(inst: InstanceLoad, r: RequestLoad, expected_len: int = DEFAULT_EXPECTED_LEN,
                    saved_tokens: int = 0) -> float:
    """Predicted margin of a new request ``r`` on ``inst``: first token after ``inst``'s queue and
    its own prefill (less ``saved_tokens`` of its prompt whose KV the instance keeps), later
    tokens at the step time of the batch with it. A request resumed by recomputation (``r.output_len``
    tokens already delivered) prefills those too."""
    pending = inst.pending_dispatch  # dispatched since its last poll: ahead of ``r`` in its queue
    step = inst.step_s_next + len(pending) * max(0.0, inst.step_s_next - inst.step_s)
    own = max(0, r.prompt_len + r.output_len - saved_tokens)
    first = inst.queue_s + inst.prefill_s_per_token * (own + sum(p.prompt_len for p in pending)) + step
    rest = max(0, expected_len - 1) * step
    m = math.inf
    if math.isfinite(r.ttft_s):
        m = min(r.ttft_s - first, r.ttft_s + max(0, expected_len - 1) * r.tbt_s - (first + rest))
    if math.isfinite(r.deadline_s):
        m = min(m, r.deadline_s - (first + rest))
    return m


def by_slo(instances: Sequence[InstanceLoad], request: RequestLoad, cfg: PolicyConfig, state: DispatchState) -> str:
    """Dispatch policy ``slo``: the most predicted margin for a request with an objective (ties by
    freeness); freeness alone for one without, or where no instance predicts step times."""
    has_objective = math.isfinite(request.ttft_s) or math.isfinite(request.deadline_s)
    predicted = [i for i in instances if i.step_s_next > 0]
    if not has_objective or not predicted:
        return by_freeness(instances, request, cfg, state)
    return max(predicted, key=lambda i: (dispatch_margin(i, request, cfg.slo_expected_len),
                                         state.dispatch_freeness(i, cfg, request=request), i.instance_id)).instance_id
