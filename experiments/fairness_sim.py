"""The simulation behind ``experiments/fairness.py``: its systems, its multi-turn workload,
one instance's run (``simulate``) and a cluster's (``ConversationCluster``), and each
run's summary. ``experiments/fairness.py`` describes the systems and the metrics.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from experiments.workloads import sharegpt_like
from llumnix_py.engines.core import EngineConfig, EngineCore
from llumnix_py.engines.sim.executor import SimExecutor
from llumnix_py.engines.sim.profiles import LLAMA_7B_A10
from llumnix_py.engines.types import Request, SamplingParams, StepOutput
from llumnix_py.load import RequestLoad
from llumnix_py.scheduler.fair_book import ClusterFairBook
from llumnix_py.sim.cluster import SimCluster, SimInstance
from llumnix_py.sim.config import SimConfig
from migration.protocol import MigrationStatus
from policies.config import PolicyConfig
from policies.fairness import max_service_gap

PROFILE = LLAMA_7B_A10
VLLM_SEGMENTS = 2 * PROFILE.model.num_layers


@dataclass(frozen=True)
class System:
    mode: str  # preemption_mode
    groups: bool = True
    asynchronous: bool = True
    reuse: bool = True
    segments: int = 1
    cluster: bool = False  # on a SimCluster of --instances instances
    migration: bool = False  # live migration between them (cluster only)
    migrate_out: str = "most_served"  # which request leaves a migration source (cluster only)
    global_fair: bool = False  # engines order clients by cluster-wide service (cluster only)
    steer: bool = False  # fair dispatch: an under-served client's request goes to the freest instance (cluster only)


SYSTEMS: dict[str, System] = {
    "recompute": System("recompute", groups=False, asynchronous=False, reuse=False),
    "vllm-swap": System("swap", groups=False, asynchronous=False, reuse=False, segments=VLLM_SEGMENTS),
    "swap-per-block": System("swap", groups=False, asynchronous=False, reuse=False),
    "llumnix-py": System("swap"),
    "-groups": System("swap", groups=False),
    "-async": System("swap", asynchronous=False),
    "-reuse": System("swap", reuse=False),
    "+cost": System("cost"),
    "cluster": System("swap", cluster=True),
    "cluster+migration": System("swap", cluster=True, migration=True),
    "cluster+global": System("swap", cluster=True, global_fair=True),
    "cluster+migration+global": System("swap", cluster=True, migration=True, migrate_out="most_served_cluster",
                                       global_fair=True),
    "cluster+global+steer": System("swap", cluster=True, global_fair=True, steer=True),
    "cluster+migration+global+steer": System("swap", cluster=True, migration=True,
                                             migrate_out="most_served_cluster", global_fair=True, steer=True),
}


@dataclass
class Conversation:
    client: str
    turns: list[tuple[int, int]]  # (new message tokens, output tokens) per turn
    start: float
    history: tuple[int, ...] = ()
    turn: int = 0


@dataclass
class Run:
    ttft: list[float] = field(default_factory=list)
    tbt: list[float] = field(default_factory=list)
    gap: float = 0.0
    cluster_gap: float = 0.0  # the gap over one VTC of the whole cluster
    preemptions: int = 0
    copies: int = 0
    blocks_copied: int = 0
    reused_tokens: int = 0
    switches: int = 0
    makespan: float = 0.0
    group_sizes: dict = field(default_factory=dict)  # blocks per contiguous run of the running block tables
    migrations: int = 0  # finished live migrations (cluster only)
    steered: int = 0  # turns fair dispatch sent to the freest instance (cluster only)
    queue_wait: list[float] = field(default_factory=list)  # per turn: arrival to the first step computing it
    busy_s: float = 0.0  # engine step time, summed over engines
    stall_s: float = 0.0  # of it, steps waiting on KV copies (swaps, stores, restores)


def note_starts(run: Run, pending: dict[str, float], seqs: dict, out: StepOutput, t0: float) -> None:
    """Turns of ``pending`` (request id -> arrival) that the step begun at ``t0`` computed tokens
    of (or that produced output in it) have waited ``t0 - arrival`` in the queue."""
    if not pending:
        return
    emitted = {o.request_id for o in out.outputs}
    for rid in [r for r in pending if r in emitted or (r in seqs and seqs[r].num_computed > 0)]:
        run.queue_wait.append(t0 - pending.pop(rid))


def make_conversations(args, rng: np.random.Generator) -> list[Conversation]:
    heavy, light = (2, 4) if args.smoke else (2, 6)
    per_heavy, per_light = (3, 1) if args.smoke else ((8, 2) if args.quick else (16, 3))
    turns = (2, 3) if args.smoke else ((2, 4) if args.quick else (3, 6))
    clients = [f"heavy{i}" for i in range(heavy) for _ in range(per_heavy)] + \
              [f"light{i}" for i in range(light) for _ in range(per_light)]
    convs = []
    for k, client in enumerate(clients):
        n = int(rng.integers(turns[0], turns[1] + 1))
        p, o = sharegpt_like(n, rng)
        msgs = [(int(min(a, args.max_message)), int(min(b, args.max_output))) for a, b in zip(p, o)]
        convs.append(Conversation(client, msgs, start=float(rng.uniform(0, args.spread))))
    return convs


def engine_config(system: System, num_blocks: int, args) -> EngineConfig:
    return EngineConfig(num_blocks=num_blocks, block_size=PROFILE.block_size, max_batch_size=args.max_batch,
                       max_batched_tokens=4096, num_host_blocks=2 * num_blocks, preemption_mode=system.mode,
                       block_groups=system.groups, group_copies=system.groups, async_swap=system.asynchronous,
                       conversation_host_blocks=num_blocks if system.reuse else 0, fairness=True,
                       fairness_margin=args.margin)


def simulate(system: System, convs: list[Conversation], args, seed: int) -> Run:
    num_blocks = args.blocks or (160 if args.smoke else PROFILE.num_blocks)
    if system.cluster:
        return simulate_cluster(system, convs, args, seed, num_blocks // args.instances)
    cfg = engine_config(system, num_blocks, args)
    ex = SimExecutor(PROFILE, vocab_size=32000, num_host_blocks=cfg.num_host_blocks, copy_segments=system.segments)
    engine = EngineCore(cfg, ex)
    rng = np.random.default_rng(seed)
    convs = [replace(c) for c in convs]
    arrivals: list = [(c.start, i) for i, c in enumerate(convs)]
    heapq.heapify(arrivals)
    now, run, book = 0.0, Run(), ClusterFairBook()
    live: dict[str, tuple[int, float, list[int]]] = {}  # request id -> (conversation, arrival, tokens)
    pending: dict[str, float] = {}  # not started yet: request id -> arrival
    last_token: dict[str, float] = {}
    while arrivals or engine.has_unfinished():
        if not engine.has_unfinished() and arrivals[0][0] > now:
            engine.idle(arrivals[0][0] - now)
            now = arrivals[0][0]
        while arrivals and arrivals[0][0] <= now:
            _, i = heapq.heappop(arrivals)
            c = convs[i]
            msg, out_len = c.turns[c.turn]
            prompt = c.history + tuple(int(t) for t in rng.integers(0, 32000, msg))
            rid = f"c{i}t{c.turn}"
            engine.add_request(Request(rid, prompt, SamplingParams(max_tokens=max(out_len, 1), ignore_eos=True,
                                                                   seed=i * 100 + c.turn),
                                       arrival_time=now, client_id=c.client, conversation_id=f"c{i}"))
            live[rid] = (i, now, list(prompt))
            pending[rid] = now
        t0 = now
        out = engine.step()
        now += out.duration_s
        run.busy_s += out.duration_s
        note_starts(run, pending, engine.seqs, out, t0)
        run.preemptions += len(out.preempted)
        for o in out.outputs:
            i, arrived, tokens = live[o.request_id]
            if o.index == 0 and o.new_token_ids:
                run.ttft.append(now - arrived)
            elif o.new_token_ids:
                run.tbt.append(now - last_token[o.request_id])
            last_token[o.request_id] = now
            tokens.extend(o.new_token_ids)
            if o.finish_reason is not None:
                c = convs[i]
                c.history, c.turn = tuple(tokens), c.turn + 1
                del live[o.request_id], last_token[o.request_id]
                if c.turn < len(c.turns) and len(c.history) + sum(c.turns[c.turn]) <= args.max_context:
                    heapq.heappush(arrivals, (now + float(rng.exponential(args.think)), i))
        for n, k in engine.group_sizes().items():  # sampled every step: the distribution under load
            run.group_sizes[n] = run.group_sizes.get(n, 0) + k
        active = {s.client_id for s in engine.seqs.values()}
        if len(active) > 1:
            run.gap = max(run.gap, max_service_gap(engine.fair.counters, active))
        book.observe("i0", engine.fair.served, active)
        if len(book.active) > 1:
            run.cluster_gap = max(run.cluster_gap, book.gap())
    m = engine.swapper.meter
    run.copies, run.blocks_copied, run.stall_s = m.copies, m.blocks_copied, m.stall_s
    run.reused_tokens, run.switches, run.makespan = engine.conversations.restored_tokens, engine.fair.switches, now
    engine.close()
    return run


@dataclass(frozen=True)
class _FairSimConfig(SimConfig):
    """A ``SimConfig`` whose instances run the given engine config (fairness, host pool, reuse)."""

    engine: Optional[EngineConfig] = None

    def engine_config(self) -> EngineConfig:
        return self.engine


@dataclass(frozen=True)
class _Turn:  # a WorkloadRequest for SimCluster.run; later turns arrive when released (inf until then)
    arrival_time: float
    prompt_len: int
    output_len: int


class ConversationCluster(SimCluster):
    """``SimCluster`` with closed-loop conversations: a turn's prompt is its conversation's
    history plus the new message, with the client and conversation ids; the next turn is
    released a think time after this one finished. Measures TTFT, TBT and the per-engine
    fairness gap as ``simulate`` does."""

    def __init__(self, config: SimConfig, convs: list[Conversation], turns: list[tuple[int, int]],
                 messages: dict, thinks: dict) -> None:
        super().__init__(config)
        self.convs, self.turns, self.messages, self.thinks = convs, turns, messages, thinks
        self.run_stats = Run()
        self.book = ClusterFairBook()
        self._rids: list[str] = []
        self._index: dict[str, int] = {}
        self._tokens: dict[str, list[int]] = {}
        self._last: dict[str, float] = {}
        self._pending: dict[str, float] = {}  # dispatched, not started: request id -> arrival

    def _order(self) -> None:
        if not self._rids:  # run() creates the records in workload order before any event
            self._rids = list(self.records)
            self._index = {rid: k for k, rid in enumerate(self._rids)}

    def _dispatch(self, rec) -> None:
        self._order()
        ci, turn = self.turns[self._index[rec.request_id]]
        c = self.convs[ci]
        prompt = tuple(c.history) + self.messages[(ci, turn)]
        if len(prompt) != rec.prompt_len:
            raise RuntimeError(f"turn {turn} of c{ci}: prompt of {len(prompt)} tokens, expected {rec.prompt_len}")
        view = RequestLoad.queued(rec.request_id, prompt_len=rec.prompt_len, block_size=self.engine_config.block_size,
                                  arrival_time=rec.arrival_time, conversation_id=f"c{ci}", client_id=c.client)
        iid = self.scheduler.dispatch(view)
        if iid is None:
            self._undispatched.append(rec)
            return
        inst = self.instances[iid]
        rec.dispatched_to = iid
        self._tokens[rec.request_id] = list(prompt)
        self._pending[rec.request_id] = rec.arrival_time
        inst.core.submit(Request(rec.request_id, prompt, SamplingParams(max_tokens=rec.output_len, ignore_eos=True,
                                                                        seed=ci * 100 + turn),
                                 arrival_time=rec.arrival_time, client_id=c.client, conversation_id=f"c{ci}"))
        inst.core.admit(self.now)
        inst.dirty = True
        self._wake(inst)

    def _on_step_end(self, arg: tuple[SimInstance, StepOutput]) -> None:
        inst, out = arg
        now, run = self.now, self.run_stats
        note_starts(run, self._pending, inst.engine.seqs, out, now - out.duration_s)
        finished = []
        for o in out.outputs:
            if o.index == 0 and o.new_token_ids:
                run.ttft.append(now - self.records[o.request_id].arrival_time)
            elif o.new_token_ids:
                run.tbt.append(now - self._last[o.request_id])
            self._last[o.request_id] = now
            self._tokens[o.request_id].extend(o.new_token_ids)
            if o.finish_reason is not None:
                finished.append(o.request_id)
        super()._on_step_end(arg)
        for rid in finished:  # release the conversation's next turn, if it has one
            k = self._index[rid]
            ci, turn = self.turns[k]
            self.convs[ci].history = tuple(self._tokens.pop(rid))
            del self._last[rid]
            if k + 1 < len(self.turns) and self.turns[k + 1][0] == ci:
                nxt = self.records[self._rids[k + 1]]
                nxt.arrival_time = now + self.thinks[(ci, turn + 1)]
                self._push(nxt.arrival_time, self._on_arrival, nxt.request_id)
        for n, k in inst.engine.group_sizes().items():
            run.group_sizes[n] = run.group_sizes.get(n, 0) + k
        active = {s.client_id for s in inst.engine.seqs.values()}
        if len(active) > 1:
            run.gap = max(run.gap, max_service_gap(inst.engine.fair.counters, active))
        self.book.observe(inst.instance_id, inst.engine.fair.served, active)
        if len(self.book.active) > 1:
            run.cluster_gap = max(run.cluster_gap, self.book.gap())

    def _loads_read_before_next_tick(self, round_now: bool) -> bool:
        return True  # turns arrive in a closed loop, unknown to the parent's look-ahead: poll every tick


def simulate_cluster(system: System, convs: list[Conversation], args, seed: int, num_blocks: int) -> Run:
    """``system``'s engines on a ``ConversationCluster`` of ``args.instances`` instances of ``num_blocks``."""
    rng = np.random.default_rng(seed)
    convs = [replace(c) for c in convs]
    workload, turns, messages, thinks = [], [], {}, {}
    for ci, c in enumerate(convs):  # the turns that fit max_context, as simulate's loop releases them
        history = 0
        for t, (msg, out_len) in enumerate(c.turns):
            if t and history + msg + out_len > args.max_context:
                break
            messages[(ci, t)] = tuple(int(x) for x in rng.integers(0, 32000, msg))
            thinks[(ci, t)] = float(rng.exponential(args.think))
            workload.append(_Turn(c.start if t == 0 else float("inf"), history + msg, max(out_len, 1)))
            turns.append((ci, t))
            history += msg + max(out_len, 1)
    cfg = _FairSimConfig(num_instances=args.instances, profile=PROFILE, seed=seed,
                         policy=PolicyConfig(dispatch="conversation", migrate_out=system.migrate_out,
                                             global_fairness=system.global_fair, fair_dispatch=system.steer),
                         enable_migration=system.migration, num_blocks=num_blocks,
                         engine=engine_config(system, num_blocks, args))
    cluster = ConversationCluster(cfg, convs, turns, messages, thinks)
    result = cluster.run(workload, progress=False)
    run = cluster.run_stats
    for e in cluster.engines().values():
        run.copies += e.swapper.meter.copies
        run.blocks_copied += e.swapper.meter.blocks_copied
        run.stall_s += e.swapper.meter.stall_s
        run.reused_tokens += e.conversations.restored_tokens
        run.switches += e.fair.switches
        e.close()
    run.preemptions = sum(r.preemptions for r in result.requests)  # also steps that only preempted
    run.migrations = sum(m.status == MigrationStatus.FINISHED for m in result.migrations)
    run.steered = cluster.scheduler.num_fair_steered
    run.makespan = result.virtual_s
    run.busy_s = sum(inst.core.stats.busy_s for inst in [*cluster.retired.values(), *cluster.instances.values()])
    return run


def summarize(run: Run) -> dict:
    def pct(xs, q):
        return float(np.percentile(xs, q)) if xs else 0.0
    return {"ttft_p95": pct(run.ttft, 95), "ttft_p99": pct(run.ttft, 99), "tbt_p95": pct(run.tbt, 95),
            "tbt_p99": pct(run.tbt, 99), "fairness_gap": run.gap,
            "cluster_gap": run.cluster_gap, "preemptions": run.preemptions,
            "yields": run.switches, "copies": run.copies, "blocks_copied": run.blocks_copied,
            "reused_tokens": run.reused_tokens, "requests": len(run.ttft), "makespan_s": run.makespan,
            "busy_s": run.busy_s, "stall_s": run.stall_s,
            "stall_share": run.stall_s / run.busy_s if run.busy_s > 0 else 0.0,
            "migrations": run.migrations, "steered": run.steered,
            "group_size_mean": (sum(n * k for n, k in run.group_sizes.items()) / sum(run.group_sizes.values())
                                if run.group_sizes else 0.0),
            "group_sizes": {str(n): run.group_sizes[n] for n in sorted(run.group_sizes)}}
