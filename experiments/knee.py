"""The knee sweep of the serving experiment: rates through both knees, seeds, run lengths.

For each trace, rate, seed and system, one workload of the longest length is drawn
(``make_workload(trace, longest, rate, seed)``) and replayed whole and as its first
requests (e.g. 2,500 / 5,000 / 10,000), so the lengths compare the same workload.
``analyse`` turns the P99 prefill latencies into capacities, gains, overload marks
and the largest ratio in the window (``experiments.capacity``); ``tables`` and
``plot`` present them. ``experiments/serving.py`` drives it.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Optional, Sequence

from experiments import capacity, common
from experiments.workloads import make_workload
from llumnix_py import planner
from llumnix_py.sim.config import SimConfig
from llumnix_py.sim.metrics import SimResult

# What each knee point keeps of ``SimResult.summary()``.
POINT_KEYS = ("prefill_p99", "prefill_mean", "preemption_loss", "migrations", "migrations_per_request_max",
              "migrations_per_request_p99", "migration_return_rate", "migration_caused_preemptions", "wall_s")


def prefix_point(res: SimResult, n: int) -> dict:
    """A knee point of the first ``n`` requests (in workload order) of a longer run: every
    ``POINT_KEYS`` number over those requests and their migrations only (``wall_s`` is
    the whole run's)."""
    if not 0 < n <= len(res.requests):
        raise ValueError(f"a prefix of {n} requests of a run of {len(res.requests)}")
    first = res.requests[:n]
    ids = {r.request_id for r in first}
    part = dataclasses.replace(res, requests=first, migrations=[m for m in res.migrations if m.request_id in ids],
                               migration_records=[m for m in res.migration_records if m["request_id"] in ids])
    return common.pick(part.summary(), POINT_KEYS)


def run_sweep(traces: Sequence[str], rates: dict[str, Sequence[float]], systems: Sequence[str],
              seeds: Sequence[int], lengths: Sequence[int], instances: int, progress: bool,
              prefixes: bool = False) -> dict:
    """``{trace: {system: {rate: {seed: {length: point}}}}}`` (numbers as ``POINT_KEYS``).

    Each length replays the workload's first ``length`` requests as a run of its own;
    with ``prefixes``, only the longest runs and each shorter length is the point of its
    first requests in that run (``prefix_point``: 1.75x cheaper for 2,500 / 5,000 / 10,000;
    a request's prefill latency depends on the requests before it, and requests after it
    only through the instances they share while it waits).
    """
    from tqdm import tqdm

    lengths = sorted(lengths)
    runs = 1 if prefixes else len(lengths)
    total = sum(len(rates[t]) for t in traces) * len(seeds) * len(systems) * runs
    out: dict = {}
    with tqdm(total=total, disable=not progress, unit="run", desc="knee sweep") as bar:
        for trace in traces:
            for rate in rates[trace]:
                for seed in seeds:
                    workload = make_workload(trace, lengths[-1], rate, seed=seed)
                    for system in systems:
                        by_len = out.setdefault(trace, {}).setdefault(system, {}).setdefault(rate, {}) \
                            .setdefault(seed, {})
                        if prefixes:
                            res = common.simulate(workload, system, instances, seed=seed)
                            by_len.update({n: prefix_point(res, n) for n in lengths})
                            bar.update(1)
                            continue
                        for n in lengths:
                            res = common.simulate(workload[:n], system, instances, seed=seed)
                            by_len[n] = common.pick(res.summary(), POINT_KEYS)
                            bar.update(1)
    return out


def p99_of(sweep_trace: dict) -> dict:
    """The ``capacity`` module's input: ``{system: {rate: {seed: {length: P99 prefill}}}}``."""
    return {system: {rate: {seed: {n: pt["prefill_p99"] for n, pt in by_len.items()}
                            for seed, by_len in by_seed.items()}
                     for rate, by_seed in by_rate.items()}
            for system, by_rate in sweep_trace.items()}


def analyse(sweep: dict, objectives: Sequence[float], growth: float) -> dict:
    """Per trace: capacities, gains of Llumnix (and of a memory reference over the system it
    scales), overload marks, largest ratio in the window."""
    out: dict = {}
    for trace, by_system in sweep.items():
        p99 = p99_of(by_system)
        caps = capacity.capacities(p99, objectives)
        marks = capacity.overload_marks(p99, growth)
        ours_all = [s for s in by_system if s.startswith("llumnix")]
        gains: dict = {}
        window: dict = {}
        for ours in ours_all:
            for base in by_system:
                if base == ours:
                    continue
                g = capacity.gains(caps, ours, base)
                if g:
                    gains.setdefault(ours, {})[base] = g
                if not base.startswith("llumnix"):
                    w = capacity.largest_ratio(p99, base, ours, marks)
                    if w:
                        window.setdefault(ours, {})[base] = w
        for ref in by_system:  # a memory reference ("infaas++@kv-x1.1") over the system it scales
            base = ref.partition("@")[0]
            if base != ref and base in by_system:
                g = capacity.gains(caps, ref, base)
                if g:
                    gains.setdefault(ref, {})[base] = g
        out[trace] = {"capacity": caps, "gains": gains, "overload": marks, "largest_ratio": window,
                      "main_length": capacity.main_length(p99)}
    return out


def work_caps(traces: Sequence[str], seeds: Sequence[int], n: int, instances: int) -> dict[str, dict[str, float]]:
    """``{trace: {seed: rps}}``: the rate no scheduler can sustain on ``instances`` instances of the
    profile the sweep simulates (``SimConfig``'s default, LLaMA-7B on an A10) with the first ``n``
    requests of each seed's workload, by the prefill work and decode reads they need
    (``llumnix_py.planner.work_cap``)."""
    layout, profile = planner.Layout(instances, None), SimConfig().profile
    return {t: {str(seed): planner.work_cap(layout, profile, make_workload(t, n, 1.0, seed=seed))
                for seed in seeds} for t in traces}


def capacity_shares(analysis: dict, caps: dict[str, dict[str, float]]) -> dict:
    """``{trace: {system: {objective: spread}}}``: each seed's capacity over its work cap, for the
    systems that run the profile's instances as they are (not a memory reference such as
    ``infaas++@kv-x1.1``, whose pools are larger). A share near 1 leaves no scheduler room to
    gain; a share above 1 is a capacity the run's prefill latencies show but the cluster could
    not sustain (the work left undone when the run ends: a long tail's decodes)."""
    out: dict = {}
    for trace, a in analysis.items():
        for system, by_obj in a["capacity"].items():
            if "num_blocks" in common.SYSTEM_SIM.get(system, {}):
                continue
            for obj, entry in by_obj.items():
                shares = [v / caps[trace][seed] for seed, v in entry.get("per_seed", {}).items()
                          if seed in caps.get(trace, {})]
                if shares:
                    out.setdefault(trace, {}).setdefault(system, {})[obj] = capacity.spread(shares)
    return out


def headroom_table(caps: dict[str, dict[str, float]], shares: dict,
                   objectives: Sequence[float]) -> tuple[list[str], list[list]]:
    """The work caps and each system's capacity over them (``work_caps``, ``capacity_shares``)."""
    obj_keys = [f"{o:g}" for o in objectives]
    headers = ["trace", "work cap (req/s), per seed", "system"] + [f"capacity at P99 <= {k} s / work cap"
                                                                    for k in obj_keys]
    rows = [[t, " / ".join(f"{c:.3g}" for c in caps[t].values()), system]
            + [f"{e['median']:.2f} [{e['min']:.2f}-{e['max']:.2f}]" if e else "-"
               for e in (by_obj.get(k) for k in obj_keys)]
            for t, by_sys in shares.items() for system, by_obj in by_sys.items()]
    return headers, rows


def to_json(sweep: dict, analysis: dict) -> dict:
    """String keys throughout (rates, seeds, lengths)."""
    points = {t: {s: {str(r): {str(seed): {str(n): pt for n, pt in by_len.items()}
                               for seed, by_len in by_seed.items()}
                      for r, by_seed in by_rate.items()}
                  for s, by_rate in by_sys.items()}
              for t, by_sys in sweep.items()}
    an = {t: {**a, "overload": {s: {str(r): m for r, m in by_rate.items()} for s, by_rate in a["overload"].items()}}
          for t, a in analysis.items()}
    return {"points": points, "analysis": an}


def load_points(paths: Sequence[Path]) -> tuple[dict, dict]:
    """The knee points of earlier ``serving.py --json`` runs merged (numeric keys again),
    and their setup. A sweep can run in chunks (one file per system, or per seed with
    ``--seed S --seeds 1``): points of one system from several files are merged by seed,
    and the setup's seeds are the union. Every system of a trace must end up with the same
    rates and seeds, and the files must share run lengths and instances. A point found in
    two files (sweeps that share an edge rate) is kept once if both runs measured the same
    (the simulator is deterministic: only ``wall_s`` may differ), else it is an error."""
    import json

    sweep: dict = {}
    setup: Optional[dict] = None
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "knee" not in data:
            raise SystemExit(f"--from-json: {path} has no knee sweep")
        if setup is None:
            setup = dict(data["setup"], seeds=[])
        elif ((data["setup"]["lengths"], data["setup"]["instances"], data["setup"].get("prefixes", False))
              != (setup["lengths"], setup["instances"], setup.get("prefixes", False))):
            raise SystemExit(f"--from-json: {path} has other run lengths, instances or prefix mode than {paths[0]}")
        setup["seeds"] = sorted(set(setup["seeds"]) | {int(s) for s in data["setup"]["seeds"]})
        for trace, by_sys in data["knee"]["points"].items():
            for system, by_rate in by_sys.items():
                mine = sweep.setdefault(trace, {}).setdefault(system, {})
                for r, by_seed in by_rate.items():
                    for seed, by_len in by_seed.items():
                        point = {int(n): pt for n, pt in by_len.items()}
                        known = mine.setdefault(float(r), {}).get(int(seed))
                        if known is not None and _measured(known) != _measured(point):
                            raise SystemExit(f"--from-json: {trace} {system} at {r} req/s, seed {seed} "
                                             f"is in two files with different results")
                        mine[float(r)][int(seed)] = known or point
    if not sweep or setup is None:
        raise SystemExit("--from-json: no knee points")
    for trace, by_sys in sweep.items():
        shapes = {(tuple(sorted(by_rate)), tuple(sorted({s for b in by_rate.values() for s in b})))
                  for by_rate in by_sys.values()}
        if len(shapes) != 1:
            raise SystemExit(f"--from-json: the runs of {trace} do not share rates and seeds")
    return sweep, setup


def _measured(point: dict) -> dict:
    """A point's figures without its wall-clock time (the one field two replays may differ in)."""
    return {n: {k: v for k, v in pt.items() if k != "wall_s"} for n, pt in point.items()}


def _cap_cell(entry: dict) -> str:
    if not entry:
        return "-"
    cens = set(entry["censored"].values())
    mark = ">=" if cens == {"above"} else "<=" if cens == {"below"} else "~" if cens else ""
    return f"{mark}{entry['median']:.3g} [{entry['min']:.3g}-{entry['max']:.3g}]"


def _gain_cell(g: Optional[dict]) -> str:
    if not g:
        return "-"
    cens = " (bound)" if g["censored"] else ""
    return f"{100 * g['median']:+.0f}% [{100 * g['min']:+.0f}% to {100 * g['max']:+.0f}%]{cens}"


def tables(analysis: dict, sweep: dict, objectives: Sequence[float]) -> dict[str, tuple[list[str], list[list]]]:
    """The capacity, gain, window and point tables (headers, rows)."""
    obj_keys = [f"{o:g}" for o in objectives]
    cap_rows, gain_rows, window_rows, point_rows = [], [], [], []
    for trace, a in analysis.items():
        for system, by_obj in a["capacity"].items():
            cap_rows.append([trace, system] + [_cap_cell(by_obj.get(k, {})) for k in obj_keys])
        for ours, by_base in a["gains"].items():
            for base, by_obj in by_base.items():
                gain_rows.append([trace, f"{ours} over {base}"] + [_gain_cell(by_obj.get(k)) for k in obj_keys])
        for ours, by_base in a["largest_ratio"].items():
            for base, w in by_base.items():
                bo, oo = w["base_overloaded"], w["ours_overloaded"]
                window_rows.append([trace, f"{base} / {ours}", w["rate"], f"{w['ratio']['median']:.3g}x "
                                    f"[{w['ratio']['min']:.3g}-{w['ratio']['max']:.3g}]",
                                    f"{bo['overloaded_seeds']}/{bo['seeds']}",
                                    f"{oo['overloaded_seeds']}/{oo['seeds']}"])
        n = a["main_length"]
        for system, by_rate in sweep[trace].items():
            for rate in sorted(by_rate):
                by_seed = by_rate[rate]
                lengths = sorted(next(iter(by_seed.values())))
                med = {m: statistics.median(by_seed[s][m]["prefill_p99"] for s in by_seed) for m in lengths}
                mark = a["overload"][system][rate]

                def median(key: str) -> float:
                    return float(statistics.median(by_seed[s][n][key] for s in by_seed))
                point_rows.append([trace, rate, system, " / ".join(f"{med[m]:.3g}" for m in lengths),
                                   f"{mark['overloaded_seeds']}/{mark['seeds']}" + (" OVER" if mark["overloaded"]
                                                                                     else ""),
                                   median("preemption_loss"), median("migration_return_rate"),
                                   median("migrations_per_request_max"), median("migration_caused_preemptions")])
    lengths_label = "P99 prefill median (s) at " + " / ".join(str(m) for m in _lengths(sweep)) + " requests"
    return {
        "capacity": (["trace", "system"] + [f"rate at P99 prefill <= {k} s" for k in obj_keys], cap_rows),
        "gains": (["trace", "capacity gain"] + [f"P99 <= {k} s" for k in obj_keys], gain_rows),
        "window": (["trace", "baseline / Llumnix", "rate", "largest P99 ratio (a point)",
                    "baseline overloaded (seeds)", "Llumnix overloaded (seeds)"], window_rows),
        "points": (["trace", "rate", "system", lengths_label, "overloaded (seeds)", "preempt loss",
                    "migration return rate", "max migrations/request", "migration-caused preemptions"], point_rows),
    }


def _lengths(sweep: dict) -> list[int]:
    for by_sys in sweep.values():
        for by_rate in by_sys.values():
            for by_seed in by_rate.values():
                for by_len in by_seed.values():
                    return sorted(by_len)
    return []


def plot(analysis: dict, sweep: dict, objectives: Sequence[float], path: Path, line_objective: float) -> None:
    """P99 prefill (median, min-max band over seeds) against rate, one panel per trace, with
    the objectives (dotted) and each system's capacity at ``line_objective`` (dashed).
    Hollow markers: overloaded points (P99 grows with run length)."""
    traces = list(sweep)
    fig, axes = common.subplots(1, len(traces), width=3.6, height=3.0)
    for c, trace in enumerate(traces):
        ax = axes[0][c]
        n = analysis[trace]["main_length"]
        for i, (system, by_rate) in enumerate(sweep[trace].items()):
            color = f"C{i}"
            rates = sorted(by_rate)
            vals = [[by_rate[r][s][n]["prefill_p99"] for s in by_rate[r]] for r in rates]
            med = [statistics.median(v) for v in vals]
            ax.plot(rates, med, color=color, label=system)
            ax.fill_between(rates, [min(v) for v in vals], [max(v) for v in vals], color=color, alpha=0.15)
            over = [analysis[trace]["overload"][system][r]["overloaded"] for r in rates]
            ax.scatter([r for r, o in zip(rates, over) if not o], [m for m, o in zip(med, over) if not o],
                       color=color, s=14)
            ax.scatter([r for r, o in zip(rates, over) if o], [m for m, o in zip(med, over) if o],
                       facecolors="none", edgecolors=color, s=18)
            cap = analysis[trace]["capacity"][system].get(f"{line_objective:g}")
            if cap:
                ax.axvline(cap["median"], color=color, linestyle="--", linewidth=0.9)
        for obj in objectives:
            ax.axhline(obj, color="gray", linestyle=":", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(trace)
        ax.set_xlabel("rate (req/s)")
        if c == 0:
            ax.set_ylabel(f"P99 prefill (s), {n} requests")
    axes[0][0].legend(fontsize=7)
    common.save_figure(fig, path)
