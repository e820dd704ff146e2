"""The upper bound on disaggregated goodput (``experiments/pd_bound.py``): its arithmetic by
hand, and that no simulated goodput ever exceeds it."""

from __future__ import annotations

import json
import math

import pytest

from experiments import pd_bound
from experiments.pd_planner import Application, goodput, make_requests, plan
from llumnix_py import planner
from llumnix_py.engines.sim.profiles import PROFILES
from llumnix_py.planner import Layout
from llumnix_py.slo import SLO


def test_the_rate_bound_by_hand():
    # 10 requests arriving at 1, 2, ..., 10 (rate 1), one second of prefill each, one instance:
    # 9 must meet the objective. With T = 0 the 9 cheapest of the first 10 need 9 s by 10 / r.
    arrivals, work = [float(k + 1) for k in range(10)], [1.0] * 10
    assert pd_bound.rate_bound(arrivals, work, 1, 0.0) == pytest.approx(10 / 9)
    # With T = 1 s: 9 s of work by 10 / r + 1, so r <= 10 / 8.
    assert pd_bound.rate_bound(arrivals, work, 1, 1.0) == pytest.approx(10 / 8)
    # Two instances halve the work a second: the first 10 need 4.5 s by 10 / r.
    assert pd_bound.rate_bound(arrivals, work, 2, 0.0) == pytest.approx(10 / 4.5)
    # The one request allowed to miss is the dearest: a 5 s first prompt does not bind.
    assert pd_bound.rate_bound(arrivals, [5.0] + [1.0] * 9, 1, 0.0) == pytest.approx(10 / 9)
    # Work that never exceeds the objective does not bound the rate.
    assert pd_bound.rate_bound(arrivals, [0.01] * 10, 1, 1.0) == math.inf


@pytest.mark.parametrize("args", [([], [], 1, 0.1), ([1.0], [1.0, 2.0], 1, 0.1), ([1.0], [1.0], 0, 0.1),
                                  ([1.0], [1.0], 1, -1.0), ([1.0], [-1.0], 1, 0.1)])
def test_the_rate_bound_refuses_bad_input(args):
    with pytest.raises(ValueError):
        pd_bound.rate_bound(*args)


def test_arrivals_scale_with_the_rate_as_the_bound_assumes():
    app = Application("a", SLO(1.0, 1.0), (100.0, 200.0), (10.0, 20.0))
    one, three = make_requests(app, 50, 1.0, 7), make_requests(app, 50, 3.0, 7)
    assert [r.arrival_time / 3 for r in one] == pytest.approx([r.arrival_time for r in three])
    assert [r.prompt_len for r in one] == [r.prompt_len for r in three]


# Long prompts, two output tokens, loose objectives on opt-13b-a100 with 3 GPUs: prefill binds.
PREFILL_HEAVY = Application("prefill-heavy", SLO(1.0, 1.0), (2000.0, 2001.0), (2.0, 2.01))


def test_no_simulated_goodput_exceeds_the_bound():
    n, profile = 80, "opt-13b-a100"
    b = pd_bound.bound(PREFILL_HEAVY, 3, (1,), n, profile, 0)
    assert (b["prefill_instances"], b["decode_gpus"]) == (2, 1)  # one GPU must decode
    ranked = plan(PREFILL_HEAVY, 3, n, profile, exact=True, iterations=6)
    assert 0 < max(r["goodput_rps"] for r in ranked) <= b["rps"]
    ideal = planner.goodput(pd_bound.prefill_only(PREFILL_HEAVY, n, 0), Layout(2, None, "round_robin", False),
                            PREFILL_HEAVY.slo, profile, iterations=6)
    assert max(r["goodput_rps"] for r in ranked) <= ideal <= b["rps"]
    # The same bound with every instance prefilling holds colocation too.
    sample = make_requests(PREFILL_HEAVY, n, 1.0, 0)
    work = pd_bound.prompt_work(PROFILES[profile], [r.prompt_len for r in sample])
    colocated = goodput(PREFILL_HEAVY, Layout(3, None, "round_robin", False), n, profile, iterations=6)
    assert 0 < colocated <= pd_bound.rate_bound([r.arrival_time for r in sample], work, 3, PREFILL_HEAVY.slo.ttft_s)


def test_the_experiment_writes_its_table_plot_and_json(tmp_path):
    out = tmp_path / "out"
    data = pd_bound.main(["--smoke", "--no-progress", "--app", "chatbot", "--gpus", "3", "--tp", "1",
                          "--out", str(out), "--json", str(tmp_path / "b.json")])
    r = data["results"]["chatbot, 3 GPUs"]
    for key in ("colocated_rps", "prefill_utilisation", "bound_rps", "bound_ratio", "ideal_rps", "ideal_ratio",
                "two_x_reachable"):
        assert key in r, key
    assert r["ideal_rps"] <= r["bound_rps"]
    assert r["two_x_reachable"] == (r["bound_rps"] >= 2 * r["colocated_rps"] > 0)
    assert json.loads((tmp_path / "b.json").read_text())["results"]["chatbot, 3 GPUs"]["bound_rps"] == r["bound_rps"]
    assert (out / "pd_bound.png").stat().st_size > 0 and "bound" in (out / "pd_bound.md").read_text()


def test_the_experiment_refuses_bad_flags(tmp_path):
    with pytest.raises(SystemExit):
        pd_bound.main(["--smoke", "--gpus", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        pd_bound.main(["--smoke", "--tp", "x", "--out", str(tmp_path)])
