"""``EngineCore``: the engine adapter shared by the built-in and the simulated engine.

Plan, execute, apply: the ``BatchScheduler`` plans a step, an ``Executor`` runs
it (the Llama model, or a cost model), and the core applies the sampled tokens.
The core also implements the migration primitives over its block manager.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence as Seq

from llumnix_py.engines.base import EngineAdapter
from llumnix_py.engines.batch_scheduler import BatchPolicy, BatchScheduler, VictimPolicy, check_prefill_first_steps, \
    get_preemption_policy
from llumnix_py.engines.block_manager import BlockManager
from llumnix_py.engines.conversations import ConversationStore
from llumnix_py.engines.copier import Copier
from llumnix_py.engines.fair_share import FairShare
from llumnix_py.engines.executor import Executor, SeqWork
from llumnix_py.engines.jit_batch import EdfBatchPolicy, JitBatchPolicy, MeasuredStepTime
from llumnix_py.engines.sequence import Sequence, cdiv
from llumnix_py.engines.swap import Swapper
from llumnix_py.engines.types import (
    MAX_FAIR_LEAD,
    FinishReason,
    MigrationRequestState,
    Request,
    RequestOutput,
    SamplingParams,
    SeqStatus,
    StepOutput,
    TokenLogprob,
    job_kv_key,
)
from llumnix_py.errors import InvalidRequestError, MigrationError, UnknownRequestError
from llumnix_py.load import InstanceLoad
from policies.jit import JitParams
from policies.length import LengthPrior
from policies.registry import PREEMPTION_MODE


@dataclass(frozen=True)
class EngineConfig:
    """Limits of one engine instance.

    Attributes:
        num_blocks: KV blocks in the pool.
        block_size: tokens per block.
        watermark: fraction of blocks admissions leave free (decodes may use them).
        max_batch_size: running requests at most.
        max_batched_tokens: tokens per step at most (a longer prompt at the head of the queue
            runs alone, the running requests waiting one step).
        eos_token_id: end-of-sequence token (ignored with ``ignore_eos``); None for none.
        preemption_policy: name of the victim policy (``newest``, ``largest``).
        batch_policy: ``fcfs`` (priorities, then arrival: the default), ``edf`` (earliest due
            time) or ``jit`` (by margin, ``policies.jit``); the last two on the wall clock that
            stamps requests' arrival, with step times measured from this engine's own steps.
        length_estimator / length_quantile: the ``jit`` policy's length bound (``quantile`` or
            ``oracle``, which takes ``max_tokens`` as the true length) and its quantile.
        jit_skip_slack: the ``jit`` policy lets running requests with much slack sit out a step
            for an urgent request that would miss otherwise (``policies.jit.JitParams.skip_slack``).
        num_host_blocks: blocks of the host swap pool (0: preemption always recomputes).
        preemption_mode: name of the policy that picks, per preemption, recompute or swap
            (``policies.switching``: ``cost``, ``recompute``, ``swap``).
        group_copies: swap copies move contiguous runs of blocks in one copy (False: one
            copy per block, as vLLM's swap).
        block_groups: the block managers hand out contiguous runs of blocks when they are
            free (False: single blocks off the free stack, as vLLM's).
        conversation_host_blocks: host blocks that finished turns of conversations may hold
            for the next turn to reuse (LRU; 0: none kept).
        fairness: admissions and preemptions follow per-client virtual token counters
            (``policies.fairness``; clients are ``Request.client_id``).
        fairness_margin: weighted tokens of extra service after which a running client's
            request yields to a waiting client's.
        fairness_max_idle_clients: idle clients the fairness books keep at most (besides
            those forgotten exactly at the floor; ``engines.fair_share``).
        async_swap: swap copies run on the executor's copier (a copy thread, or the
            simulator's virtual clock) beside the steps; a swapped-in request runs once its
            copy has landed (False: every copy completes before the step).
        prefill_first_steps: prompts first: while prompts wait, up to this many steps in a row
            prefill them alone and the running batch sits out (FCFS and fair-share scheduling;
            ``BatchScheduler._prefill_only``). 1000 is vLLM <= 0.3's scheduling, which ran a
            prompt-only step whenever a waiting prompt could be admitted (DistServe's simulator
            models its vLLM baseline so); 0 (default): every step also decodes. A llumlet sets
            its own count while its instance is a ``prefill`` instance (``set_prefill_first``).
    """

    num_blocks: int = 512
    block_size: int = 16
    watermark: float = 0.01
    max_batch_size: int = 64
    max_batched_tokens: int = 4096
    eos_token_id: Optional[int] = None
    preemption_policy: str = "newest"
    batch_policy: str = "fcfs"
    length_estimator: str = "quantile"
    length_quantile: float = 0.9
    jit_skip_slack: bool = False
    num_host_blocks: int = 0
    preemption_mode: str = "cost"
    group_copies: bool = True
    block_groups: bool = True
    async_swap: bool = False
    conversation_host_blocks: int = 0
    fairness: bool = False
    fairness_margin: float = 64.0
    fairness_max_idle_clients: int = 4096
    prefill_first_steps: int = 0

    def __post_init__(self) -> None:
        check_prefill_first_steps(self.prefill_first_steps)
        if self.batch_policy not in ("fcfs", "edf", "jit"):
            raise ValueError(f"unknown batch policy {self.batch_policy!r}; known: ['edf', 'fcfs', 'jit']")
        if self.length_estimator not in ("quantile", "oracle"):
            raise ValueError(f"unknown length estimator {self.length_estimator!r}; known: ['oracle', 'quantile']")
        if not 0 < self.length_quantile <= 1:
            raise ValueError("length_quantile must be in (0, 1]")
        if self.num_blocks <= 1:
            raise ValueError("num_blocks must be > 1")
        if self.block_size <= 0:
            raise ValueError("block_size must be positive")
        if not 0.0 <= self.watermark < 0.5:
            raise ValueError("watermark must be in [0, 0.5)")
        if self.max_batch_size <= 0 or self.max_batched_tokens <= 0:
            raise ValueError("max_batch_size and max_batched_tokens must be positive")
        get_preemption_policy(self.preemption_policy)
        if isinstance(self.num_host_blocks, bool) or not isinstance(self.num_host_blocks, int) \
                or self.num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be an integer >= 0, got {self.num_host_blocks!r}")
        PREEMPTION_MODE.check_name(self.preemption_mode)
        if isinstance(self.conversation_host_blocks, bool) or not isinstance(self.conversation_host_blocks, int) \
                or self.conversation_host_blocks < 0:
            raise ValueError(f"conversation_host_blocks must be an integer >= 0, got {self.conversation_host_blocks!r}")
        if not self.fairness_margin >= 0:
            raise ValueError(f"fairness_margin must be >= 0, got {self.fairness_margin!r}")
        if self.fairness_max_idle_clients < 0:
            raise ValueError(f"fairness_max_idle_clients must be >= 0, got {self.fairness_max_idle_clients!r}")

    @property
    def watermark_blocks(self) -> int:
        return int(self.num_blocks * self.watermark)


class EngineCore(EngineAdapter):
    """An engine instance: block manager + batching scheduler + executor."""

    def __init__(self, config: EngineConfig, executor: Executor, victim_policy: Optional[VictimPolicy] = None,
                 batch_policy: Optional[BatchPolicy] = None, copier: Optional[Copier] = None) -> None:
        self.config = config
        self.executor = executor
        self.blocks = BlockManager(config.num_blocks, config.watermark_blocks, groups=config.block_groups)
        # The host swap pool, as big as the executor's host tensor (none without one).
        self.host = BlockManager(executor.num_host_blocks, groups=config.block_groups) \
            if executor.num_host_blocks else None
        if config.async_swap and copier is None:
            copier = executor.make_copier()
        self.swapper = Swapper(executor, grouped=config.group_copies, copier=copier if config.async_swap else None)
        self.conversations = ConversationStore(self.host, config.block_size, config.conversation_host_blocks)
        self._store_s = 0.0  # synchronous stores' seconds not yet charged to a step (_stall)
        self.fair = FairShare(margin=config.fairness_margin, max_idle_clients=config.fairness_max_idle_clients) \
            if config.fairness else None
        self.measured_step_time: Optional[MeasuredStepTime] = None
        if batch_policy is None and config.batch_policy != "fcfs":
            self.measured_step_time = MeasuredStepTime()
            cls = JitBatchPolicy if config.batch_policy == "jit" else EdfBatchPolicy
            batch_policy = cls(time.time, self.measured_step_time, LengthPrior(), config.length_estimator,
                               config.length_quantile, JitParams(skip_slack=config.jit_skip_slack))
        self.scheduler = BatchScheduler(
            self.blocks,
            config.block_size,
            config.max_batch_size,
            config.max_batched_tokens,
            victim_policy or get_preemption_policy(config.preemption_policy),
            batch_policy,
            host=self.host,
            switch_policy=PREEMPTION_MODE.get(config.preemption_mode),
            switch_costs=self.swapper.meter.costs(),
            group_copies=config.group_copies,
            async_swap_in=config.async_swap,
            conversations=self.conversations,
            fair=self.fair,
        )
        self.scheduler.prefill_first = config.prefill_first_steps
        self.seqs: dict[str, Sequence] = {}  # every unfinished request, frozen ones included
        self._prealloc: dict[str, list[int]] = {}  # incoming migrations: request id -> reserved blocks
        self._mig_epoch: dict[str, int] = {}  # outgoing migrations: request id -> preemptions at start
        self._lifts: dict[str, float] = {}  # migrated in, not run yet: request id -> its client's counter rise
        self._migrated_in: set[str] = set()  # committed here (parked), not activated yet
        # Outgoing waiting turns carrying their conversation's stored prefix: request id ->
        # (conversation id, blocks); the stored turn is lent to the migration meanwhile.
        self._carrying: dict[str, tuple[str, int]] = {}
        self._carried: set[str] = set()  # of those, the ones whose prefix was read into a frame (it went)

    @property
    def length_prior(self) -> Optional[LengthPrior]:
        """The output-length prior of this engine's batch policy (the llumlet core feeds it), if any."""
        return getattr(self.scheduler.batch_policy, "prior", None)

    # ----- serving -----------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def kv_block_bytes(self) -> int:
        return self.executor.kv_block_bytes

    def add_request(self, request: Request) -> None:
        rid = request.request_id
        if rid in self.seqs or rid in self._prealloc:
            raise InvalidRequestError(f"request {rid} already exists on this instance")
        self._validate_tokens(request.prompt_token_ids, len(request.prompt_token_ids), rid)
        self._validate_sampling(request.sampling, rid)
        seq = Sequence.from_request(request)
        if self.fair is not None:
            self.fair.on_arrival(seq.client_id, {s.client_id for s in self.seqs.values()})
        self.scheduler.enqueue(seq)
        self.seqs[rid] = seq

    def check_request(self, request: Request) -> None:
        self._validate_tokens(request.prompt_token_ids, len(request.prompt_token_ids), request.request_id)
        self._validate_sampling(request.sampling, request.request_id)

    def _validate_sampling(self, sp: SamplingParams, rid: str) -> None:
        """Token ids the sampling parameters name are in the vocabulary; logprobs only where computed."""
        vocab = self.executor.vocab_size
        bad = [t for t in sp.token_ids_used() if t >= vocab]
        if bad:
            raise InvalidRequestError(f"request {rid}: stop_token_ids/logit_bias name token ids {bad[:5]} "
                                      f"outside the vocabulary (size {vocab})")
        if not self.executor.supports_logprobs and (sp.logprobs is not None or sp.prompt_logprobs is not None):
            raise InvalidRequestError(f"request {rid}: this engine does not compute log probabilities")

    def _validate_tokens(self, token_ids: Seq[int], prompt_len: int, rid: str, ints_checked: bool = False) -> None:
        """Type, range, context and pool checks. ``ints_checked``: the ids are known to be plain
        ints (a validated migration state), so the per-token type check is skipped; the range
        is checked with a C-speed min/max either way."""
        vocab = self.executor.vocab_size
        bad = [] if ints_checked else [t for t in token_ids if isinstance(t, bool) or not isinstance(t, int)]
        if not bad and token_ids and not (min(token_ids) >= 0 and max(token_ids) < vocab):
            bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"request {rid}: token ids {bad[:5]} outside the vocabulary (size {vocab})")
        max_len = self.executor.max_model_len
        if prompt_len >= max_len:
            raise InvalidRequestError(
                f"request {rid}: prompt of {prompt_len} tokens leaves no room for output "
                f"(model context is {max_len} tokens)")
        usable = self.config.num_blocks - self.config.watermark_blocks
        if cdiv(len(token_ids), self.block_size) > usable:
            raise InvalidRequestError(
                f"request {rid}: {len(token_ids)} tokens need more KV blocks than this instance has ({usable})")

    def abort_request(self, request_id: str) -> None:
        seq = self.seqs.get(request_id)
        if seq is None:
            raise UnknownRequestError(f"request {request_id} is not on this instance")
        self._drop(seq, FinishReason.ABORT)

    def _drop(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.request_id in self.swapper.landing:  # its copy writes its blocks: let it land first,
            self.swapper.wait_landing(seq.request_id)  # and every copy queued before it (FIFO) with it
            self._land()
        if seq.status in (SeqStatus.WAITING, SeqStatus.RUNNING):
            self.scheduler.remove(seq)
        if reason != FinishReason.ABORT and seq.status == SeqStatus.RUNNING and seq.conversation_id \
                and not _last_call_of_its_job(seq):
            self._keep_turn(seq)
        self.scheduler.free_blocks_of(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self.seqs.pop(seq.request_id, None)
        self._mig_epoch.pop(seq.request_id, None)
        self._lifts.pop(seq.request_id, None)
        if seq.request_id in self._migrated_in:  # a parked copy: its carried blocks, if any
            self.free_pre_alloc(seq.request_id)
            self._migrated_in.discard(seq.request_id)
        self._give_back(seq.request_id)

    def has_unfinished(self) -> bool:
        sch = self.scheduler
        return bool(sch.waiting or sch.running or sch.landing or sch.ready)

    def runnable(self) -> bool:
        sch = self.scheduler
        return bool(sch.running or sch.landing or sch.ready or sch.admissible())

    def hold_waiting(self, request_ids: frozenset[str]) -> bool:
        self.scheduler.held = frozenset(request_ids)
        return True

    def set_prefill_first(self, steps: Optional[int]) -> bool:
        if steps is not None:
            check_prefill_first_steps(steps)
        self.scheduler.prefill_first = self.config.prefill_first_steps if steps is None else steps
        return True

    def close(self) -> None:
        """Let copies in flight land and stop the copy thread, if any."""
        self.swapper.close()

    def idle(self, seconds: float) -> None:
        """The engine ran no step for ``seconds``: copies in flight went on (a virtual
        copier's clock moves; a real copy thread needs no telling)."""
        if self.swapper.copier is not None and seconds > 0:
            self.swapper.copier.advance(seconds)

    def step(self) -> StepOutput:
        """Plan, copy, execute, apply. Asynchronous swaps: land finished swap-ins and restores
        first (they join this plan), queue this plan's copies, wait only for swap-outs whose
        device blocks the step touches, and for all of this plan's swap-outs before returning;
        the stores of turns that finish in this step are queued then and overlap the next."""
        swapper, asynchronous = self.swapper, self.swapper.copier is not None
        waited = 0.0
        if self.fair is not None:  # clients that left since the last step go idle; the book forgets what it may
            self.fair.settle({s.client_id for s in self.seqs.values()})
        if asynchronous:
            self._land()
        self.scheduler.switch_costs = swapper.meter.costs()
        plan = self.scheduler.schedule()
        if asynchronous:
            swapper.submit(plan)
        # Synchronous: the KV has landed before the step reads it.
        copy_s = 0.0 if asynchronous else swapper.run(plan)
        outgrown = self._finish_outgrown()
        if plan.empty:
            if asynchronous:
                waited += swapper.wait_all_outs()
                if self.scheduler.landing and not self.scheduler.running:
                    waited += swapper.wait_landing()  # nothing else to run: wait for the oldest
                    self._land()
            return StepOutput(outputs=tuple(outgrown), duration_s=self._stall(copy_s + waited),
                              preempted=tuple(s.request_id for s in plan.preempted))
        work = [self._decode_work(s) for s in plan.decodes] + [self._prefill_work(s) for s in plan.prefills]
        if asynchronous:
            waited += swapper.wait_outs({b for w in work for b in w.block_table})
        done = self.executor.execute_full(work)
        if self.measured_step_time is not None:
            self.measured_step_time.observe(sum(len(w.token_ids) for w in work if w.is_prefill), len(plan.decodes),
                                            done.duration_s)
        if asynchronous:
            swapper.copier.advance(done.duration_s)
            waited += swapper.wait_all_outs()
        if plan.prefills and not plan.decodes:
            swapper.meter.observe_prefill(sum(len(w.token_ids) for w in work), done.duration_s)
        if self.fair is not None:
            self._charge(plan, work, done.tokens)
        if self._lifts:  # a migrated-in request that ran is here for good: its lift stays
            for s in plan.decodes + plan.prefills:
                self._lifts.pop(s.request_id, None)
        outputs = [self._apply(seq, tok, lp, plp) for seq, tok, lp, plp in zip(
            plan.decodes + plan.prefills, done.tokens, done.logprobs, done.prompt_logprobs)] + outgrown
        return StepOutput(
            outputs=tuple(outputs),
            duration_s=done.duration_s + self._stall(copy_s + waited),
            num_prefill_tokens=sum(len(w.token_ids) for w in work if w.is_prefill),
            num_decode_tokens=len(plan.decodes),
            preempted=tuple(s.request_id for s in plan.preempted),
        )

    def _charge(self, plan, work: list[SeqWork], tokens: list[Optional[int]]) -> None:
        """Charge each client the prompt tokens computed and the tokens generated this step."""
        prompt: dict[str, int] = {}
        output: dict[str, int] = {}
        for seq, w, tok in zip(plan.decodes + plan.prefills, work, tokens):
            if w.is_prefill:
                prompt[seq.client_id] = prompt.get(seq.client_id, 0) + len(w.token_ids)
            if tok is not None:
                output[seq.client_id] = output.get(seq.client_id, 0) + 1
        assert self.fair is not None
        self.fair.on_step(prompt, output)

    def _stall(self, copy_s: float) -> float:
        """This step's wait on KV copies: ``copy_s`` (its synchronous copies and its waits for
        asynchronous ones) plus the synchronous stores since the last step (its finished turns,
        a migrated-in waiting turn's prefix kept between steps), which it pays for; counted
        into the switch meter."""
        stall_s, self._store_s = copy_s + self._store_s, 0.0
        self.swapper.meter.stall_s += stall_s
        return stall_s

    def _keep_turn(self, seq: Sequence) -> None:
        """Copy a finished turn's full blocks to the host pool for its conversation's next turn."""
        k = seq.num_computed // self.block_size
        host = self.conversations.put(seq.conversation_id, seq.all_token_ids(), k) if k else None
        if host is not None:
            self._store_s += self.swapper.store(seq.block_table[:k], host)

    def _land(self) -> None:
        for rid in self.swapper.landed():
            self.scheduler.land(self.seqs[rid])

    def _finish_outgrown(self) -> list[RequestOutput]:
        """End waiting requests that grew (by preemption) beyond what this instance can ever hold."""
        usable = self.config.num_blocks - self.config.watermark_blocks
        out = []
        while self.scheduler.waiting and cdiv(self.scheduler.waiting[0].num_tokens, self.block_size) > usable:
            seq = self.scheduler.waiting[0]
            self._drop(seq, FinishReason.LENGTH)
            out.append(RequestOutput(seq.request_id, (), len(seq.output_token_ids), FinishReason.LENGTH))
        return out

    def _decode_work(self, seq: Sequence) -> SeqWork:
        last = seq.output_token_ids[-1] if seq.output_token_ids else seq.prompt_token_ids[-1]
        return SeqWork(seq.request_id, (last,), seq.num_computed, tuple(seq.block_table), seq.sampling,
                       len(seq.output_token_ids), is_prefill=False, **self._sampling_context(seq))

    def _prefill_work(self, seq: Sequence) -> SeqWork:
        """All tokens past ``num_computed`` (0, or a restored conversation prefix)."""
        return SeqWork(seq.request_id, seq.all_token_ids()[seq.num_computed:], seq.num_computed,
                       tuple(seq.block_table), seq.sampling,
                       len(seq.output_token_ids), is_prefill=True, **self._sampling_context(seq))

    def _sampling_context(self, seq: Sequence) -> dict:
        """What the sampler needs beyond the logits: the tokens so far (only when a penalty reads
        them) and the tokens ``min_tokens`` bans. Both follow from the sequence, so they are the
        same after a preemption or a migration."""
        sp = seq.sampling
        banned: tuple[int, ...] = ()
        if len(seq.output_token_ids) < sp.min_tokens:
            eos = self.config.eos_token_id
            banned = sp.stop_token_ids + ((eos,) if eos is not None and not sp.ignore_eos else ())
        return {"history": seq.all_token_ids() if sp.penalized else (),
                "prompt_len": len(seq.prompt_token_ids), "banned_token_ids": banned}

    def _apply(self, seq: Sequence, token: Optional[int], logprob: Optional[TokenLogprob] = None,
               prompt_lps: Optional[tuple[Optional[TokenLogprob], ...]] = None) -> RequestOutput:
        assert token is not None
        seq.num_computed = seq.num_tokens
        seq.output_token_ids.append(token)
        index = len(seq.output_token_ids) - 1
        reason = self._finish_reason(seq, token)
        if reason is not None:
            self._drop(seq, reason)
        return RequestOutput(seq.request_id, (token,), index, reason,
                             logprobs=None if logprob is None else (logprob,), prompt_logprobs=prompt_lps)

    def _finish_reason(self, seq: Sequence, token: int) -> Optional[FinishReason]:
        sp = seq.sampling
        stops = token in sp.stop_token_ids or (token == self.config.eos_token_id and not sp.ignore_eos)
        if stops and len(seq.output_token_ids) >= sp.min_tokens:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= sp.max_tokens or seq.num_tokens >= self.executor.max_model_len:
            return FinishReason.LENGTH
        return None

    def load(self) -> InstanceLoad:
        bs = self.block_size
        running = [s.to_load(bs, migrating=s.request_id in self._mig_epoch) for s in self.scheduler.running]
        running += [s.to_load(bs, migrating=True) for s in self.seqs.values() if s.status == SeqStatus.FROZEN]
        running += [s.to_load(bs, migrating=True) for s in self.scheduler.landing + self.scheduler.ready]  # pinned
        # until they run
        load = InstanceLoad(
            total_blocks=self.config.num_blocks,
            used_blocks=self.blocks.num_used,
            watermark_blocks=self.config.watermark_blocks,
            block_size=bs,
            running=tuple(running),
            waiting=tuple(s.to_load(bs, migrating=s.request_id in self._mig_epoch) for s in self.scheduler.waiting),
            reserved_blocks=sum(len(v) for v in self._prealloc.values()),
            max_batch_size=self.config.max_batch_size,
            conversations=tuple((cid, len(t.tokens)) for cid, t in self.conversations.entries().items()),
            client_service=tuple(sorted(self.fair.counters.items())) if self.fair is not None else (),
            client_served=tuple(sorted(self.fair.served.items())) if self.fair is not None else (),
            kv_copy_stall_s=self.swapper.meter.stall_s,
        )
        annotate = getattr(self.scheduler.batch_policy, "annotate", None)  # SLO-aware policies add margins
        return load if annotate is None else annotate(load, self.scheduler.running, self.scheduler.waiting)

    def set_fair_offsets(self, offsets: Mapping[str, float]) -> None:
        """Order clients by cluster-wide service (``FairShare.set_offsets``); ``ValueError`` on
        anything but client ids mapped to finite numbers."""
        if not isinstance(offsets, Mapping) or not all(
                isinstance(c, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for c, v in offsets.items()):
            raise ValueError("fair offsets must map client ids to finite numbers")
        if self.fair is not None:
            self.fair.set_offsets({c: float(v) for c, v in offsets.items()})

    def group_sizes(self) -> dict[int, int]:
        """Group size (blocks in a contiguous run of a block table) -> how many such groups
        the running requests hold: how well block groups hold up under load."""
        sizes: dict[int, int] = {}
        for s in self.scheduler.running:
            for n in self.blocks.runs_of(s.block_table):
                sizes[n] = sizes.get(n, 0) + 1
        return sizes

    def request_ids(self) -> list[str]:
        return list(self.seqs)

    # ----- migration primitives: source side ---------------------------------------------
    def incremental_blocks(self, request_id: str, num_sent: int, include_last: bool) -> Optional[list[int]]:
        seq = self.seqs.get(request_id)
        if seq is None or seq.status not in (SeqStatus.RUNNING, SeqStatus.FROZEN):
            return None
        carried = self._carrying.get(request_id)
        if carried is not None and seq.status == SeqStatus.FROZEN:  # its conversation's prefix, in the host pool
            turn = self.conversations.lent(carried[0])
            return [self.config.num_blocks + h for h in turn.host_blocks[num_sent:carried[1]]]
        if seq.status == SeqStatus.RUNNING:  # a frozen request's blocks cannot change
            if num_sent == 0:
                self._mig_epoch[request_id] = seq.num_preemptions
            elif self._mig_epoch.get(request_id) != seq.num_preemptions:
                return None  # preempted (blocks recycled) since the migration began
        end = len(seq.block_table) if include_last else seq.num_computed // self.block_size
        return list(seq.block_table[num_sent:end])

    def freeze(self, request_id: str) -> Optional[MigrationRequestState]:
        seq = self.seqs.get(request_id)
        if seq is None or seq.status not in (SeqStatus.RUNNING, SeqStatus.WAITING) \
                or request_id in self.swapper.landing or seq in self.scheduler.ready:
            return None  # its swap-in or restore is still writing its blocks, or it holds them to prefill
        epoch = self._mig_epoch.get(request_id)
        if seq.status == SeqStatus.RUNNING and epoch is not None and epoch != seq.num_preemptions:
            return None
        if seq.status == SeqStatus.WAITING:
            self._mig_epoch.pop(request_id, None)
        prev = seq.status
        self.scheduler.remove(seq)
        seq.frozen_from = prev
        seq.status = SeqStatus.FROZEN
        state = seq.to_migration_state(prev)
        if prev == SeqStatus.WAITING and request_id not in self._migrated_in:
            k = self.scheduler.reusable_blocks(seq)
            if k:  # its conversation's stored prefix travels with it (``num_computed_tokens``)
                self.conversations.lend(seq.conversation_id)
                self._carrying[request_id] = (seq.conversation_id, k)
                state = dataclasses.replace(state, num_computed_tokens=k * self.block_size)
        if self.fair is not None:  # the client's standing here travels with the request
            lead = self.fair.lead_of(seq.client_id, {s.client_id for s in self.seqs.values()})
            state = dataclasses.replace(state, fair_lead=lead)
        return state

    def unfreeze(self, request_id: str) -> None:
        """Undo ``freeze``; on a request that is not frozen, end its outgoing migration's
        pre-copy (it is no longer reported as migrating). ``MigrationError`` if neither applies.
        A waiting turn's conversation prefix: lent to a migration that rolled back, back in
        the store where it was; carried in by a migration now activated (blocks reserved
        for it), kept for the turn in this instance's conversation store."""
        seq = self.seqs.get(request_id)
        if seq is not None and seq.status != SeqStatus.FROZEN and request_id in self._mig_epoch:
            del self._mig_epoch[request_id]  # an aborted pre-copy
            return
        seq = self._frozen(request_id)
        self._mig_epoch.pop(request_id, None)
        self._lifts.pop(request_id, None)  # activated (a parked copy) or kept (a rollback): the lift stays
        if seq.frozen_from == SeqStatus.RUNNING:
            seq.status = SeqStatus.RUNNING
            self.scheduler.running.append(seq)
        else:
            if request_id in self._migrated_in and self._prealloc.get(request_id):
                self._keep_carried(seq, self._prealloc[request_id])
                self.free_pre_alloc(request_id)
            self._give_back(request_id)
            self.scheduler.enqueue(seq)
        seq.frozen_from = None
        self._migrated_in.discard(request_id)

    def free_src(self, request_id: str) -> None:
        seq = self._frozen(request_id)
        rise = self._lifts.pop(request_id, None)
        if rise is not None and self.fair is not None:  # a parked copy dropped unrun: as if it never came
            self.fair.undo_lift(seq.client_id, rise)
        if request_id in self._carried:  # the destination has the prefix now: no second copy here
            self._carried.discard(request_id)
            self.conversations.hand_over(self._carrying.pop(request_id)[0])
        self._give_back(request_id)  # it moved without its prefix (refused): the stored turn stays here
        if request_id in self._migrated_in:  # a parked copy dropped: the blocks it carried, if any
            self.free_pre_alloc(request_id)
        self.scheduler.free_blocks_of(seq)
        seq.status = SeqStatus.FINISHED
        del self.seqs[request_id]
        self._mig_epoch.pop(request_id, None)
        self._migrated_in.discard(request_id)

    def _give_back(self, request_id: str) -> None:
        """A waiting turn's migration ended here (rolled back, or the turn aborted): the stored
        turn it carried goes back to the store."""
        carried = self._carrying.pop(request_id, None)
        self._carried.discard(request_id)
        if carried is not None:
            self.conversations.give_back(carried[0])

    def _keep_carried(self, seq: Sequence, blocks: list[int]) -> None:
        """A migrated-in waiting turn's conversation prefix (the device blocks it came in):
        into the conversation store, which its admission restores from (checked token by
        token); dropped (recomputed) when the store has no room."""
        host = self.conversations.put(seq.conversation_id, seq.all_token_ids(), len(blocks))
        if host is not None:
            self._store_s += self.swapper.store(list(blocks), host)

    def _frozen(self, request_id: str) -> Sequence:
        seq = self.seqs.get(request_id)
        if seq is None or seq.status != SeqStatus.FROZEN:
            raise MigrationError(f"request {request_id} is not frozen on this instance")
        return seq

    def read_blocks(self, block_ids: Seq[int]) -> object:
        """KV of the blocks ``incremental_blocks`` named, as a migration frame. Addresses::

            0 .. num_blocks-1              device blocks (a running request's)
            num_blocks + h                 host block h (a waiting turn's conversation prefix)
        """
        n = self.config.num_blocks
        ids = list(block_ids)
        if ids and min(ids) >= n:
            host = [i - n for i in ids]
            for rid, (cid, _) in self._carrying.items():  # its prefix goes out: the destination will have it
                if set(host) <= set(self.conversations.lent(cid).host_blocks):
                    self._carried.add(rid)
            self.swapper.settle_outs()  # a finished turn's store may still be writing them
            return self.executor.read_blocks(host, host=True)
        if ids and max(ids) >= n:
            raise MigrationError("a migration frame mixes device and host blocks")
        return self.executor.read_blocks(ids)

    # ----- migration primitives: destination side ----------------------------------------
    def pre_alloc(self, request_id: str, num_blocks: int) -> Optional[list[int]]:
        if request_id in self.seqs:
            raise MigrationError(f"request {request_id} already runs on this instance")
        if request_id not in self._prealloc and len(self.scheduler.running) >= self.config.max_batch_size:
            return None  # no room in the batch for one more request
        got = self.blocks.allocate(("pre", request_id), num_blocks)
        if got is None:
            return None
        self._prealloc.setdefault(request_id, []).extend(got)
        return got

    def free_pre_alloc(self, request_id: str) -> int:
        ids = self._prealloc.pop(request_id, [])
        self.blocks.free(("pre", request_id), ids)
        return len(ids)

    def reserved_blocks(self, request_id: str) -> list[int]:
        return list(self._prealloc.get(request_id, ()))

    def write_blocks(self, block_ids: Seq[int], data: object) -> None:
        ids = list(block_ids)
        self.swapper.wait_outs(set(ids))  # a freed block a store or swap-out is still reading
        self.executor.write_blocks(ids, data)

    def commit_dst(self, state: MigrationRequestState) -> None:
        rid = state.request_id
        if rid in self.seqs:
            raise MigrationError(f"request {rid} already exists on this instance")
        self._validate_tokens(state.prompt_token_ids + state.output_token_ids, len(state.prompt_token_ids), rid,
                              ints_checked=True)
        self._validate_sampling(state.sampling, rid)
        lead = state.fair_lead
        if lead is not None and not 0 <= lead <= MAX_FAIR_LEAD:
            raise MigrationError(f"request {rid}: fair_lead {lead!r} is not in [0, {MAX_FAIR_LEAD:g}]")
        reserved = self._prealloc.get(rid, [])
        seq = Sequence.from_migration(state)
        active = {s.client_id for s in self.seqs.values()}
        if state.status == SeqStatus.RUNNING:
            need = cdiv(state.num_computed_tokens, self.block_size)
            if len(reserved) != need or state.num_computed_tokens != seq.num_tokens - 1:
                raise MigrationError(
                    f"request {rid}: {len(reserved)} reserved blocks for {state.num_computed_tokens} "
                    f"computed tokens of {seq.num_tokens} (need {need} blocks and all but the last token)")
            self.blocks.transfer(reserved, ("pre", rid), ("seq", rid))
            del self._prealloc[rid]
            seq.block_table = list(reserved)
            seq.status = SeqStatus.RUNNING
            self.scheduler.running.append(seq)
        elif state.num_computed_tokens:  # a waiting turn with its conversation's stored prefix
            k = state.num_computed_tokens // self.block_size
            if state.num_computed_tokens % self.block_size or len(reserved) != k or not seq.conversation_id \
                    or state.num_computed_tokens >= seq.num_tokens:
                raise MigrationError(
                    f"request {rid}: a waiting turn carries whole blocks of its conversation's prefix, with "
                    f"a token left to prefill; got {state.num_computed_tokens} tokens in {len(reserved)} blocks")
            seq.num_computed = 0  # its blocks stay reserved while it is parked; activation keeps them
            self.scheduler.enqueue(seq)
        else:
            self.free_pre_alloc(rid)
            self.scheduler.enqueue(seq)
        self.seqs[rid] = seq
        self._migrated_in.add(rid)
        if self.fair is not None:  # VTC's lift for an arrival, with the client's lead from the source
            self._lifts[rid] = self.fair.on_migrated_in(seq.client_id, active, state.fair_lead or 0.0)

    # ----- checks --------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Every block is free or owned by exactly one live request or reservation."""
        self.blocks.check_invariants()
        owners = self.blocks.owners()
        expected = {("seq", s.request_id): len(s.block_table) for s in self.seqs.values() if s.block_table}
        expected.update({("pre", r): len(b) for r, b in self._prealloc.items() if b})
        assert owners == expected, f"block owners {owners} != live requests {expected}"
        for s in self.scheduler.running:
            assert s.status == SeqStatus.RUNNING and self.seqs.get(s.request_id) is s
        for s in self.scheduler.waiting:
            assert s.status == SeqStatus.WAITING and not s.block_table and self.seqs.get(s.request_id) is s
        for s in self.scheduler.landing:  # a swap-in (host blocks held) or a restore (prefix counted)
            assert s.block_table and (s.host_table or s.num_computed) and s.request_id in self.swapper.landing
        for s in self.scheduler.ready:
            assert s.block_table and s.num_computed and not s.host_table and s.request_id not in self.swapper.landing
        for s in self.scheduler.running:
            assert not s.host_table, f"running request {s.request_id} still holds host blocks"
        if self.host is not None:  # the same invariant on the host pool
            self.host.check_invariants()
            swapped = {("swap", s.request_id): len(s.host_table) for s in self.seqs.values() if s.host_table}
            swapped.update(self.conversations.owners())
            assert self.host.owners() == swapped, f"host owners {self.host.owners()} != swapped {swapped}"
            assert self.conversations.num_blocks <= self.conversations.max_blocks
        else:
            assert not any(s.host_table for s in self.seqs.values())


def _last_call_of_its_job(seq: Sequence) -> bool:
    """A job's call known to be its last (``job_calls_left == 1``) keeping its job's KV: nothing
    will reuse it, so the host pool keeps room for other turns."""
    obj = seq.objective
    return obj is not None and obj.job_calls_left == 1 and seq.conversation_id == job_kv_key(obj)
