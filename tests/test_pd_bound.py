"""The upper bound on disaggregated goodput (``experiments/pd_bound.py``): its arithmetic by
hand, and that no simulated goodput ever exceeds it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_prompts_that_can_never_meet_the_objective_come_off_the_misses_allowed():
    arrivals, work = [float(k + 1) for k in range(10)], [5.0] + [1.0] * 9
    # the 5 s first prompt is the one allowed miss: 9 s of work by 10 / r
    assert pd_bound.rate_bound(arrivals, work, 1, 0.0, latency_s=[0.0] * 10) == pytest.approx(10 / 9)
    # but if the last prompt can never meet the objective, it is the miss, and the 5 s prompt
    # must meet it: 5 s of work by 1 / r
    late = [0.0] * 9 + [1.0]
    assert pd_bound.rate_bound(arrivals, work, 1, 0.5, latency_s=late) == pytest.approx(1 / 4.5)
    assert pd_bound.rate_bound(arrivals, work, 1, 0.5) == pytest.approx(10 / 8.5)
    # more hopeless prompts than the target allows: no rate serves it
    assert pd_bound.rate_bound(arrivals, work, 1, 0.5, latency_s=[0.0] * 8 + [1.0, 1.0]) == 0.0
    with pytest.raises(ValueError):
        pd_bound.rate_bound(arrivals, work, 1, 0.5, latency_s=[0.0])


def test_the_bound_counts_the_prompts_whose_latency_floor_exceeds_the_ttft():
    # 3,000-token prompts take about 0.51 s on one A100 even alone: TP1 prefill cannot meet a
    # 0.4 s TTFT, TP2 halves the FLOPs time (about 0.27 s) and can
    app = Application("long-prompts", SLO(0.4, 1.0), (3000.0, 3001.0), (2.0, 2.01))
    prof = PROFILES["opt-13b-a100"]
    assert prof.prefill_latency_floor_s(3000) > 0.4
    b = pd_bound.bound(app, 4, (1, 2), 40, "opt-13b-a100", 0)
    assert b["by_degree"][1]["hopeless_share"] == 1.0 and b["by_degree"][1]["rps"] == 0.0
    assert b["by_degree"][2]["hopeless_share"] == 0.0 and b["rps"] == b["by_degree"][2]["rps"] > 0
    assert b["degree"] == 2


def brute_force_rate_bound(arrivals, work, instances, ttft, target=0.9):
    n = len(work)
    may_miss = n - math.ceil(target * n - 1e-9)
    best = math.inf
    for k in range(n):
        must = sorted(work[:k + 1])[:max(k + 1 - may_miss, 0)]
        excess = sum(must) / instances - ttft
        if must and excess > 0:
            best = min(best, arrivals[k] / excess)
    return best


def test_a_cheap_early_prompt_counts_once_dearer_ones_arrive():
    # 10 requests, one may miss: a cheap first prompt, then dear ones. The first ten's nine
    # cheapest are 0.1 s + 8 x 1 s, not 9 x 1 s (which the bound before session 22 took).
    arrivals, work = [float(k + 1) for k in range(10)], [0.1] + [1.0] * 9
    assert pd_bound.rate_bound(arrivals, work, 1, 0.0) == pytest.approx(10 / 8.1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 5.0), st.sampled_from([0.0, 0.05, 0.3, 1.0, 2.5])), min_size=1, max_size=40),
       st.integers(1, 3), st.sampled_from([0.0, 0.1, 1.0]), st.sampled_from([0.5, 0.9, 1.0]))
def test_the_rate_bound_matches_a_brute_force_over_every_prefix(rows, instances, ttft, target):
    gaps, work = zip(*rows)
    arrivals = [float(a) for a in np.cumsum(gaps)]
    expected = brute_force_rate_bound(arrivals, list(work), instances, ttft, target)
    got = pd_bound.rate_bound(arrivals, list(work), instances, ttft, target)
    assert got == pytest.approx(expected, rel=1e-9) if math.isfinite(expected) else got == math.inf


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
                "memory_rps", "memory_ratio", "work_rps", "work_ratio", "colocated_long_rps", "two_x_reachable"):
        assert key in r, key
    assert r["ideal_rps"] <= r["bound_rps"]
    assert r["colocated_long_rps"] is None and r["memory_ratio"] == pytest.approx(r["memory_rps"] / r["colocated_rps"])
    assert r["bound_long_rps"] is None
    assert r["work_rps"] <= r["memory_rps"] and r["work_ratio"] == pytest.approx(r["work_rps"] / r["colocated_rps"])
    assert r["two_x_reachable"] == (r["bound_rps"] >= 2 * r["colocated_rps"] > 0
                                    and r["memory_rps"] >= 2 * r["colocated_rps"]
                                    and r["work_rps"] >= 2 * r["colocated_rps"])
    assert json.loads((tmp_path / "b.json").read_text())["results"]["chatbot, 3 GPUs"]["bound_rps"] == r["bound_rps"]
    md = (out / "pd_bound.md").read_text()
    assert (out / "pd_bound.png").stat().st_size > 0 and "bound" in md and "work cap" in md


def test_the_experiment_refuses_bad_flags(tmp_path):
    with pytest.raises(SystemExit):
        pd_bound.main(["--smoke", "--gpus", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        pd_bound.main(["--smoke", "--tp", "x", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        pd_bound.main(["--smoke", "--long", "0", "--out", str(tmp_path)])


@pytest.mark.parametrize("fused", [True, False])
def test_no_simulated_run_reads_its_decode_context_faster_than_the_memory_cap_allows(fused):
    # Two instances of LLaMA-7B on an A10 (about 9,000 tokens of KV each), driven far past what
    # their pools hold: requests queue, are preempted and recomputed. However the engine batched,
    # the context its decode steps read (every finished request's, counted as the cap counts it)
    # cannot exceed each instance's busy seconds at its most K / floor(K) tokens a second.
    import dataclasses as dc

    from llumnix_py.sim import SimCluster, SimConfig

    profile = dc.replace(PROFILES["llama-7b-a10"], fused_mixed_steps=fused)
    app = Application("memory-bound", SLO(1.0, 1.0), (400.0, 1200.0), (300.0, 700.0), model="llama-7b-a10")
    requests = make_requests(app, 60, 40.0, 3)
    cluster = SimCluster(SimConfig(num_instances=2, profile=profile, seed=0))
    result = cluster.run(requests, progress=False)
    assert all(r.done for r in result.requests)
    capacity = 0.0  # context tokens a second, over the busy seconds of each instance
    for inst in cluster.instances.values():
        k = inst.engine.config.num_blocks * inst.engine.config.block_size
        prof = inst.profile or profile
        capacity += inst.core.stats.busy_s * k / prof.decode_step_floor_s(k)
    reads = sum(planner.decode_reads(requests))
    assert reads <= capacity
    # and the run was bound by memory, so the check is not vacuous: within 3x of the cap
    assert reads > capacity / 3
    assert sum(r.preemptions for r in result.requests) > 0


def test_the_memory_cap_by_hand():
    app = Application("one", SLO(1.0, 1.0), (100.0, 101.0), (11.0, 11.1))
    requests = make_requests(app, 5, 1.0, 0)
    assert planner.decode_reads(requests) == [(r.output_len - 1) * r.prompt_len
                                              + (r.output_len - 1) * r.output_len // 2 for r in requests]
    cap = pd_bound.budget_memory_cap(app, 4, (1, 2), 5, "opt-13b-a100", 0)
    prof = PROFILES["opt-13b-a100"]
    k = prof.num_blocks * prof.block_size
    one = 4 * k / prof.decode_step_floor_s(k) / (sum(planner.decode_reads(requests)) / 5)
    assert cap["by_degree"][1]["rps"] == pytest.approx(one)
    # a degree that holds more KV a GPU (the weights split over more GPUs) reads more a unit
    assert cap["rps"] == max(row["rps"] for row in cap["by_degree"].values()) == cap["by_degree"][2]["rps"] > one


def test_the_budget_s_work_cap_by_hand():
    from llumnix_py.engines.sim.profiles import with_tensor_parallel

    app = Application("one", SLO(1.0, 1.0), (1000.0, 1001.0), (101.0, 101.1))
    requests = make_requests(app, 5, 1.0, 0)
    profs = {d: with_tensor_parallel(PROFILES["opt-13b-a100"], d) for d in (1, 2)}
    # each prompt prefilled at the degree cheapest in GPU-seconds, each context token read there too
    prefill = [min(d * p.prefill_work_s(r.prompt_len) for d, p in profs.items()) for r in requests]
    per_read = min(d / p.decode_read_ceiling for d, p in profs.items())
    reads = planner.decode_reads(requests)
    cap = pd_bound.budget_work_cap(app, 4, (1, 2), 5, "opt-13b-a100", 0)
    assert cap["adds"] and cap["prefill_unit_s"] == pytest.approx(sum(prefill) / 5, rel=1e-12)
    assert cap["read_unit_s"] == pytest.approx(sum(reads) / 5 * per_read, rel=1e-12)
    assert cap["rps"] == pytest.approx(4 / (sum(prefill) / 5 + sum(reads) / 5 * per_read), rel=1e-12)
    # tighter than the memory cap, which leaves the prefill work out
    assert cap["rps"] < pd_bound.budget_memory_cap(app, 4, (1, 2), 5, "opt-13b-a100", 0)["rps"]
    # degrees wider than the budget are not instances of it
    assert pd_bound.budget_work_cap(app, 1, (1, 2), 5, "opt-13b-a100", 0)["rps"] == pytest.approx(
        1 / (sum(profs[1].prefill_work_s(r.prompt_len) for r in requests) / 5
             + sum(reads) / 5 / profs[1].decode_read_ceiling), rel=1e-12)


def test_no_simulated_run_prefills_and_reads_faster_than_the_work_cap_allows():
    # Two serial instances of LLaMA-7B on an A10, driven past what they hold with long prompts and
    # long outputs: each instance's busy seconds hold its prompts' prefill work plus its decode
    # reads at the read ceiling, however it batched, chunked or recomputed.
    from llumnix_py.sim import SimCluster, SimConfig

    profile = PROFILES["llama-7b-a10"]
    assert profile.prefill_and_decode_add
    app = Application("work-bound", SLO(1.0, 1.0), (800.0, 2400.0), (100.0, 400.0), model="llama-7b-a10")
    requests = make_requests(app, 60, 40.0, 5)
    cluster = SimCluster(SimConfig(num_instances=2, profile=profile, seed=0))
    result = cluster.run(requests, progress=False)
    assert all(r.done for r in result.requests)
    busy = sum(inst.core.stats.busy_s for inst in cluster.instances.values())
    needed = sum(profile.prefill_work_s(r.prompt_len) for r in requests) \
        + sum(planner.decode_reads(requests)) / profile.decode_read_ceiling
    assert needed <= busy
    # and not vacuous: the run spent most of its busy time on that work, and both terms count
    # (the prefill work is over a fifth of it: the memory cap, reads alone, is that much looser)
    assert needed > busy / 2
    assert sum(profile.prefill_work_s(r.prompt_len) for r in requests) > needed / 5


def test_long_runs_measure_the_baseline_and_the_bound_again(tmp_path):
    data = pd_bound.main(["--smoke", "--no-progress", "--app", "chatbot", "--gpus", "2", "--tp", "1", "--long", "2",
                          "--out", str(tmp_path / "out")])
    r = data["results"]["chatbot, 2 GPUs"]
    assert data["settings"]["long"] == 2 and r["long_requests"] == 60
    assert r["colocated_long_rps"] == r["colocated_long_by_degree"][1] >= 0
    assert r["bound_long_rps"] == pd_bound.bound(pd_bound.APPLICATIONS["chatbot"], 2, (1,), 60, "opt-13b-a100", 0)["rps"]
    assert r["memory_ratio"] == (r["memory_rps"] / r["colocated_long_rps"] if r["colocated_long_rps"] > 0 else None)
    assert r["work_rps"] == pytest.approx(pd_bound.budget_work_cap(pd_bound.APPLICATIONS["chatbot"], 2, (1,), 60,
                                                                   "opt-13b-a100", 0)["rps"])
    assert r["work_rps"] <= r["memory_rps"] and r["work_prefill_unit_s"] > 0 and r["work_read_unit_s"] > 0
    assert r["work_ratio"] == (r["work_rps"] / r["colocated_long_rps"] if r["colocated_long_rps"] > 0 else None)
    assert r["two_x_reachable"] == (r["bound_rps"] >= 2 * r["colocated_rps"] > 0
                                    and r["memory_rps"] >= 2 * r["colocated_long_rps"]
                                    and r["work_rps"] >= 2 * r["colocated_long_rps"]
                                    and r["bound_long_rps"] >= 2 * r["colocated_long_rps"])
