"""Self-healing without Ray: the restart budget, the scheduler watchdog, the daemon's
instance replacement, and what ``/health``, ``/v1/cluster/state`` and ``/metrics`` say.

Every clock here is a ``ManualClock``: backoff and crash-loop windows pass when the
test advances it, never by waiting. The Ray side (a SIGKILLed scheduler or instance
coming back by itself) is in ``tests/test_faults_ray.py``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Optional

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from llumnix_py.config import ClusterConfig, LlumletConfig, PolicyConfig, SchedulerConfig
from llumnix_py.engines.registry import frontend_info
from llumnix_py.frontend.cluster import Cluster
from llumnix_py.frontend.health import HealthView, assess
from llumnix_py.healing import Phase, RestartBudget, RestartPolicy
from llumnix_py.errors import SchedulerUnavailableError
from llumnix_py.runtime.local import LocalInstance, LocalLauncher
from llumnix_py.runtime.watchdog import SchedulerWatchdog
from llumnix_py.scheduler.daemon import SchedulerDaemon
from llumnix_py.server.app import ServerThread, create_app
from llumnix_py.tokens import CallbackSink
from tests.cluster_helpers import RESULT_TIMEOUT_S, ManualClock, small_spec, wait_for

POLICY = RestartPolicy(max_attempts=3, backoff_initial_s=1.0, backoff_max_s=4.0, stable_s=5.0)


# ----- the restart budget -------------------------------------------------------------------------


def test_first_restart_is_immediate_and_failures_back_off_then_give_up():
    b = RestartBudget(POLICY)
    assert not b.due(0.0)  # nothing is missing
    b.down(10.0)
    assert b.phase is Phase.DOWN and b.due(10.0)
    b.attempt(10.0)
    with pytest.raises(RuntimeError):
        b.attempt(10.0)  # one at a time
    b.failed(10.5, "boom")
    assert b.last_error == "boom" and not b.due(11.4) and b.due(11.5)  # 1 s after the first failure
    b.attempt(11.5)
    b.failed(12.0)
    assert not b.due(13.9) and b.due(14.0)  # then 2 s
    b.attempt(14.0)
    b.failed(14.0)
    assert b.phase is Phase.GAVE_UP and not b.due(1e9)  # 3 failures in a row: reported, no more tries
    assert b.report(20.0)["phase"] == "gave_up" and b.report(20.0)["streak"] == 3
    b.reset()  # an operator brought it back
    assert b.phase is Phase.UP and b.streak == 0


def test_a_crash_loop_counts_and_a_stable_life_starts_afresh():
    b = RestartBudget(POLICY)
    b.down(0.0, up_since=None)
    b.attempt(0.0)
    b.succeeded(1.0)
    assert b.restarts == 1 and b.phase is Phase.UP
    b.down(3.0, up_since=1.0)  # died 2 s after its restart: a crash loop
    assert b.streak == 1 and not b.due(3.9) and b.due(4.0)
    b.attempt(4.0)
    b.succeeded(4.0)
    b.down(20.0, up_since=4.0)  # 16 s of healthy life: a fresh failure, restarted at once
    assert b.streak == 0 and b.due(20.0)


def test_satisfied_cancels_a_due_restart_and_disabled_never_restarts():
    b = RestartBudget(POLICY)
    b.down(0.0)
    b.satisfied()
    assert b.phase is Phase.UP and not b.due(0.0)
    off = RestartBudget(RestartPolicy(enabled=False))
    off.down(0.0)
    assert not off.due(1e9)
    with pytest.raises(ValueError):
        RestartPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RestartPolicy(backoff_initial_s=5.0, backoff_max_s=1.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["down", "young_death", "try_ok", "try_fail", "wait"]),
                          st.floats(min_value=0.0, max_value=8.0)), max_size=60))
def test_budget_bounds_the_restart_loop(events):
    """Whatever happens: at most ``max_attempts`` failures in a row are tried, the wait
    between attempts never exceeds ``backoff_max_s``, a repeated report of a loss does not
    postpone the restart, and nothing is tried after giving up."""
    b, now, up_since = RestartBudget(POLICY), 0.0, 0.0
    failures_in_a_row = 0
    for kind, dt in events:
        now += dt
        if kind == "wait":
            continue
        if kind in ("down", "young_death"):
            before = (b.phase, b.not_before)
            b.down(now, up_since=now - 0.1 if kind == "young_death" else None)
            if kind == "down" and before[0] is Phase.DOWN:
                assert b.not_before == before[1]  # hearing of the same loss again postpones nothing
            continue
        if b.phase is Phase.DOWN:
            assert b.not_before - now <= POLICY.backoff_max_s
        if not b.due(now):
            continue
        assert b.phase is not Phase.GAVE_UP
        b.attempt(now)
        if kind == "try_ok":
            b.succeeded(now)
            up_since, failures_in_a_row = now, 0
        else:
            b.failed(now)
            failures_in_a_row += 1
            assert failures_in_a_row <= POLICY.max_attempts
    if b.phase is Phase.GAVE_UP:
        assert not b.due(now + 1e9)
    assert up_since <= now


# ----- the scheduler watchdog (probe and restart injected) ---------------------------------------


class FakeScheduler:
    def __init__(self, failures: int = 0) -> None:
        self.alive = True
        self.failures = failures  # restarts that raise before one succeeds
        self.restarts = 0
        self.switched: list[str] = []

    def restart(self) -> str:
        self.restarts += 1
        if self.failures:
            self.failures -= 1
            raise RuntimeError("no room for the actor")
        self.alive = True
        return f"scheduler-{self.restarts}"


def watchdog(s: FakeScheduler, clock: ManualClock) -> SchedulerWatchdog:
    return SchedulerWatchdog(POLICY, lambda: s.alive, s.restart, s.switched.append, clock=clock)


def test_watchdog_restarts_a_dead_scheduler_at_once_and_switches_the_frontend_back():
    clock, s = ManualClock(100.0), FakeScheduler()
    w = watchdog(s, clock)
    w.check_once()
    assert s.restarts == 0 and w.up
    s.alive = False
    clock.advance(10.0)  # up long enough: not a crash loop
    w.check_once()
    assert s.restarts == 1 and s.switched == ["scheduler-1"] and w.up
    assert w.report()["restarts"] == 1 and w.report()["downtimes_s"] == [0.0]


def test_watchdog_backs_off_after_failed_restarts_and_gives_up():
    clock, s = ManualClock(100.0), FakeScheduler(failures=10)
    w = watchdog(s, clock)
    s.alive = False
    clock.advance(10.0)
    w.check_once()
    assert s.restarts == 1 and not w.up and w.report()["phase"] == "down"
    w.check_once()
    assert s.restarts == 1  # backing off: no second try at the same moment
    clock.advance(1.0)
    w.check_once()
    assert s.restarts == 2
    clock.advance(1.9)
    w.check_once()
    assert s.restarts == 2
    clock.advance(0.1)
    w.check_once()
    assert s.restarts == 3 and w.report()["phase"] == "gave_up"
    clock.advance(1000.0)
    w.check_once()
    assert s.restarts == 3 and s.switched == []
    w.restarted("by-hand")  # an operator's restart: a fresh budget
    assert w.up and s.switched == ["by-hand"] and w.report()["streak"] == 0


# ----- the daemon replaces dead instances --------------------------------------------------------


class FlakyLauncher(LocalLauncher):
    """A local launcher whose next ``fail`` launches raise (no room for an actor)."""

    def __init__(self) -> None:
        super().__init__(small_spec(), LlumletConfig(instance_id="t", transport="inproc"),
                         lambda: CallbackSink(lambda *a: None))
        self.fail = 0
        self.calls = 0
        self.launched: list[LocalInstance] = []

    def launch(self, instance_id: str):
        self.calls += 1
        if self.fail:
            self.fail -= 1
            raise RuntimeError("launch failed")
        handle = super().launch(instance_id)
        self.launched.append(handle)
        return handle


@contextlib.contextmanager
def stepped_daemon(n: int, clock: ManualClock, **sched: Any) -> Iterator[tuple[SchedulerDaemon, FlakyLauncher]]:
    """A daemon stepped by hand (``tick``) over ``n`` in-process instances; crashed ones are stopped after."""
    launcher = FlakyLauncher()
    daemon = SchedulerDaemon(SchedulerConfig(instance_restart=POLICY, **sched), launcher, clock=clock)
    try:
        daemon.launch(n)
        daemon.keep(n)
        yield daemon, launcher
    finally:
        live = set(daemon.handles)
        daemon.stop()
        for h in launcher.launched:
            if h.instance_id not in live:
                h.stop()  # release a crashed llumlet's threads


def crash(daemon: SchedulerDaemon, iid: str) -> str:
    handle = daemon.handle(iid)
    assert isinstance(handle, LocalInstance)
    handle.crash()
    return handle.incarnation


def test_a_dead_instance_is_replaced_by_a_new_incarnation_that_takes_dispatches():
    clock = ManualClock()
    with stepped_daemon(2, clock) as (daemon, launcher):
        clock.advance(10.0)  # a healthy life (longer than stable_s): replaced at once
        old = crash(daemon, "instance-001")
        daemon.tick()
        m = daemon.membership()
        assert m["instances"] == ["instance-000", "instance-002"] and m["dead"] == ["instance-001"]
        assert m["dead_incarnations"] == [["instance-001", old]]
        assert m["incarnations"]["instance-002"] not in (old, m["incarnations"]["instance-000"])
        assert m["healing"] == {"target": 2, "replaced": 1, "phase": "up", "restarts": 1, "streak": 0,
                                "next_attempt_in_s": None, "last_error": ""}
        assert {load.instance_id for load in m["loads"]} == {"instance-000", "instance-002"}  # it answered a poll
        from llumnix_py.load import RequestLoad

        picks = {daemon.dispatch(RequestLoad.queued(f"r{i}", prompt_len=8, block_size=16)) for i in range(8)}
        assert "instance-002" in picks
        daemon.tick()
        assert launcher.calls == 3  # nothing more to replace


def test_replacement_backs_off_gives_up_and_a_manual_drain_is_not_replaced():
    clock = ManualClock()
    with stepped_daemon(2, clock) as (daemon, launcher):
        launcher.fail = 10
        clock.advance(10.0)
        crash(daemon, "instance-000")
        daemon.tick()
        assert launcher.calls == 3 and daemon.membership()["healing"]["phase"] == "down"
        daemon.tick()
        assert launcher.calls == 3  # backing off
        clock.advance(1.0)
        daemon.tick()
        clock.advance(2.0)
        daemon.tick()
        assert launcher.calls == 5 and daemon.membership()["healing"]["phase"] == "gave_up"
        clock.advance(1000.0)
        daemon.tick()
        assert launcher.calls == 5 and daemon.instance_ids() == ["instance-001"]
        assert "launch failed" in daemon.state()["instance_healing"]["last_error"]
    with stepped_daemon(2, ManualClock()) as (daemon, launcher):
        daemon.drain("instance-000")  # scale in by hand: the count held follows
        for _ in range(50):
            daemon.tick()
            if daemon.instance_ids() == ["instance-001"]:
                break
        assert daemon.instance_ids() == ["instance-001"] and launcher.calls == 2
        assert daemon.membership()["healing"]["target"] == 1


def test_instances_added_long_before_the_loop_starts_are_not_dead_on_its_first_tick():
    """A restarted scheduler attaches instances one by one (seconds, under load) before its
    loop starts; their first polls may also be slow. The heartbeat counts from ``start``."""
    clock = ManualClock()
    with stepped_daemon(2, clock) as (daemon, _):
        slow = threading.Event()
        for handle in daemon.handles.values():
            load = handle.load
            handle.load = lambda load=load: (slow.wait(RESULT_TIMEOUT_S), load())[1]  # type: ignore[method-assign]
        ticks = []
        tick = daemon.ticker.tick
        daemon.ticker.tick = lambda *a, **kw: (ticks.append(1), tick(*a, **kw))[1]  # type: ignore[method-assign]
        clock.advance(10.0)  # the attach took longer than the heartbeat timeout
        daemon.start()
        wait_for(lambda: len(ticks) >= 2, what="two ticks without an answered poll")
        assert daemon.membership()["dead"] == [] and daemon.instance_ids() == ["instance-000", "instance-001"]
        slow.set()


def test_with_auto_scaling_the_floor_is_min_instances():
    clock = ManualClock()
    policy = PolicyConfig(scaling="none", min_instances=1, max_instances=4)  # no scaling decision interferes
    with stepped_daemon(2, clock, policy=policy, enable_scaling=True) as (daemon, launcher):
        clock.advance(10.0)
        crash(daemon, "instance-000")
        daemon.tick()
        assert daemon.instance_ids() == ["instance-001"] and launcher.calls == 2  # 1 >= min_instances
        assert daemon.membership()["healing"]["target"] == 1
        crash(daemon, "instance-001")
        daemon.tick()
        assert daemon.instance_ids() == ["instance-002"] and launcher.calls == 3  # below the floor: replaced


def test_a_replacement_that_dies_young_is_a_crash_loop():
    clock = ManualClock()
    with stepped_daemon(1, clock) as (daemon, launcher):
        clock.advance(60.0)
        crash(daemon, "instance-000")
        daemon.tick()  # an old instance died: replaced at once
        assert daemon.instance_ids() == ["instance-001"]
        clock.advance(1.0)
        crash(daemon, "instance-001")  # ... and its replacement dies within stable_s
        daemon.tick()
        assert daemon.instance_ids() == [] and daemon.membership()["healing"]["streak"] == 1
        clock.advance(0.5)
        daemon.tick()
        assert daemon.instance_ids() == []  # backing off
        clock.advance(0.5)
        daemon.tick()
        assert daemon.instance_ids() == ["instance-002"] and launcher.calls == 3


# ----- what the frontend says ----------------------------------------------------------------------


@pytest.mark.parametrize("view,status,reason", [
    (HealthView(True, 3, 3), "ok", None),
    (HealthView(False, 3, 3, scheduler_restart="restarting"), "degraded", "being restarted"),
    (HealthView(False, 3, 3, scheduler_restart="gave_up"), "degraded", "gave up"),
    (HealthView(False, 3, 3), "degraded", "unreachable"),
    (HealthView(True, 2, 3, instance_restart="down"), "degraded", "2 of 3 configured instances are live"),
    (HealthView(True, 2, 3, instance_restart="gave_up"), "degraded", "replacing them gave up"),
    (HealthView(True, 4, 3), "ok", None),
    (HealthView(True, 0, 3), "unavailable", "no instance is live"),
])
def test_health_verdicts(view, status, reason):
    h = assess(view)
    assert h.status == status and h.http_status == (503 if status == "unavailable" else 200)
    assert (not h.reasons) if reason is None else any(reason in r for r in h.reasons)
    assert h.to_dict()["status"] == status


class SwitchableControl:
    """A control plane whose scheduler can be taken away: its calls then fail, and the
    frontend's own view (instances it polls) is all that is left."""

    def __init__(self) -> None:
        self.up = True
        self.live = ["instance-000", "instance-001"]
        self.replaced = 0
        self.restarts = 0

    def _need_scheduler(self) -> None:
        if not self.up:
            raise SchedulerUnavailableError("the scheduler is unreachable")

    def state(self) -> dict[str, Any]:
        self._need_scheduler()
        return {"instances": [{"instance_id": i, "freeness": 1.0} for i in self.live],
                "migrations": {"finished": 1}, "migration_downtime_ms": [1.0]}

    def membership(self) -> dict[str, Any]:
        m = {"instances": list(self.live), "dead": [], "loads": []}
        if self.up:
            m["healing"] = {"target": 2, "replaced": self.replaced, "phase": "up" if len(self.live) >= 2 else "down"}
        return m

    def instance_ids(self) -> list[str]:
        return list(self.live)

    @property
    def scheduler_up(self) -> bool:
        return self.up

    def healing(self) -> Optional[dict[str, Any]]:
        return {"phase": "up" if self.up else "restarting", "restarts": self.restarts}

    def stop(self) -> None:
        pass


def sample(text: str, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"{name} {labels} missing")


def test_health_state_and_metrics_while_the_scheduler_is_down_and_an_instance_is_missing():
    cfg = ClusterConfig(num_instances=2, runtime="local", engine=small_spec())
    control = SwitchableControl()
    cluster = Cluster(cfg, control, frontend_info(cfg.engine))  # type: ignore[arg-type]
    with ServerThread(create_app(cluster)) as srv:
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["instances"] == 2
        state = httpx.get(srv.url + "/v1/cluster/state").json()
        assert state["stale"] is False and len(state["instances"]) == 2
        text = httpx.get(srv.url + "/metrics").text
        assert sample(text, "llumnix_scheduler_up") == 1
        assert sample(text, "llumnix_instances", kind="live") == 2 == sample(text, "llumnix_instances",
                                                                              kind="configured")

        control.up = False  # the scheduler dies, and one instance with it
        control.live = ["instance-000"]
        h = httpx.get(srv.url + "/health")
        body = h.json()
        assert h.status_code == 200 and body["status"] == "degraded" and not body["scheduler_up"]
        assert any("being restarted" in r for r in body["reasons"])
        assert any("1 of 2 configured instances" in r for r in body["reasons"])
        state = httpx.get(srv.url + "/v1/cluster/state")
        assert state.status_code == 200
        s = state.json()
        assert s["stale"] is True and s["stale_s"] >= 0  # the last-known view, less the dead instance
        assert [i["instance_id"] for i in s["instances"]] == ["instance-000"] and s["migrations"] == {"finished": 1}
        text = httpx.get(srv.url + "/metrics").text
        assert sample(text, "llumnix_scheduler_up") == 0 and sample(text, "llumnix_instances", kind="live") == 1

        control.up, control.restarts = True, 1  # restarted, and the instance replaced
        control.live, control.replaced = ["instance-000", "instance-002"], 1
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"
        text = httpx.get(srv.url + "/metrics").text
        assert sample(text, "llumnix_restarts_total", component="scheduler") == 1
        assert sample(text, "llumnix_restarts_total", component="instance") == 1
        control.replaced = 0  # the restarted scheduler counts from zero again: nothing is counted twice
        httpx.get(srv.url + "/metrics")
        control.replaced = 1
        text = httpx.get(srv.url + "/metrics").text
        assert sample(text, "llumnix_restarts_total", component="instance") == 2
        assert httpx.get(srv.url + "/v1/cluster/state").json()["stale"] is False
