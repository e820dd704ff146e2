"""Prefill/decode disaggregation against colocation, DistServe's evaluation in the simulator.

For each of DistServe's applications (``experiments/pd_planner.py``: chatbot, code
completion, summarization, with the SLOs of DistServe's artifact) on the model DistServe
judged those SLOs on (``Application.model``: OPT-13B on one A100 for chatbot, OPT-66B on
two A100s, tensor parallel, for the other two; ``--profile`` runs every application on one
profile instead), on the same GPU budget (default four instances of the profile's size:
4 GPUs for OPT-13B, 8 for OPT-66B), three systems:

- colocated, round-robin dispatch, no migration (the vLLM baseline);
- colocated, llumnix-py's freeness dispatch and migration;
- disaggregated: the planner's best prefill:decode split of the budget, fixed; every
  request is handed from its prefill instance to a decode instance by live migration.

Every colocated engine schedules prompts as vLLM <= 0.3 did (``--colocated-prefill-first``,
default 1000 steps: a prompt-only step whenever a waiting prompt can be admitted, the
running batch sitting out; DistServe's simulator models its vLLM baseline the same way).
Runs before session 16 had every step also decode (serial mixed steps, ``0``), which kept
the colocated baselines' prompts waiting for a decode pass in every step. Prefill instances
put prompts first for ``--prefill-first`` steps (default ``PREFILL_FIRST_STEPS``, 16).

``--colocated prefill_queue,slo`` adds colocated llumnix-py systems with other dispatch, on
the round-robin's best layout, with migration: ``prefill_queue`` (fewest prompt tokens to
prefill first, then freeness: ``policies.dispatch``) and ``slo`` (every request carries the
application's SLO as its objective; just-in-time batching and SLO-aware dispatch, issue 16's
``jit`` and ``slo``).

With ``--tp 1,2`` every system gets the same search over tensor-parallel degrees (as
multiples of the profile's own GPUs): each colocated system runs at its best degree, and
the planner picks a degree per phase, so no system is held to a size the others escape.

A fourth comparison (``shift``) runs a workload whose mix shifts mid-run, half
decode-heavy requests (short prompts, long outputs) then half prefill-heavy ones (long
prompts, short outputs), on 4 GPUs split 1:3 for the first half, with fixed roles
and with run-time role flips (``policies.roles.plan_role_flip``, default thresholds):
the same requests (same seed) at each of a few rates, SLO attainment and the flips.

It reports each system's goodput (the highest rate with >= 90% of requests meeting both
TTFT and TPOT, by bisection over simulated runs) and goodput per GPU, the attainment
against the rate (a sweep) and against the SLO scale (at one rate, the colocated
round-robin goodput, from the runs of the same sweep point), as a table, a Markdown
report, PNG plots and JSON. Nothing in the cost model was fitted to this experiment.

    python experiments/disaggregation.py                   # 4 GPUs, 400 requests a run
    python experiments/disaggregation.py --quick --json out.json
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import (VLLM_PREFILL_FIRST, parse_args, print_table, save_figure, subplots,  # noqa: E402
                                write_json, write_markdown)
from experiments.pd_planner import (APPLICATIONS, DEFAULT_APPLICATIONS, Application, colocated_goodputs,  # noqa: E402
                                   goodput, make_requests, plan, run)
from experiments.workloads import WorkloadRequest  # noqa: E402
from llumnix_py.llumlet_types import PREFILL_FIRST_STEPS, check_prefill_first_steps  # noqa: E402
from llumnix_py.planner import Layout, memory_cap, parse_counts, profile_gpus, work_cap  # noqa: E402
from llumnix_py.sim import SimCluster  # noqa: E402
from llumnix_py.slo import SLO, attainment  # noqa: E402

SCALES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)


# Extra colocated llumnix-py systems (``--colocated``): dispatch, batching, and whether each
# request carries the application's SLO as its objective.
COLOCATED_VARIANTS: dict[str, tuple[str, str, bool]] = {
    "prefill_queue": ("prefill_queue", "fcfs", False),
    "slo": ("slo", "jit", True),
}


class Unservable(Exception):
    """No layout of the budget holds an application's longest requests: it is reported as
    such and the run goes on with the other applications."""


def _extra(ap) -> None:
    ap.add_argument("--profile", default=None,
                    help="one cost profile for every application (default: each application's own model)")
    ap.add_argument("--gpus", type=int, default=None,
                    help="GPU budget (default 4 instances of the profile's size; --quick and --smoke 2)")
    ap.add_argument("--tp", default="1",
                    help="tensor-parallel degrees to search, as multiples of the profile's GPUs (default 1)")
    ap.add_argument("--app", choices=sorted(APPLICATIONS), action="append",
                    help=f"application(s) (default: {', '.join(DEFAULT_APPLICATIONS)})")
    ap.add_argument("--handoffs", default="1",
                    help="hand-offs (migrations) in flight at once per disaggregated instance, out and in; several, "
                         "comma-separated, are searched by the planner like the degrees (default 1)")
    ap.add_argument("--prefill-first", type=int, default=PREFILL_FIRST_STEPS, metavar="N",
                    help="prefill instances prefill waiting prompts alone for up to N steps in a row before the "
                         "requests waiting for their hand-off decode (0: every step decodes them; default %(default)s)")
    ap.add_argument("--colocated-prefill-first", type=int, default=VLLM_PREFILL_FIRST, metavar="N",
                    help="every colocated engine prefills waiting prompts alone for up to N steps in a row (default "
                         "%(default)s: vLLM <= 0.3's prompt-only steps, as DistServe's simulator models its vLLM "
                         "baseline; 0: every step also decodes, the serial mixed steps of runs before session 16)")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests a run (default 400, --quick 60): the chatbot needs about 4,000 for its goodputs "
                         "to be sustained ones (RESULTS.md, \"The chatbot's goodput on 400 requests is a transient\")")
    ap.add_argument("--no-shift", action="store_true", help="skip the shifting-mix comparison")
    ap.add_argument("--colocated", default="",
                    help=f"extra colocated llumnix-py systems, comma-separated: {', '.join(COLOCATED_VARIANTS)} "
                         "(default none)")


def settings(args) -> dict[str, Any]:
    try:
        handoffs, degrees = parse_counts(args.handoffs, "--handoffs"), parse_counts(args.tp, "--tp")
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    variants = tuple(v for v in args.colocated.split(",") if v)
    unknown = [v for v in variants if v not in COLOCATED_VARIANTS]
    if unknown:
        raise SystemExit(f"--colocated: unknown system(s) {unknown}; known: {list(COLOCATED_VARIANTS)}")
    try:
        check_prefill_first_steps(args.prefill_first)
        check_prefill_first_steps(args.colocated_prefill_first)
    except ValueError as exc:
        raise SystemExit(f"--prefill-first / --colocated-prefill-first: {exc}") from None
    if args.requests is not None and args.requests < 1:
        raise SystemExit(f"--requests must be >= 1, got {args.requests}")
    base = _settings(args)
    if args.requests is not None:
        base["n"] = args.requests
    return {**base, "handoffs": handoffs, "degrees": degrees, "colocated": variants,
            "prefill_first": args.prefill_first, "colocated_prefill_first": args.colocated_prefill_first}


def _settings(args) -> dict[str, Any]:
    if args.smoke:
        return {"gpus": args.gpus, "units": 2, "n": 30, "iterations": 2, "rates": 2, "shift_n": 40, "shift_rates": (1.0,),
                "shift_gpus": 4}
    if args.quick:
        return {"gpus": args.gpus, "units": 2, "n": 60, "iterations": 4, "rates": 3, "shift_n": 100,
                "shift_rates": (0.5, 1.0), "shift_gpus": 4}
    return {"gpus": args.gpus, "units": 4, "n": 400, "iterations": 7, "rates": 6, "shift_n": 300,
            "shift_rates": (0.5, 1.0, 1.5, 2.0, 3.0), "shift_gpus": 4}


def budget(cfg: dict[str, Any], profile: str) -> int:
    """The GPU budget for ``profile``: ``--gpus``, or ``units`` instances of its size."""
    return cfg["gpus"] or cfg["units"] * profile_gpus(profile)


def evaluate(app: Application, cfg: dict[str, Any], profile: str, seed: int, progress: bool) -> dict[str, Any]:
    gpus, n, iters, degrees = budget(cfg, profile), cfg["n"], cfg["iterations"], cfg["degrees"]
    first = cfg.get("prefill_first", PREFILL_FIRST_STEPS)
    unit = profile_gpus(profile)
    if gpus % unit:
        raise SystemExit(f"a budget of {gpus} GPUs does not split into instances of {profile} ({unit} GPUs each)")
    ranked = plan(app, gpus, n, profile, seed=seed, exact=True, iterations=iters, progress=progress,
                  handoffs=cfg["handoffs"], degrees=degrees, prefill_first=first)
    best = ranked[0]
    if best["infeasible"]:
        raise Unservable(f"no layout of {gpus} GPUs of {profile} can serve {app.name}: {best['infeasible']}")
    good: dict[str, float] = {}
    systems: dict[str, Layout] = {}
    by_degree: dict[str, dict[int, float]] = {}  # each colocated system's goodput at each degree tried
    for name, dispatch, migration in (("colocated round-robin", "round_robin", False),
                                      ("colocated llumnix", "freeness", True)):
        tried = colocated_goodputs(app, gpus, n, profile, seed=seed, iterations=iters, degrees=degrees,
                                   dispatch=dispatch, migration=migration,
                                   engine_prefill_first=cfg.get("colocated_prefill_first", 0))
        if not tried:
            raise Unservable(f"no degree in {degrees} splits {gpus} GPUs into instances of {profile} "
                             f"that hold {app.name}'s longest requests")
        by_degree[name] = {lay.tp[0]: g for g, lay in tried}
        good[name], systems[name] = tried[0]
    carried: set[str] = set()  # systems whose requests carry their objectives
    for variant in cfg.get("colocated", ()):
        dispatch, batching, objectives = COLOCATED_VARIANTS[variant]
        lay = dataclasses.replace(systems["colocated round-robin"], dispatch=dispatch, migration=True,
                                  batch_policy=batching)
        good[lay.name] = goodput(app, lay, n, profile, seed=seed, iterations=iters, objectives=objectives)
        systems[lay.name] = lay
        if objectives:
            carried.add(lay.name)
    systems["disaggregated"] = Layout(best["prefill"] + best["decode"], (best["prefill"], best["decode"]),
                                      tp=(best["tp_prefill"], best["tp_decode"]), handoffs=best["handoffs"], unit=unit,
                                      prefill_first=first)
    good["disaggregated"] = best["goodput_rps"]
    # attainment vs rate, and (at the baseline's goodput, or the lowest swept rate) vs SLO scale
    top = max(max(good.values()), 0.5 * gpus) * 1.5
    rates = [top * (k + 1) / cfg["rates"] for k in range(cfg["rates"])]
    scale_rate = good["colocated round-robin"] or rates[0]
    curves: dict[str, Any] = {}
    for name, lay in systems.items():
        objectives = name in carried
        by_rate = [run(app, lay, r, n, profile, seed, objectives=objectives).slo_attainment(app.slo) for r in rates]
        ttfts, tpots = run(app, lay, scale_rate, n, profile, seed, objectives=objectives).latencies()
        by_scale = [attainment(ttfts, tpots, app.slo.ttft_s * s, app.slo.tpot_s * s) for s in SCALES]
        curves[name] = {"rates": rates, "attainment": by_rate, "scale_rate": scale_rate, "scales": list(SCALES),
                        "attainment_by_scale": by_scale}
    base = good["colocated round-robin"]
    sample = make_requests(app, n, 1.0, seed)
    caps = {name: memory_cap(lay, profile, sample) for name, lay in systems.items()}
    works = {name: work_cap(lay, profile, sample) for name, lay in systems.items()}
    return {
        "slo_ms": {"ttft": app.slo.ttft_s * 1e3, "tpot": app.slo.tpot_s * 1e3},
        "source": app.source,
        "profile": profile,
        "gpus": gpus,
        "gpus_per_instance": {name: lay.tp[0] * unit if lay.pd is None else [lay.tp[0] * unit, lay.tp[1] * unit]
                              for name, lay in systems.items()},
        "colocated_by_degree": by_degree,
        "plan": ranked,
        "split": [best["prefill"], best["decode"]],
        "handoffs": best["handoffs"],
        "prefill_first": first,
        "goodput_rps": good,
        "goodput_per_gpu": {k: v / gpus for k, v in good.items()},
        "vs_round_robin": {k: (v / base if base > 0 else None) for k, v in good.items()},
        "memory_cap_rps": caps,
        "over_memory_cap": {k: v > caps[k] for k, v in good.items()},
        "work_cap_rps": works,
        "over_work_cap": {k: v > works[k] for k, v in good.items()},
        "curves": curves,
    }


# The shifting workload (lengths assumed here, not from DistServe), judged by the summarization SLO
# (the loosest TTFT of the three: the prefill-heavy half's 2,500-token prompts need ~0.4 s of prefill).
SHIFT_SLO = SLO.from_ms(1500, 150)
SHIFT_PHASES = (Application("decode-heavy", SHIFT_SLO, (200.0, 600.0), (600.0, 1500.0)),
                Application("prefill-heavy", SHIFT_SLO, (2500.0, 4000.0), (30.0, 80.0)))


def shifting_requests(n: int, rate: float, seed: int) -> list[WorkloadRequest]:
    """``n // 2`` decode-heavy requests, then the rest prefill-heavy, Poisson at ``rate`` throughout."""
    first = make_requests(SHIFT_PHASES[0], n // 2, rate, seed)
    second = make_requests(SHIFT_PHASES[1], n - n // 2, rate, seed + 1)
    t0 = first[-1].arrival_time if first else 0.0
    return first + [WorkloadRequest(r.arrival_time + t0, r.prompt_len, r.output_len) for r in second]


def shift(cfg: dict[str, Any], profile: str, seed: int) -> dict[str, Any]:
    """Fixed roles against run-time role flips on the shifting workload, same requests per rate."""
    gpus = cfg["shift_gpus"]  # 4: a flip keeps one instance of each phase, so 2 could never flip
    rates = [gpus * f for f in cfg["shift_rates"]]
    out: dict[str, Any] = {"split": [1, gpus - 1], "rates": rates, "slo_ms": [1500, 150], "systems": {}}
    for flip in (False, True):
        layout = Layout(gpus, (1, gpus - 1), flip=flip, handoffs=max(cfg["handoffs"]),
                        prefill_first=cfg.get("prefill_first", PREFILL_FIRST_STEPS))
        rows = []
        for rate in rates:
            cluster = SimCluster(layout.sim_config(profile, seed))
            result = cluster.run(shifting_requests(cfg["shift_n"], rate, seed), progress=False)
            ttfts, tpots = result.latencies()
            tpots = [x for x in tpots if x is not None]  # one-token requests have none
            rows.append({"rate": rate, "attainment": result.slo_attainment(SHIFT_SLO),
                         "completed": sum(r.done and r.num_tokens == r.output_len for r in result.requests),
                         "requests": len(result.requests),
                         "flips": [[t, iid, role] for t, iid, role in cluster.scheduler.role_flips],
                         "mean_ttft_s": sum(ttfts) / len(ttfts), "mean_tpot_s": sum(tpots) / len(tpots)})
        out["systems"][layout.name] = rows
    return out


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


def plot_shift(data: dict[str, Any], out: Path) -> None:
    fig, axes = subplots(1, 1)
    ax = axes[0][0]
    for name, rows in data["systems"].items():
        ax.plot([r["rate"] for r in rows], [r["attainment"] for r in rows], marker="o", label=name)
    ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    ax.set_title("shifting mix (decode-heavy, then prefill-heavy): attainment vs rate")
    ax.set_xlabel("requests/s")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    save_figure(fig, out / "disaggregation_shift.png")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args("disaggregation", __doc__.split("\n")[0], argv, _extra)
    cfg = settings(args)
    results, unservable = {}, {}
    for name in args.app or DEFAULT_APPLICATIONS:
        app = APPLICATIONS[name]
        try:
            results[name] = evaluate(app, cfg, args.profile or app.model, args.seed, args.progress)
        except Unservable as exc:
            print(f"{name}: not run: {exc} (more GPUs, --gpus, or larger instances, --tp, would hold it)")
            unservable[name] = str(exc)
    if not results:
        raise SystemExit("no application could be served: " + "; ".join(unservable.values()))
    headers = ["application", "model", "TTFT/TPOT SLO (ms)", "system", "GPUs an instance", "goodput (req/s)",
               "per GPU", "x round-robin", "work cap (req/s)"]
    rows = []
    for name, r in results.items():
        for system, g in r["goodput_rps"].items():
            label = system
            if system == "disaggregated":
                at_once = f", {r['handoffs']} hand-offs at once" if r["handoffs"] != 1 else ""
                label = f"{system} {r['split'][0]}:{r['split'][1]}{at_once}"
            size = r["gpus_per_instance"][system]
            ratio = r["vs_round_robin"][system]
            rows.append([name, f"{r['profile']}, {r['gpus']} GPUs", f"{r['slo_ms']['ttft']:g}/{r['slo_ms']['tpot']:g}",
                         label, size if isinstance(size, int) else f"{size[0]}/{size[1]}", g,
                         r["goodput_per_gpu"][system], ratio if ratio is not None else "n/a (baseline 0)",
                         f"{r['work_cap_rps'][system]:.3g}" + (" (goodput above it: a transient)"
                                                                if r["over_work_cap"][system] else "")])
    title = (f"Goodput per GPU, {cfg['n']} requests a run, tensor-parallel degrees searched: "
             f"{', '.join(map(str, cfg['degrees']))}; prompts first: colocated engines "
             f"{cfg['colocated_prefill_first']} steps, prefill instances {cfg['prefill_first']}")
    print_table(title, headers, rows)
    shift_profile = args.profile or APPLICATIONS["chatbot"].model
    shifted = shift(cfg, shift_profile, args.seed) if not args.no_shift else {"systems": {}}
    shift_headers = ["system", "rate (req/s)", "attainment", "mean TTFT (s)", "mean TPOT (ms)", "role flips",
                     "completed"]
    shift_rows = [[name, r["rate"], r["attainment"], r["mean_ttft_s"], r["mean_tpot_s"] * 1e3, len(r["flips"]),
                   f"{r['completed']}/{r['requests']}"]
                  for name, rs in shifted["systems"].items() for r in rs]
    shift_title = (f"Shifting mix, {cfg['shift_n']} requests (half decode-heavy, then half prefill-heavy), "
                   f"SLO 1500/150 ms, {cfg['shift_gpus']} GPUs of {shift_profile} starting 1:{cfg['shift_gpus'] - 1}")
    if shift_rows:
        print_table(shift_title, shift_headers, shift_rows)
    notes = "\n".join([f"- {name}: {r['source']}" for name, r in results.items()]
                      + [f"- {name}: not run: {why}" for name, why in unservable.items()])
    write_markdown(args.out / "disaggregation.md", "Prefill/decode disaggregation vs colocation",
                   [(title, headers, rows)] + ([(shift_title, shift_headers, shift_rows)] if shift_rows else []),
                   notes=f"Sources:\n{notes}\n- shifting mix: lengths assumed here (mean/P99 prompt 200/600 then "
                         f"2500/4000, output 600/1500 then 30/80), not DistServe's\n")
    plot(results, args.out)
    if shifted["systems"]:
        plot_shift(shifted, args.out)
    data = {"settings": {**cfg, "profile": args.profile, "shift_profile": shift_profile, "seed": args.seed},
            "results": results, "unservable": unservable, "shift": shifted}
    write_json(args.json, data)
    return data


if __name__ == "__main__":
    main()
