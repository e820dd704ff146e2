"""policies/cooldown.py: a request that just moved is not a migration candidate, unless draining."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.config import PolicyConfig
from policies.cooldown import cooling, hold_cooling
from policies.pairing import plan_migrations
from policies.virtual_usage import freeness
from tests.test_policies_migration import CONFIG, clusters, make_inst, make_req


def all_ids(instances) -> list[str]:
    return [r.request_id for inst in instances for r in inst.running + inst.waiting]


def test_cooling_keeps_moves_inside_the_window():
    last = {"a": 10.0, "b": 7.0, "c": 5.0}
    assert cooling(last, 12.0, 5.0) == {"a"}  # b ended exactly 5 s ago: the boundary is out
    assert cooling(last, 12.0, 7.0) == {"a", "b"}
    assert cooling(last, 12.0, 0.0) == frozenset()


def test_a_cooling_request_stays_and_the_next_candidate_moves():
    src = make_inst("s", running=[make_req("small", 10), make_req("big", 300)], total=314)  # freeness 2
    dst = make_inst("d", total=880)
    cfg = PolicyConfig()
    (plan,) = plan_migrations([src, dst], cfg)
    assert plan.request.request_id == "small"
    plans = plan_migrations(hold_cooling([src, dst], frozenset({"small"})), cfg)
    assert [p.request.request_id for p in plans] == ["big"]


def test_a_draining_instance_moves_cooling_requests():
    src = make_inst("s", running=[make_req("r", 10)], terminating=True)
    dst = make_inst("d")
    held = hold_cooling([src, dst], frozenset({"r"}))
    assert held[0] is src
    assert [p.request.request_id for p in plan_migrations(held, PolicyConfig())] == ["r"]


@st.composite
def cooling_cases(draw):
    """A cluster and a subset of its requests (any of them, running or waiting) cooling down."""
    instances = draw(clusters())
    ids = all_ids(instances)
    return instances, frozenset(draw(st.lists(st.sampled_from(ids), unique=True)) if ids else [])


def test_the_config_rejects_a_bad_cooldown():
    for bad in (-1.0, float("inf"), True):
        with pytest.raises(ValueError, match="migration_cooldown_s"):
            PolicyConfig(migration_cooldown_s=bad)


@settings(max_examples=150, deadline=None)
@given(cooling_cases(), CONFIG)
def test_no_cooling_request_leaves_a_live_instance(case, cfg):
    instances, chosen = case
    held = hold_cooling(instances, chosen)
    by_id = {inst.instance_id: inst for inst in instances}
    for plan in plan_migrations(held, cfg):
        if not by_id[plan.pair.src].terminating:
            assert plan.request.request_id not in chosen


@settings(max_examples=150, deadline=None)
@given(cooling_cases(), CONFIG)
def test_holding_changes_no_freeness_and_no_draining_instance(case, cfg):
    instances, chosen = case
    held = hold_cooling(instances, chosen)
    assert [i.instance_id for i in held] == [i.instance_id for i in instances]
    for before, after in zip(instances, held):
        assert freeness(after, cfg) == freeness(before, cfg)
        if before.terminating:
            assert after is before
        assert all_ids([after]) == all_ids([before])


@settings(max_examples=100, deadline=None)
@given(clusters(), CONFIG)
def test_nothing_cooling_changes_nothing(instances, cfg):
    assert plan_migrations(hold_cooling(instances, frozenset()), cfg) == plan_migrations(instances, cfg)


@settings(max_examples=100, deadline=None)
@given(clusters(), CONFIG)
def test_everything_cooling_leaves_only_draining_moves(instances, cfg):
    held = hold_cooling(instances, frozenset(all_ids(instances)))
    terminating = {i.instance_id for i in instances if i.terminating}
    for plan in plan_migrations(held, cfg):
        assert plan.pair.src in terminating


def _snapshot(*reqs, total=100):
    from llumnix_py.load import InstanceLoad

    return InstanceLoad(total_blocks=total, used_blocks=sum(r.num_blocks for r in reqs), running=tuple(reqs))


def _moved_r_from_a_to_b():
    """A scheduler with a 5 s cooldown whose first round moved request r from a to b, ended at 1.0."""
    from llumnix_py.scheduler.core import GlobalScheduler, SchedulerConfig

    core = GlobalScheduler(SchedulerConfig(policy=PolicyConfig(migration_cooldown_s=5.0)))
    for iid in ("a", "b"):
        core.register(iid, iid, 0.0)
    core.on_load("a", _snapshot(make_req("r", 10), make_req("big", 88)), 0.0)  # freeness 1: a source
    core.on_load("b", _snapshot(make_req("y", 50)), 0.0)  # freeness 50
    (order,) = core.migration_round(0.0)
    assert order.request_id == "r"
    core.on_migration_result(order.migration_id, "r", True, 10, 1.0)
    return core


def test_the_scheduler_holds_a_request_that_just_moved_until_its_cooldown_ends():
    core = _moved_r_from_a_to_b()
    # Now b is the overloaded one and r (its shortest request) would go back to a;
    # the only other candidate (x) does not fit the pairing rule.
    core.on_load("a", _snapshot(make_req("z", 50)), 1.0)
    core.on_load("b", _snapshot(make_req("r", 10), make_req("x", 88)), 1.0)
    assert core.migration_round(2.0) == []  # r is cooling (ended at 1.0, cooldown 5 s)
    assert core.migration_round(5.9) == []
    (again,) = core.migration_round(6.0)  # the cooldown is over: r goes back (a return)
    assert (again.src, again.dst, again.request_id) == ("b", "a", "r")
    core.on_migration_done(again.migration_id)


def test_a_draining_instance_is_not_held_by_the_cooldown():
    core = _moved_r_from_a_to_b()
    core.on_load("a", _snapshot(make_req("big", 88)), 1.0)
    core.on_load("b", _snapshot(make_req("r", 10), make_req("y", 50)), 1.0)
    core.mark_terminating("b")
    (drain,) = core.migration_round(1.5)
    assert (drain.src, drain.request_id) == ("b", "r")
