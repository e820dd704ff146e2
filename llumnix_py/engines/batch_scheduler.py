"""Iteration-level continuous batching: plan one step.

Each step every running request decodes one token and waiting requests are
admitted (prefilled, whole) while blocks, the batch-size limit and the
batched-token budget allow. When a running request needs a block and none is
free, an injected policy picks a victim to preempt, and a second injected policy
(``policies.switching``) picks how: by recomputation (its blocks are freed and it
goes back to the waiting queue to prefill again) or by swapping (its blocks move to
the host pool and come back, whole, when it is readmitted; FastSwitch,
arXiv:2411.18424). The planner only plans, copies included; the engine core
executes and applies.

An injected ``BatchPolicy`` (e.g. ``engines.jit_batch.JitBatchPolicy``) replaces FCFS
admission: it orders the waiting requests (the planner skips what does not fit rather than
blocking behind it), names running requests to preempt first, and running requests that
sit out the step (``skip``: not computed, their KV and their place in the batch kept; a plan
that would compute nothing at all runs them). Without one, FCFS with priorities, the default.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import AbstractSet, Callable, Optional, Protocol, Sequence as Seq

from llumnix_py.engines.block_manager import BlockManager, copy_runs
from llumnix_py.engines.conversations import ConversationStore
from llumnix_py.engines.fair_share import FairShare
from llumnix_py.engines.sequence import Sequence, cdiv
from llumnix_py.engines.types import SeqStatus
from llumnix_py.errors import UnknownPolicyError
from policies.switching import PreemptionMode, SwitchCosts, SwitchFn, SwitchView, always_recompute

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
    skip: tuple[str, ...]  # running requests that sit out this step (their KV stays)


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
        swap_out: (device blocks, host blocks) of each request swapped out while planning;
            the device blocks are already free, so the copy must run before the step.
        swap_in: (request id, host blocks, device blocks) of each swapped request readmitted.
            Synchronous: it is in ``decodes`` and its KV lands before the step. Asynchronous:
            it waits in ``BatchScheduler.landing`` until its copy has landed (``land``).
    """

    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    swap_out: list[tuple[list[int], list[int]]] = field(default_factory=list)
    swap_in: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    restore: list[tuple[str, list[int], list[int]]] = field(default_factory=list)  # (request id, host,
    # device): a conversation's stored prefix for a new turn (its prefill skips it). Synchronous: it
    # is in ``prefills`` and the copy runs before the step. Asynchronous: it waits in ``landing``
    # until its copy has landed, then prefills in the next plan (``BatchScheduler.ready``).

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


def check_prefill_first_steps(steps: object) -> None:
    """``ValueError`` unless ``steps`` (``BatchScheduler.prefill_first``) is an integer in [0, 1000]."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= 1000:
        raise ValueError(f"prefill_first_steps must be an integer in [0, 1000], got {steps!r}")


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
        host: Optional[BlockManager] = None,
        switch_policy: SwitchFn = always_recompute,
        switch_costs: Optional[SwitchCosts] = None,
        group_copies: bool = True,
        async_swap_in: bool = False,
        conversations: Optional[ConversationStore] = None,
        fair: Optional[FairShare] = None,
    ) -> None:
        self.blocks = blocks
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        self.max_batched_tokens = max_batched_tokens
        self.victim_policy = batch_policy.victim if batch_policy is not None else victim_policy
        self.batch_policy = batch_policy
        self.host = host  # the host swap pool; None: preemption always recomputes
        self.switch_policy = switch_policy
        self.switch_costs = switch_costs or SwitchCosts(0.0, 1.0, 0.0, 0)  # the core refreshes it
        self.group_copies = group_copies
        self.async_swap_in = async_swap_in
        self.conversations = conversations
        self.fair = fair  # per-client fair sharing (None: priority, then FCFS)
        self.landing: list[Sequence] = []  # swapped in or restoring, copy in flight: not runnable yet
        self.ready: list[Sequence] = []  # restored (landed): prefill first in the next plan
        self.waiting: list[Sequence] = []  # sorted by Sequence.queue_key()
        self.running: list[Sequence] = []  # batch order (admission order)
        self.held: frozenset[str] = frozenset()  # waiting requests not to admit (``admissible``)
        self.prefill_first = 0  # steps in a row that admissions may run alone (``_prefill_only``)
        self._prefill_run = 0  # such steps since the running batch last ran

    def admissible(self) -> list[Sequence]:
        """The waiting requests a step may admit, in queue order: all but those ``held`` (a
        ``decode`` instance's prefill work, kept for the scheduler to redirect; the llumlet
        sets and releases them)."""
        if not self.held:
            return self.waiting
        return [s for s in self.waiting if s.request_id not in self.held]

    # ----- queue edits -------------------------------------------------------------------
    def enqueue(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        keys = [s.queue_key() for s in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, seq.queue_key()), seq)

    def remove(self, seq: Sequence) -> None:
        """Take a request out of the queue or the batch (abort, finish, freeze)."""
        if seq in self.landing:
            self.landing.remove(seq)
        elif seq in self.ready:
            self.ready.remove(seq)
        elif seq.status == SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)

    def free_blocks_of(self, seq: Sequence) -> None:
        """Free the request's blocks on both pools."""
        if seq.block_table:
            self.blocks.free(("seq", seq.request_id), seq.block_table)
            seq.block_table = []
        if seq.host_table:
            assert self.host is not None
            self.host.free(("swap", seq.request_id), seq.host_table)
            seq.host_table = []

    def preempt(self, seq: Sequence) -> None:
        """Preempt by recomputation: free blocks, back to the waiting queue."""
        self.running.remove(seq)
        self.free_blocks_of(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.enqueue(seq)

    def switch_view(self, seq: Sequence) -> SwitchView:
        """What the switch policy sees of a running request about to be preempted."""
        kept = seq.block_table[:cdiv(seq.num_computed, self.block_size)]
        return SwitchView(
            request_id=seq.request_id, num_tokens=seq.num_tokens, num_blocks=len(kept),
            num_copies=len(copy_runs(kept, range(len(kept)), self.group_copies)),
            host_free_blocks=self._host_room())

    def _host_room(self) -> int:
        """Host blocks a swap-out may take: free ones and those stored turns would give up."""
        if self.host is None:
            return 0
        return self.host.num_free + (self.conversations.num_blocks if self.conversations is not None else 0)

    def switch_out(self, seq: Sequence, plan: StepPlan) -> PreemptionMode:
        """Preempt a running request the way the switch policy picks; a swap records its
        copy in ``plan.swap_out``. A swap the host pool cannot take recomputes."""
        mode = self.switch_policy(self.switch_view(seq), self.switch_costs) if self.host is not None \
            else PreemptionMode.RECOMPUTE
        kept = seq.block_table[:cdiv(seq.num_computed, self.block_size)]
        if mode == PreemptionMode.SWAP and self.conversations is not None:
            self.conversations.make_room(len(kept))  # a running request outranks a stored turn
        host_ids = self.host.allocate(("swap", seq.request_id), len(kept)) \
            if mode == PreemptionMode.SWAP and kept and self.host is not None else None
        if host_ids is None:
            self.preempt(seq)
            return PreemptionMode.RECOMPUTE
        self.running.remove(seq)
        self.blocks.free(("seq", seq.request_id), seq.block_table)  # the copy runs before the step
        plan.swap_out.append((kept, host_ids))
        seq.block_table = []
        seq.host_table = host_ids
        seq.num_preemptions += 1
        self.enqueue(seq)
        return PreemptionMode.SWAP

    def admit_tokens(self, seq: Sequence) -> int:
        """Tokens a waiting request feeds when admitted: one for a swapped request (its
        KV comes back from the host pool), its sequence less a restored conversation
        prefix otherwise."""
        if seq.host_table:
            return 1
        return seq.num_tokens - self.reusable_blocks(seq) * self.block_size

    def reusable_blocks(self, seq: Sequence) -> int:
        """Blocks of the request's conversation's stored turn that its tokens share."""
        if self.conversations is None or not seq.conversation_id or seq.conversation_id not in self.conversations:
            return 0
        if seq.sampling.prompt_logprobs is not None and not seq.output_token_ids:
            return 0  # the prompt's log probabilities need the whole prompt computed
        return self.conversations.reusable_blocks(seq.conversation_id, seq.all_token_ids())

    def admit_blocks(self, seq: Sequence) -> int:
        if seq.host_table:
            return cdiv(seq.num_computed + 1, self.block_size)
        return cdiv(seq.num_tokens, self.block_size)

    # ----- planning ----------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Plan one step: decodes (preempting if blocks run out), then FCFS admissions.

        A head of the queue (the first to admit: the oldest, or the fair-share order's first)
        longer than ``max_batched_tokens`` minus the running batch (one token each) cannot
        share a step: it gets the step to itself, and the decodes wait one step, as every
        prompt step of vLLM <= 0.3 did. Waiting for the batch to empty instead would block the
        queue behind it until every running request finished (a re-prefill after preemption
        grows past the budget with its outputs), and for good when it is longer than the
        budget itself.
        """
        if self.batch_policy is not None:
            return self._schedule_by_policy(self.batch_policy)
        plan = StepPlan()
        if self._ready_alone(plan) or self._prefill_only(plan):
            return plan
        head = self.head()
        if not self.ready and head is not None \
                and self.admit_tokens(head) > self.max_batched_tokens - len(self.running):
            self._plan_prefills(plan, budget=self.admit_tokens(head), order=[head])  # the head alone, if it fits
            if plan.prefills or plan.decodes:
                return plan
        self._plan_decodes(plan)
        ready = self._take_ready(plan)
        if not plan.preempted:
            self._plan_prefills(plan, budget=self.max_batched_tokens - len(plan.decodes) - ready)
            if self.fair is not None:
                self._yield_to_waiting(plan)
        return plan

    def _schedule_by_policy(self, policy: BatchPolicy) -> StepPlan:
        """Plan with the injected policy: its preemptions, the decodes, then admissions in its
        order, skipping any that does not fit (the token budget, blocks, batch slots)."""
        plan = StepPlan()
        if self._ready_alone(plan):
            return plan
        free_slots = self.max_batch_size - len(self.running) if self.max_batch_size else None
        free = self.blocks.num_free - self.blocks.watermark_blocks
        queue = self.admissible()
        decision = policy.plan(self.running, queue, free_blocks=max(0, free), block_size=self.block_size,
                               free_slots=free_slots)
        by_id = {s.request_id: s for s in self.running}
        for rid in decision.preempt:
            seq = by_id[rid]
            self.switch_out(seq, plan)
            plan.preempted.append(seq)
        chosen = len(plan.preempted)
        skip = {r for r in decision.skip if r in by_id} - {s.request_id for s in plan.preempted}
        waiting = {s.request_id: s for s in queue}
        order = [waiting[r] for r in decision.admit_order if r in waiting]
        if not self.ready and order \
                and self.admit_tokens(order[0]) > self.max_batched_tokens - (len(self.running) - len(skip)):
            self._plan_prefills(plan, budget=self.admit_tokens(order[0]), order=order[:1])  # alone, as in ``schedule``
            if plan.prefills or plan.decodes:
                return plan
        self._plan_decodes(plan, skip)
        ready = self._take_ready(plan)
        if len(plan.preempted) == chosen:  # no shortage while decoding: admit
            self._plan_prefills(plan, budget=self.max_batched_tokens - len(plan.decodes) - ready, order=order)
        if skip and plan.empty:  # sitting out was for a request that is not in the step after all
            self._plan_decodes(plan)
        return plan

    def _ready_alone(self, plan: StepPlan) -> bool:
        """Restored turns whose prefixes landed come first. Too many tokens to share a step
        with the running batch: they take this step alone (the decodes wait one step, as
        for an over-budget head of the queue)."""
        if self.ready and self._ready_tokens() > self.max_batched_tokens - len(self.running):
            self._take_ready(plan)
            return True
        return False

    def _prefill_only(self, plan: StepPlan) -> bool:
        """Prompts first (``prefill_first`` > 0: the engine's own ``EngineConfig.prefill_first_steps``,
        or a ``prefill`` instance's, set by its llumlet): while requests wait to be admitted, up to
        ``prefill_first`` steps in a row admit them alone and the running batch sits out (on a
        prefill instance it is requests waiting for their hand-off, whose later tokens the decode
        instance computes, so its steps only delay the prompts queued behind them). The step
        after runs as usual, so a running request waits at most that many steps; so does a step
        where nothing can be admitted. FCFS and fair-share scheduling only: an injected batch
        policy decides for itself."""
        if not self.prefill_first or not self.running or self.ready or self._prefill_run >= self.prefill_first:
            self._prefill_run = 0
            return False
        self._plan_prefills(plan, budget=self.max_batched_tokens)
        if not plan.prefills:  # nothing to admit, or nothing fits: the batch runs as usual
            self._prefill_run = 0
            return bool(plan.decodes)  # a swap-in admitted above decodes in this step
        self._prefill_run += 1
        return True

    def _ready_tokens(self) -> int:
        return sum(s.num_tokens - s.num_computed for s in self.ready)

    def _take_ready(self, plan: StepPlan) -> int:
        """Move the restored turns into the batch as this plan's first prefills (after the
        decodes were planned: they already hold their blocks, so no decode preempts them
        in the step they start); the tokens they feed."""
        tokens = self._ready_tokens()
        for seq in self.ready:
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            plan.prefills.append(seq)
        self.ready = []
        return tokens

    def _yield_to_waiting(self, plan: StepPlan) -> None:
        """Fairness: when the least-served waiting request was not admitted, a running request
        of a client far over its share may yield to it (at most one per step; it is admitted
        when the switch has freed room)."""
        assert self.fair is not None
        order = self.fair.order(self.admissible())
        admitted = set(plan.prefills) | set(plan.decodes)
        if not order or order[0] in admitted:
            return
        victim = self.fair.switch_victim(order[0], [s for s in self.running if s not in plan.prefills])
        if victim is None:
            return
        if victim in plan.decodes:
            plan.decodes.remove(victim)
        self.switch_out(victim, plan)
        plan.preempted.append(victim)

    def _plan_decodes(self, plan: StepPlan, skip: AbstractSet[str] = frozenset()) -> None:
        """Every running request decodes (a block appended where its next token needs one), but
        those in ``skip``, which sit out; a shortage preempts the victim policy's choice."""
        # Iterate over a snapshot: preemption removes victims from ``running``.
        for seq in list(self.running):
            if seq.status != SeqStatus.RUNNING or seq.request_id in skip:
                continue  # preempted earlier in this loop, or sitting out
            need = cdiv(seq.num_computed + 1, self.block_size) - len(seq.block_table)
            while need > 0:
                got = self.blocks.allocate(("seq", seq.request_id), need, respect_watermark=False,
                                           after=seq.block_table[-1] if seq.block_table else None)
                if got is not None:
                    seq.block_table.extend(got)
                    need = 0
                    break
                victim = self.fair.victim(self.running) if self.fair is not None \
                    else self.victim_policy([s for s in self.running])
                self.switch_out(victim, plan)
                plan.preempted.append(victim)
                if victim in plan.decodes:
                    plan.decodes.remove(victim)
                if victim is seq:
                    break
            if seq.status == SeqStatus.RUNNING:
                plan.decodes.append(seq)

    def _plan_prefills(self, plan: StepPlan, budget: int, order: Optional[list[Sequence]] = None) -> None:
        """Admit from the head of the queue (FCFS, or the fair-share order: stop at the first that
        does not fit), or in ``order`` (a policy's: skip what does not fit)."""
        admitted: list[tuple[Sequence, bool]] = []
        skip = order is not None
        if order is None:
            queue = self.admissible()
            order = self.fair.order(queue) if self.fair is not None else queue
        held = len(self.running) + len(self.landing) + len(self.ready)  # batch slots taken or promised
        for seq in order:
            if self.max_batch_size and held + len(admitted) >= self.max_batch_size:
                break
            n = self.admit_tokens(seq)
            if n > budget:
                if skip:
                    continue
                break
            got = self.blocks.allocate(("seq", seq.request_id), self.admit_blocks(seq))
            if got is None:
                if skip:
                    continue
                break
            seq.block_table = got
            decodes = bool(seq.host_table)
            if seq.host_table:  # swap in: the KV returns, the request decodes on
                plan.swap_in.append((seq.request_id, seq.host_table, got[:len(seq.host_table)]))
                if not self.async_swap_in:  # the copy runs before the step
                    assert self.host is not None
                    self.host.free(("swap", seq.request_id), seq.host_table)
                    seq.host_table = []
            else:
                seq.num_computed = self._restore(seq, got, plan)
            admitted.append((seq, decodes))
            if not self._lands_first(seq):  # a request that lands first computes in a later plan,
                budget -= n  # which counts its tokens
        for seq, decodes in admitted:
            self.waiting.remove(seq)
            if self._lands_first(seq):  # runnable once ``land``ed
                self.landing.append(seq)
                continue
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            (plan.decodes if decodes else plan.prefills).append(seq)

    def _lands_first(self, seq: Sequence) -> bool:
        """An admitted request whose KV comes by an asynchronous copy (a swap-in, a restored
        conversation prefix): it waits in ``landing`` until the copy has landed."""
        return self.async_swap_in and seq.num_computed > 0

    def _restore(self, seq: Sequence, got: list[int], plan: StepPlan) -> int:
        """Restore the shared prefix of the request's conversation into its first blocks;
        the tokens it covers (0 when nothing is reused). The stored turn is consumed."""
        k = self.reusable_blocks(seq)
        cid = seq.conversation_id
        if self.conversations is not None and cid and cid in self.conversations:
            turn = self.conversations.take(cid)
            if k:
                plan.restore.append((seq.request_id, list(turn.host_blocks[:k]), got[:k]))
                self.conversations.restored_tokens += k * self.block_size
            # Synchronous: the copy is done before anything reuses the host blocks. Asynchronous: it
            # is queued before any later copy that could write them (one FIFO link).
            self.conversations.release(cid, turn)
        return k * self.block_size

    def land(self, seq: Sequence) -> None:
        """A swap-in's copy has landed: free its host blocks; it runs from the next plan. A
        restored prefix has landed: the turn prefills the rest first in the next plan."""
        self.landing.remove(seq)
        if not seq.host_table:
            self.ready.append(seq)
            return
        assert self.host is not None
        self.host.free(("swap", seq.request_id), seq.host_table)
        seq.host_table = []
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def head(self) -> Optional[Sequence]:
        """The waiting request admitted first (without a batch policy): the oldest, or the
        fair-share order's first; None when nothing waits but ``held`` requests."""
        queue = self.admissible()
        if not queue:
            return None
        return self.fair.order(queue)[0] if self.fair is not None else queue[0]

    def head_blocked(self) -> bool:
        """True when the head of the queue waits for blocks (fragmentation signal)."""
        head = self.head()
        return head is not None and not self.blocks.can_allocate(self.admit_blocks(head))
