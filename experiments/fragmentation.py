"""Memory fragmentation over time, INFaaS++ vs Llumnix (paper, Section 6.3).

Fragmentation of the cluster at a moment: the free KV blocks of instances whose
head-of-line waiting request cannot be admitted, as a fraction of all blocks (see
``llumnix_py.sim.metrics``). Llumnix's de-fragmentation (the head-of-line demand in
virtual usage makes such an instance a migration source) should keep it lower.

JSON: ``{system: {"fragmentation_mean", "fragmentation_p99", "usage_mean",
"prefill_p99", "migrations", "times": [...], "fragmentation": [...]}}``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common  # noqa: E402
from experiments.workloads import make_workload  # noqa: E402

SYSTEMS = ("infaas++", "llumnix")


def _extra(ap) -> None:
    ap.add_argument("--trace", default="L-L")
    ap.add_argument("--rate", type=float, default=3.0)
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--instances", type=int, default=16)


def run(args) -> dict:
    if args.smoke:
        n, inst, rate = 60, 4, args.rate / 4
    elif args.quick:
        n, inst, rate = 600, args.instances, args.rate
    else:
        n, inst, rate = 5000, args.instances, args.rate
    n = args.requests or n
    workload = make_workload(args.trace, n, rate, seed=args.seed)
    out = {}
    for system in SYSTEMS:
        res = common.simulate(workload, system, inst, seed=args.seed, progress=args.progress)
        tl = res.timeline
        frag = np.asarray(tl.fragmentation) if tl.fragmentation else np.zeros(1)
        s = res.summary()
        out[system] = {
            "fragmentation_mean": float(frag.mean()),
            "fragmentation_p99": float(np.percentile(frag, 99)),
            "usage_mean": float(np.mean(tl.usage)) if tl.usage else 0.0,
            "prefill_p99": s["prefill_p99"],
            "migrations": s["migrations"],
            "times": list(tl.times),
            "fragmentation": list(tl.fragmentation),
            "usage": list(tl.usage),
        }
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = common.parse_args("fragmentation", __doc__.splitlines()[0], argv, _extra)
    results = run(args)
    headers = ["system", "fragmentation mean %", "fragmentation P99 %", "KV usage mean %", "prefill P99 s",
               "migrations"]
    rows = [[system, 100 * r["fragmentation_mean"], 100 * r["fragmentation_p99"], 100 * r["usage_mean"],
             r["prefill_p99"], r["migrations"]] for system, r in results.items()]
    common.print_table("Fragmentation", headers, rows)
    common.write_markdown(args.out / "fragmentation.md", "Fragmentation", [("Summary", headers, rows)],
                          notes=f"{args.trace} at {args.rate} req/s (smoke: a quarter of it on 4 instances), "
                                f"seed {args.seed}; sampled every second of virtual time.")
    fig, axes = common.subplots(2, 1, width=7.0, height=2.6)
    for system, r in results.items():
        axes[0][0].plot(r["times"], [100 * f for f in r["fragmentation"]], label=system, lw=0.8)
        axes[1][0].plot(r["times"], [100 * u for u in r["usage"]], label=system, lw=0.8)
    axes[0][0].set_ylabel("fragmented blocks %")
    axes[1][0].set_ylabel("KV usage %")
    axes[1][0].set_xlabel("time (s)")
    axes[0][0].legend(fontsize=7)
    common.save_figure(fig, args.out / "fragmentation.png")
    common.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
