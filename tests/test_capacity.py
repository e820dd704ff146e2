"""experiments/capacity.py: capacity at an objective, overload marks, gains and the window ratio."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from experiments import capacity


def test_capacity_interpolates_in_log_p99_between_the_last_rate_under_and_the_first_over():
    cap, cens = capacity.capacity_one([1.0, 2.0, 3.0], [1.0, 2.0, 8.0], 4.0)
    assert cens is None
    assert cap == pytest.approx(2.5)  # log 4 is halfway between log 2 and log 8


def test_capacity_is_a_bound_when_the_sweep_does_not_cross_the_objective():
    assert capacity.capacity_one([1.0, 2.0], [0.5, 0.9], 2.0) == (2.0, "above")
    assert capacity.capacity_one([1.0, 2.0], [3.0, 9.0], 2.0) == (1.0, "below")


def test_capacity_takes_the_first_crossing():
    # A noisy dip back under the objective past the knee does not raise the capacity.
    cap, cens = capacity.capacity_one([1.0, 2.0, 3.0, 4.0], [1.0, 10.0, 1.5, 20.0], 5.0)
    assert cens is None and 1.0 < cap < 2.0


@pytest.mark.parametrize("rates,p99s,obj", [([], [], 1.0), ([2.0, 1.0], [1.0, 1.0], 1.0), ([1.0], [1.0], 0.0),
                                            ([1.0, 2.0], [1.0], 1.0)])
def test_capacity_rejects_bad_input(rates, p99s, obj):
    with pytest.raises(ValueError):
        capacity.capacity_one(rates, p99s, obj)


@given(st.lists(st.floats(0.01, 1000.0), min_size=1, max_size=8), st.floats(0.1, 100.0))
def test_capacity_lies_in_the_swept_range_and_below_the_first_rate_over(p99s, objective):
    rates = [1.0 + 0.5 * i for i in range(len(p99s))]
    cap, cens = capacity.capacity_one(rates, p99s, objective)
    assert rates[0] <= cap <= rates[-1]
    over = [r for r, y in zip(rates, p99s) if y > objective]
    if over:
        assert cap <= over[0]
        assert cens == ("below" if over[0] == rates[0] else None)
    else:
        assert (cap, cens) == (rates[-1], "above")


def test_overloaded_when_p99_grows_with_run_length():
    assert capacity.is_overloaded({2500: 10.0, 5000: 30.0, 10000: 80.0})
    assert not capacity.is_overloaded({2500: 1.3, 5000: 1.4, 10000: 1.35})
    assert not capacity.is_overloaded({2500: 10.0, 5000: 40.0, 10000: 20.0})  # not monotone at the end
    assert not capacity.is_overloaded({10000: 80.0})


def sweep() -> dict:
    """Two systems, three rates, two seeds, two lengths: base saturates at 2, ours at 3."""
    def point(short: float, long: float) -> dict:
        return {100: short, 200: long}
    base = {1.0: {0: point(1.0, 1.0), 1: point(1.0, 1.1)},
            2.0: {0: point(5.0, 20.0), 1: point(4.0, 16.0)},
            3.0: {0: point(30.0, 90.0), 1: point(30.0, 100.0)}}
    ours = {1.0: {0: point(1.0, 1.0), 1: point(1.0, 1.0)},
            2.0: {0: point(1.0, 1.2), 1: point(1.0, 1.1)},
            3.0: {0: point(6.0, 20.0), 1: point(5.0, 10.0)}}
    return {"base": base, "ours": ours}


def test_capacities_gains_marks_and_the_window_ratio():
    p99 = sweep()
    caps = capacity.capacities(p99, [5.0])
    assert set(caps) == {"base", "ours"}
    b, o = caps["base"]["5"], caps["ours"]["5"]
    assert b["n"] == o["n"] == 2 and not b["censored"] and not o["censored"]
    assert 1.0 < b["min"] <= b["median"] <= b["max"] < 2.0
    assert 2.0 < o["min"] <= o["max"] < 3.0
    gains = capacity.gains(caps, "ours", "base")
    assert gains["5"]["min"] > 0 and gains["5"]["n"] == 2
    per_seed = [caps["ours"]["5"]["per_seed"][s] / caps["base"]["5"]["per_seed"][s] - 1 for s in ("0", "1")]
    assert gains["5"]["median"] == pytest.approx(sum(per_seed) / 2)
    marks = capacity.overload_marks(p99)
    assert marks["base"][2.0]["overloaded"] and not marks["base"][1.0]["overloaded"]
    assert not marks["ours"][2.0]["overloaded"] and marks["ours"][3.0]["overloaded_seeds"] == 2
    window = capacity.largest_ratio(p99, "base", "ours", marks)
    assert window["rate"] == 2.0  # 20/1.2 and 16/1.1 beat 90/20 and 100/10 at the median
    assert window["ratio"]["median"] == pytest.approx((20 / 1.2 + 16 / 1.1) / 2)
    assert window["base_overloaded"]["overloaded"] and not window["ours_overloaded"]["overloaded"]
    assert math.isclose(capacity.main_length(p99), 200)


def test_a_memory_reference_gains_over_the_system_it_scales_and_is_no_llumnix():
    from experiments import knee

    p99 = sweep()
    by_system = {"infaas++": p99["base"], "infaas++@kv-x1.1": p99["ours"], "llumnix": p99["ours"]}
    per_length = {s: {r: {seed: {n: {"prefill_p99": v} for n, v in by_len.items()} for seed, by_len in by_seed.items()}
                      for r, by_seed in by_rate.items()} for s, by_rate in by_system.items()}
    gains = knee.analyse({"L-L": per_length}, [5.0], 1.5)["L-L"]["gains"]
    assert set(gains) == {"llumnix", "infaas++@kv-x1.1"}
    assert set(gains["infaas++@kv-x1.1"]) == {"infaas++"}  # over its own base only
    assert gains["infaas++@kv-x1.1"]["infaas++"]["5"]["min"] > 0
    assert set(gains["llumnix"]) == {"infaas++", "infaas++@kv-x1.1"}
    assert gains["llumnix"]["infaas++@kv-x1.1"]["5"]["median"] == pytest.approx(0.0)


def _chunk(tmp_path, name: str, system: str, seeds: list[int]) -> Path:
    """A ``serving.py --json`` file holding one system's points of the given seeds."""
    import json

    from experiments import knee

    by_rate = {r: {s: {n: {"prefill_p99": p} for n, p in by_len.items()} for s, by_len in by_seed.items() if s in seeds}
               for r, by_seed in sweep()[system].items()}
    data = {"knee": knee.to_json({"L-L": {system: by_rate}}, {}),
            "setup": {"seeds": seeds, "lengths": [100, 200], "instances": 16}}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_load_points_merges_a_sweep_run_in_chunks_by_system_and_seed(tmp_path):
    from experiments import knee

    files = [_chunk(tmp_path, f"{sys_}-{s}.json", sys_, [s]) for sys_ in ("base", "ours") for s in (0, 1)]
    merged, setup = knee.load_points(files)
    assert setup["seeds"] == [0, 1]
    for system in ("base", "ours"):
        got = {r: {s: {n: pt["prefill_p99"] for n, pt in by_len.items()} for s, by_len in by_seed.items()}
               for r, by_seed in merged["L-L"][system].items()}
        assert got == sweep()[system]


def test_load_points_refuses_a_point_in_two_files_and_mismatched_setups(tmp_path):
    import json

    from experiments import knee

    a = _chunk(tmp_path, "a.json", "base", [0])
    # the same deterministic replay in two files (sweeps sharing an edge rate): kept once
    again = json.loads(a.read_text())
    for by_seed in again["knee"]["points"]["L-L"]["base"].values():
        for by_len in by_seed.values():
            for pt in by_len.values():
                pt["wall_s"] = 99.0
    b = tmp_path / "b.json"
    b.write_text(json.dumps(again))
    merged, _ = knee.load_points([a, b])
    assert merged == knee.load_points([a])[0]
    # a point that differs between two files is an error
    differs = json.loads(a.read_text())
    first = next(iter(differs["knee"]["points"]["L-L"]["base"].values()))
    next(iter(next(iter(first.values())).values()))["prefill_p99"] += 1.0
    b.write_text(json.dumps(differs))
    with pytest.raises(SystemExit, match="in two files with different results"):
        knee.load_points([a, b])
    other = json.loads(a.read_text())
    other["setup"]["lengths"] = [100, 400]
    c = tmp_path / "c.json"
    c.write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="run lengths"):
        knee.load_points([_chunk(tmp_path, "d.json", "ours", [0]), c])
    with pytest.raises(SystemExit, match="do not share rates and seeds"):
        knee.load_points([a, _chunk(tmp_path, "e.json", "ours", [0, 1])])


def test_prefix_point_is_the_summary_of_the_first_requests_of_a_longer_run():
    import numpy as np

    from experiments import common, knee
    from experiments.workloads import make_workload

    workload = make_workload("L-L", 60, 6.0, seed=3)
    res = common.simulate(workload, "llumnix", 4, seed=3)
    whole = knee.prefix_point(res, 60)
    assert {k: v for k, v in whole.items() if k != "wall_s"} == \
        {k: v for k, v in common.pick(res.summary(), knee.POINT_KEYS).items() if k != "wall_s"}
    first = knee.prefix_point(res, 20)
    lat = [r.prefill_latency for r in res.requests[:20]]
    assert first["prefill_p99"] == pytest.approx(float(np.percentile(lat, 99)))
    assert first["prefill_mean"] == pytest.approx(float(np.mean(lat)))
    moved = {r.request_id for r in res.requests[:20] if r.migrations}
    assert first["migrations"] == sum(1 for m in res.migrations
                                      if m.request_id in moved and m.status.name == "FINISHED")
    with pytest.raises(ValueError):
        knee.prefix_point(res, 61)


def test_a_prefix_sweep_runs_each_point_once_and_reports_every_length():
    from experiments import knee

    args = (["L-L"], {"L-L": (4.0,)}, ["infaas++"], [0], [20, 40], 4, False)
    by_len = knee.run_sweep(*args, prefixes=True)["L-L"]["infaas++"][4.0][0]
    apart = knee.run_sweep(*args)["L-L"]["infaas++"][4.0][0]
    assert set(by_len) == set(apart) == {20, 40}
    # the longest length is the same run either way (the simulator is deterministic)
    assert by_len[40]["prefill_p99"] == apart[40]["prefill_p99"]
    assert by_len[20]["prefill_mean"] > 0


def test_capacity_shares_divide_each_seed_by_its_work_cap_and_skip_memory_references():
    from experiments import knee

    entry = {"per_seed": {"0": 3.0, "1": 4.0}, "censored": {}, "median": 3.5, "min": 3.0, "max": 4.0, "n": 2}
    analysis = {"L-L": {"capacity": {"infaas++": {"5": entry}, "infaas++@kv-x1.1": {"5": entry}}}}
    shares = knee.capacity_shares(analysis, {"L-L": {"0": 4.0, "1": 5.0}})
    assert set(shares["L-L"]) == {"infaas++"}  # a larger pool has a larger cap: not compared with this one
    got = shares["L-L"]["infaas++"]["5"]
    assert (got["min"], got["max"], got["n"]) == (pytest.approx(0.75), pytest.approx(0.8), 2)
