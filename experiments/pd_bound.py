"""How far disaggregation can go in this cost model: an upper bound on any prefill/decode split's goodput.

Issue 15's target is a disaggregated goodput per GPU at least 2x that of colocated vLLM
(round-robin, prompts first as vLLM <= 0.3 ran them). Every run so far fell short
(``experiments/disaggregation.py``: 0.31x-1.00x). This script asks whether *any* split
could reach it, for each of DistServe's applications on a GPU budget:

- **colocated round-robin**: the baseline's goodput, at its best tensor-parallel degree
  (the highest rate with >= 90% of requests meeting both TTFT and TPOT, by bisection over
  simulated runs of the same requests, as in ``experiments/disaggregation.py``), and its
  *prefill utilisation* there: the prompts' prefill work (below) per second over the
  instances it has.
- **bound**: a rate no layout of the planner's space can exceed, by any dispatch, batching
  or hand-off. A disaggregated layout prefills new prompts on its prefill instances; at
  least one decode instance of the smallest degree that holds the longest request takes
  GPUs from the budget, so at most ``P = (units - decode units) // degree`` prefill
  instances of a degree remain. Each prompt ``i`` costs a prefill instance at least
  ``w_i = CostProfile.prefill_work_s(prompt_len)`` seconds of step time however it is
  batched (its FLOPs and all-reduce bytes; what a batch shares is left out). For 90% of
  ``n`` requests to meet the TTFT objective ``T`` at rate ``r``, a prompt whose *latency floor*
  exceeds ``T`` misses whatever the rate: ``CostProfile.prefill_latency_floor_s`` (one step's
  fixed cost, the larger of its FLOPs and one read of the weights, its all-reduces) is the
  least time from its first prefill step to its first token, since chunking pays the fixed
  cost and the weights again and batching only adds FLOPs. Those prompts come off the misses
  allowed (none left: the degree's bound is 0, as for chatbot prompts on one A100 at 200 ms).
  Among the others and the first ``k + 1``
  arrivals all but ``n - ceil(0.9 n)`` must have their first token by ``a_k + T``, where
  ``a_k = s_k / r`` (the same unit-rate Poisson arrivals scaled, ``s_k``), so the cheapest
  of them fit in ``P (a_k + T)`` instance-seconds. Hence, for every ``k`` whose cheapest
  work ``W_k`` exceeds ``P T``: ``r <= s_k / (W_k / P - T)``. The bound is the least of
  these, for the best degree. It needs no simulation and holds for the finite run the
  goodput is measured on.
- **memory cap**: a rate no layout of the budget, colocated or disaggregated, can *sustain*
  (serve for ever, every request finished), by the KV its decode steps must read. A request of
  ``p`` prompt and ``o`` output tokens reads ``c = (o - 1) p + (o - 1) o / 2`` context tokens
  over its decode steps, wherever they run. A step that reads ``R`` context tokens takes at
  least ``CostProfile.decode_step_floor_s(R)`` (its fixed cost, the weights once, the KV at the
  attention bandwidth), and an instance's pool of ``K`` tokens caps ``R``, so an instance reads
  at most ``K / decode_step_floor_s(K)`` tokens a second. Over the budget's units, at the best
  degree per unit: ``r <= units * max_d (K_d / floor_d(K_d) / d) / mean(c)``. Above it the
  decode work left undone grows with the run's length: no steady state exists, and a goodput
  measured on a short run there only shows how long the run was. ``--long K`` measures the
  colocated baseline on ``K`` times the requests too, so the comparison with the cap is
  between rates that are sustained (a scheduler that starves its dearest 10% of requests for
  ever is not covered: it does not serve the rate). The bound above is then also taken over the
  long run's requests and compared with the baseline's goodput on them.
- **work cap**: a rate no layout of the budget can sustain, counting the prefill work and the
  decode reads together. Where a step's prefill and decode times add
  (``CostProfile.prefill_and_decode_add``: serial mixed steps, as vLLM <= 0.3 and every OPT
  profile here run them) a step that prefills prompts and decodes a context of ``R`` tokens
  takes at least the prompts' ``prefill_work_s`` plus ``decode_step_floor_s(R)``, so an
  instance's second holds ``r w + r c / ceiling <= 1``. In GPU units, each request costs at
  least ``min_d d w_d + c min_d d / ceiling_d`` unit-seconds (prefill and reads each at the
  degree cheapest for them, wherever the hand-off puts them), and ``r <= units / mean`` of
  that: tighter than the memory cap by the prefill work. With fused steps the two are apart
  and the cap is the larger of the two means. It is taken over the long run's requests.
- **ideal**: a simulated estimate under the bound: the same ``P`` prefill instances
  serving the prompts alone (every request ends at its first token: decoding is free and
  the hand-off instant), round-robin, goodput by the same bisection (TTFT alone).

If the bound is under twice the colocated goodput (in the same run), or the memory or work cap
under twice the colocated goodput on the long runs, the 2x target is out of reach for that
application and budget in this cost model, whatever the scheduler does. Nothing in the cost
model is fitted to this (``llumnix_py/engines/sim/profiles.py``).

    python experiments/pd_bound.py                         # DistServe's applications, 4 and 16 instances of their model
    python experiments/pd_bound.py --app code --gpus 16,32 --json out.json
    python experiments/pd_bound.py --app chatbot --gpus 4 --long 10 --json out.json
    python experiments/pd_bound.py --quick
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from experiments.common import (VLLM_PREFILL_FIRST, parse_args, print_table, save_figure, subplots,  # noqa: E402
                                write_json, write_markdown)
from experiments.pd_planner import (APPLICATIONS, DEFAULT_APPLICATIONS, Application, colocated_goodputs,  # noqa: E402
                                   make_requests)
from llumnix_py import planner  # noqa: E402
from llumnix_py.engines.sim.cost_model import CostProfile  # noqa: E402
from llumnix_py.planner import Layout, kv_tokens, parse_counts, profile_gpus  # noqa: E402
from llumnix_py.slo import DEFAULT_TARGET  # noqa: E402


def rate_bound(unit_arrivals: Sequence[float], work_s: Sequence[float], instances: int, ttft_s: float,
               target: float = DEFAULT_TARGET, latency_s: Optional[Sequence[float]] = None) -> float:
    """The highest rate at which ``target`` of the requests can have their first token within
    ``ttft_s`` on ``instances`` instances, by work alone (module docstring); ``inf`` when the
    work never binds, 0 when more prompts than the target allows cannot meet the objective
    however idle the instance (``latency_s``).

    Args:
        unit_arrivals: arrival times at rate 1, increasing (at rate ``r`` they are divided by ``r``).
        work_s: each request's least prefill time on one instance, in arrival order.
        instances: instances that prefill.
        ttft_s: the TTFT objective.
        target: the share of requests that must meet it.
        latency_s: each request's least time to its first token on an idle instance
            (``CostProfile.prefill_latency_floor_s``); a request whose floor exceeds ``ttft_s``
            misses at any rate, and the others may miss only what is left. ``None``: not used.

    Raises:
        ValueError: lengths that differ, no request, fewer than one instance, a target outside
            (0, 1], a negative objective or work.
    """
    n = len(work_s)
    if n == 0 or len(unit_arrivals) != n or (latency_s is not None and len(latency_s) != n):
        raise ValueError(f"{len(unit_arrivals)} arrivals for {n} requests")
    if instances < 1 or not 0 < target <= 1 or ttft_s < 0 or min(work_s) < 0:
        raise ValueError("instances >= 1, a target in (0, 1], and objectives and work >= 0 are required")
    may_miss = n - math.ceil(target * n - 1e-9)
    if latency_s is not None:  # these miss at any rate: drop them, and their misses from the allowance
        hopeless = [lat > ttft_s for lat in latency_s]
        may_miss -= sum(hopeless)
        if may_miss < 0:
            return 0.0
        unit_arrivals = [s for s, h in zip(unit_arrivals, hopeless) if not h]
        work_s = [w for w, h in zip(work_s, hopeless) if not h]
    best = math.inf
    # Among the first k + 1 arrivals, the ``may_miss`` dearest works may miss (a min-heap of them)
    # and the rest must meet the objective (a max-heap, stored negated, with their sum). A work
    # that may miss early must be kept once a dearer one arrives. Until session 22 the first
    # ``may_miss`` works were discarded, however cheap: that overstated the work, so the rate
    # came out lower than the true bound (and some runs' goodput could have exceeded it).
    kept: list[float] = []
    missed: list[float] = []
    total = 0.0
    for s, w in zip(unit_arrivals, work_s):
        if kept and w < -kept[0]:  # cheaper than the dearest kept one: kept instead, which may miss now
            dearest = -heapq.heapreplace(kept, -w)
            total += w - dearest
            w = dearest
        heapq.heappush(missed, w)
        if len(missed) > may_miss:
            cheapest = heapq.heappop(missed)
            heapq.heappush(kept, -cheapest)
            total += cheapest
        if not kept:
            continue
        excess = total / instances - ttft_s
        if excess > 0:
            best = min(best, s / excess)
    return best


def prompt_work(profile: CostProfile, prompts: Sequence[int]) -> list[float]:
    """Each prompt's least prefill time on an instance of ``profile`` (``prefill_work_s``)."""
    return [profile.prefill_work_s(int(p)) for p in prompts]


def bound(app: Application, gpus: int, degrees: Sequence[int], n: int, profile: str, seed: int) -> dict[str, Any]:
    """The bound over the degrees (module docstring), and each degree's."""
    unit = profile_gpus(profile)
    units = gpus // unit
    sample = make_requests(app, n, 1.0, seed)
    arrivals = [r.arrival_time for r in sample]
    longest_prompt = max(r.prompt_len for r in sample)
    longest = max(r.prompt_len + r.output_len for r in sample)
    decode = [d for d in degrees if kv_tokens(Layout(2, (1, 1), tp=(d, d), unit=unit), profile, "decode") >= longest]
    if not decode:
        return {"rps": 0.0, "why": f"no decode instance of degree {list(degrees)} holds {longest} tokens",
                "by_degree": {}}
    dec = min(decode)
    by_degree: dict[int, dict[str, Any]] = {}
    for d in degrees:
        lay = Layout(2, (1, 1), tp=(d, dec), unit=unit)
        p = (units - dec) // d
        if p < 1 or kv_tokens(lay, profile, "prefill") < longest_prompt:
            continue
        prof = lay.sim_config(profile, 0).role_profile("prefill")
        work = prompt_work(prof, [r.prompt_len for r in sample])
        floors = [prof.prefill_latency_floor_s(r.prompt_len) for r in sample]
        by_degree[d] = {"prefill_instances": p, "decode_gpus": dec * unit, "mean_work_s": float(np.mean(work)),
                        "hopeless_share": float(np.mean([f > app.slo.ttft_s for f in floors])),
                        "rps": rate_bound(arrivals, work, p, app.slo.ttft_s, latency_s=floors)}
    if not by_degree:
        return {"rps": 0.0, "why": "no prefill instance fits beside the smallest decode instance", "by_degree": {}}
    best = max(by_degree, key=lambda d: (by_degree[d]["rps"], -d))
    return {"rps": by_degree[best]["rps"], "degree": best, **by_degree[best], "by_degree": by_degree}


def budget_work_cap(app: Application, gpus: int, degrees: Sequence[int], n: int, profile: str,
                    seed: int) -> dict[str, Any]:
    """The rate no layout of ``gpus`` can sustain, colocated or disaggregated, with instances of
    any mix of ``degrees``, by the prefill work and the decode reads its requests need (module
    docstring). In GPU units: a prompt prefilled at degree ``d`` costs ``d * prefill_work_s``
    unit-seconds, a context token read there ``d / read ceiling``; each request at its cheapest
    degree for each. Where the profile's steps add them (``CostProfile.prefill_and_decode_add``)
    a unit's second holds both together, ``r <= units / mean(prefill + reads)``; with fused
    steps each apart, ``r <= units / max(mean prefill, mean reads)``."""
    unit = profile_gpus(profile)
    units = gpus // unit
    sample = make_requests(app, n, 1.0, seed)
    reads = np.asarray(planner.decode_reads(sample), dtype=float)
    profs = {d: Layout(1, None, tp=(d, d), unit=unit).sim_config(profile, 0).role_profile("both")
             for d in degrees if d <= units}
    if not profs:
        return {"rps": math.inf, "by_degree": {}}
    prefill = np.min([d * np.asarray(prompt_work(p, [r.prompt_len for r in sample])) for d, p in profs.items()],
                     axis=0)
    per_read = min(d / p.decode_read_ceiling for d, p in profs.items())
    adds = all(p.prefill_and_decode_add for p in profs.values())
    demand = float(np.mean(prefill + reads * per_read)) if adds \
        else max(float(np.mean(prefill)), float(np.mean(reads)) * per_read)
    return {"rps": units / demand if demand > 0 else math.inf, "adds": adds,
            "prefill_unit_s": float(np.mean(prefill)), "read_unit_s": float(np.mean(reads)) * per_read}


def budget_memory_cap(app: Application, gpus: int, degrees: Sequence[int], n: int, profile: str,
                      seed: int) -> dict[str, Any]:
    """The rate no layout of ``gpus`` can sustain, by the KV its decode steps read (module
    docstring), and each degree's share: per unit of the profile's GPUs, the context tokens an
    instance reads a second at most."""
    unit = profile_gpus(profile)
    units = gpus // unit
    reads = float(np.mean(planner.decode_reads(make_requests(app, n, 1.0, seed))))
    by_degree: dict[int, dict[str, Any]] = {}
    for d in degrees:
        if d > units:
            continue
        one = Layout(1, None, tp=(d, d), unit=unit)
        per_unit = planner.read_rate(one, profile, "both") / d
        by_degree[d] = {"kv_tokens": kv_tokens(one, profile, "both"), "reads_per_unit_s": per_unit,
                        "rps": units * per_unit / reads if reads > 0 else math.inf}
    if not by_degree:
        return {"rps": math.inf, "mean_reads": reads, "by_degree": {}}
    best = max(by_degree, key=lambda d: (by_degree[d]["rps"], -d))
    return {"rps": by_degree[best]["rps"], "degree": best, "mean_reads": reads, "by_degree": by_degree}


def prefill_only(app: Application, n: int, seed: int):
    """``app``'s requests with one output token each (a planner workload)."""
    return lambda rate: [dataclasses.replace(r, output_len=1) for r in make_requests(app, n, rate, seed)]


def evaluate(app: Application, gpus: int, degrees: Sequence[int], n: int, iterations: int, profile: str,
             seed: int, long: int = 1) -> dict[str, Any]:
    unit = profile_gpus(profile)
    if gpus % unit:
        raise SystemExit(f"a budget of {gpus} GPUs does not split into instances of {profile} ({unit} GPUs each)")
    sample = make_requests(app, n, 1.0, seed)
    tried = colocated_goodputs(app, gpus, n, profile, seed=seed, iterations=iterations, degrees=degrees,
                               engine_prefill_first=VLLM_PREFILL_FIRST)
    if not tried:
        return {"gpus": gpus, "profile": profile, "unservable": "no colocated layout holds the longest request"}
    colocated, lay = tried[0]
    prof = lay.sim_config(profile, 0).role_profile("both")
    work = prompt_work(prof, [r.prompt_len for r in sample])
    utilisation = colocated * float(np.mean(work)) / lay.instances
    b = bound(app, gpus, degrees, n, profile, seed)
    ideal_rps, ideal_layout = 0.0, None
    for d, row in b["by_degree"].items():
        ideal = Layout(row["prefill_instances"], None, "round_robin", False, tp=(d, d), unit=unit,
                       engine_prefill_first=VLLM_PREFILL_FIRST)
        g = planner.goodput(prefill_only(app, n, seed), ideal, app.slo, profile, seed=seed, iterations=iterations)
        row["ideal_rps"] = g
        if g > ideal_rps:
            ideal_rps, ideal_layout = g, f"{row['prefill_instances']} x {d * unit} GPUs"
    def ratio(x: float, base: float = colocated) -> Optional[float]:
        return x / base if base > 0 else None

    cap = budget_memory_cap(app, gpus, degrees, n, profile, seed)
    work_cap = budget_work_cap(app, gpus, degrees, long * n, profile, seed)
    sustained, long_by_degree, bound_long = colocated, None, None
    if long > 1:  # the baseline on a run long enough to show whether its goodput is sustained
        bound_long = bound(app, gpus, degrees, long * n, profile, seed)["rps"]
        tried_long = colocated_goodputs(app, gpus, long * n, profile, seed=seed, iterations=iterations,
                                        degrees=degrees, engine_prefill_first=VLLM_PREFILL_FIRST)
        sustained = tried_long[0][0] if tried_long else 0.0
        long_by_degree = {t[1].tp[0]: t[0] for t in tried_long}
    return {
        "gpus": gpus, "profile": profile, "slo_ms": {"ttft": app.slo.ttft_s * 1e3, "tpot": app.slo.tpot_s * 1e3},
        "colocated_rps": colocated, "colocated_layout": f"{lay.instances} x {lay.tp[0] * unit} GPUs",
        "colocated_by_degree": {t[1].tp[0]: t[0] for t in tried},
        "prefill_utilisation": utilisation,
        "bound_rps": b["rps"], "bound_layout": (f"{b['prefill_instances']} x {b['degree'] * unit} GPUs prefill + "
                                                f"{b['decode_gpus']} GPUs decode") if "degree" in b else b.get("why"),
        "bound_by_degree": b["by_degree"], "bound_ratio": ratio(b["rps"]),
        "ideal_rps": ideal_rps, "ideal_layout": ideal_layout, "ideal_ratio": ratio(ideal_rps),
        "memory_rps": cap["rps"], "memory_by_degree": cap["by_degree"], "mean_decode_reads": cap["mean_reads"],
        "long_requests": long * n, "colocated_long_rps": sustained if long > 1 else None,
        "colocated_long_by_degree": long_by_degree, "bound_long_rps": bound_long,
        "bound_long_ratio": None if bound_long is None else ratio(bound_long, sustained),
        "colocated_over_memory_cap": colocated > cap["rps"],
        "memory_ratio": ratio(cap["rps"], sustained),
        "work_rps": work_cap["rps"], "work_prefill_unit_s": work_cap.get("prefill_unit_s"),
        "work_read_unit_s": work_cap.get("read_unit_s"), "work_ratio": ratio(work_cap["rps"], sustained),
        "two_x_reachable": bool(colocated > 0 and b["rps"] >= 2 * colocated and cap["rps"] >= 2 * sustained
                                and work_cap["rps"] >= 2 * sustained
                                and (bound_long is None or bound_long >= 2 * sustained)),
    }


def plot(results: dict[str, Any], out: Path) -> None:
    keys = [k for k, r in results.items() if "colocated_rps" in r]
    if not keys:
        return
    fig, axes = subplots(1, 1, width=max(4.0, 1.3 * len(keys)) + 3.0, height=3.2)
    ax = axes[0][0]
    x = np.arange(len(keys))
    w = 0.2
    ax.bar(x - 1.5 * w, [results[k]["bound_ratio"] or 0 for k in keys], w, label="bound / colocated")
    ax.bar(x - 0.5 * w, [results[k]["ideal_ratio"] or 0 for k in keys], w, label="ideal (simulated) / colocated")
    ax.bar(x + 0.5 * w, [min(results[k]["memory_ratio"] or 0, 10.0) for k in keys], w,
           label="memory cap / colocated (long runs where measured)")
    ax.bar(x + 1.5 * w, [min(results[k]["work_ratio"] or 0, 10.0) for k in keys], w,
           label="work cap / colocated (long runs where measured)")
    ax.axhline(2.0, color="k", ls="--", lw=1, label="the 2x target")
    ax.set_xticks(x, keys, rotation=20, fontsize=7)
    ax.set_ylabel("x colocated round-robin goodput")
    ax.set_title("Disaggregated goodput: what any split could reach", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, out / "pd_bound.png")


def _extra(ap) -> None:
    ap.add_argument("--app", choices=sorted(APPLICATIONS), action="append",
                    help=f"application(s) (default: {', '.join(DEFAULT_APPLICATIONS)})")
    ap.add_argument("--gpus", default=None,
                    help="GPU budgets, comma-separated (default: 4 and 16 instances of the smallest size of each "
                         "application's model; --quick and --smoke: 4)")
    ap.add_argument("--tp", default="1,2", help="tensor-parallel degrees, as multiples of the profile's GPUs")
    ap.add_argument("--requests", type=int, default=None, help="requests a run (default 400, --quick 100)")
    ap.add_argument("--long", type=int, default=1,
                    help="also measure the colocated baseline on this many times the requests, to compare the "
                         "memory and work caps with a sustained goodput (default 1: not measured)")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args("pd_bound", __doc__.split("\n")[0], argv, _extra)
    try:
        degrees = parse_counts(args.tp, "--tp")
        budgets = parse_counts(args.gpus, "--gpus") if args.gpus else None
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if args.long < 1:
        raise SystemExit(f"--long must be >= 1, got {args.long}")
    n = args.requests or (30 if args.smoke else 100 if args.quick else 400)
    iterations = 2 if args.smoke else 5 if args.quick else 7
    jobs = []
    for name in args.app or DEFAULT_APPLICATIONS:
        app = APPLICATIONS[name]
        unit = profile_gpus(app.model)
        for gpus in budgets or ((4 * unit,) if args.quick or args.smoke else (4 * unit, 16 * unit)):
            jobs.append((f"{name}, {gpus} GPUs", app, gpus))
    results = {}
    for key, app, gpus in tqdm(jobs, desc="bound", unit="budget", disable=not args.progress):
        results[key] = {"application": app.name,
                        **evaluate(app, gpus, degrees, n, iterations, app.model, args.seed, args.long)}
    long_head = f"colocated RR, {args.long * n} requests" if args.long > 1 else None
    long_bound = f"bound / colocated, {args.long * n} requests" if args.long > 1 else None
    headers = ["application, budget", "colocated RR (req/s)", "on", "its prefill utilisation", "bound (req/s)",
               "bound layout", "bound / colocated", "ideal (req/s)", "ideal / colocated", "memory cap (req/s)",
               *([long_head, long_bound] if long_head else []), "cap / colocated", "work cap (req/s)",
               "work cap / colocated", "2x possible"]
    rows = [[k, r["colocated_rps"], r["colocated_layout"], r["prefill_utilisation"], r["bound_rps"],
             r["bound_layout"], r["bound_ratio"], r["ideal_rps"], r["ideal_ratio"], r["memory_rps"],
             *([r["colocated_long_rps"], r["bound_long_ratio"]] if long_head else []), r["memory_ratio"],
             r["work_rps"], r["work_ratio"], "yes" if r["two_x_reachable"] else "no"] if "colocated_rps" in r
            else [k, "unservable"] + [""] * (len(headers) - 2)
            for k, r in results.items()]
    title = (f"Upper bound on disaggregated goodput against colocated round-robin (prompts first), {n} requests a "
             f"run, seed {args.seed}, degrees {', '.join(map(str, degrees))}")
    print_table(title, headers, rows)
    write_markdown(args.out / "pd_bound.md", "How far disaggregation can go in this cost model",
                   [(title, headers, rows)], notes=__doc__.split("\n\n")[1])
    plot(results, args.out)
    data = {"settings": {"requests": n, "long": args.long, "iterations": iterations, "degrees": list(degrees),
                         "seed": args.seed},
            "results": results}
    write_json(args.json, data)
    return data


if __name__ == "__main__":
    main()
