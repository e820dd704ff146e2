"""Serving capacity and latency of round-robin, INFaaS++ and Llumnix (paper, Figure 11).

16 simulated LLaMA-7B/A10 instances; three systems:

* ``round_robin``: round-robin dispatch, no migration;
* ``infaas++``: load-aware dispatch (least KV demand), no migration;
* ``llumnix``: freeness dispatch plus live migration (load balancing and
  de-fragmentation).

Two parts, both on by default:

1. **Capacity** (the headline; ``experiments/knee.py``, ``experiments/capacity.py``).
   For each trace the rate is swept through the knee region of the systems
   (``--knee-factors`` times the paper's highest rate of the trace, scaled to
   ``--instances``/16), with ``--seeds`` seeds per rate, each workload replayed at
   ``--lengths`` requests (its first 2,500 / 5,000 / 10,000). Per system: the highest
   rate with P99 prefill under each of ``--objectives`` seconds (interpolated; median
   and min-max over seeds), Llumnix's capacity gain over the others, each point marked
   overloaded when its P99 grows with run length, and the largest P99 ratio in the
   window between the knees (a point, with both systems' overload marks). With
   ``--prefixes`` each point runs once, at its longest length, and the shorter lengths
   are its first requests (``knee.prefix_point``). Each capacity is also given as a share
   of the trace's *work cap* (``llumnix_py.planner.work_cap``: the rate no scheduler can
   sustain with the same requests, by the prefill work and decode reads they need): how
   much any scheduler could still gain.
2. **Fixed rates**: the paper's rates (``--rate-scale`` multiplies them), one seed,
   means and P99s of every latency, preemption loss and the churn keys.

Usage::

    python experiments/serving.py [--quick] [--requests N] [--traces M-M,L-L] [--rate-scale 1,1.33]
                                  [--systems infaas++,llumnix] [--seeds 5] [--lengths 2500,5000,10000]
                                  [--knee-factors 0.9,1,1.1] [--objectives 2,5,10] [--no-knee] [--no-fixed]
                                  [--json out.json]

JSON: ``{"fixed_rate": {trace: {rate: {system: {prefill_mean, prefill_p99, decode_mean,
decode_p99, e2e_mean, e2e_p99, preemption_loss, migrations, migrations_per_request_max,
migrations_per_request_p99, migration_return_rate, migration_caused_preemptions, wall_s,
cpu_s}}}}, "capacity": {trace: {system: {objective: {median, min, max, n, per_seed,
censored}}}}, "capacity_gain": {trace: {llumnix system: {baseline: {objective: {median, min, max, n,
censored}}}}}, "work_cap": {trace: {seed: rps}}, "capacity_share": {trace: {system: {objective:
{median, min, max, n}}}}, "knee": {"points": {trace: {system: {rate: {seed: {length: {...}}}}}},
"analysis": {trace: {...}}}, "setup": {...}}`` (seconds, req/s).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common, knee  # noqa: E402
from experiments.workloads import make_workload  # noqa: E402

# The paper's rate ranges (req/s) for 16 LLaMA-7B instances.
PAPER_RATES: dict[str, tuple[float, ...]] = {
    "S-S": (32.0, 34.0, 36.0),
    "M-M": (7.4, 7.6, 7.8),
    "L-L": (2.6, 2.8, 3.0),
    "S-L": (4.1, 4.2, 4.3),
    "L-S": (10.0, 14.0, 18.0),
    "sharegpt": (7.0, 7.5, 8.0),
    "burstgpt": (7.5, 8.0, 8.5),
}
CHURN_KEYS = ("migrations_per_request_max", "migrations_per_request_p99", "migration_return_rate",
              "migration_caused_preemptions")
KEYS = common.LATENCY_KEYS + ("preemption_loss", "migrations") + CHURN_KEYS + ("wall_s", "cpu_s")
# The knee sweep: multipliers of each trace's highest paper rate (scaled to the instances).
KNEE_FACTORS = tuple(round(0.7 + 0.05 * i, 2) for i in range(17))  # 0.7 .. 1.5
KNEE_LENGTHS = (2500, 5000, 10000)
OBJECTIVES = (2.0, 5.0, 10.0)
SYSTEMS = ("round_robin", "infaas++", "llumnix")


def _extra(ap) -> None:
    ap.add_argument("--requests", type=int, default=None, help="requests per point (full: 10000)")
    ap.add_argument("--traces", type=str, default=None, help="comma-separated traces (default: all)")
    ap.add_argument("--instances", type=int, default=16)
    ap.add_argument("--highest-rate-only", action="store_true", help="only the highest rate of each trace")
    ap.add_argument("--end-rates", action="store_true", help="only the lowest and highest rate of each trace")
    ap.add_argument("--rate-scale", type=str, default="1",
                    help="comma-separated multipliers of the sweep's rates (default 1: the paper's rates)")
    ap.add_argument("--systems", type=str, default=",".join(SYSTEMS),
                    help=f"comma-separated systems (default {','.join(SYSTEMS)}; also: "
                         f"{', '.join(s for s in common.SYSTEMS if s not in SYSTEMS)})")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per knee point (full: 5)")
    ap.add_argument("--lengths", type=str, default=None,
                    help="comma-separated run lengths of each knee point (full: 2500,5000,10000)")
    ap.add_argument("--prefixes", action="store_true",
                    help="run each knee point once, at its longest length, and read the shorter lengths "
                         "off its first requests (1.75x cheaper at 2500,5000,10000)")
    ap.add_argument("--knee-factors", type=str, default=None,
                    help="comma-separated multipliers of each trace's highest paper rate for the knee sweep")
    ap.add_argument("--objectives", type=str, default=",".join(f"{o:g}" for o in OBJECTIVES),
                    help="comma-separated P99 prefill objectives in seconds")
    ap.add_argument("--growth", type=float, default=1.5,
                    help="a point is overloaded when its longest run's P99 exceeds this times its shortest's")
    ap.add_argument("--no-knee", action="store_true", help="skip the capacity sweep")
    ap.add_argument("--no-fixed", action="store_true", help="skip the fixed-rate table")
    ap.add_argument("--from-json", type=str, default=None,
                    help="comma-separated JSON files of earlier runs: analyse their knee points together "
                         "(systems merged) instead of simulating")


def plan(args) -> tuple[list[str], dict[str, tuple[float, ...]], int, int]:
    """Traces, rates, requests per point and instances for the chosen mode."""
    if args.smoke:
        traces, n, inst = ["L-L"], 60, 4
        rates = {"L-L": (0.6,)}
    elif args.quick:
        traces, n, inst = ["M-M"], 400, args.instances
        rates = {t: (PAPER_RATES[t][-1],) for t in traces}
    else:
        traces, n, inst = list(PAPER_RATES), 10_000, args.instances
        rates = dict(PAPER_RATES)
    if args.traces:
        traces = parse_traces(args.traces)
        rates = {t: rates.get(t, PAPER_RATES[t]) for t in traces}
    if args.highest_rate_only:
        rates = {t: (rates[t][-1],) for t in traces}
    elif args.end_rates:
        rates = {t: tuple(sorted({rates[t][0], rates[t][-1]})) for t in traces}
    scales = parse_scales(args.rate_scale)
    rates = {t: tuple(sorted({round(r * k, 3) for r in rates[t] for k in scales})) for t in traces}
    return traces, rates, args.requests or n, inst


def parse_traces(text: str) -> list[str]:
    traces = text.split(",")
    unknown = [t for t in traces if t not in PAPER_RATES]
    if unknown:
        raise SystemExit(f"--traces: unknown {unknown}; known: {', '.join(PAPER_RATES)}")
    return traces


def parse_scales(text: str, flag: str = "--rate-scale") -> list[float]:
    try:
        scales = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: not a comma list of numbers: {text!r}") from None
    if not scales or any(not k > 0 for k in scales):
        raise SystemExit(f"{flag}: values must be positive: {text!r}")
    return scales


def plan_knee(args) -> tuple[list[str], dict[str, tuple[float, ...]], list[int], list[int], int]:
    """Traces, knee rates, seeds, run lengths and instances of the capacity sweep."""
    if args.smoke:
        traces, factors, seeds, lengths, inst = ["L-L"], (1.0, 1.4), 2, (20, 40), 4
    elif args.quick:
        traces, factors, seeds, lengths, inst = ["L-L"], (1.1, 1.4), 2, (100, 200), 4
    else:
        traces, factors, seeds, lengths, inst = list(PAPER_RATES), KNEE_FACTORS, 5, KNEE_LENGTHS, args.instances
    if args.traces:
        traces = parse_traces(args.traces)
    if args.knee_factors:
        factors = tuple(parse_scales(args.knee_factors, "--knee-factors"))
    if args.lengths:
        lengths = tuple(int(x) for x in parse_scales(args.lengths, "--lengths"))
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit("--seeds: at least 1")
        seeds = args.seeds
    rates = {t: tuple(sorted({round(PAPER_RATES[t][-1] * f * inst / 16, 4) for f in factors})) for t in traces}
    return traces, rates, [args.seed + i for i in range(seeds)], sorted(set(lengths)), inst


def parse_systems(text: str) -> list[str]:
    systems = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in systems if x not in common.SYSTEMS]
    if unknown or not systems:
        raise SystemExit(f"--systems: unknown {unknown or text!r}; known: {', '.join(common.SYSTEMS)}")
    return systems


def run(args, planned: Optional[tuple[list[str], dict[str, tuple[float, ...]], int, int]] = None) -> dict:
    traces, rates, n, inst = planned or plan(args)
    systems = parse_systems(args.systems)
    results: dict = {}
    for trace in traces:
        for rate in rates[trace]:
            workload = make_workload(trace, n, rate, seed=args.seed)
            for system in systems:
                res = common.simulate(workload, system, inst, seed=args.seed, progress=args.progress)
                summary = res.summary()
                results.setdefault(trace, {}).setdefault(str(rate), {})[system] = common.pick(summary, KEYS)
                if args.progress:
                    print(f"{trace} @ {rate} req/s {system}: P99 prefill {summary['prefill_p99']:.2f}s "
                          f"({summary['wall_s']:.1f}s wall)", file=sys.stderr)
    return results


def comparison_rows(results: dict) -> list[list]:
    """Llumnix vs INFaaS++ at every rate where both ran."""
    rows = []
    for trace, by_rate in results.items():
        for rate in sorted(by_rate, key=float):
            if not {"infaas++", "llumnix"} <= set(by_rate[rate]):
                continue
            rows.append(_compare(trace, rate, by_rate[rate]["infaas++"], by_rate[rate]["llumnix"]))
    return rows


def _compare(trace: str, rate: str, base: dict, ours: dict) -> list:
    ratio = base["prefill_p99"] / ours["prefill_p99"] if ours["prefill_p99"] > 0 else float("inf")
    loss = base["preemption_loss"]
    reduction = 100.0 * (loss - ours["preemption_loss"]) / loss if loss > 0 else 0.0
    e2e = base["e2e_mean"] / ours["e2e_mean"] if ours["e2e_mean"] > 0 else float("inf")
    return [trace, float(rate), ratio, e2e, base["preemption_loss"], ours["preemption_loss"], reduction]


def plot(results: dict, path: Path) -> None:
    metrics = [("e2e_mean", "E2E mean (s)"), ("prefill_mean", "Prefill mean (s)"),
               ("prefill_p99", "Prefill P99 (s)"), ("decode_mean", "Decode mean (s/token)"),
               ("decode_p99", "Decode P99 (s/token)"), ("preemption_loss", "Preemption loss (s)")]
    traces = list(results)
    fig, axes = common.subplots(len(metrics), len(traces), width=3.0, height=2.3)
    for c, trace in enumerate(traces):
        rates = sorted(results[trace], key=float)
        for r, (key, label) in enumerate(metrics):
            ax = axes[r][c]
            for system in results[trace][rates[0]]:
                ax.plot([float(x) for x in rates], [results[trace][x][system][key] for x in rates],
                        marker="o", label=system)
            if r == 0:
                ax.set_title(trace)
            if c == 0:
                ax.set_ylabel(label)
            if r == len(metrics) - 1:
                ax.set_xlabel("rate (req/s)")
    axes[0][0].legend(fontsize=7)
    common.save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = common.parse_args("serving", __doc__.splitlines()[0], argv, _extra)
    systems = parse_systems(args.systems)
    objectives = parse_scales(args.objectives, "--objectives")
    # the fixed-rate options checked before the capacity sweep's simulations run
    fixed = None if args.no_fixed or args.from_json else plan(args)
    out: dict = {}
    sections: list = []
    notes = []
    if not args.no_knee:
        if args.from_json:
            sweep, setup = knee.load_points([Path(x) for x in args.from_json.split(",") if x.strip()])
            traces, seeds, lengths, inst = list(sweep), setup["seeds"], setup["lengths"], setup["instances"]
            args.prefixes = bool(setup.get("prefixes", False))
            rates = {t: tuple(sorted(next(iter(sweep[t].values())))) for t in traces}
            args.no_fixed = True
        else:
            traces, rates, seeds, lengths, inst = plan_knee(args)
            sweep = knee.run_sweep(traces, rates, systems, seeds, lengths, inst, args.progress, args.prefixes)
        analysis = knee.analyse(sweep, objectives, args.growth)
        tabs = knee.tables(analysis, sweep, objectives)
        titles = {"capacity": "Capacity: highest rate (req/s) at each P99 prefill objective, median (min-max) "
                              "over seeds (>= / <=: in some seed the P99 was under / over the objective at every rate swept, a bound)",
                  "gains": "Llumnix's capacity gain, paired by seed: median (min to max)",
                  "window": "Largest P99 prefill ratio in the window (a point in the window, not the result)",
                  "points": "Knee points (overloaded: P99 grows with run length)"}
        caps = knee.work_caps(traces, seeds, max(lengths), inst)
        shares = knee.capacity_shares(analysis, caps)
        tabs["headroom"] = knee.headroom_table(caps, shares, objectives)
        titles["headroom"] = ("Capacity over the work cap (the rate no scheduler sustains with these requests: "
                              "prefill work and decode reads at the roofline), median [min-max] over seeds")
        for key in ("capacity", "gains", "headroom", "window", "points"):
            headers, rows = tabs[key]
            common.print_table(titles[key], headers, rows)
            sections.append((titles[key], headers, rows))
        knee.plot(analysis, sweep, objectives, args.out / "serving_capacity.png", line_objective=5.0)
        out["capacity"] = {t: a["capacity"] for t, a in analysis.items()}
        out["capacity_gain"] = {t: a["gains"] for t, a in analysis.items()}
        out["work_cap"] = caps
        out["capacity_share"] = shares
        out["knee"] = knee.to_json(sweep, analysis)
        out["setup"] = {"knee_rates": {t: list(r) for t, r in rates.items()}, "seeds": seeds, "lengths": lengths,
                        "prefixes": bool(getattr(args, "prefixes", False)),
                        "instances": inst, "objectives": objectives, "growth": args.growth}
        notes.append(f"Capacity sweep: {inst} instances, rates {rates}, seeds {seeds}, run lengths {lengths} "
                     f"requests (prefixes of one workload per seed"
                     f"{', read off one run of the longest' if getattr(args, 'prefixes', False) else ', each run apart'}"
                     f"); capacity read at {max(lengths)} requests.")
    if not args.no_fixed:
        results = run(args, fixed)
        headers = ["trace", "rate", "system", "e2e mean", "e2e P99", "prefill mean", "prefill P99",
                   "decode mean", "decode P99", "preempt loss", "migrations", "return rate", "max mig/req",
                   "wall s"]
        rows = [[trace, float(rate), system, s["e2e_mean"], s["e2e_p99"], s["prefill_mean"], s["prefill_p99"],
                 s["decode_mean"], s["decode_p99"], s["preemption_loss"], s["migrations"],
                 s["migration_return_rate"], s["migrations_per_request_max"], s["wall_s"]]
                for trace, by_rate in results.items() for rate, by_sys in by_rate.items()
                for system, s in by_sys.items()]
        cmp_headers = ["trace", "rate", "P99 prefill INFaaS++/Llumnix", "E2E mean INFaaS++/Llumnix",
                       "preempt loss INFaaS++", "preempt loss Llumnix", "preempt loss reduction %"]
        cmp_rows = comparison_rows(results)
        common.print_table("Fixed rates: serving (latencies in seconds)", headers, rows)
        common.print_table("Fixed rates: Llumnix vs INFaaS++ at each rate", cmp_headers, cmp_rows)
        sections += [("Fixed rates: Llumnix vs INFaaS++ at each rate", cmp_headers, cmp_rows),
                     ("Fixed rates: all points (seconds)", headers, rows)]
        _, _, n, inst = plan(args)
        notes.append(f"Fixed rates: {inst} simulated LLaMA-7B/A10 instances, {n} requests per point, "
                     f"Poisson arrivals, seed {args.seed}.")
        plot(results, args.out / "serving.png")
        out["fixed_rate"] = results
    common.write_markdown(args.out / "serving.md", "Serving capacity and performance (Figure 11)", sections,
                          notes="\n\n".join(notes))
    common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
