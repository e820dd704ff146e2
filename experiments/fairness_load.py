"""The load sweep of ``experiments/fairness.py`` (``--spreads``): its figures, table and plot.

The simulation stays in ``fairness.py``; this module only turns the systems' summaries
at each load into the sweep's figures (pure functions over dictionaries).

Load: the conversations start uniformly within ``spread`` seconds (``--spread``), so a
smaller spread is a higher load; the same seed gives the same conversations at every
spread (the same turns and lengths, the starts scaled with the spread). The offered load
is reported as conversations started per second (``conversation_rate``).

Overloaded: a load is marked overloaded when the baseline's (``vllm-swap``) P99 queue wait
is at least ``QUEUE_BOUND`` of its P99 TTFT, i.e. when the queue, not the prefill or the
context switches, sets the TTFT tail. A turn's queue wait runs from its arrival to the
start of the first step that computes any of its tokens. The makespan (virtual seconds
until the last turn ended) is reported beside it.

Load sweep (``--spreads 20,40,80,160``): the chosen systems (``--systems``, default
``vllm-swap,swap-per-block,llumnix-py,-reuse``) run side by side at each spread (the
conversations start uniformly within that many seconds: a smaller spread is a higher
load), on the same conversations (same seed: the same turns and lengths, the starts
scaled with the spread). Per load: P95/P99 TTFT and TBT of each system, their ratios
against ``vllm-swap`` (its figure / the system's), the P99 queue wait (a turn's arrival
to the first step that computes it), the fairness gap, the stall share (of the engine's
step time, the part spent waiting on KV copies) and the makespan, and whether the
load is overloaded: ``vllm-swap``'s P99 queue wait is at least half its P99 TTFT (the
queue sets the TTFT tail; ``experiments/fairness_load.py``). The sweep replaces the
single-load table; its JSON is ``{"conversations", "turns", "load_sweep": {"baseline",
"target", "overload_rule", "spreads_s", "points": [{"spread_s", "conversation_rate",
"queue_share_p99", "overloaded", "systems": {name: {...the single-load keys...,
"queue_wait_p50", "queue_wait_p99", "queue_wait_mean", "tbt_p999", "tbt_max", "ttft_p99_vs_vllm_swap",
"tbt_p99_vs_vllm_swap", "ttft_p95_vs_vllm_swap", "tbt_p95_vs_vllm_swap", "target_met",
"queue_share_p99"}}}]}}``; the plot is ``fairness_load.png`` (P99 TTFT and TBT ratios
against the offered load). Without ``--spreads`` the output is as before.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from experiments import common

BASELINE = "vllm-swap"
TARGET = 1.4  # issue 17: at least 1.4x better P99 TTFT and P99 TBT than the baseline
QUEUE_BOUND = 0.5
DEFAULT_SYSTEMS = ("vllm-swap", "swap-per-block", "llumnix-py", "-reuse")
RATIO_KEYS = ("ttft_p99", "tbt_p99", "ttft_p95", "tbt_p95")
OVERLOAD_RULE = (f"overloaded when {BASELINE}'s P99 queue wait (arrival to the first step computing the turn) "
                 f"is at least {QUEUE_BOUND:g} of its P99 TTFT")


def parse_spreads(text: str, flag: str = "--spreads") -> list[float]:
    """Distinct positive finite spreads (seconds), sorted from the highest load (smallest spread) down."""
    try:
        spreads = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: not a comma list of seconds: {text!r}") from None
    if not spreads:
        raise SystemExit(f"{flag}: no spread given: {text!r}")
    if any(not (s > 0 and math.isfinite(s)) for s in spreads):
        raise SystemExit(f"{flag}: spreads must be positive and finite: {text!r}")
    if len(set(spreads)) != len(spreads):
        raise SystemExit(f"{flag}: a spread is given twice: {text!r}")
    return sorted(spreads)


def queue_figures(waits: Sequence[float]) -> dict:
    """Median, P99 and mean queue wait (seconds) of the turns."""
    if not waits:
        return {"queue_wait_p50": 0.0, "queue_wait_p99": 0.0, "queue_wait_mean": 0.0}
    return {"queue_wait_p50": float(np.percentile(waits, 50)), "queue_wait_p99": float(np.percentile(waits, 99)),
            "queue_wait_mean": float(np.mean(waits))}


def tbt_tail(tbt: Sequence[float]) -> dict:
    """P99.9 and largest TBT (seconds): the shape of the tail beyond P99."""
    if not tbt:
        return {"tbt_p999": 0.0, "tbt_max": 0.0}
    return {"tbt_p999": float(np.percentile(tbt, 99.9)), "tbt_max": float(max(tbt))}


def _ratio(base: float, ours: float) -> Optional[float]:
    return base / ours if ours > 0 else None


def load_point(spread: float, conversations: int, summaries: dict[str, dict]) -> dict:
    """One load of the sweep: each system's summary with its ratios against the baseline
    (``<key>_vs_vllm_swap`` = the baseline's figure / this one's, ``None`` if this one's is 0),
    whether it meets the target on both P99s, and whether the load is overloaded."""
    base = summaries[BASELINE]
    systems = {}
    for name, s in summaries.items():
        r = dict(s)
        for key in RATIO_KEYS:
            r[f"{key}_vs_vllm_swap"] = _ratio(base[key], s[key])
        ttft_x, tbt_x = r["ttft_p99_vs_vllm_swap"], r["tbt_p99_vs_vllm_swap"]
        r["target_met"] = ttft_x is not None and tbt_x is not None and ttft_x >= TARGET and tbt_x >= TARGET
        r["queue_share_p99"] = s["queue_wait_p99"] / s["ttft_p99"] if s["ttft_p99"] > 0 else 0.0
        systems[name] = r
    share = systems[BASELINE]["queue_share_p99"]
    return {"spread_s": spread, "conversation_rate": conversations / spread, "queue_share_p99": share,
            "overloaded": share >= QUEUE_BOUND, "systems": systems}


def sweep_json(points: list[dict]) -> dict:
    """The ``load_sweep`` entry of the JSON."""
    return {"baseline": BASELINE, "target": TARGET, "overload_rule": OVERLOAD_RULE,
            "spreads_s": [p["spread_s"] for p in points], "points": points}


HEADERS = ["spread s", "conv/s", "overloaded", "system", "TTFT P95", "TTFT P99", "TBT P95", "TBT P99",
           "P99 TTFT x", "P99 TBT x", "P95 TTFT x", "P95 TBT x", "queue mean", "queue P99", "queue share",
           "fairness gap", "preempt", "stall share", "makespan"]


def table_rows(points: list[dict]) -> list[list]:
    """One row per load and system (x = the baseline's figure / this one's)."""
    rows = []
    for p in points:
        for name, s in p["systems"].items():
            rows.append([p["spread_s"], p["conversation_rate"], "yes" if p["overloaded"] else "no", name,
                         s["ttft_p95"], s["ttft_p99"], s["tbt_p95"], s["tbt_p99"],
                         s["ttft_p99_vs_vllm_swap"], s["tbt_p99_vs_vllm_swap"], s["ttft_p95_vs_vllm_swap"],
                         s["tbt_p95_vs_vllm_swap"], s["queue_wait_mean"], s["queue_wait_p99"], s["queue_share_p99"],
                         s["fairness_gap"], s["preemptions"], s["stall_share"], s["makespan_s"]])
    return rows


def plot(points: list[dict], path: Path) -> None:
    """P99 TTFT and P99 TBT ratios against the baseline, per system, over the offered load;
    overloaded loads hollow, the target and parity dashed."""
    fig, axes = common.subplots(1, 2, width=4.2, height=3.2)
    names = [n for n in points[0]["systems"] if n != BASELINE]
    rates = [p["conversation_rate"] for p in points]
    for ax, (key, label) in zip(axes[0], [("ttft_p99_vs_vllm_swap", f"P99 TTFT: {BASELINE} / system"),
                                          ("tbt_p99_vs_vllm_swap", f"P99 TBT: {BASELINE} / system")]):
        for name in names:
            ys = [p["systems"][name][key] for p in points]
            xs = [x for x, y in zip(rates, ys) if y is not None]
            line, = ax.plot(xs, [y for y in ys if y is not None], marker="o", label=name)
            over = [(x, p["systems"][name][key]) for x, p in zip(rates, points)
                    if p["overloaded"] and p["systems"][name][key] is not None]
            if over:
                ax.scatter(*zip(*over), s=70, facecolors="white", edgecolors=line.get_color(), zorder=3)
        ax.axhline(TARGET, color="grey", linestyle="--", linewidth=0.8)
        ax.axhline(1.0, color="black", linestyle=":", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xticks(rates, [common.fmt(x) for x in rates], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("conversations started per second (hollow: overloaded)")
        ax.set_ylabel(label)
        ax.legend(fontsize=6)
    common.save_figure(fig, path)
