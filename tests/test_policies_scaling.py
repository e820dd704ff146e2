"""Scaling from the average freeness."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llumnix_py.errors import UnknownPolicyError
from llumnix_py.load import InstanceLoad, RequestLoad
from policies.config import PolicyConfig
from policies.scaling import ScalingState, average_freeness, decide_scaling
from policies.types import ScaleAction, ScaleDecision


def make_inst(iid: str, n_running: int = 0, blocks: int = 0, n_waiting: int = 0, **kw) -> InstanceLoad:
    running = tuple(RequestLoad(request_id=f"{iid}r{k}", num_blocks=blocks, blocks_needed=blocks)
                    for k in range(n_running))
    waiting = tuple(RequestLoad(request_id=f"{iid}w{k}", num_blocks=0, blocks_needed=1) for k in range(n_waiting))
    return InstanceLoad(instance_id=iid, total_blocks=880, used_blocks=n_running * blocks, running=running,
                        waiting=waiting, **kw)


def busy(iid: str, **kw) -> InstanceLoad:
    return make_inst(iid, n_running=8, blocks=105, **kw)  # freeness (880 - 840) / 8 = 5 < 10


def idle(iid: str, **kw) -> InstanceLoad:
    return make_inst(iid, n_running=1, blocks=80, **kw)  # freeness 800 > 60


def run_rounds(instances, cfg, state, n):
    decisions = [decide_scaling(instances, cfg, state) for _ in range(n)]
    assert decisions, "no rounds run"
    return decisions


def test_scale_out_after_the_period_only():
    cfg = PolicyConfig(scale_period_rounds=3)
    state = ScalingState()
    decisions = run_rounds([busy("i0"), busy("i1")], cfg, state, 4)
    assert [d.action for d in decisions] == [ScaleAction.NONE, ScaleAction.NONE, ScaleAction.OUT, ScaleAction.NONE]
    assert "average freeness" in decisions[2].reason


def test_an_interrupted_period_starts_over():
    cfg = PolicyConfig(scale_period_rounds=3)
    state = ScalingState()
    run_rounds([busy("i0")], cfg, state, 2)
    mid = make_inst("i0", n_running=2, blocks=400)  # freeness 40: within thresholds
    assert decide_scaling([mid], cfg, state).action is ScaleAction.NONE
    assert state.out_rounds == 0
    assert [d.action for d in run_rounds([busy("i0")], cfg, state, 3)][-1] is ScaleAction.OUT


def test_never_out_above_max():
    cfg = PolicyConfig(scale_period_rounds=1, max_instances=2)
    decision = decide_scaling([busy("i0"), busy("i1")], cfg, ScalingState())
    assert decision.action is ScaleAction.NONE and "max_instances" in decision.reason


def test_scale_in_picks_fewest_running_then_fewest_waiting_then_highest_id():
    cfg = PolicyConfig(scale_period_rounds=2)
    cluster = [
        idle("i0"),
        idle("i1", n_waiting=0),
        idle("i2", n_waiting=1),
        make_inst("i3", n_running=2, blocks=10),
    ]
    decisions = run_rounds(cluster, cfg, ScalingState(), 2)
    assert decisions[-1] == ScaleDecision(ScaleAction.IN, "i1", decisions[-1].reason)
    assert decisions[-1].reason


def test_empty_instances_have_finite_freeness():
    cfg = PolicyConfig()
    assert average_freeness([make_inst("a"), make_inst("b")], cfg) == 880
    assert average_freeness([], cfg) is None
    assert average_freeness([make_inst("a", terminating=True)], cfg) is None


def test_no_scale_in_while_another_instance_terminates():
    cfg = PolicyConfig(scale_period_rounds=1)
    cluster = [idle("i0"), idle("i1"), idle("i2", terminating=True)]
    decision = decide_scaling(cluster, cfg, ScalingState())
    assert decision.action is ScaleAction.NONE and "terminating" in decision.reason
    # Once it is gone the held condition fires at once.
    state = ScalingState(in_rounds=5)
    assert decide_scaling(cluster[:2], cfg, state).action is ScaleAction.IN


def test_never_in_below_min():
    cfg = PolicyConfig(scale_period_rounds=1, min_instances=2)
    decision = decide_scaling([idle("i0"), idle("i1")], cfg, ScalingState())
    assert decision.action is ScaleAction.NONE and "min_instances" in decision.reason


def test_below_min_scales_out_at_once():
    cfg = PolicyConfig(min_instances=2)
    assert decide_scaling([idle("i0")], cfg, ScalingState()).action is ScaleAction.OUT
    assert decide_scaling([], cfg, ScalingState()).action is ScaleAction.OUT
    # The terminating one does not count as active.
    assert decide_scaling([idle("i0"), idle("i1", terminating=True)], cfg, ScalingState()).action is ScaleAction.OUT


def test_none_policy_and_unknown_name():
    cfg = PolicyConfig(scaling="none", scale_period_rounds=1)
    assert decide_scaling([busy("i0")], cfg, ScalingState()).action is ScaleAction.NONE
    with pytest.raises(UnknownPolicyError):
        PolicyConfig(scaling="elastic")


@st.composite
def clusters(draw):
    n = draw(st.integers(0, 8))
    return [
        make_inst(
            f"i{k}",
            n_running=draw(st.integers(0, 8)),
            blocks=draw(st.integers(0, 110)),
            n_waiting=draw(st.integers(0, 3)),
            terminating=draw(st.integers(0, 4)) == 0,
        )
        for k in range(n)
    ]


@settings(max_examples=200, deadline=None)
@given(
    rounds=st.lists(clusters(), min_size=1, max_size=12),
    min_instances=st.integers(1, 4),
    extra=st.integers(0, 4),
    period=st.integers(1, 3),
)
def test_property_bounds_are_respected(rounds, min_instances, extra, period):
    cfg = PolicyConfig(min_instances=min_instances, max_instances=min_instances + extra, scale_period_rounds=period)
    state = ScalingState()
    assert rounds
    for cluster in rounds:
        decision = decide_scaling(cluster, cfg, state)
        active = [inst for inst in cluster if not inst.terminating]
        if decision.action is ScaleAction.OUT:
            assert len(cluster) + 1 <= cfg.max_instances
        elif decision.action is ScaleAction.IN:
            assert len(active) - 1 >= cfg.min_instances
            assert decision.instance_id in {inst.instance_id for inst in active}
            assert len(active) == len(cluster), "scaled in while another instance terminates"
        else:
            assert decision.instance_id is None
        assert decision.reason
