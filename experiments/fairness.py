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
``ConversationCluster`` (``experiments/fairness_sim.py``) adds the closed loop (a turn arrives after the previous one
finished) and real prompts with client and conversation ids.

Metrics: P95/P99 TTFT and TBT (seconds); the stall share: the part of the engines' step
time spent waiting on KV copies (synchronous swaps and stores, waits for asynchronous ones;
``SwitchMeter.stall_s``), the context switches' direct cost; and the fairness metric: the largest
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
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common, fairness_load  # noqa: E402
from experiments.fairness_sim import SYSTEMS, make_conversations, simulate, summarize  # noqa: E402


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
               "fairness gap", "cluster gap", "preempt", "yields", "copies", "stall share", "reused tok", "group",
               "migr", "steered"]
    rows = [[n, r["ttft_p95"], r["ttft_p99"], r["tbt_p95"], r["tbt_p99"], r.get("ttft_p99_vs_vllm_swap", 0.0),
             r.get("tbt_p99_vs_vllm_swap", 0.0), r["fairness_gap"], r["cluster_gap"], r["preemptions"], r["yields"],
             r["copies"], r["stall_share"], r["reused_tokens"], r["group_size_mean"], r["migrations"], r["steered"]]
            for n, r in results["systems"].items()]
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
