"""The daemon's tick as a sans-IO step over ``GlobalScheduler``: inputs in, actions out, no clock."""

from __future__ import annotations

from llumnix_py.scheduler.tick import SchedulerTick
from policies.types import ScaleAction
from tests.test_scheduler_core import load, make, overloaded


def test_a_round_runs_once_per_interval_and_its_orders_come_back():
    s = make()
    tick = SchedulerTick(s, migration_interval_s=0.1)
    first = tick.tick(0.0, {"a": overloaded("a")})
    assert first.orders, "an overloaded instance beside empty ones should migrate"
    assert {o.src for o in first.orders} == {"a"}
    assert tick.tick(0.05).orders == ()  # within the interval
    assert not tick.round_due(0.05) and tick.round_due(0.1)
    assert tick.tick(0.05, force_round=True).orders == ()  # forced, but "a" still has its order in flight
    ended = [o.migration_id for o in first.orders]
    again = tick.tick(0.3, {"a": overloaded("a")}, ended=ended)
    assert again.orders and {o.src for o in again.orders} == {"a"}


def test_no_round_when_migration_is_off_and_no_scaling_decision_when_not_asked():
    s = make()
    tick = SchedulerTick(s, migration_interval_s=0.1)
    actions = tick.tick(0.0, {"a": overloaded("a")}, migrate=False, scale=False)
    assert actions.orders == () and actions.scale.action == ScaleAction.NONE


def test_dead_and_drained_instances_are_removed_and_reported_once():
    s = make(heartbeat_timeout_s=1.0)
    tick = SchedulerTick(s, migration_interval_s=0.1)
    s.mark_terminating("c")
    assert tick.tick(0.5, {"c": load()}, died=["a"], removable=lambda iid: False).retired == (("a", "dead"),)
    assert tick.tick(0.6, removable=lambda iid: True).retired == (("c", "drained"),)
    assert tick.tick(0.7, died=["a"]).retired == ()  # already gone
    assert tick.tick(5.0, heartbeat=False).retired == ()
    assert tick.tick(5.0).retired == (("b", "dead"),)  # silent past the heartbeat timeout
    assert set(s.instances) == set()
