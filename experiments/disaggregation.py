"""Prefill/decode disaggregation against colocation, DistServe's evaluation in the simulator.

For each of DistServe's applications (``experiments/pd_planner.py``: chatbot, code
completion, summarization, with the SLOs of DistServe's artifact) on the same GPU budget
of one profile (default ``opt-13b-a100``, one GPU an instance), three systems:

- colocated, round-robin dispatch, no migration (the vLLM baseline);
- colocated, llumnix-py's freeness dispatch and migration;
- disaggregated: the planner's best prefill:decode split of the budget, fixed; every
  request is handed from its prefill instance to a decode instance by live migration.

It reports each system's goodput (the highest rate with >= 90% of requests meeting both
TTFT and TPOT, by bisection over simulated runs) and goodput per GPU, the attainment
against the rate (a sweep) and against the SLO scale (at one rate, the colocated
round-robin goodput, from the runs of the same sweep point), as a table, a Markdown
report, PNG plots and JSON. Nothing in the cost model was fitted to this experiment.

    python experiments/disaggregation.py                   # 4 GPUs, 400 requests a run
    python experiments/disaggregation.py --quick --json out.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import parse_args, print_table, save_figure, subplots, write_json, write_markdown  # noqa: E402
from experiments.pd_planner import APPLICATIONS, Application, Layout, goodput, plan, run  # noqa: E402
from llumnix_py.slo import attainment  # noqa: E402

SCALES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)


def _extra(ap) -> None:
    ap.add_argument("--profile", default="opt-13b-a100")
    ap.add_argument("--gpus", type=int, default=None, help="GPU budget (default 4; --quick 2, --smoke 2)")
    ap.add_argument("--app", choices=sorted(APPLICATIONS), action="append", help="application(s) (default: all)")


def settings(args) -> dict[str, Any]:
    if args.smoke:
        return {"gpus": args.gpus or 2, "n": 30, "iterations": 2, "rates": 2}
    if args.quick:
        return {"gpus": args.gpus or 2, "n": 60, "iterations": 4, "rates": 3}
    return {"gpus": args.gpus or 4, "n": 400, "iterations": 7, "rates": 6}


def evaluate(app: Application, cfg: dict[str, Any], profile: str, seed: int, progress: bool) -> dict[str, Any]:
    gpus, n, iters = cfg["gpus"], cfg["n"], cfg["iterations"]
    ranked = plan(app, gpus, n, profile, seed=seed, exact=True, iterations=iters, progress=progress)
    best = ranked[0]
    systems = {
        "colocated round-robin": Layout(gpus, None, "round_robin", False),
        "colocated llumnix": Layout(gpus),
        "disaggregated": Layout(gpus, (best["prefill"], best["decode"])),
    }
    good = {name: goodput(app, lay, n, profile, seed=seed, iterations=iters) for name, lay in systems.items()
            if name != "disaggregated"}
    good["disaggregated"] = best["goodput_rps"]
    # attainment vs rate, and (at the baseline's goodput, or the lowest swept rate) vs SLO scale
    top = max(max(good.values()), 0.5 * gpus) * 1.5
    rates = [top * (k + 1) / cfg["rates"] for k in range(cfg["rates"])]
    scale_rate = good["colocated round-robin"] or rates[0]
    curves: dict[str, Any] = {}
    for name, lay in systems.items():
        by_rate = [run(app, lay, r, n, profile, seed).slo_attainment(app.slo) for r in rates]
        ttfts, tpots = run(app, lay, scale_rate, n, profile, seed).latencies()
        by_scale = [attainment(ttfts, tpots, app.slo.ttft_s * s, app.slo.tpot_s * s) for s in SCALES]
        curves[name] = {"rates": rates, "attainment": by_rate, "scale_rate": scale_rate, "scales": list(SCALES),
                        "attainment_by_scale": by_scale}
    base = good["colocated round-robin"]
    return {
        "slo_ms": {"ttft": app.slo.ttft_s * 1e3, "tpot": app.slo.tpot_s * 1e3},
        "source": app.source,
        "plan": ranked,
        "split": [best["prefill"], best["decode"]],
        "goodput_rps": good,
        "goodput_per_gpu": {k: v / gpus for k, v in good.items()},
        "vs_round_robin": {k: (v / base if base > 0 else None) for k, v in good.items()},
        "curves": curves,
    }


def plot(results: dict[str, Any], out: Path) -> None:
    apps = list(results)
    fig, axes = subplots(2, len(apps))
    for col, name in enumerate(apps):
        r = results[name]
        for system, c in r["curves"].items():
            axes[0][col].plot(c["rates"], c["attainment"], marker="o", label=system)
            axes[1][col].plot(c["scales"], c["attainment_by_scale"], marker="o", label=system)
        axes[0][col].axhline(0.9, color="grey", lw=0.8, ls="--")
        axes[1][col].axhline(0.9, color="grey", lw=0.8, ls="--")
        axes[0][col].set_title(f"{name}: attainment vs rate")
        axes[0][col].set_xlabel("requests/s")
        axes[1][col].set_title(f"{name}: vs SLO scale at {next(iter(r['curves'].values()))['scale_rate']:.2g} req/s")
        axes[1][col].set_xlabel("SLO scale")
        for row in (0, 1):
            axes[row][col].set_ylim(0, 1.05)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, out / "disaggregation.png")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args("disaggregation", __doc__.split("\n")[0], argv, _extra)
    cfg = settings(args)
    results = {}
    for name in args.app or sorted(APPLICATIONS):
        results[name] = evaluate(APPLICATIONS[name], cfg, args.profile, args.seed, args.progress)
    headers = ["application", "TTFT/TPOT SLO (ms)", "system", "goodput (req/s)", "per GPU", "x round-robin"]
    rows = []
    for name, r in results.items():
        for system, g in r["goodput_rps"].items():
            label = f"{system} {r['split'][0]}:{r['split'][1]}" if system == "disaggregated" else system
            ratio = r["vs_round_robin"][system]
            rows.append([name, f"{r['slo_ms']['ttft']:g}/{r['slo_ms']['tpot']:g}", label, g,
                         r["goodput_per_gpu"][system], ratio if ratio is not None else "n/a (baseline 0)"])
    title = f"Goodput per GPU, {cfg['gpus']} GPUs of {args.profile}, {cfg['n']} requests a run"
    print_table(title, headers, rows)
    notes = "\n".join(f"- {name}: {r['source']}" for name, r in results.items())
    write_markdown(args.out / "disaggregation.md", "Prefill/decode disaggregation vs colocation",
                   [(title, headers, rows)], notes=f"Sources:\n{notes}\n")
    plot(results, args.out)
    data = {"settings": {**cfg, "profile": args.profile, "seed": args.seed}, "results": results}
    write_json(args.json, data)
    return data


if __name__ == "__main__":
    main()
