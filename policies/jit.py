"""Just-in-time batching by margin (after JITServe), as pure functions over frozen views.

JITServe (Zhang et al., arXiv 2504.20068) gives each request just enough serving
bandwidth to meet its objective just in time, and composes each batch by *grouped margin
goodput maximization*. What this module follows, in our words (its code is not public to
us; this is our reading of the paper's abstract and design, not a port):

* **margin**: the slack between the time a request has left and the time it needs at the
  predicted step time of the current batch, for the tokens its (conservative, refined)
  length estimate still expects. A stream's tokens each have a due time
  (``ttft + k * tbt``), so its margin is the tighter of its next token's and its last
  token's; a deadline (or a compound job's share) binds the last token only.
* **groups**: ``URGENT`` (0 <= margin < ``urgent_steps`` decode steps: it cannot afford
  to wait), ``SLACK`` (more margin than that), ``BEST_EFFORT`` (no objective), and
  ``LOST`` (negative margin even at the fastest step: no schedule meets it, so its
  tokens add no goodput).
* **goodput maximization**: admission goes group by group (urgent, slack, best effort,
  lost), within a group by least margin first, and the policy skips a request that does
  not fit instead of blocking the queue behind it. When an urgent or slack request
  cannot be admitted for want of blocks or batch slots, running LOST requests are
  preempted (by recomputation: they go back to the queue, behind everything that can
  still be met) -- only then, only as many as free the room, and only when that room
  actually admits it: lost work is deferred when, and only when, that saves another.
  Under memory pressure the preemption victim is likewise taken from the lost group,
  then best effort, then the most slack.
* **slack sits out** (``JitParams.skip_slack``, off by default): JITServe gives each request
  just enough bandwidth, and a decode step is faster with fewer requests in it (each one reads
  its KV and costs its own per-sequence work). So when an urgent request is predicted to miss
  at the current batch's step time (margin < 0), running requests with much slack may sit out
  this step (``JitPlan.skip``: they keep their KV, they are only not computed), just as many as
  turn the most such misses into meets at the smaller batch's step time, fewest first. A
  request sits out only if, with its next token after this step (its prefills included) and
  one full decode step more, its margin stays at least ``skip_keep_steps`` predicted steps
  (with ``skip_keep_steps`` >= ``urgent_steps`` it is still slack after the skip), only for a
  request of its own priority class or a higher one, and never an urgent, lost or best-effort
  one. It is judged again every step, so a request sits out only while its slack lasts.
  ``slack_skips`` is the rule. In our simulations it cost 2-5% of goodput (RESULTS.md), so it
  stays off: the step-time predictions it trusts do not foresee later prefills.
* **priorities** stay strict, as in the default FCFS-with-priorities scheduler: a request
  of a higher priority class is admitted before any of a lower one, the groups and margins
  order requests within a class, a lost request is preempted only for a request of its
  own class or a higher one, and the victim comes from the lowest class first. With one
  class (every ``priority`` 0, the default) nothing changes. EDF does the same.

Nothing here reads a clock or an engine: ``now`` and the step-time predictions come in.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

StepTime = Callable[[int, int, int], float]
"""``(prefill_tokens, decode_seqs, decode_context_tokens) -> seconds`` of one step."""


class Group(enum.IntEnum):
    """Admission order of the groups (lower first)."""

    URGENT = 0
    SLACK = 1
    BEST_EFFORT = 2
    LOST = 3


@dataclass(frozen=True, kw_only=True)
class SloView:
    """One request as the JIT policy sees it (absolute times on the runtime's clock).

    Attributes:
        request_id: its id.
        running: in the running batch (else waiting).
        num_tokens: prompt plus outputs so far (a waiting request re-prefills them all).
        blocks: KV blocks it holds (0 while waiting).
        remaining: the length estimator's bound on the tokens still to come (>= 1).
        next_due: when its next token is due (stream), else ``inf``.
        tbt_s: seconds allowed per later token (stream), else 0.
        end_due: when its whole response is due (deadline, or a job call's share), else ``inf``.
        hard_due: when the objective itself is lost: the deadline, or a job call's job deadline
            (later than its share); ``inf`` for a stream (its tokens' due times are ``next_due``).
        has_objective: False for a best-effort request.
        arrival: its arrival time (orders best-effort and lost requests, FCFS).
        priority: its priority class (higher first, as ``Request.priority``).
    """

    request_id: str
    running: bool
    num_tokens: int
    blocks: int
    remaining: int
    next_due: float = math.inf
    tbt_s: float = 0.0
    end_due: float = math.inf
    hard_due: float = math.inf
    has_objective: bool = True
    arrival: float = 0.0
    priority: int = 0


def margin_parts(v: SloView, now: float, step_s: float, first_s: float) -> tuple[float, float]:
    """``(next, end)``: the slack of its next token (which a faster batch does not change)
    and of its last token (which moves by ``remaining - 1`` steps); ``inf`` where none binds."""
    if not v.has_objective:
        return math.inf, math.inf
    t_next = now + first_s
    rest = max(0, v.remaining - 1)
    m_next = m_end = math.inf
    if math.isfinite(v.next_due):
        m_next = v.next_due - t_next
        m_end = m_next + rest * (v.tbt_s - step_s)
    if math.isfinite(v.end_due):
        m_end = min(m_end, v.end_due - (t_next + rest * step_s))
    return m_next, m_end


def hard(v: SloView) -> SloView:
    """``v`` judged against its objective itself rather than the share a scheduler aims for."""
    return dataclasses.replace(v, end_due=max(v.end_due, v.hard_due)) if math.isfinite(v.hard_due) else v


def margin(v: SloView, now: float, step_s: float, first_s: float) -> float:
    """Slack (seconds) if ``v`` gets its next token after ``first_s`` and every later one
    ``step_s`` apart; ``inf`` without an objective."""
    return min(margin_parts(v, now, step_s, first_s))


@dataclass(frozen=True)
class JitParams:
    """Knobs of the JIT policy.

    Attributes:
        urgent_steps: a request with less margin than this many decode steps is urgent.
        skip_slack: running requests with much slack may sit out a step for an urgent request
            that would miss otherwise (``slack_skips``); off by default (see RESULTS.md).
        skip_keep_steps: a request sits out only if its margin, with its next token after this
            step and one full decode step more, stays at least this many predicted steps.
    """

    urgent_steps: float = 8.0
    skip_slack: bool = False
    skip_keep_steps: float = 8.0

    def __post_init__(self) -> None:
        if not self.urgent_steps >= 0:
            raise ValueError("urgent_steps must be >= 0")
        if not self.skip_keep_steps >= 0:
            raise ValueError("skip_keep_steps must be >= 0")


@dataclass(frozen=True)
class JitPlan:
    """The JIT policy's decision for one step.

    Attributes:
        admit_order: waiting request ids, in the order to try admitting them (skip what does not fit).
        preempt: running request ids to preempt first (lost ones whose room admits others).
        margins: each request's margin (seconds), for reporting and tests.
        groups: each request's group.
        skip: running request ids that sit out this step (keep their KV, compute nothing).
    """

    admit_order: tuple[str, ...]
    preempt: tuple[str, ...]
    margins: dict[str, float]
    groups: dict[str, Group]
    skip: tuple[str, ...] = ()


def classify(views: Sequence[SloView], now: float, step_time: StepTime,
             params: JitParams = JitParams()) -> tuple[dict[str, float], dict[str, Group]]:
    """Margins at the current batch's predicted step time, and groups.

    The decode step time is that of the running batch plus one (the request being judged,
    if waiting); a waiting request's first token comes after its prefill beside that batch.
    ``LOST`` is judged at the fastest possible step (alone in the batch), against the objective
    itself (a job call's job deadline, not its share).
    """
    running = [v for v in views if v.running]
    ctx = sum(v.num_tokens for v in running)
    step_run = step_time(0, max(1, len(running)), max(1, ctx))
    margins: dict[str, float] = {}
    groups: dict[str, Group] = {}
    for v in views:
        if v.running:
            step_s, first_s = step_run, step_run
        else:
            step_s = step_time(0, len(running) + 1, ctx + v.num_tokens)
            first_s = step_time(v.num_tokens, len(running), ctx)
        m = margins[v.request_id] = margin(v, now, step_s, first_s)
        if not v.has_objective:
            g = Group.BEST_EFFORT
        elif m < 0:
            alone = step_time(0, 1, v.num_tokens)
            best = margin(hard(v), now, alone, alone if v.running else step_time(v.num_tokens, 0, 0))
            g = Group.LOST if best < 0 else Group.URGENT
        else:
            g = Group.URGENT if m < params.urgent_steps * step_s else Group.SLACK
        groups[v.request_id] = g
    return margins, groups


def plan_jit(views: Sequence[SloView], now: float, step_time: StepTime, *, free_blocks: int, block_size: int,
             free_slots: Optional[int], params: JitParams = JitParams()) -> JitPlan:
    """Admission order and lost-request preemptions for one step (see the module docstring).

    Args:
        views: every running and waiting request of the instance.
        now: the runtime's clock.
        step_time: predicted step durations of this instance.
        free_blocks: KV blocks free for admissions now.
        block_size: tokens per block.
        free_slots: batch slots free (None: unlimited).
        params: the policy's knobs.
    """
    margins, groups = classify(views, now, step_time, params)

    def key(v: SloView) -> tuple:
        g = groups[v.request_id]
        inner = (v.arrival,) if g in (Group.BEST_EFFORT, Group.LOST) else (margins[v.request_id], v.arrival)
        return (-v.priority, int(g)) + inner + (v.request_id,)

    waiting = sorted((v for v in views if not v.running), key=key)
    lost_running = sorted((v for v in views if v.running and groups[v.request_id] == Group.LOST),
                          key=lambda v: (-v.blocks, v.request_id))
    preempt: list[str] = []
    admitted: list[SloView] = []
    blocks, slots = free_blocks, free_slots
    for v in waiting:
        need = -(-v.num_tokens // block_size)
        fits = need <= blocks and (slots is None or slots > 0)
        if not fits and groups[v.request_id] in (Group.URGENT, Group.SLACK):
            # free room from lost running requests, only if enough of them admit this one
            freed, slots_freed, chosen = 0, 0, []
            for lv in (lv for lv in lost_running if lv.priority <= v.priority):
                if need <= blocks + freed and (slots is None or slots + slots_freed > 0):
                    break
                chosen.append(lv)
                freed += lv.blocks
                slots_freed += 1
            if need <= blocks + freed and (slots is None or slots + slots_freed > 0):
                preempt.extend(lv.request_id for lv in chosen)
                lost_running = [lv for lv in lost_running if lv not in chosen]
                blocks += freed
                slots = None if slots is None else slots + slots_freed
                fits = True
        if fits:
            blocks -= need
            slots = None if slots is None else slots - 1
            admitted.append(v)
    skip: tuple[str, ...] = ()
    if params.skip_slack:
        gone = set(preempt)
        skip = slack_skips([v for v in views if v.running and v.request_id not in gone] + admitted, now, step_time,
                           margins, groups, params)
    return JitPlan(tuple(v.request_id for v in waiting), tuple(preempt), margins, groups, skip)


def skip_margin(v: SloView, now: float, step_s: float, this_s: float) -> float:
    """``v``'s margin if it sits out this step (``this_s``): its next token comes one full step
    (``step_s``) after it, and every later one ``step_s`` apart."""
    return margin(v, now, step_s, this_s + step_s)


def slack_skips(batch: Sequence[SloView], now: float, step_time: StepTime, margins: dict[str, float],
                groups: dict[str, Group], params: JitParams = JitParams()) -> tuple[str, ...]:
    """Running requests of ``batch`` that sit out this step (see the module docstring).

    Args:
        batch: the step as planned: the running requests that stay, and the waiting ones the plan
            admits (their prompts are prefilled in this step; a waiting urgent one may be helped too).
        now: the runtime's clock.
        step_time: predicted step durations.
        margins / groups: ``classify``'s, at the whole batch's step time.
        params: ``skip_keep_steps`` bounds how much slack a request must keep.

    With ``full`` the decode step of the whole batch and ``this`` this step (its prefills and the
    whole batch's decodes): needy are urgent requests of ``batch`` whose margin is negative;
    candidates are slack running requests of a class no higher than the lowest needy one whose
    ``skip_margin`` is at least ``skip_keep_steps * full``, most slack first (then most context:
    it costs the step the most). The fewest first candidates that meet the most needy requests
    (this step and every later decode step at the smaller batch's times) sit out; none when that
    meets no more of them than nobody sitting out.
    """
    running = [v for v in batch if v.running]
    n, ctx = len(running), sum(v.num_tokens for v in running)
    prefill = sum(v.num_tokens for v in batch if not v.running)
    full = step_time(0, max(1, n), max(1, ctx))
    this = step_time(prefill, n, ctx)
    needy = [v for v in batch if groups.get(v.request_id) == Group.URGENT and margins.get(v.request_id, 0.0) < 0]
    if not needy:
        return ()
    floor = min(v.priority for v in needy)
    keep = params.skip_keep_steps * full
    cands = sorted(((skip_margin(v, now, full, this), v) for v in running
                    if groups.get(v.request_id) == Group.SLACK and v.priority <= floor),
                   key=lambda x: (-x[0], -x[1].num_tokens, x[1].request_id))
    cands = [v for m, v in cands if m >= keep]

    def met(k: int, k_ctx: int) -> int:
        dec, dec_ctx = n - k, ctx - k_ctx
        this_s = step_time(prefill, dec, dec_ctx)
        step_run = step_time(0, max(1, dec), max(1, dec_ctx))
        count = 0
        for v in needy:
            step_s = step_run if v.running else step_time(0, dec + 1, dec_ctx + v.num_tokens)
            count += margin(v, now, step_s, this_s) >= 0
        return count

    best_k, best_met, k_ctx = 0, met(0, 0), 0
    base = best_met
    for k, v in enumerate(cands, 1):
        k_ctx += v.num_tokens
        got = met(k, k_ctx)
        if got > best_met:
            best_k, best_met = k, got
    return tuple(v.request_id for v in cands[:best_k]) if best_met > base else ()


def pick_victim(views: Sequence[SloView], groups: dict[str, Group], margins: dict[str, float]) -> str:
    """Which running request to preempt when blocks run out: from the lowest priority class,
    lost first (largest), then best effort (newest), then the most slack; urgent last. ``views`` must not be empty."""
    if not views:
        raise ValueError("no running request to preempt")

    def key(v: SloView) -> tuple:
        g = groups.get(v.request_id, Group.BEST_EFFORT)
        rank = {Group.LOST: 0, Group.BEST_EFFORT: 1, Group.SLACK: 2, Group.URGENT: 3}[g]
        return (v.priority, rank, -v.blocks if g == Group.LOST else 0, -v.arrival if g == Group.BEST_EFFORT else 0,
                -margins.get(v.request_id, 0.0) if g in (Group.SLACK, Group.URGENT) else 0, v.request_id)

    return min(views, key=key).request_id


def plan_edf(views: Sequence[SloView]) -> JitPlan:
    """Earliest due time first (the EDF baseline), within each priority class (higher first):
    waiting requests by their next token's due time (a stream) or their response's (a
    deadline), those without an objective last (FCFS); no deliberate preemption."""
    def due(v: SloView) -> float:
        return min(v.next_due, v.end_due) if v.has_objective else math.inf

    waiting = sorted((v for v in views if not v.running), key=lambda v: (-v.priority, due(v), v.arrival, v.request_id))
    return JitPlan(tuple(v.request_id for v in waiting), (), {}, {})


def edf_victim(views: Sequence[SloView]) -> str:
    """EDF's preemption victim: from the lowest priority class, the latest due time (no
    objective counts as latest), newest first."""
    if not views:
        raise ValueError("no running request to preempt")
    return max(views, key=lambda v: (-v.priority, min(v.next_due, v.end_due) if v.has_objective else math.inf,
                                     v.arrival, v.request_id)).request_id
