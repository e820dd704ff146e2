"""The ``opt-13b-a100`` cost profile against DistServe's published vLLM measurements.

DistServe's artifact (LLMServe/DistServe, Apache-2.0) publishes the per-request records of
real vLLM runs of OPT-13B on one A100 serving its ShareGPT chatbot workload
(``simdistserve/benchmarks/alignment/data-ground-truth/opt-13b-sharegpt/vllm-N-R.exp``:
N requests at R req/s; each record: prompt and output length, issue time, TTFT, TPOT).
``experiments/data/distserve_opt13b_vllm.json`` keeps the fields this check needs of two
of them (100 requests at 1 req/s, 300 at 3 req/s), unchanged.

The check replays each trace, the same requests at the same issue times, on one simulated
colocated instance of the profile (round-robin dispatch, no migration: the vLLM baseline
of ``experiments/disaggregation.py``) and compares each request's TTFT and TPOT with the
measured ones: medians, 90th percentiles, the median of the per-request ratios, by prompt
length, and the SLO attainment at DistServe's chatbot objectives (200 ms / 100 ms). The
engine schedules prompts as vLLM 0.3 did (a prompt-only step whenever a waiting prompt can be
admitted: ``--prefill-first 1000``, the default); ``--prefill-first 0`` replays on the serial
mixed steps of the runs before session 16 (every step also decodes). It also
states the trace's length distribution against the ``chatbot`` application's (Llumnix's
ShareGPT statistics). Nothing is fitted: the profile is the one every experiment uses.

    python experiments/profile_check.py
    python experiments/profile_check.py --quick --json out.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments.common import parse_args, print_table, save_figure, subplots, write_json, write_markdown  # noqa: E402
from experiments.disaggregation import VLLM_PREFILL_FIRST  # noqa: E402
from llumnix_py.engines.batch_scheduler import check_prefill_first_steps  # noqa: E402
from experiments.pd_planner import APPLICATIONS  # noqa: E402
from experiments.workloads import WorkloadRequest  # noqa: E402
from llumnix_py.planner import Layout  # noqa: E402
from llumnix_py.sim import SimCluster  # noqa: E402
from llumnix_py.slo import attainment  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "distserve_opt13b_vllm.json"
PROFILE = "opt-13b-a100"
BUCKETS = ((0, 256), (256, 512), (512, 1024), (1024, 2048), (2048, 1 << 20))


def load(path: Path = DATA) -> dict[str, Any]:
    with open(path) as f:
        data = json.load(f)
    for name, recs in data["traces"].items():
        for r in recs:
            if not (isinstance(r["prompt_len"], int) and r["prompt_len"] > 0 and isinstance(r["output_len"], int)
                    and r["output_len"] > 0):
                raise ValueError(f"{path}: trace {name}: bad lengths in {r}")
    return data


def replay(records: Sequence[dict[str, Any]], seed: int = 0,
           prefill_first: int = VLLM_PREFILL_FIRST) -> tuple[list[float], list[Optional[float]]]:
    """Simulated (TTFT s, TPOT s or None) of each record, in the records' order, on an engine
    that puts prompts first for ``prefill_first`` steps (``EngineConfig.prefill_first_steps``)."""
    start = min(r["issue_time"] for r in records)
    order = sorted(range(len(records)), key=lambda i: records[i]["issue_time"])
    reqs = [WorkloadRequest(records[i]["issue_time"] - start, records[i]["prompt_len"], records[i]["output_len"])
            for i in order]
    layout = Layout(1, dispatch="round_robin", migration=False, engine_prefill_first=prefill_first)
    result = SimCluster(layout.sim_config(PROFILE, seed)).run(reqs, progress=False)
    ttfts, tpots = result.latencies()
    recs = sorted(range(len(result.requests)), key=lambda k: result.requests[k].arrival_time)
    if [(result.requests[k].prompt_len, result.requests[k].output_len) for k in recs] != \
            [(r.prompt_len, r.output_len) for r in reqs]:
        raise RuntimeError("the simulated requests do not match the trace")
    out_ttft: list[float] = [0.0] * len(records)
    out_tpot: list[Optional[float]] = [None] * len(records)
    for k, i in zip(recs, order):
        out_ttft[i], out_tpot[i] = ttfts[k], tpots[k]
    return out_ttft, out_tpot


def _q(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def compare(records: Sequence[dict[str, Any]], seed: int = 0,
            prefill_first: int = VLLM_PREFILL_FIRST) -> dict[str, Any]:
    """Measured against simulated, one trace."""
    sim_ttft, sim_tpot = replay(records, seed, prefill_first)
    meas_ttft = [r["ttft_ms"] / 1e3 for r in records]
    # TPOT is defined from the second token on: one-token requests have none
    pairs = [(r["tpot_ms"] / 1e3, s) for r, s in zip(records, sim_tpot) if r["output_len"] > 1 and s is not None]
    meas_tpot, sim_tpot_2 = [p[0] for p in pairs], [p[1] for p in pairs]
    slo = APPLICATIONS["chatbot"].slo
    by_bucket = []
    for lo, hi in BUCKETS:
        idx = [i for i, r in enumerate(records) if lo <= r["prompt_len"] < hi]
        if idx:
            by_bucket.append({"prompt": f"{lo}-{hi if hi < 1 << 20 else ''}", "requests": len(idx),
                              "ttft_measured_ms": _q([meas_ttft[i] for i in idx], 50) * 1e3,
                              "ttft_simulated_ms": _q([sim_ttft[i] for i in idx], 50) * 1e3})
    meas_tpots_all = [r["tpot_ms"] / 1e3 if r["output_len"] > 1 else None for r in records]
    return {
        "requests": len(records),
        "ttft_ms": {"measured_p50": _q(meas_ttft, 50) * 1e3, "simulated_p50": _q(sim_ttft, 50) * 1e3,
                    "measured_p90": _q(meas_ttft, 90) * 1e3, "simulated_p90": _q(sim_ttft, 90) * 1e3,
                    "ratio_p50": _q([s / m for s, m in zip(sim_ttft, meas_ttft)], 50)},
        "tpot_ms": {"measured_p50": _q(meas_tpot, 50) * 1e3, "simulated_p50": _q(sim_tpot_2, 50) * 1e3,
                    "measured_p90": _q(meas_tpot, 90) * 1e3, "simulated_p90": _q(sim_tpot_2, 90) * 1e3,
                    "ratio_p50": _q([s / m for s, m in zip(sim_tpot_2, meas_tpot)], 50)},
        "attainment": {"measured": attainment(meas_ttft, meas_tpots_all, slo.ttft_s, slo.tpot_s),
                       "simulated": attainment(sim_ttft, sim_tpot, slo.ttft_s, slo.tpot_s)},
        "ttft_by_prompt": by_bucket,
        "points": {"ttft_measured": meas_ttft, "ttft_simulated": sim_ttft, "tpot_measured": meas_tpot,
                   "tpot_simulated": sim_tpot_2},
    }


def lengths(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    p = [r["prompt_len"] for r in records]
    o = [r["output_len"] for r in records]
    return {"prompt_mean": float(np.mean(p)), "prompt_p50": _q(p, 50), "prompt_p99": _q(p, 99),
            "output_mean": float(np.mean(o)), "output_p50": _q(o, 50), "output_p99": _q(o, 99)}


def plot(results: dict[str, Any], out: Path) -> None:
    names = list(results)
    fig, axes = subplots(len(names), 2)
    axes = np.atleast_2d(axes)
    for row, name in zip(axes, names):
        pts = results[name]["points"]
        for ax, key, label in ((row[0], "ttft", "TTFT (s)"), (row[1], "tpot", "TPOT (s)")):
            m, s = pts[f"{key}_measured"], pts[f"{key}_simulated"]
            ax.scatter(m, s, s=6)
            top = max(max(m), max(s))
            ax.plot([0, top], [0, top], color="grey", linewidth=0.8)
            ax.set_xlabel(f"measured {label}")
            ax.set_ylabel(f"simulated {label}")
            ax.set_title(name, fontsize=8)
    save_figure(fig, out / "profile_check.png")


def _extra(ap) -> None:
    ap.add_argument("--prefill-first", type=int, default=VLLM_PREFILL_FIRST, metavar="N",
                    help="the engine prefills waiting prompts alone for up to N steps in a row (default %(default)s: "
                         "vLLM 0.3's prompt-only steps; 0: every step also decodes)")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args("profile_check", __doc__.splitlines()[0], argv, _extra)
    try:
        check_prefill_first_steps(args.prefill_first)
    except ValueError as exc:
        raise SystemExit(f"--prefill-first: {exc}") from None
    data = load()
    names = sorted(data["traces"])
    if args.quick or args.smoke:
        names = names[:1]
    results = {n: compare(data["traces"][n], args.seed, args.prefill_first) for n in names}
    rows, bucket_rows = [], []
    for n in names:
        r = results[n]
        for metric in ("ttft_ms", "tpot_ms"):
            m = r[metric]
            rows.append([n, metric.split("_")[0].upper(), m["measured_p50"], m["simulated_p50"], m["measured_p90"],
                         m["simulated_p90"], m["ratio_p50"]])
        for b in r["ttft_by_prompt"]:
            bucket_rows.append([n, b["prompt"], b["requests"], b["ttft_measured_ms"], b["ttft_simulated_ms"]])
    headers = ["trace", "metric", "measured P50 (ms)", "simulated P50", "measured P90", "simulated P90",
               "median sim/measured"]
    print_table(f"{PROFILE} against DistServe's vLLM measurements (OPT-13B, one A100, ShareGPT; prompts first: "
                f"{args.prefill_first} steps)", headers, rows)
    bucket_headers = ["trace", "prompt tokens", "requests", "measured TTFT P50 (ms)", "simulated TTFT P50 (ms)"]
    print_table("TTFT by prompt length", bucket_headers, bucket_rows)
    att_rows = [[n, results[n]["attainment"]["measured"], results[n]["attainment"]["simulated"]] for n in names]
    att_headers = ["trace", "measured attainment (200/100 ms)", "simulated attainment"]
    print_table("SLO attainment at DistServe's chatbot objectives", att_headers, att_rows)
    trace_lengths = lengths([r for n in sorted(data["traces"]) for r in data["traces"][n]])
    app = APPLICATIONS["chatbot"]
    len_rows = [["DistServe's traces (all records)", trace_lengths["prompt_mean"], trace_lengths["prompt_p99"],
                 trace_lengths["output_mean"], trace_lengths["output_p99"]],
                ["chatbot application (Llumnix Table 1)", app.prompt[0], app.prompt[1], app.output[0], app.output[1]]]
    len_headers = ["lengths", "prompt mean", "prompt P99", "output mean", "output P99"]
    print_table("Length distributions", len_headers, len_rows)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out)
    write_markdown(args.out / "profile_check.md", "opt-13b-a100 against DistServe's vLLM measurements",
                   [("Latencies", headers, rows), ("TTFT by prompt length", bucket_headers, bucket_rows),
                    ("Attainment", att_headers, att_rows), ("Lengths", len_headers, len_rows)])
    summary = {"profile": PROFILE, "source": data["source"], "lengths": trace_lengths,
               "prefill_first": args.prefill_first,
               "traces": {n: {k: v for k, v in r.items() if k != "points"} for n, r in results.items()}}
    write_json(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
