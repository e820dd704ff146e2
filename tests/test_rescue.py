"""Across instances: rescue migration and SLO-aware dispatch (``policies/rescue.py``) as pure
functions on hand-built snapshots, in the global scheduler's migration round, and a rescue
over the real stack (built-in engine, local runtime) that keeps the request's tokens exact."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec, PolicyConfig, SchedulerConfig
from llumnix_py.engines.types import Objective, SamplingParams
from llumnix_py.frontend.cluster import Cluster
from llumnix_py.load import InstanceLoad, RequestLoad
from llumnix_py.scheduler.core import GlobalScheduler
from policies.dispatch import DispatchState
from policies.rescue import by_slo, dispatch_margin, margin_there, plan_rescues, rescue_cost
from tests.cluster_helpers import SMALL_MODEL, HoldOutputs, assert_no_leak, prompts, reference, wait_all, wait_for


def req(rid, *, next_m=math.inf, end_m=math.inf, remaining=100, blocks=2, migrating=False):
    return RequestLoad(request_id=rid, num_blocks=blocks, blocks_needed=blocks, slo_margin_next_s=next_m,
                       slo_margin_end_s=end_m, slo_remaining=remaining, migrating=migrating)


def inst(iid, running=(), *, step=0.05, step_next=0.06, free=100, terminating=False):
    return InstanceLoad(instance_id=iid, total_blocks=200, used_blocks=200 - free, running=tuple(running),
                        step_s=step, step_s_next=step_next, terminating=terminating)


def test_margin_there_gains_from_a_faster_batch_and_pays_the_copy():
    r = req("r", end_m=-1.0, remaining=101, blocks=10)
    src, dst = inst("a", step=0.05), inst("b", step=0.01, step_next=0.02)
    assert margin_there(r, src, dst, copy_s_per_block=0.01) == pytest.approx(-1.0 + 100 * 0.03 - 0.1)
    late_stream = req("s", next_m=-0.5, end_m=5.0)  # its next token is already late: no batch helps it
    assert margin_there(late_stream, src, dst, 0.0) < 0


def test_a_request_about_to_miss_is_rescued_to_where_it_is_predicted_to_meet():
    a = inst("a", [req("miss", end_m=-1.0), req("fine", end_m=3.0)], step=0.05)
    b = inst("b", [], step=0.01, step_next=0.02)
    c = inst("c", [], step=0.04, step_next=0.045)
    (r,) = plan_rescues([a, b, c], copy_s_per_block=0.01)
    assert (r.request_id, r.src, r.dst) == ("miss", "a", "b")
    assert r.margin_here_s == -1.0 and r.margin_there_s > 0


def test_no_rescue_when_nowhere_is_better_or_there_is_no_room():
    a = inst("a", [req("miss", end_m=-1.0)], step=0.05)
    assert plan_rescues([a, inst("b", step=0.05, step_next=0.06)], 0.01) == []  # not faster elsewhere
    assert plan_rescues([a, inst("b", step=0.01, step_next=0.02, free=2)], 0.01) == []  # no room
    assert plan_rescues([a, inst("b", step=0.01, step_next=0.02, terminating=True)], 0.01) == []
    assert plan_rescues([a, inst("b", step=0.01, step_next=0.02)], 0.01, busy=frozenset({"b"})) == []
    moving = inst("a", [req("miss", end_m=-1.0, migrating=True)], step=0.05)
    assert plan_rescues([moving, inst("b", step=0.01, step_next=0.02)], 0.01) == []
    unknown = inst("b", step=0.0, step_next=0.0)  # an engine that predicts nothing takes no part
    assert plan_rescues([a, unknown], 0.01) == []


def test_a_rescue_never_breaks_the_destinations_met_requests():
    a = inst("a", [req("miss", end_m=-1.0)], step=0.05)
    tight = inst("b", [req("just-met", end_m=0.5, remaining=101)], step=0.01, step_next=0.02)  # +1 step: -0.5
    assert plan_rescues([a, tight], 0.0) == []


def test_one_rescue_per_source_and_destination_best_margin_first():
    a = inst("a", [req("x", end_m=-1.0), req("y", end_m=-0.1)], step=0.05)
    b = inst("b", step=0.01, step_next=0.02)
    c = inst("c", step=0.02, step_next=0.03)
    rescues = plan_rescues([a, b, c], 0.0)
    assert len(rescues) == 1 and rescues[0].src == "a" and rescues[0].dst == "b"
    assert rescues[0].request_id == "y"  # the best predicted margin there


def test_slo_dispatch_picks_the_most_margin_and_falls_back_to_freeness():
    fast = inst("fast", step=0.01, step_next=0.012)
    slow = inst("slow", step=0.05, step_next=0.06)
    queued = InstanceLoad(instance_id="queued", total_blocks=200, used_blocks=0, step_s=0.01, step_s_next=0.012,
                          queue_s=30.0)
    r = RequestLoad.queued("r", prompt_len=100, block_size=16)
    cfg = PolicyConfig(dispatch="slo")
    stream = RequestLoad(**{**r.__dict__, "ttft_s": 1.0, "tbt_s": 0.05})
    assert by_slo([slow, fast, queued], stream, cfg, DispatchState()) == "fast"
    assert dispatch_margin(queued, stream) < 0 < dispatch_margin(fast, stream)
    deadline = RequestLoad(**{**r.__dict__, "deadline_s": 20.0})
    assert by_slo([slow, queued, fast], deadline, cfg, DispatchState()) == "fast"
    # no objective: freeness, as today (the emptier instance)
    full = InstanceLoad(instance_id="full", total_blocks=200, used_blocks=190, step_s=0.01, step_s_next=0.012)
    empty = InstanceLoad(instance_id="empty", total_blocks=200, used_blocks=0, step_s=0.05, step_s_next=0.06)
    assert by_slo([full, empty], r, cfg, DispatchState()) == "empty"


def test_a_resumed_request_is_predicted_to_prefill_its_delivered_tokens_too():
    i = InstanceLoad(instance_id="i", total_blocks=200, used_blocks=0, step_s=0.01, step_s_next=0.01,
                     prefill_s_per_token=0.001)
    new = RequestLoad(**{**RequestLoad.queued("r", prompt_len=100, block_size=16).__dict__, "deadline_s": 10.0})
    resumed = dataclasses.replace(new, output_len=50)  # 50 tokens delivered before its instance died
    assert dispatch_margin(i, new, expected_len=1) - dispatch_margin(i, resumed, expected_len=1) == \
        pytest.approx(50 * 0.001)


def test_scheduler_orders_rescues_before_balancing():
    sched = GlobalScheduler(SchedulerConfig(policy=PolicyConfig(rescue=True, migrate_out_threshold=-1e9)))
    for iid, load in (("a", inst("a", [req("miss", end_m=-1.0)], step=0.05)),
                      ("b", inst("b", step=0.01, step_next=0.02))):
        sched.register(iid, iid, 0.0)
        sched.on_load(iid, load, 0.0)
    (order,) = sched.migration_round(1.0)
    assert (order.request_id, order.src, order.dst, order.waiting) == ("miss", "a", "b", False)
    assert sched.num_rescues == 1
    assert sched.migration_round(2.0) == []  # one migration in flight per instance
    off = GlobalScheduler(SchedulerConfig(policy=PolicyConfig(migrate_out_threshold=-1e9)))
    for iid, load in (("a", inst("a", [req("miss", end_m=-1.0)])), ("b", inst("b", step=0.01))):
        off.register(iid, iid, 0.0)
        off.on_load(iid, load, 0.0)
    assert off.migration_round(1.0) == []  # rescue is off by default


def test_jit_engine_publishes_margins_for_the_scheduler():
    from tests.test_jit_policy import req as engine_req
    from tests.test_jit_policy import sim_engine, step_time, Clock
    from llumnix_py.engines.jit_batch import JitBatchPolicy
    from policies.length import LengthPrior

    clock = Clock()
    e = sim_engine(num_blocks=64, policy=JitBatchPolicy(clock, step_time, LengthPrior(), estimator="oracle"))
    e.add_request(engine_req("d", 10, 101, Objective(deadline_ms=500)))
    e.add_request(engine_req("b", 10, 5))
    e.step()
    load = e.load()
    assert load.step_s == pytest.approx(step_time(0, 2, 1)) and load.step_s_next > 0
    d = next(r for r in load.running if r.request_id == "d")
    assert d.slo_remaining == 100  # the oracle: 101 - 1 generated
    assert d.slo_margin_end_s == pytest.approx(0.5 - (0.01 + 99 * 0.01))
    b = next(r for r in load.running if r.request_id == "b")
    assert b.slo_margin_s == math.inf


# ----- over the real stack --------------------------------------------------------------------


def test_rescue_migration_on_the_built_in_engine_keeps_tokens_exact():
    """Two requests with a deadline run on one instance whose (injected) predicted step time
    makes them miss; an empty instance joins where they are predicted to meet it. Balancing is
    off (threshold far below any freeness), so every migration is a rescue; the migrated
    requests' tokens equal an unmigrated run's."""
    engine = EngineSpec(engine=EngineConfig(num_blocks=128, max_batch_size=32, batch_policy="jit",
                                            length_estimator="oracle"), model=SMALL_MODEL)
    policy = PolicyConfig(rescue=True, migrate_out_threshold=-1e9, rescue_copy_s_per_block=0.0)
    cfg = ClusterConfig(num_instances=1, runtime="local", engine=engine,
                        scheduler=SchedulerConfig(policy=policy, poll_interval_s=0.01, migration_interval_s=0.02))
    max_tokens = 200
    ps = prompts(2)
    expected = reference(EngineSpec(engine=EngineConfig(num_blocks=128, max_batch_size=32), model=SMALL_MODEL),
                         ps, max_tokens)

    def slow_when_full(prefill: int, decodes: int, ctx: int) -> float:  # 1 s per step from two requests on
        return 1.0 if decodes >= 2 else 0.1

    cluster = Cluster.start(cfg)
    try:
        first = cluster.control.instance("instance-000").llumlet.engine
        first.scheduler.batch_policy.step_time = slow_when_full
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        with HoldOutputs(cluster, "instance-000") as gate:
            gate.hold()
            obj = Objective(deadline_ms=100_000.0)  # 100 s: ~200 s of 1 s steps here, ~20 s of 0.1 s alone
            handles = [cluster.submit(p, sp, objective=obj) for p in ps]
            gate.run_until(lambda: len(first.load().running) == 2, "both requests running")
            (new,) = cluster.control.daemon.launch(1)
            wait_for(lambda: new in cluster.instance_ids(), what="the new instance")
            cluster.control.instance(new).llumlet.engine.scheduler.batch_policy.step_time = slow_when_full
            wait_for(lambda: cluster.control.instance(new).stats()["migrations_in"] >= 1,
                     what="a rescue migration into the new instance")
        got = wait_all(handles)
        assert got == expected
        moved = [h for h in handles if len(set(h.instances_seen)) > 1]
        assert moved and all(h.instances_seen[-1] == new for h in moved)
        assert cluster.control.daemon.core.num_rescues >= 1
        assert_no_leak(cluster)
    finally:
        cluster.stop()


@pytest.mark.parametrize("kw", [{"rescue": 1}, {"rescue_copy_s_per_block": -1.0},
                                {"rescue_copy_s_per_block": math.nan}, {"slo_expected_len": 0}])
def test_policy_config_refuses_bad_slo_settings(kw):
    with pytest.raises(ValueError):
        PolicyConfig(**kw)


@pytest.mark.parametrize("kw", [{"batch_policy": "lifo"}, {"length_estimator": "psychic"}, {"length_quantile": 0.0},
                                {"length_quantile": 1.5}])
def test_engine_and_sim_configs_refuse_unknown_batch_settings(kw):
    from llumnix_py.sim.config import SimConfig

    with pytest.raises(ValueError):
        EngineConfig(**kw)
    with pytest.raises(ValueError):
        SimConfig(**kw)


# ----- the migration cost from measured link bandwidth ----------------------------------------


def test_the_rescue_cost_comes_from_the_measured_link_else_the_constant():
    r = req("r", blocks=10)
    src = dataclasses.replace(inst("a"), kv_block_bytes=1_000_000)
    assert rescue_cost(r, src, 0.5, gbps=2.0) == pytest.approx(10 * 1e6 / 2e9)
    assert rescue_cost(r, src, 0.5, gbps=None) == pytest.approx(5.0)  # not measured: the constant
    assert rescue_cost(r, inst("a"), 0.5, gbps=2.0) == pytest.approx(5.0)  # block size unknown: the constant


def test_a_slow_measured_link_stops_a_rescue_the_constant_would_allow():
    a = dataclasses.replace(inst("a", [req("miss", end_m=-1.0, remaining=101, blocks=10)], step=0.05),
                            kv_block_bytes=1_000_000)
    b = inst("b", step=0.01, step_next=0.02)
    assert [x.dst for x in plan_rescues([a, b], 0.01)] == ["b"]  # 0.1 s of copy: margin -1 + 3 - 0.1
    assert [x.dst for x in plan_rescues([a, b], 0.01, links={("a", "b"): 1.0})] == ["b"]  # 10 ms
    assert plan_rescues([a, b], 0.01, links={("a", "b"): 0.002}) == []  # 5 s over 2 MB/s: margin < 0
    assert [x.dst for x in plan_rescues([a, b], 0.01, links={("b", "a"): 0.002})] == ["b"]  # the other way


@settings(max_examples=200, deadline=None)
@given(end=st.floats(-5, 5), remaining=st.integers(1, 500), blocks=st.integers(0, 64),
       steps=st.tuples(st.floats(0.005, 0.2), st.floats(0.005, 0.2)), block_bytes=st.integers(1, 1 << 22),
       gbps=st.floats(1e-4, 100), faster=st.floats(1.0, 10.0), constant=st.floats(0, 0.1))
def test_a_measured_link_prices_the_copy_and_a_faster_one_never_lowers_the_margin(
        end, remaining, blocks, steps, block_bytes, gbps, faster, constant):
    r = req("r", end_m=end, remaining=remaining, blocks=blocks)
    src = dataclasses.replace(inst("a", step=steps[0]), kv_block_bytes=block_bytes)
    dst = inst("b", step=steps[1], step_next=steps[1] * 1.1)
    per_block = block_bytes / (gbps * 1e9)
    assert margin_there(r, src, dst, constant, gbps) == pytest.approx(margin_there(r, src, dst, per_block))
    assert margin_there(r, src, dst, constant, gbps * faster) >= margin_there(r, src, dst, constant, gbps) - 1e-12
    for x in plan_rescues([dataclasses.replace(src, running=(r,)), dst], constant, links={("a", "b"): gbps}):
        assert x.margin_there_s >= 0 and x.margin_there_s == pytest.approx(margin_there(r, src, dst, constant, gbps))
