"""The engine side of just-in-time batching: views of the engine's sequences for the pure
JIT policy (``policies.jit``), with their length bounds (``policies.length``).

``JitBatchPolicy`` is what ``BatchScheduler`` takes as its injected ``batch_policy``
(FCFS with priorities stays the default when none is given). It owns no clock of its
own: the runtime hands in ``clock`` (the simulator's virtual clock, or the wall clock
that stamps ``Request.arrival_time`` in the real system) and ``step_time`` (the cost
profile in the simulator, ``MeasuredStepTime`` from real step durations otherwise).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Callable, Optional, Sequence as Seq

from llumnix_py.engines.sequence import Sequence
from llumnix_py.load import InstanceLoad
from llumnix_py.engines.types import Objective
from llumnix_py.load import RequestLoad
from policies.jit import (JitParams, JitPlan, SloView, StepTime, classify, edf_victim, hard, margin_parts,
                          pick_victim, plan_edf, plan_jit)
from policies.length import PROMPT_BUCKETS, LengthPrior, quantile_bound, remaining_bound

DEFAULT_QUANTILE = 0.9


def slo_view(seq: Sequence, prior: LengthPrior, estimator: str, quantile: float) -> SloView:
    """The JIT view of one sequence (its remaining-length bound from ``estimator``)."""
    obj = seq.objective
    kind = obj.kind if obj is not None else "none"
    generated = len(seq.output_token_ids)
    remaining = remaining_bound(estimator, prior=prior.lengths(kind, len(seq.prompt_token_ids)),
                                generated=generated, quantile=quantile, true_len=seq.sampling.max_tokens)
    common = dict(request_id=seq.request_id, running=seq.status.value == "running", num_tokens=seq.num_tokens,
                  blocks=len(seq.block_table), remaining=remaining, arrival=seq.arrival_time, priority=seq.priority)
    if obj is None:
        return SloView(has_objective=False, **common)
    if obj.kind == "stream":
        return SloView(next_due=seq.arrival_time + obj.due_s(generated, generated + 1),
                       tbt_s=obj.tbt_ms / 1e3, **common)  # type: ignore[operator]
    hard_ms = obj.deadline_ms if obj.deadline_ms is not None else obj.job_deadline_ms
    return SloView(end_due=seq.arrival_time + obj.target_ms / 1e3, hard_due=seq.arrival_time + hard_ms / 1e3,
                   **common)  # type: ignore[operator]


class JitBatchPolicy:
    """Admission order, lost-request preemption and victims by margin (``policies.jit``).

    Args:
        clock: the runtime's clock (the one ``Request.arrival_time`` is on).
        step_time: predicted step duration ``(prefill_tokens, decode_seqs, decode_context)``.
        prior: the instance's output-length prior (the llumlet core feeds it).
        estimator: ``quantile`` (imprecise, refined as tokens come) or ``oracle`` (experiments:
            takes ``max_tokens`` as the true length, which it is in the simulator).
        quantile: the bound's quantile.
        params: the policy's knobs.
    """

    def __init__(self, clock: Callable[[], float], step_time: StepTime, prior: LengthPrior,
                 estimator: str = "quantile", quantile: float = DEFAULT_QUANTILE,
                 params: JitParams = JitParams()) -> None:
        if estimator not in ("quantile", "oracle"):
            raise ValueError(f"unknown length estimator {estimator!r}; known: ['oracle', 'quantile']")
        if not 0 < quantile <= 1:
            raise ValueError("quantile must be in (0, 1]")
        self.clock, self.step_time, self.prior = clock, step_time, prior
        self.estimator, self.quantile, self.params = estimator, quantile, params
        self.last: Optional[JitPlan] = None

    def views(self, seqs: Seq[Sequence]) -> list[SloView]:
        return [slo_view(s, self.prior, self.estimator, self.quantile) for s in seqs]

    def plan(self, running: Seq[Sequence], waiting: Seq[Sequence], *, free_blocks: int, block_size: int,
             free_slots: Optional[int]) -> JitPlan:
        """This step's admission order and preemptions."""
        views = self.views(list(running) + list(waiting))
        self.last = plan_jit(views, self.clock(), self.step_time, free_blocks=free_blocks, block_size=block_size,
                             free_slots=free_slots, params=self.params)
        return self.last

    def annotate(self, load: InstanceLoad, running: Seq[Sequence], waiting: Seq[Sequence]) -> InstanceLoad:
        """``load`` with each request's margins and length bound, and this instance's
        predicted step times and queue, for the global scheduler's SLO-aware policies."""
        now = self.clock()
        ctx = sum(s.num_tokens for s in running)
        n = len(running)
        step_s = self.step_time(0, max(1, n), max(1, ctx))
        mean_ctx = ctx // n if n else 512
        per_token = self.step_time(512, 0, 0) / 512
        queued = sum(s.num_tokens for s in waiting)
        views = {v.request_id: v for v in self.views(list(running) + list(waiting))}

        def annotated(r):
            v = views.get(r.request_id)
            if v is None:
                return r
            first = step_s if v.running else self.step_time(queued, n, ctx)
            m_next, m_end = margin_parts(hard(v), now, step_s, first)  # the objective's own margin
            return dataclasses.replace(r, slo_margin_next_s=m_next, slo_margin_end_s=m_end, slo_remaining=v.remaining)

        return dataclasses.replace(
            load, running=tuple(annotated(r) for r in load.running), waiting=tuple(annotated(r) for r in load.waiting),
            step_s=step_s, step_s_next=self.step_time(0, n + 1, ctx + mean_ctx),
            queue_s=self.step_time(queued, n, ctx) if queued else 0.0, prefill_s_per_token=per_token,
            job_len_bounds=self.job_len_bounds())

    def job_len_bounds(self) -> tuple[int, ...]:
        """Per prompt bucket, the conservative length of a new job call (nothing generated yet),
        from the prior at this policy's quantile (the oracle too: a new request's truth is unknown
        to the instance that publishes it)."""
        return tuple(quantile_bound(self.prior.lengths("job", edge), 0, self.quantile) for edge in PROMPT_BUCKETS)

    def victim(self, running: Seq[Sequence]) -> Sequence:
        """The running request to preempt when blocks run out (``VictimPolicy``)."""
        views = self.views(running)
        margins, groups = classify(views, self.clock(), self.step_time, self.params)
        rid = pick_victim(views, groups, margins)
        return next(s for s in running if s.request_id == rid)


class EdfBatchPolicy(JitBatchPolicy):
    """Earliest due time first (a baseline): admission and victims by due time, no margins,
    no deliberate preemption (``policies.jit.plan_edf``)."""

    def plan(self, running: Seq[Sequence], waiting: Seq[Sequence], *, free_blocks: int, block_size: int,
             free_slots: Optional[int]) -> JitPlan:
        self.last = plan_edf(self.views(list(running) + list(waiting)))
        return self.last

    def victim(self, running: Seq[Sequence]) -> Sequence:
        rid = edf_victim(self.views(running))
        return next(s for s in running if s.request_id == rid)

    def annotate(self, load: InstanceLoad, running: Seq[Sequence], waiting: Seq[Sequence]) -> InstanceLoad:
        return load  # EDF publishes no margins: the global scheduler balances as today


def with_objective(view: RequestLoad, objective: Optional[Objective], elapsed_s: float = 0.0) -> RequestLoad:
    """A request's dispatch view with its objective (relative seconds) for the ``slo`` dispatcher;
    a job call counts by its share of the job's time (``Objective.target_ms``) and carries the
    job's whole time left (``job_deadline_s``) for the ``jobs`` dispatcher.

    A request placed again after ``elapsed_s`` seconds since its arrival, with ``view.output_len``
    tokens already delivered (one resumed after its instance died), is judged from now: its
    next token (index ``output_len``) is its "first", and every due time is ``elapsed_s`` closer
    (negative where it is already late). A new request (``elapsed_s`` 0, nothing delivered) is
    judged from its arrival, as the dispatch policies assume.
    """
    if objective is None:
        return view
    if objective.kind == "stream":
        first_s = objective.due_s(view.output_len, view.output_len + 1) - elapsed_s
        return dataclasses.replace(view, ttft_s=first_s, tbt_s=objective.tbt_ms / 1e3)  # type: ignore[operator]
    job_s = objective.job_deadline_ms / 1e3 - elapsed_s if objective.job_deadline_ms is not None else math.inf
    return dataclasses.replace(view, deadline_s=objective.target_ms / 1e3 - elapsed_s, job_deadline_s=job_s)


class MeasuredStepTime:
    """Step-time prediction from measured steps (the real system): per decode batch size,
    an exponential average of measured decode steps; prefill as seconds per token.

    ``observe`` is fed each step's duration; ``__call__`` is a ``StepTime``. Before any
    measurement it predicts ``initial_s`` per step (and per 512 prefill tokens).
    """

    def __init__(self, initial_s: float = 0.02, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self._decode: dict[int, float] = {}
        self._per_token = initial_s / 512
        self._default = initial_s
        self._lock = threading.Lock()

    def observe(self, prefill_tokens: int, decode_seqs: int, duration_s: float) -> None:
        if not math.isfinite(duration_s) or duration_s <= 0:
            return
        with self._lock:
            if prefill_tokens == 0 and decode_seqs > 0:
                old = self._decode.get(decode_seqs, duration_s)
                self._decode[decode_seqs] = old + self.alpha * (duration_s - old)
            elif prefill_tokens > 0 and decode_seqs == 0:
                self._per_token += self.alpha * (duration_s / prefill_tokens - self._per_token)

    def __call__(self, prefill_tokens: int, decode_seqs: int, decode_context: int) -> float:
        with self._lock:
            decode = 0.0
            if decode_seqs > 0:
                near = min(self._decode, key=lambda b: (abs(b - decode_seqs), b)) if self._decode else None
                decode = self._default if near is None else self._decode[near] * max(1.0, decode_seqs / near)
            return decode + prefill_tokens * self._per_token
