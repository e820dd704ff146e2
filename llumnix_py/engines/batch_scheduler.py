"""Iteration-level continuous batching: plan one step.

Each step every running request decodes one token and waiting requests are
admitted (prefilled, whole) while blocks, the batch-size limit and the
batched-token budget allow. When a running request needs a block and none is
free, an injected policy picks a victim to preempt (by recomputation: its blocks
are freed and it goes back to the waiting queue). The planner only plans; the
engine core executes and applies.

An injected ``BatchPolicy`` (e.g. ``engines.jit_batch.JitBatchPolicy``) replaces FCFS
admission: it orders the waiting requests (the planner skips what does not fit rather than
blocking behind it) and names running requests to preempt first. Without one, FCFS with
priorities, the default.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence as Seq

from llumnix_py.engines.block_manager import BlockManager
from llumnix_py.engines.sequence import Sequence, cdiv
from llumnix_py.engines.types import SeqStatus
from llumnix_py.errors import UnknownPolicyError

VictimPolicy = Callable[[Seq[Sequence]], Sequence]


def newest_victim(running: Seq[Sequence]) -> Sequence:
    """Default victim: the lowest-priority request, latest arrival among those."""
    return max(running, key=lambda s: (-s.priority, s.arrival_time, s.request_id))


def largest_victim(running: Seq[Sequence]) -> Sequence:
    """Alternative: the request holding the most blocks (frees the most at once)."""
    return max(running, key=lambda s: (-s.priority, len(s.block_table), s.arrival_time, s.request_id))


class BatchPlanDecision(Protocol):
    admit_order: tuple[str, ...]
    preempt: tuple[str, ...]


class BatchPolicy(Protocol):
    """Chooses admissions and deliberate preemptions for a step (see the module docstring)."""

    def plan(self, running: Seq[Sequence], waiting: Seq[Sequence], *, free_blocks: int, block_size: int,
             free_slots: Optional[int]) -> BatchPlanDecision: ...

    def victim(self, running: Seq[Sequence]) -> Sequence: ...


PREEMPTION_POLICIES: dict[str, VictimPolicy] = {"newest": newest_victim, "largest": largest_victim}


def get_preemption_policy(name: str) -> VictimPolicy:
    try:
        return PREEMPTION_POLICIES[name]
    except KeyError:
        raise UnknownPolicyError(f"unknown preemption policy {name!r}; known: {sorted(PREEMPTION_POLICIES)}") from None


@dataclass
class StepPlan:
    """What one step will run.

    Attributes:
        decodes: running requests feeding their last token (block already appended).
        prefills: requests admitted this step (all their tokens are fed).
        preempted: requests moved back to the waiting queue while planning.
    """

    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class BatchScheduler:
    """Owns the waiting queue and the running batch of one engine."""

    def __init__(
        self,
        blocks: BlockManager,
        block_size: int,
        max_batch_size: int,
        max_batched_tokens: int,
        victim_policy: VictimPolicy = newest_victim,
        batch_policy: Optional[BatchPolicy] = None,
    ) -> None:
        self.blocks = blocks
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        self.max_batched_tokens = max_batched_tokens
        self.victim_policy = batch_policy.victim if batch_policy is not None else victim_policy
        self.batch_policy = batch_policy
        self.waiting: list[Sequence] = []  # sorted by Sequence.queue_key()
        self.running: list[Sequence] = []  # batch order (admission order)

    # ----- queue edits -------------------------------------------------------------------
    def enqueue(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        keys = [s.queue_key() for s in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, seq.queue_key()), seq)

    def remove(self, seq: Sequence) -> None:
        """Take a request out of the queue or the batch (abort, finish, freeze)."""
        if seq.status == SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)

    def free_blocks_of(self, seq: Sequence) -> None:
        if seq.block_table:
            self.blocks.free(("seq", seq.request_id), seq.block_table)
            seq.block_table = []

    def preempt(self, seq: Sequence) -> None:
        """Preempt by recomputation: free blocks, back to the waiting queue."""
        self.running.remove(seq)
        self.free_blocks_of(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.enqueue(seq)

    # ----- planning ----------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Plan one step: decodes (preempting if blocks run out), then FCFS admissions.

        A head of the queue longer than ``max_batched_tokens`` minus the running batch
        (one token each) cannot share a step: it gets the step to itself, and the decodes
        wait one step, as every prompt step of vLLM <= 0.3 did. Waiting for the batch to
        empty instead would block the queue behind it until every running request
        finished (a re-prefill after preemption grows past the budget with its outputs).
        """
        if self.batch_policy is not None:
            return self._schedule_by_policy(self.batch_policy)
        plan = StepPlan()
        if self.waiting and self.waiting[0].num_tokens > self.max_batched_tokens - len(self.running):
            self._plan_prefills(plan, budget=self.waiting[0].num_tokens)  # the head alone, if it fits
            if plan.prefills:
                return plan
        self._plan_decodes(plan)
        if not plan.preempted:
            self._plan_prefills(plan, budget=self.max_batched_tokens - len(plan.decodes))
        return plan

    def _schedule_by_policy(self, policy: BatchPolicy) -> StepPlan:
        """Plan with the injected policy: its preemptions, the decodes, then admissions in its
        order, skipping any that does not fit (the token budget, blocks, batch slots)."""
        plan = StepPlan()
        free_slots = self.max_batch_size - len(self.running) if self.max_batch_size else None
        free = self.blocks.num_free - self.blocks.watermark_blocks
        decision = policy.plan(self.running, self.waiting, free_blocks=max(0, free), block_size=self.block_size,
                               free_slots=free_slots)
        by_id = {s.request_id: s for s in self.running}
        for rid in decision.preempt:
            seq = by_id[rid]
            self.preempt(seq)
            plan.preempted.append(seq)
        chosen = len(plan.preempted)
        waiting = {s.request_id: s for s in self.waiting}
        order = [waiting[r] for r in decision.admit_order if r in waiting]
        if order and order[0].num_tokens > self.max_batched_tokens - len(self.running):
            self._plan_prefills(plan, budget=order[0].num_tokens, order=order[:1])  # alone, as in ``schedule``
            if plan.prefills:
                return plan
        self._plan_decodes(plan)
        if len(plan.preempted) == chosen:  # no shortage while decoding: admit
            self._plan_prefills(plan, budget=self.max_batched_tokens - len(plan.decodes), order=order)
        return plan

    def _plan_decodes(self, plan: StepPlan) -> None:
        # Iterate over a snapshot: preemption removes victims from ``running``.
        for seq in list(self.running):
            if seq.status != SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            need = cdiv(seq.num_computed + 1, self.block_size) - len(seq.block_table)
            while need > 0:
                got = self.blocks.allocate(("seq", seq.request_id), need, respect_watermark=False)
                if got is not None:
                    seq.block_table.extend(got)
                    need = 0
                    break
                victim = self.victim_policy([s for s in self.running])
                self.preempt(victim)
                plan.preempted.append(victim)
                if victim in plan.decodes:
                    plan.decodes.remove(victim)
                if victim is seq:
                    break
            if seq.status == SeqStatus.RUNNING:
                plan.decodes.append(seq)

    def _plan_prefills(self, plan: StepPlan, budget: int, order: Optional[list[Sequence]] = None) -> None:
        """Admit from the head of the queue (FCFS: stop at the first that does not fit), or
        in ``order`` (a policy's: skip what does not fit)."""
        admitted: list[Sequence] = []
        skip = order is not None
        for seq in (order if order is not None else self.waiting):
            if self.max_batch_size and len(self.running) + len(admitted) >= self.max_batch_size:
                break
            n = seq.num_tokens
            if n > budget:
                if skip:
                    continue
                break
            got = self.blocks.allocate(("seq", seq.request_id), cdiv(n, self.block_size))
            if got is None:
                if skip:
                    continue
                break
            seq.block_table = got
            seq.num_computed = 0
            admitted.append(seq)
            budget -= n
        for seq in admitted:
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
        plan.prefills = admitted

    def head_blocked(self) -> bool:
        """True when the head of the queue waits for blocks (fragmentation signal)."""
        if not self.waiting:
            return False
        return not self.blocks.can_allocate(cdiv(self.waiting[0].num_tokens, self.block_size))
