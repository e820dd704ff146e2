"""``experiments/slo_target.py``: the issue-16 target's comparison, on hand-built sweep results."""

from __future__ import annotations

import pytest

from experiments.slo_target import TARGET, knee, target_rows, target_summary

BASELINES = ("fcfs+rr", "llumnix", "edf")


def run(goodput: float, attainment: float, offered: float = 1000.0) -> dict:
    return {"goodput": goodput, "attainment": attainment, "offered": offered}


def sweep(**systems: list[tuple[float, float]]) -> dict:
    """``{system: {rate: run}}`` from ``system=[(goodput, attainment) at rates 10, 20, 30, 40]``."""
    rates = ("10.0", "20.0", "30.0", "40.0")
    return {s.replace("_", "+"): {r: run(g, a, offered=100.0 * float(r)) for r, (g, a) in zip(rates, v)}
            for s, v in systems.items()}


def test_knee_is_the_first_rate_below_90_even_when_attainment_recovers():
    by_rate = {"30.0": run(1, 0.95), "10.0": run(1, 0.99), "20.0": run(1, 0.85), "40.0": run(1, 0.91)}
    assert knee(by_rate) == "20.0"
    assert knee({"10.0": run(1, 0.9), "20.0": run(1, 0.95)}) is None  # exactly 90% is not below
    assert knee({"5": run(1, 0.5), "10": run(1, 0.4)}) == "5"  # compared as numbers, not strings


def test_the_best_baseline_is_the_one_whose_knee_comes_last_and_jit_is_compared_there():
    res = sweep(fcfs_rr=[(900, 0.95), (1500, 0.8), (1800, 0.7), (2000, 0.6)],
                llumnix=[(1000, 0.99), (1900, 0.95), (2200, 0.85), (2400, 0.7)],
                edf=[(1000, 1.0), (2000, 0.99), (2900, 0.96), (3200, 0.8)],
                jit=[(1000, 1.0), (2000, 1.0), (3000, 0.99), (3800, 0.95)],
                jit_oracle=[(1000, 1.0), (2000, 1.0), (3000, 1.0), (3900, 0.97)])
    t = target_summary(res, BASELINES)
    assert t["best"] == "edf" and t["reached"] and t["rate"] == 40.0
    assert t["baseline_goodput"] == 3200 and t["jit_goodput"] == 3800
    assert t["ratio"] == pytest.approx(3800 / 3200)
    assert t["offered"] == 4000 and t["bound"] == pytest.approx(4000 / 3200)
    assert t["met"] is False and t["attainable"] is False  # 1.25 < 1.4: no scheduler could meet it here
    assert t["ratios"]["jit+oracle"] == pytest.approx(3900 / 3200) and t["ratios"]["edf"] == 1.0
    per = t["baselines"]
    assert (per["fcfs+rr"]["knee"], per["llumnix"]["knee"], per["edf"]["knee"]) == (20.0, 30.0, 40.0)
    assert per["llumnix"]["jit_ratio"] == pytest.approx(3000 / 2200)  # JIT over each baseline at its own knee
    assert per["fcfs+rr"]["bound"] == pytest.approx(2000 / 1500)


def test_met_and_attainable_when_jit_is_far_ahead_at_the_knee():
    res = sweep(fcfs_rr=[(900, 0.95), (1000, 0.5), (1000, 0.3), (1000, 0.2)],
                llumnix=[(950, 0.97), (1100, 0.6), (1100, 0.4), (1100, 0.3)],
                edf=[(1000, 0.99), (1200, 0.6), (1200, 0.4), (1200, 0.3)],
                jit=[(1000, 1.0), (1900, 0.96), (2500, 0.85), (2600, 0.7)])
    t = target_summary(res, BASELINES)
    assert t["rate"] == 20.0 and t["best"] == "edf"  # all three knees at 20: the highest goodput there
    assert t["ratio"] == pytest.approx(1900 / 1200) and t["ratio"] >= TARGET and t["met"] is True
    assert t["bound"] == pytest.approx(2000 / 1200) and t["attainable"] is True


def test_a_best_baseline_never_below_90_in_the_sweep_gives_no_ratio():
    res = sweep(fcfs_rr=[(900, 0.95), (1500, 0.8), (1800, 0.7), (2000, 0.6)],
                llumnix=[(1000, 0.99), (1900, 0.95), (2200, 0.85), (2400, 0.7)],
                edf=[(1000, 1.0), (2000, 0.99), (2900, 0.96), (3700, 0.93)],
                jit=[(1000, 1.0), (2000, 1.0), (3000, 0.99), (3800, 0.95)])
    t = target_summary(res, BASELINES)
    assert t["best"] == "edf" and not t["reached"] and t["held_to"] == 40.0
    assert t["rate"] is None and t["ratio"] is None and t["bound"] is None
    assert t["met"] is None and t["attainable"] is None and t["ratios"] == {}
    assert t["baselines"]["edf"] == {"knee": None, "held_to": 40.0, "attainment_at_top": 0.93}
    assert t["baselines"]["llumnix"]["knee"] == 30.0  # the others' knees are still reported
    headers, rows = target_rows({"chat": t})
    assert len(rows) == 3
    edf = dict(zip(headers, next(r for r in rows if r[1] == "edf")))
    assert edf["best"] == "yes" and edf["first rate < 90%"] == ">= 90% to 40" and edf["1.4x met"] == "not reached"
    assert all(r[2] == "" for r in rows if r[1] != "edf")


def test_missing_pieces():
    res = sweep(llumnix=[(1000, 0.99), (1900, 0.95), (2200, 0.85), (2400, 0.7)])
    t = target_summary(res, BASELINES)  # no jit in the sweep: the knee is found, no ratio
    assert t["best"] == "llumnix" and t["rate"] == 30.0 and t["ratio"] is None and t["met"] is None
    assert t["attainable"] is False  # 3000 / 2200 < 1.4
    with pytest.raises(ValueError):
        target_summary({"jit": res["llumnix"]}, BASELINES)
    headers, rows = target_rows({"w": t})
    row = dict(zip(headers, rows[0]))
    assert row["best"] == "yes" and row["jit x it"] == "" and row["1.4x attainable"] == "no"
