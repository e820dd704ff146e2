"""Fair preemption with cheap context switches (FastSwitch's ideas) on one simulated instance.

Under one fairness policy (per-client virtual token counters, ``policies/fairness.py``,
with FastSwitch-style priority adjustment: a far-over-share running client yields to a
waiting one), the same multi-turn workload runs with each way of switching context:

* ``recompute``: preempted requests re-prefill (vLLM's default);
* ``vllm-swap``: synchronous swap, one copy per block and, as vLLM's KV layout has one
  tensor per layer for K and for V, one copy per block per layer per K/V
  (``copy_segments = 2 * num_layers``);
* ``swap-per-block``: the same, on the built-in engine's block-major layout (a block of
  every layer is contiguous: one copy per block) - separates layout from grouping;
* ``llumnix-py``: block groups (contiguous runs, one copy per run), asynchronous copies
  (overlapping steps on the virtual clock), and multi-turn KV reuse (a finished turn's
  KV kept in the host pool, the next turn prefills only its new tokens);
* ablations of ``llumnix-py``: without groups, without async, without reuse, and with
  the cost policy choosing swap or recompute per preemption (``+cost``);
* ``cluster`` and ``cluster+migration``: ``llumnix-py``'s engines (fairness, host swap
  pool, groups, async, reuse) on a simulated cluster (``SimCluster``: the real global
  scheduler, llumlets and migration protocol) of ``--instances`` instances that together
  hold the single instance's KV blocks, conversation-aware dispatch; live migration off,
  or on with the ``most_served`` migrate-out policy (the most-served client's request
  moves to an instance with room: migration as a third context switch), and
  ``cluster+global``: global fairness (``PolicyConfig.global_fairness``): the global
  scheduler keeps one VTC over the cluster (``llumnix_py.scheduler.fair_book``) and every
  tick hands each engine its clients' cluster counters, so engines admit, preempt and
  yield by cluster-wide service; migration off. ``cluster+migration+global``: the same
  with migration on and ``most_served_cluster`` (the request that leaves belongs to the
  client most served over the whole cluster). ``+steer`` (fair dispatch,
  ``PolicyConfig.fair_dispatch``): a turn of a client more than the margin below the
  mean cluster-wide counter of the active clients goes to the freest instance instead of
  where conversation-aware dispatch would send it.

Workload: ShareGPT-like conversations (``experiments.workloads.sharegpt_like`` lengths per
turn) from a few heavy clients (many conversations each) and more light ones; a turn's
prompt is the conversation's history plus the new message; the next turn arrives a
think time (exponential) after the previous one ended. The engine is the real
``EngineCore`` over the LLaMA-7B/A10 cost model on a virtual clock; copies cost a fixed
overhead per copy plus bytes over PCIe (``HardwareSpec.host_link_gbps``,
``host_copy_overhead_s``). ``SimCluster`` replays open-loop arrivals only; the subclass
``ConversationCluster`` here adds the closed loop (a turn arrives after the previous one
finished) and real prompts with client and conversation ids.

Metrics: P95/P99 TTFT and TBT (seconds), and the fairness metric: the largest
difference of service (VTC counters, weighted tokens) between clients with requests in
the system, sampled every step (on a cluster: each engine's own counters, the largest
over engines, as fairness is per instance), and the cluster-wide gap: the same metric
over one VTC of the whole cluster (a ``ClusterFairBook`` fed, every step, with each
engine's exact served book and clients: the global scheduler's view without polling
lag), for every row; the group-size distribution under load (blocks per
contiguous run of the running requests' block tables, sampled every step; ``group`` is
its mean).

Load sweep (``--spreads 20,40,80,160``): the chosen systems side by side at each load, on the
same conversations; ``experiments/fairness_load.py`` describes its figures and JSON.
"""

from __future__ import annotations

import copy
import heapq
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common, fairness_load  # noqa: E402
from experiments.workloads import sharegpt_like  # noqa: E402
from llumnix_py.engines.core import EngineConfig, EngineCore  # noqa: E402
from llumnix_py.engines.sim.executor import SimExecutor  # noqa: E402
from llumnix_py.engines.sim.profiles import LLAMA_7B_A10  # noqa: E402
from llumnix_py.engines.types import Request, SamplingParams, StepOutput  # noqa: E402
from llumnix_py.load import RequestLoad  # noqa: E402
from llumnix_py.scheduler.fair_book import ClusterFairBook  # noqa: E402
from llumnix_py.sim.cluster import SimCluster, SimInstance  # noqa: E402
from llumnix_py.sim.config import SimConfig  # noqa: E402
from migration.protocol import MigrationStatus  # noqa: E402
from policies.config import PolicyConfig  # noqa: E402
from policies.fairness import max_service_gap  # noqa: E402

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
    run.copies, run.blocks_copied = m.copies, m.blocks_copied
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
        run.reused_tokens += e.conversations.restored_tokens
        run.switches += e.fair.switches
        e.close()
    run.preemptions = sum(r.preemptions for r in result.requests)  # also steps that only preempted
    run.migrations = sum(m.status == MigrationStatus.FINISHED for m in result.migrations)
    run.steered = cluster.scheduler.num_fair_steered
    run.makespan = result.virtual_s
    return run


def summarize(run: Run) -> dict:
    def pct(xs, q):
        return float(np.percentile(xs, q)) if xs else 0.0
    return {"ttft_p95": pct(run.ttft, 95), "ttft_p99": pct(run.ttft, 99), "tbt_p95": pct(run.tbt, 95),
            "tbt_p99": pct(run.tbt, 99), "fairness_gap": run.gap,
            "cluster_gap": run.cluster_gap, "preemptions": run.preemptions,
            "yields": run.switches, "copies": run.copies, "blocks_copied": run.blocks_copied,
            "reused_tokens": run.reused_tokens, "requests": len(run.ttft), "makespan_s": run.makespan,
            "migrations": run.migrations, "steered": run.steered,
            "group_size_mean": (sum(n * k for n, k in run.group_sizes.items()) / sum(run.group_sizes.values())
                                if run.group_sizes else 0.0),
            "group_sizes": {str(n): run.group_sizes[n] for n in sorted(run.group_sizes)}}


def _extra(ap) -> None:
    ap.add_argument("--blocks", type=int, default=None, help="KV blocks of the instance (default: the profile's)")
    ap.add_argument("--max-batch", type=int, default=48)
    ap.add_argument("--margin", type=float, default=512.0, help="fairness margin (weighted tokens)")
    ap.add_argument("--think", type=float, default=3.0, help="mean think time between turns (s)")
    ap.add_argument("--spread", type=float, default=20.0, help="conversations start within this many seconds")
    ap.add_argument("--max-message", type=int, default=1024)
    ap.add_argument("--max-output", type=int, default=512)
    ap.add_argument("--max-context", type=int, default=6000)
    ap.add_argument("--instances", type=int, default=2,
                    help="instances of the cluster rows (together the single instance's KV blocks)")
    ap.add_argument("--systems", default=None,
                    help=f"comma list of {', '.join(SYSTEMS)} (default: all; with --spreads: "
                         f"{','.join(fairness_load.DEFAULT_SYSTEMS)})")
    ap.add_argument("--spreads", default=None,
                    help="load sweep: comma list of spreads (seconds, each > 0; e.g. 20,40,80,160); the systems "
                         "run side by side at each, on the same conversations; replaces --spread and the "
                         "single-load table")


def parse_systems(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = set(names) - set(SYSTEMS)
    if unknown or not names:
        raise SystemExit(f"unknown systems {sorted(unknown) or text!r}; known: {list(SYSTEMS)}")
    return names


def _smoke(args) -> None:
    if args.smoke:  # a small instance under pressure, with short turns that fit it
        args.max_message, args.max_output, args.max_context = 256, 128, 1500


def run(args) -> dict:
    _smoke(args)
    convs = make_conversations(args, np.random.default_rng(args.seed))
    names = parse_systems(args.systems or ",".join(SYSTEMS))
    out = {}
    iterator = names
    if args.progress:
        from tqdm import tqdm
        iterator = tqdm(names, desc="systems")
    for name in iterator:
        out[name] = summarize(simulate(SYSTEMS[name], convs, args, args.seed))
    base = out.get("vllm-swap")
    for name, r in out.items():
        if base:
            r["ttft_p99_vs_vllm_swap"] = base["ttft_p99"] / r["ttft_p99"] if r["ttft_p99"] else 0.0
            r["tbt_p99_vs_vllm_swap"] = base["tbt_p99"] / r["tbt_p99"] if r["tbt_p99"] else 0.0
    return {"conversations": len(convs), "turns": sum(len(c.turns) for c in convs), "systems": out}


def run_sweep(args) -> dict:
    """The chosen systems at each of ``--spreads``, on the same conversations (``fairness_load``)."""
    _smoke(args)
    spreads = fairness_load.parse_spreads(args.spreads)
    names = parse_systems(args.systems or ",".join(fairness_load.DEFAULT_SYSTEMS))
    if fairness_load.BASELINE not in names:
        raise SystemExit(f"--spreads: the ratios are against {fairness_load.BASELINE}; add it to --systems")
    jobs = [(spread, name) for spread in spreads for name in names]
    if args.progress:
        from tqdm import tqdm
        jobs = tqdm(jobs, desc="loads x systems")
    summaries: dict[float, dict] = {}
    for spread, name in jobs:
        at = copy.copy(args)
        at.spread = spread
        convs = make_conversations(at, np.random.default_rng(args.seed))
        r = simulate(SYSTEMS[name], convs, at, args.seed)
        summaries.setdefault(spread, {})[name] = {**summarize(r), **fairness_load.queue_figures(r.queue_wait),
                                                  **fairness_load.tbt_tail(r.tbt)}
    points = [fairness_load.load_point(spread, len(convs), summaries[spread]) for spread in spreads]
    return {"conversations": len(convs), "turns": sum(len(c.turns) for c in convs),
            "load_sweep": fairness_load.sweep_json(points)}


def sweep_main(args) -> dict:
    results = run_sweep(args)
    points = results["load_sweep"]["points"]
    rows = fairness_load.table_rows(points)
    common.print_table(f"Fair preemption against load (seconds; x = {fairness_load.BASELINE}'s figure / this one's)",
                       fairness_load.HEADERS, rows)
    common.write_markdown(args.out / "fairness.md", "Fair preemption with cheap context switches: load sweep",
                          [("Latencies (seconds) against load", fairness_load.HEADERS, rows)],
                          notes=f"{results['conversations']} conversations, {results['turns']} turns, "
                                f"LLaMA-7B/A10 cost model, seed {args.seed}, margin {args.margin}, spreads "
                                f"{', '.join(common.fmt(p['spread_s']) for p in points)} s; "
                                f"{fairness_load.OVERLOAD_RULE}.")
    fairness_load.plot(points, args.out / "fairness_load.png")
    common.write_json(args.json, results)
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict:
    if argv is None:
        argv = sys.argv[1:]
    args = common.parse_args("fairness", __doc__.splitlines()[0], argv, _extra)
    if args.spreads is not None:
        return sweep_main(args)
    results = run(args)
    headers = ["system", "TTFT P95", "TTFT P99", "TBT P95", "TBT P99", "P99 TTFT x", "P99 TBT x",
               "fairness gap", "cluster gap", "preempt", "yields", "copies", "reused tok", "group", "migr",
               "steered"]
    rows = [[n, r["ttft_p95"], r["ttft_p99"], r["tbt_p95"], r["tbt_p99"], r.get("ttft_p99_vs_vllm_swap", 0.0),
             r.get("tbt_p99_vs_vllm_swap", 0.0), r["fairness_gap"], r["cluster_gap"], r["preemptions"], r["yields"],
             r["copies"], r["reused_tokens"], r["group_size_mean"], r["migrations"], r["steered"]] for n, r in results["systems"].items()]
    common.print_table("Fair preemption (seconds; x = vllm-swap's P99 / this one's)", headers, rows)
    common.write_markdown(args.out / "fairness.md", "Fair preemption with cheap context switches",
                          [("Latencies (seconds) and switches", headers, rows)],
                          notes=f"{results['conversations']} conversations, {results['turns']} turns, "
                                f"LLaMA-7B/A10 cost model, seed {args.seed}, margin {args.margin}; "
                                f"cluster rows: {args.instances} instances sharing the single instance's KV blocks.")
    names = list(results["systems"])
    fig, axes = common.subplots(1, 4)
    for ax, (key, label) in zip(axes[0], [("ttft_p99", "P99 TTFT (s)"), ("tbt_p99", "P99 TBT (s)"),
                                          ("fairness_gap", "max service gap (tokens)"),
                                          ("cluster_gap", "cluster-wide service gap (tokens)")]):
        ax.bar(range(len(names)), [results["systems"][n][key] for n in names])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, fontsize=6)
        ax.set_ylabel(label)
    common.save_figure(fig, args.out / "fairness.png")
    common.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
