"""Serving performance of round-robin, INFaaS++ and Llumnix (paper, Figure 11).

16 simulated LLaMA-7B/A10 instances; for each trace and arrival rate (Poisson),
the mean and P99 of end-to-end, prefill and decode latency and the mean
preemption loss of each system:

* ``round_robin``: round-robin dispatch, no migration;
* ``infaas++``: load-aware dispatch (least KV demand), no migration;
* ``llumnix``: freeness dispatch plus live migration (load balancing and
  de-fragmentation).

``--rate-scale 1.33`` multiplies every rate of the sweep (a comma list runs each
scale): the load at which a cluster saturates depends on the per-instance step
time, so the paper's phenomenon is looked for at the same place relative to this
simulator's saturation point, not only at the paper's absolute rates.
``--systems`` picks systems (default the paper's three; ``llumnix+load-dispatch``
is an ablation: migration behind INFaaS++'s dispatch rule).

Usage::

    python experiments/serving.py [--quick] [--requests N] [--traces M-M,L-L] [--rate-scale 1,1.33]
                                  [--systems infaas++,llumnix] [--json out.json]

JSON: ``{trace: {rate: {system: {prefill_mean, prefill_p99, decode_mean, decode_p99,
e2e_mean, e2e_p99, preemption_loss, migrations, wall_s}}}}`` (seconds).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common  # noqa: E402
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
KEYS = common.LATENCY_KEYS + ("preemption_loss", "migrations", "wall_s", "cpu_s")
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


def plan(args) -> tuple[list[str], dict[str, tuple[float, ...]], int, int]:
    """Traces, rates, requests per point and instances for the chosen mode."""
    if args.smoke:
        traces, n, inst = ["L-L"], 60, 4
        rates = {"L-L": (0.6,)}
    elif args.quick:
        traces, n, inst = ["M-M", "S-L"], 400, args.instances
        rates = {t: (PAPER_RATES[t][-1],) for t in traces}
    else:
        traces, n, inst = list(PAPER_RATES), 10_000, args.instances
        rates = dict(PAPER_RATES)
    if args.traces:
        traces = args.traces.split(",")
        rates = {t: rates.get(t, PAPER_RATES[t]) for t in traces}
    if args.highest_rate_only:
        rates = {t: (rates[t][-1],) for t in traces}
    elif args.end_rates:
        rates = {t: tuple(sorted({rates[t][0], rates[t][-1]})) for t in traces}
    scales = parse_scales(args.rate_scale)
    rates = {t: tuple(sorted({round(r * k, 3) for r in rates[t] for k in scales})) for t in traces}
    return traces, rates, args.requests or n, inst


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--rate-scale: not a comma list of numbers: {text!r}") from None
    if not scales or any(not k > 0 for k in scales):
        raise SystemExit(f"--rate-scale: multipliers must be positive: {text!r}")
    return scales


def parse_systems(text: str) -> list[str]:
    systems = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in systems if x not in common.SYSTEMS]
    if unknown or not systems:
        raise SystemExit(f"--systems: unknown {unknown or text!r}; known: {', '.join(common.SYSTEMS)}")
    return systems


def run(args) -> dict:
    traces, rates, n, inst = plan(args)
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
    results = run(args)
    headers = ["trace", "rate", "system", "e2e mean", "e2e P99", "prefill mean", "prefill P99",
               "decode mean", "decode P99", "preempt loss", "migrations", "wall s"]
    rows = [[trace, float(rate), system, s["e2e_mean"], s["e2e_p99"], s["prefill_mean"], s["prefill_p99"],
             s["decode_mean"], s["decode_p99"], s["preemption_loss"], s["migrations"], s["wall_s"]]
            for trace, by_rate in results.items() for rate, by_sys in by_rate.items() for system, s in by_sys.items()]
    cmp_headers = ["trace", "rate", "P99 prefill INFaaS++/Llumnix", "E2E mean INFaaS++/Llumnix",
                   "preempt loss INFaaS++", "preempt loss Llumnix", "preempt loss reduction %"]
    cmp_rows = comparison_rows(results)
    common.print_table("Serving (latencies in seconds)", headers, rows)
    common.print_table("Llumnix vs INFaaS++ at each rate", cmp_headers, cmp_rows)
    _, _, n, inst = plan(args)
    common.write_markdown(args.out / "serving.md", "Serving performance (Figure 11)", [
        ("Llumnix vs INFaaS++ at each rate", cmp_headers, cmp_rows),
        ("All points (seconds)", headers, rows),
    ], notes=f"{inst} simulated LLaMA-7B/A10 instances, {n} requests per point, Poisson arrivals, seed {args.seed}.")
    plot(results, args.out / "serving.png")
    common.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
