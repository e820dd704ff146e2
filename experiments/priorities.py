"""Priority isolation (paper, Figure 13): Llumnix with and without priority headroom.

S-S trace at 26 req/s with Gamma arrivals of CV 2, 4, 6 and 8; 10% of the requests
are high priority. ``llumnix`` treats every request alike in dispatch and migration
(the engines still queue high priority first); ``llumnix+priority`` reserves
``--headroom`` blocks on each instance for high-priority requests (virtual usage,
paper Section 4.4.2), so dispatch and migration keep their instances lightly loaded.

JSON: ``{cv: {system: {"high": {...}, "normal": {...}}}}`` with the latency keys
(``prefill_mean``, ``prefill_p99``, ``decode_mean``, ``decode_p99``, ``e2e_mean``,
``e2e_p99``; seconds).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common  # noqa: E402
from experiments.workloads import make_workload  # noqa: E402


def _extra(ap) -> None:
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--rate", type=float, default=26.0)
    ap.add_argument("--headroom", type=int, default=300, help="blocks reserved for high priority per instance")
    ap.add_argument("--instances", type=int, default=16)


def run(args) -> dict:
    if args.smoke:
        cvs, n, inst, rate = (4.0,), 100, 4, args.rate / 4
    elif args.quick:
        cvs, n, inst, rate = (2.0, 8.0), 1500, args.instances, args.rate
    else:
        cvs, n, inst, rate = (2.0, 4.0, 6.0, 8.0), 10_000, args.instances, args.rate
    n = args.requests or n
    systems = {"llumnix": {}, "llumnix+priority": {"headroom_blocks": ((1, args.headroom),)}}
    out: dict = {}
    for cv in cvs:
        workload = make_workload("S-S", n, rate, cv=cv, priority_ratio=0.1, seed=args.seed)
        for name, policy_kw in systems.items():
            res = common.simulate(workload, "llumnix", inst, seed=args.seed, progress=args.progress,
                                  policy_kw=policy_kw)
            out.setdefault(str(cv), {})[name] = {
                "high": common.pick(res.summary(priority=1), common.LATENCY_KEYS),
                "normal": common.pick(res.summary(priority=0), common.LATENCY_KEYS),
            }
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = common.parse_args("priorities", __doc__.splitlines()[0], argv, _extra)
    results = run(args)
    headers = ["CV", "system", "class", "e2e mean", "e2e P99", "prefill mean", "prefill P99", "decode mean",
               "decode P99"]
    rows = [[float(cv), system, cls, s["e2e_mean"], s["e2e_p99"], s["prefill_mean"], s["prefill_p99"],
             s["decode_mean"], s["decode_p99"]]
            for cv, by_sys in results.items() for system, by_cls in by_sys.items() for cls, s in by_cls.items()]
    common.print_table("Priorities (seconds)", headers, rows)
    common.write_markdown(args.out / "priorities.md", "Priorities (Figure 13)",
                          [("Latencies (seconds)", headers, rows)],
                          notes=f"S-S, Gamma arrivals, 10% high priority, headroom {args.headroom} blocks, "
                                f"seed {args.seed}.")
    metrics = [("e2e_mean", "E2E mean (s)"), ("prefill_mean", "Prefill mean (s)"),
               ("decode_mean", "Decode mean (s/token)"), ("prefill_p99", "Prefill P99 (s)")]
    fig, axes = common.subplots(1, len(metrics))
    cvs = sorted(results, key=float)
    for ax, (key, label) in zip(axes[0], metrics):
        for system in ("llumnix", "llumnix+priority"):
            for cls, style in (("high", "-o"), ("normal", "--s")):
                ax.plot([float(c) for c in cvs], [results[c][system][cls][key] for c in cvs], style,
                        label=f"{system} {cls}")
        ax.set_xlabel("CV")
        ax.set_ylabel(label)
    axes[0][0].legend(fontsize=6)
    common.save_figure(fig, args.out / "priorities.png")
    common.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
