"""Global scheduler overhead at scale (paper, Section 6.5): wall time per decision.

The simulator times every call into the real ``GlobalScheduler`` with the wall
clock: each dispatch, each migration round (pairing over all instances), each load
poll. The load is M-M at the paper's per-instance rate (7.6 req/s per 16 instances),
scaled to the cluster size.

JSON: ``{instances: {"dispatch_mean_ms", "dispatch_p99_ms", "migration_round_mean_ms",
"migration_round_p99_ms", "poll_mean_ms", "rounds", "dispatches", "sim_wall_s"}}``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common  # noqa: E402
from experiments.workloads import make_workload  # noqa: E402

PER_INSTANCE_RATE = 7.6 / 16


def _extra(ap) -> None:
    ap.add_argument("--requests", type=int, default=None)


def _ms(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    a = np.asarray(values) * 1e3
    return float(a.mean()), float(np.percentile(a, 99))


def run(args) -> dict:
    if args.smoke:
        sizes, n = (8,), 60
    elif args.quick:
        sizes, n = (16, 64), 400
    else:
        sizes, n = (16, 32, 64), 3000
    n = args.requests or n
    out = {}
    for size in sizes:
        workload = make_workload("M-M", n, PER_INSTANCE_RATE * size, seed=args.seed)
        res = common.simulate(workload, "llumnix", size, seed=args.seed, progress=args.progress)
        t = res.timings
        d, r, p = _ms(t["dispatch"]), _ms(t["migration_round"]), _ms(t["poll"])
        out[str(size)] = {"dispatch_mean_ms": d[0], "dispatch_p99_ms": d[1], "migration_round_mean_ms": r[0],
                          "migration_round_p99_ms": r[1], "poll_mean_ms": p[0], "rounds": len(t["migration_round"]),
                          "dispatches": len(t["dispatch"]), "sim_wall_s": res.wall_s}
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = common.parse_args("scheduler_overhead", __doc__.splitlines()[0], argv, _extra)
    results = run(args)
    headers = ["instances", "dispatch mean ms", "dispatch P99 ms", "migration round mean ms",
               "migration round P99 ms", "poll mean ms", "rounds", "sim wall s"]
    rows = [[int(k), v["dispatch_mean_ms"], v["dispatch_p99_ms"], v["migration_round_mean_ms"],
             v["migration_round_p99_ms"], v["poll_mean_ms"], v["rounds"], v["sim_wall_s"]]
            for k, v in results.items()]
    common.print_table("Scheduler overhead (wall clock)", headers, rows)
    common.write_markdown(args.out / "scheduler_overhead.md", "Scheduler overhead", [("Per call", headers, rows)],
                          notes="Wall time of the real GlobalScheduler calls inside the simulation (this machine).")
    fig, axes = common.subplots(1, 1, width=4.5, height=3.2)
    ax = axes[0][0]
    sizes = sorted(results, key=int)
    for key, label in (("dispatch_mean_ms", "dispatch"), ("migration_round_mean_ms", "migration round"),
                       ("migration_round_p99_ms", "migration round P99")):
        ax.plot([int(s) for s in sizes], [results[s][key] for s in sizes], "-o", label=label)
    ax.set_xlabel("instances")
    ax.set_ylabel("wall time per call (ms)")
    ax.legend(fontsize=7)
    common.save_figure(fig, args.out / "scheduler_overhead.png")
    common.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
