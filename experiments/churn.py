"""What migration churn costs and what it buys: ablations of its causes (issue 19).

Llumnix (freeness dispatch + migration) on one trace, with one knob changed per
variant, same workloads and seeds side by side:

* ``default``: the paper's settings (rounds every 0.1 s, threshold 3 steps);
* ``interval-0.5`` / ``interval-1.0``: migration rounds every 0.5 / 1.0 s (frequency);
* ``threshold-1`` / ``-5`` / ``-10`` / ``-20`` / ``-40``: the pairing threshold, both sides;
* ``reserve-5`` / ``-10`` / ``-20`` / ``-40``: sources still below 3, destinations only above
  5 / 10 / 20 / 40 (``migrate_in_threshold``: a destination keeps room for arrivals);
  ``reserve-20+cooldown-30``: the reserve on top of the servers' default cooldown;
* ``copy-x100``: migration copies 100x faster (pre-allocated destination blocks held ~1% as long);
* ``poll-0.01``: loads polled every 0.01 s instead of 0.05 s (freeness noise between polls);
* ``cooldown-2`` / ``-10`` / ``-30``: a request that finished a migration is not moved
  again for 2 / 10 / 30 s unless draining (``policies.cooldown``; 30 s: the servers' default);
* ``waiting-head`` / ``longest``: the source moves its head-of-line queued request / its
  longest running request (default: its shortest running one); ``heads-first``: a source
  whose queue head waits for blocks moves that head first wherever it fits
  (``PolicyConfig.blocked_heads_first``), else its shortest running request;
* ``no-migration``: Llumnix's dispatch without migration, and ``load-dispatch``:
  migration behind INFaaS++'s dispatch rule (which of the two a difference comes from);
* ``infaas++``: no migration at all (INFaaS++'s dispatch), the reference; ``infaas++@kv-x1.1``:
  the same on instances with 10% more KV blocks (what more memory, not better placed, buys).

Per variant (median over seeds): P99 and mean prefill, the share of requests whose
prefill took over 2 s / 5 s (what a capacity at that objective counts: P99 stays under
it while the share stays under 1%), preemption loss, migrations
(finished, aborted), the churn keys (``migrations_per_request_max``/``_p99``,
``migration_return_rate``, ``migration_caused_preemptions``) and, from the ledger's
per-migration records, the share of migrations that still left the source freer one
interval later and the share that overshot (source freer than destination after); and
memory in the wrong place (``llumnix_py.sim.metrics``): the share of samples where some
queue head waits for blocks, the stranded memory then (free blocks on the instances whose
head does not wait, share of the cluster's) and the share of waiting heads that another
instance had room for.

Usage::

    python experiments/churn.py [--quick] [--trace L-L] [--rates 3.9] [--requests N] [--seeds 3]
                                [--variants default,cooldown-10] [--json out.json]
    python experiments/churn.py --from-json a.json,b.json   # parts run apart, one table and plot

JSON: ``{"setup": {...}, "runs": {rate: {variant: {seed: {...}}}}, "median": {rate: {variant: {...}}}}``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common  # noqa: E402
from experiments.workloads import make_workload  # noqa: E402
from llumnix_py.engines.sim.profiles import LLAMA_7B_A10  # noqa: E402
from llumnix_py.slo import attainment  # noqa: E402

# The default profile with a migration link 100x faster: copies take ~1% of their time, so
# blocks pre-allocated on a destination are held only that long (what pre-allocation costs).
FAST_COPY = dataclasses.replace(LLAMA_7B_A10, hw=dataclasses.replace(LLAMA_7B_A10.hw,
                                                                    link_gbps=LLAMA_7B_A10.hw.link_gbps * 100))

# name -> (system, policy keywords, simulator keywords)
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "default": ("llumnix", {}, {}),
    "interval-0.5": ("llumnix", {}, {"migration_interval_s": 0.5}),
    "interval-1.0": ("llumnix", {}, {"migration_interval_s": 1.0}),
    "threshold-1": ("llumnix", {"migrate_out_threshold": 1.0}, {}),
    "threshold-10": ("llumnix", {"migrate_out_threshold": 10.0}, {}),
    "poll-0.01": ("llumnix", {}, {"poll_interval_s": 0.01}),
    "cooldown-2": ("llumnix", {"migration_cooldown_s": 2.0}, {}),
    "cooldown-10": ("llumnix", {"migration_cooldown_s": 10.0}, {}),
    "cooldown-30": ("llumnix", {"migration_cooldown_s": 30.0}, {}),
    "threshold-5": ("llumnix", {"migrate_out_threshold": 5.0}, {}),
    "threshold-20": ("llumnix", {"migrate_out_threshold": 20.0}, {}),
    "threshold-40": ("llumnix", {"migrate_out_threshold": 40.0}, {}),
    "reserve-5": ("llumnix", {"migrate_in_threshold": 5.0}, {}),
    "reserve-10": ("llumnix", {"migrate_in_threshold": 10.0}, {}),
    "reserve-20": ("llumnix", {"migrate_in_threshold": 20.0}, {}),
    "reserve-40": ("llumnix", {"migrate_in_threshold": 40.0}, {}),
    "copy-x100": ("llumnix", {}, {"profile": FAST_COPY}),
    "reserve-20+cooldown-30": ("llumnix+reserve-20+cooldown-30", {}, {}),
    "waiting-head": ("llumnix", {"migrate_out": "waiting_head"}, {}),
    "heads-first": ("llumnix+heads-first", {}, {}),
    "longest": ("llumnix", {"migrate_out": "longest"}, {}),
    "load-dispatch": ("llumnix+load-dispatch", {}, {}),
    "no-migration": ("llumnix-no-migration", {}, {}),
    "infaas++": ("infaas++", {}, {}),
    "infaas++@kv-x1.1": ("infaas++@kv-x1.1", {}, {}),
}
OBJECTIVES = (2.0, 5.0)
KEYS = ("prefill_p99", "prefill_mean", "preemption_loss", "migrations", "migrations_aborted",
        "migrations_per_request_max", "migrations_per_request_p99", "migration_return_rate",
        "migration_caused_preemptions", "head_waiting_share", "stranded_mean", "heads_fit_elsewhere", "wall_s")


def payoff_shares(records: Sequence[dict]) -> dict[str, float]:
    """From the ledger's records of finished migrations with both "after" freeness values:
    ``relieved`` (the source is freer one interval later than before the move) and
    ``overshot`` (one interval later the source is freer than the destination)."""
    done = [r for r in records if r["finished"] and r["src_freeness_before"] is not None
            and r["src_freeness_after"] is not None and r["dst_freeness_after"] is not None]
    if not done:
        return {"relieved": 0.0, "overshot": 0.0, "judged": 0}
    relieved = sum(1 for r in done if r["src_freeness_after"] > r["src_freeness_before"])
    overshot = sum(1 for r in done if r["src_freeness_after"] > r["dst_freeness_after"])
    return {"relieved": relieved / len(done), "overshot": overshot / len(done), "judged": len(done)}


def over_objective(prefills: Sequence[float], objective_s: float) -> float:
    """Share of requests whose prefill latency exceeds ``objective_s`` (0 for none): the
    TTFT-only complement of ``llumnix_py.slo.attainment``."""
    if not prefills:
        return 0.0
    return 1.0 - attainment(prefills, [None] * len(prefills), objective_s, math.inf)


def _extra(ap) -> None:
    ap.add_argument("--trace", type=str, default=None, help="trace (default L-L)")
    ap.add_argument("--rates", type=str, default=None, help="comma-separated rates (req/s)")
    ap.add_argument("--requests", type=int, default=None, help="requests per run (full: 5000)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per variant (full: 3)")
    ap.add_argument("--instances", type=int, default=None)
    ap.add_argument("--variants", type=str, default=None, help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--from-json", type=str, default=None, metavar="A.json,B.json",
                    help="tabulate and plot saved runs together (same trace, requests and instances; "
                         "e.g. variants run in separate processes) instead of running")


def plan(args) -> dict[str, Any]:
    if args.smoke:
        setup = {"trace": "L-L", "rates": [0.9], "requests": 60, "seeds": 1, "instances": 4,
                 "variants": ["default", "cooldown-10", "infaas++"]}
    elif args.quick:
        setup = {"trace": "L-L", "rates": [0.95], "requests": 300, "seeds": 1, "instances": 4,
                 "variants": ["default", "interval-1.0", "threshold-10", "cooldown-10", "infaas++"]}
    else:
        setup = {"trace": "L-L", "rates": [3.8, 4.0], "requests": 5000, "seeds": 3, "instances": 16,
                 "variants": list(VARIANTS)}
    if args.trace:
        setup["trace"] = args.trace
    if args.rates:
        try:
            setup["rates"] = [float(x) for x in args.rates.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"--rates: not a comma list of numbers: {args.rates!r}") from None
        if not setup["rates"] or any(r <= 0 for r in setup["rates"]):
            raise SystemExit(f"--rates: rates must be positive: {args.rates!r}")
    for key in ("requests", "seeds", "instances"):
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                raise SystemExit(f"--{key}: at least 1")
            setup[key] = value
    if args.variants:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown or not names:
            raise SystemExit(f"--variants: unknown {unknown or args.variants!r}; known: {', '.join(VARIANTS)}")
        setup["variants"] = names
    setup["seed_list"] = [args.seed + i for i in range(setup["seeds"])]
    return setup


def run(setup: dict, progress: bool) -> dict:
    from tqdm import tqdm

    runs: dict = {}
    total = len(setup["rates"]) * len(setup["seed_list"]) * len(setup["variants"])
    with tqdm(total=total, disable=not progress, unit="run", desc="churn") as bar:
        for rate in setup["rates"]:
            for seed in setup["seed_list"]:
                workload = make_workload(setup["trace"], setup["requests"], rate, seed=seed)
                for name in setup["variants"]:
                    system, policy_kw, sim_kw = VARIANTS[name]
                    res = common.simulate(workload, system, setup["instances"], seed=seed, policy_kw=policy_kw,
                                          **sim_kw)
                    point = common.pick(res.summary(), KEYS)
                    point.update({f"payoff_{k}": v for k, v in payoff_shares(res.migration_records).items()})
                    prefills = res.latencies()[0]  # an unfinished request counts as infinitely late
                    point.update({f"over_{o:g}s": over_objective(prefills, o) for o in OBJECTIVES})
                    runs.setdefault(str(rate), {}).setdefault(name, {})[str(seed)] = point
                    bar.update(1)
    return runs


def medians(runs: dict) -> dict:
    return {rate: {name: {k: float(statistics.median(p[k] for p in by_seed.values()))
                          for k in next(iter(by_seed.values()))}
                   for name, by_seed in by_name.items()}
            for rate, by_name in runs.items()}


def plot(med: dict, path: Path) -> None:
    """Churn against tail latency: one point per variant, one panel per rate."""
    rates = list(med)
    fig, axes = common.subplots(1, len(rates), width=4.2, height=3.4)
    for c, rate in enumerate(rates):
        ax = axes[0][c]
        for i, (name, m) in enumerate(med[rate].items()):
            ax.scatter(100 * m["migration_return_rate"], m["prefill_p99"], color=f"C{i % 10}", label=name)
            ax.annotate(name, (100 * m["migration_return_rate"], m["prefill_p99"]), fontsize=6)
        ax.set_xlabel("migration return rate (%)")
        ax.set_ylabel("P99 prefill (s)")
        ax.set_title(f"{rate} req/s")
    axes[0][0].legend(fontsize=6)
    common.save_figure(fig, path)


def load_runs(paths: Sequence[Path]) -> tuple[dict, dict]:
    """The setup and runs of several saved ``--json`` outputs, merged.

    They must share trace, requests and instances; a (rate, variant, seed) run present
    in two files must be the same run (the simulator is deterministic), else SystemExit.
    """
    setup: Optional[dict] = None
    runs: dict = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
            part, part_runs = data["setup"], data["runs"]
            key = (part["trace"], part["requests"], part["instances"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"--from-json: {path}: not a churn.py --json output ({exc})") from None
        if setup is None:
            setup = {**part, "rates": [], "variants": [], "seed_list": []}
        elif key != (setup["trace"], setup["requests"], setup["instances"]):
            raise SystemExit(f"--from-json: {path} is {key}, the first file "
                             f"{(setup['trace'], setup['requests'], setup['instances'])}")
        for rate, by_name in part_runs.items():
            for name, by_seed in by_name.items():
                merged = runs.setdefault(rate, {}).setdefault(name, {})
                for seed, point in by_seed.items():
                    if seed in merged and merged[seed] != point:
                        raise SystemExit(f"--from-json: {path}: rate {rate}, {name}, seed {seed} differs "
                                         "from an earlier file's")
                    merged[seed] = point
        for field in ("rates", "variants", "seed_list"):
            setup[field] += [x for x in part[field] if x not in setup[field]]
    if setup is None:
        raise SystemExit("--from-json: no file named")
    setup["seeds"] = len(setup["seed_list"])
    return setup, runs


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = common.parse_args("churn", __doc__.splitlines()[0], argv, _extra)
    if args.from_json:
        setup, runs = load_runs([Path(x) for x in args.from_json.split(",") if x.strip()])
    else:
        setup = plan(args)
        runs = run(setup, args.progress)
    med = {rate: {name: m[name] for name in setup["variants"] if name in m}  # rows in the order asked
           for rate, m in medians(runs).items()}
    headers = ["rate", "variant", "P99 prefill", "mean prefill", "> 2 s %", "> 5 s %", "preempt loss", "migrations",
               "aborted", "max mig/req", "P99 mig/req", "return rate %", "dst preempted", "src relieved %", "overshot %",
               "head waits %", "stranded %", "fits elsewhere %"]
    rows = [[float(rate), name, m["prefill_p99"], m["prefill_mean"], 100 * m["over_2s"], 100 * m["over_5s"],
             m["preemption_loss"], m["migrations"],
             m["migrations_aborted"], m["migrations_per_request_max"], m["migrations_per_request_p99"],
             100 * m["migration_return_rate"], m["migration_caused_preemptions"], 100 * m["payoff_relieved"],
             100 * m["payoff_overshot"]] + [100 * m.get(k, math.nan)  # absent from files written before them
                                            for k in ("head_waiting_share", "stranded_mean", "heads_fit_elsewhere")]
            for rate, by_name in med.items() for name, m in by_name.items()]
    title = f"Churn ablations, {setup['trace']}, medians over seeds {setup['seed_list']} (seconds)"
    common.print_table(title, headers, rows)
    common.write_markdown(args.out / "churn.md", "Churn ablations", [(title, headers, rows)],
                          notes=f"{setup['instances']} simulated LLaMA-7B/A10 instances, {setup['requests']} "
                                f"requests per run, Poisson arrivals, trace {setup['trace']}, rates {setup['rates']}, "
                                f"seeds {setup['seed_list']}.")
    plot(med, args.out / "churn.png")
    out = {"setup": setup, "runs": runs, "median": med}
    common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
