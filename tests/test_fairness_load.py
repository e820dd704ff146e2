"""The load sweep of ``experiments/fairness.py`` (``--spreads``): figures, JSON, validation."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from experiments import common, fairness, fairness_load

SYSTEMS = "vllm-swap,swap-per-block,llumnix-py"


def _args(*extra: str):
    args = common.parse_args("fairness", "test", ["--smoke", "--no-progress", "--out", "/tmp/unused", *extra],
                             fairness._extra)
    fairness._smoke(args)
    return args


def test_the_sweep_runs_each_system_at_each_load_and_writes_its_figures(tmp_path):
    js = tmp_path / "sweep.json"
    returned = fairness.main(["--smoke", "--no-progress", "--out", str(tmp_path / "out"), "--json", str(js),
                              "--spreads", "40,5", "--systems", SYSTEMS])
    data = json.loads(js.read_text())
    assert data == json.loads(json.dumps(returned))
    assert "systems" not in data  # the sweep replaces the single-load table
    sweep = data["load_sweep"]
    assert sweep["baseline"] == "vllm-swap" and sweep["target"] == 1.4 and "overloaded" in sweep["overload_rule"]
    assert sweep["spreads_s"] == [5.0, 40.0]  # from the highest load down
    points = sweep["points"]
    assert [p["spread_s"] for p in points] == [5.0, 40.0]
    for p in points:
        assert p["conversation_rate"] == pytest.approx(data["conversations"] / p["spread_s"])
        assert set(p["systems"]) == set(SYSTEMS.split(","))
        base = p["systems"]["vllm-swap"]
        for s in p["systems"].values():
            assert s["requests"] > 0 and s["ttft_p99"] >= s["ttft_p95"] > 0 and s["tbt_p99"] >= s["tbt_p95"] > 0
            for key in fairness_load.RATIO_KEYS:  # the baseline's own figure over the system's own
                assert s[f"{key}_vs_vllm_swap"] == pytest.approx(base[key] / s[key])
            assert s["target_met"] == (s["ttft_p99_vs_vllm_swap"] >= 1.4 and s["tbt_p99_vs_vllm_swap"] >= 1.4)
            # a turn's queue wait is part of its TTFT, so every percentile of it is at most TTFT's
            assert s["tbt_max"] >= s["tbt_p999"] >= s["tbt_p99"]
            assert 0 <= s["queue_wait_p50"] <= s["queue_wait_p99"] <= s["ttft_p99"]
            assert s["queue_share_p99"] == pytest.approx(s["queue_wait_p99"] / s["ttft_p99"])
        assert p["queue_share_p99"] == base["queue_share_p99"]
        assert p["overloaded"] == (base["queue_wait_p99"] >= fairness_load.QUEUE_BOUND * base["ttft_p99"])
        assert all(v == pytest.approx(1.0) for k, v in base.items() if k.endswith("_vs_vllm_swap"))
    # the ratios follow the figures, they are not constant: llumnix-py differs from the baseline
    ours = [p["systems"]["llumnix-py"][f"{k}_vs_vllm_swap"] for p in points for k in fairness_load.RATIO_KEYS]
    assert any(abs(x - 1.0) > 0.05 for x in ours)
    # the higher load queues more, and the mark tells the two loads apart
    heavy, light = (p["systems"]["vllm-swap"] for p in points)
    assert heavy["queue_wait_mean"] > light["queue_wait_mean"]
    assert [p["overloaded"] for p in points] == [True, False]
    png = tmp_path / "out" / "fairness_load.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "out" / "fairness.md").read_text()
    assert "|---|" in md and "llumnix-py" in md and "overloaded" in md


def test_load_point_takes_ratios_from_the_figures_and_marks_overload():
    def summary(ttft_p99, tbt_p99, queue_p99, ttft_p95=1.0, tbt_p95=0.1):
        return {"ttft_p99": ttft_p99, "tbt_p99": tbt_p99, "ttft_p95": ttft_p95, "tbt_p95": tbt_p95,
                "queue_wait_p99": queue_p99}
    point = fairness_load.load_point(10.0, 30, {"vllm-swap": summary(10.0, 0.3, 6.0),
                                                "a": summary(5.0, 0.2, 1.0, tbt_p95=0.0),
                                                "b": summary(4.0, 0.15, 0.0)})
    a, b = point["systems"]["a"], point["systems"]["b"]
    assert a["ttft_p99_vs_vllm_swap"] == pytest.approx(2.0) and a["tbt_p99_vs_vllm_swap"] == pytest.approx(1.5)
    assert a["tbt_p95_vs_vllm_swap"] is None  # no ratio against a zero
    assert a["target_met"] and b["target_met"] is True and b["tbt_p99_vs_vllm_swap"] == pytest.approx(2.0)
    assert point["conversation_rate"] == 3.0 and point["queue_share_p99"] == pytest.approx(0.6)
    assert point["overloaded"]
    light = fairness_load.load_point(10.0, 30, {"vllm-swap": summary(10.0, 0.3, 4.9), "a": summary(9.0, 0.1, 0.0)})
    assert not light["overloaded"] and not light["systems"]["a"]["target_met"]  # 1.11x TTFT misses


def test_every_spread_replays_the_same_conversations():
    args = _args()
    by_spread = {}
    for spread in (10.0, 40.0):
        at = copy.copy(args)
        at.spread = spread
        by_spread[spread] = fairness.make_conversations(at, np.random.default_rng(3))
    a, b = by_spread[10.0], by_spread[40.0]
    assert a and len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.client, x.turns) == (y.client, y.turns)
        assert y.start == pytest.approx(4 * x.start)


@pytest.mark.parametrize("system", ["vllm-swap", "cluster"])
def test_every_turn_has_one_queue_wait_within_its_ttft(system):
    args = _args()
    args.spread = 5.0
    convs = fairness.make_conversations(args, np.random.default_rng(0))
    run = fairness.simulate(fairness.SYSTEMS[system], convs, args, 0)
    assert run.ttft and len(run.queue_wait) == len(run.ttft)
    assert min(run.queue_wait) >= 0 and max(run.queue_wait) > 0  # spread 5 s: some turns wait
    assert sorted(run.queue_wait)[-1] <= sorted(run.ttft)[-1]


@pytest.mark.parametrize("flag,value,match", [
    ("--spreads", "0", "--spreads"), ("--spreads", "-5", "--spreads"), ("--spreads", "x", "--spreads"),
    ("--spreads", "inf", "--spreads"), ("--spreads", "nan", "--spreads"), ("--spreads", "10,10", "--spreads"),
    ("--spreads", ",", "--spreads"), ("--systems", "llumnix-py", "vllm-swap"), ("--systems", "nope", "unknown"),
])
def test_bad_sweep_options_are_refused(tmp_path, flag, value, match):
    argv = ["--smoke", "--no-progress", "--out", str(tmp_path), flag, value]
    if flag != "--spreads":
        argv += ["--spreads", "5,10"]
    with pytest.raises(SystemExit, match=match):
        fairness.main(argv)
