"""The engine side of just-in-time batching: views of the engine's sequences for the pure
JIT policy (``policies.jit``), with their length bounds (``policies.length``).

``JitBatchPolicy`` is what ``BatchScheduler`` takes as its injected ``batch_policy``
(FCFS with priorities stays the default when none is given). It owns no clock of its
own: the runtime hands in ``clock`` (the simulator's virtual clock, or the wall clock
that stamps ``Request.arrival_time`` in the real system) and ``step_time`` (the cost
profile in the simulator, ``MeasuredStepTime`` from real step durations otherwise).
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Optional, Sequence as Seq

from llumnix_py.engines.sequence import Sequence
from policies.jit import JitParams, JitPlan, SloView, StepTime, classify, pick_victim, plan_jit
from policies.length import LengthPrior, remaining_bound

DEFAULT_QUANTILE = 0.9


def slo_view(seq: Sequence, prior: LengthPrior, estimator: str, quantile: float) -> SloView:
    """The JIT view of one sequence (its remaining-length bound from ``estimator``)."""
    obj = seq.objective
    kind = obj.kind if obj is not None else "none"
    generated = len(seq.output_token_ids)
    remaining = remaining_bound(estimator, prior=prior.lengths(kind, len(seq.prompt_token_ids)),
                                generated=generated, quantile=quantile, true_len=seq.sampling.max_tokens)
    common = dict(request_id=seq.request_id, running=seq.status.value == "running", num_tokens=seq.num_tokens,
                  blocks=len(seq.block_table), remaining=remaining, arrival=seq.arrival_time)
    if obj is None:
        return SloView(has_objective=False, **common)
    if obj.kind == "stream":
        return SloView(next_due=seq.arrival_time + obj.due_s(generated, generated + 1),
                       tbt_s=obj.tbt_ms / 1e3, **common)  # type: ignore[operator]
    return SloView(end_due=seq.arrival_time + obj.target_ms / 1e3, **common)


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

    def victim(self, running: Seq[Sequence]) -> Sequence:
        """The running request to preempt when blocks run out (``VictimPolicy``)."""
        views = self.views(running)
        margins, groups = classify(views, self.clock(), self.step_time, self.params)
        rid = pick_victim(views, groups, margins)
        return next(s for s in running if s.request_id == rid)


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
