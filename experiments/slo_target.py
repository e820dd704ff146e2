"""The SLO target's comparison (issue 16), stated from one rate sweep: pure functions over its results.

The target: "JIT goodput at least 1.4x the best baseline, at the rate where that baseline's attainment
first falls below 90%". Our reading:

* a baseline's *knee* is the lowest swept rate at which its attainment is below 90% (attainment need
  not fall monotonically; the first rate below counts). A baseline that stays at or above 90% at
  every swept rate has no knee in the sweep;
* *the best baseline* is the one whose knee comes last: it keeps 90% attainment up to the highest
  load, so it is the hardest to beat there. A baseline with no knee in the sweep comes after every
  baseline with one; then the sweep never takes the best baseline below 90% and the target's
  comparison is not reached (no ratio is given, rather than one at another rate). Baselines with the
  same knee are ranked by their goodput there (the higher, the harder for JIT); baselines without a
  knee by their attainment at the top of the sweep;
* the ratio is JIT's goodput over the best baseline's, both at the best baseline's knee, from the
  same run (same requests and seed).

The bound: at a rate, no scheduler's goodput exceeds the offered output tokens per second of the
workload (every request served within its objective), so no scheduler is more than
``offered / goodput`` times a baseline there. When that bound is under 1.4, the target cannot be met
at that point by any scheduler.

Input: ``{system: {rate: {"goodput": ..., "attainment": ..., "offered": ...}}}`` for one workload,
rates as strings, as in ``experiments/slo.py``'s JSON ``results``.
"""

from __future__ import annotations

from typing import Optional, Sequence

ATTAINMENT = 0.9  # the attainment a baseline must keep
TARGET = 1.4  # JIT's goodput over the best baseline's, at its knee


def knee(by_rate: dict[str, dict]) -> Optional[str]:
    """The lowest rate (its key) at which attainment is below :data:`ATTAINMENT` (None: never in the sweep)."""
    below = [r for r, v in by_rate.items() if v["attainment"] < ATTAINMENT]
    return min(below, key=float) if below else None


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num is not None and den else None


def _at_knee(by_sys: dict[str, dict], baseline: str, jit: str) -> dict:
    """One baseline's knee, its goodput there, JIT's ratio over it and the bound on any scheduler's."""
    by_rate = by_sys[baseline]
    r = knee(by_rate)
    if r is None:
        top = max(by_rate, key=float)
        return {"knee": None, "held_to": float(top), "attainment_at_top": by_rate[top]["attainment"]}
    v = by_rate[r]
    j = by_sys.get(jit, {}).get(r)
    return {"knee": float(r), "attainment": v["attainment"], "goodput": v["goodput"],
            "jit_goodput": j["goodput"] if j else None, "jit_attainment": j["attainment"] if j else None,
            "jit_ratio": _ratio(j["goodput"] if j else None, v["goodput"]),
            "offered": v.get("offered"), "bound": _ratio(v.get("offered"), v["goodput"])}


def target_summary(by_sys: dict[str, dict], baselines: Sequence[str], jit: str = "jit") -> dict:
    """The target's comparison on one workload's sweep (see the module docstring for the reading).

    Returns ``{"baselines": {b: per-baseline knee, goodput, JIT ratio, bound}, "best": b,
    "reached": bool, "rate", "baseline_goodput", "jit_goodput", "ratio", "offered", "bound",
    "ratios": {system: goodput / best baseline's} at the knee, "met": ratio >= 1.4,
    "attainable": bound >= 1.4}``; when not reached, ``rate``, ``ratio``, ``bound``, ``met`` and
    ``attainable`` are None and ``held_to`` is the top of the sweep.

    Raises:
        ValueError: no baseline is in ``by_sys``.
    """
    present = [b for b in baselines if b in by_sys]
    if not present:
        raise ValueError(f"none of the baselines {list(baselines)} in the results")
    per = {b: _at_knee(by_sys, b, jit) for b in present}

    def hardness(b: str) -> tuple:
        k = per[b]
        return (1, k["held_to"], k["attainment_at_top"]) if k["knee"] is None else (0, k["knee"], k["goodput"])

    best = max(present, key=hardness)
    k = per[best]
    out = {"baselines": per, "best": best, "reached": k["knee"] is not None, "target": TARGET}
    if k["knee"] is None:
        out.update(rate=None, held_to=k["held_to"], baseline_goodput=None, jit_goodput=None, ratio=None,
                   offered=None, bound=None, ratios={}, met=None, attainable=None)
        return out
    r = next(key for key in by_sys[best] if float(key) == k["knee"])
    ratios = {s: _ratio(v[r]["goodput"], k["goodput"]) for s, v in by_sys.items() if r in v}
    out.update(rate=k["knee"], baseline_goodput=k["goodput"], jit_goodput=k["jit_goodput"], ratio=k["jit_ratio"],
               offered=k["offered"], bound=k["bound"], ratios=ratios,
               met=k["jit_ratio"] >= TARGET if k["jit_ratio"] is not None else None,
               attainable=k["bound"] >= TARGET if k["bound"] is not None else None)
    return out


def target_rows(summaries: dict[str, dict]) -> tuple[list[str], list[list]]:
    """A table of :func:`target_summary` per workload: one row per baseline, the best one marked."""
    headers = ["workload", "baseline", "best", "first rate < 90%", "its attainment", "its goodput",
               "jit goodput", "jit x it", "offered (tok/s)", "bound: any x it", "1.4x met", "1.4x attainable"]
    rows = []
    for w, t in summaries.items():
        for b, k in t["baselines"].items():
            best = b == t["best"]
            if k["knee"] is None:
                rows.append([w, b, "yes" if best else "", f">= 90% to {k['held_to']:g}", "", "", "", "", "", "",
                             "not reached" if best else "", ""])
                continue
            rows.append([w, b, "yes" if best else "", k["knee"], k["attainment"], k["goodput"],
                         _blank(k["jit_goodput"]), _blank(k["jit_ratio"]), _blank(k["offered"]), _blank(k["bound"]),
                         _yes_no(t["met"]) if best else "", _yes_no(t["attainable"]) if best else ""])
    return headers, rows


def _blank(v: Optional[float]):
    return "" if v is None else v


def _yes_no(v: Optional[bool]) -> str:
    return "" if v is None else ("yes" if v else "no")
