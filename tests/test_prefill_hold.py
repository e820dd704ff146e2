"""A ``decode`` instance holds the prefill work queued on it for the scheduler to redirect
(``llumnix_py.prefill_hold``), at most ``decode_hold_s``: on the core (simulated engine,
injected time), on a threaded llumlet (built-in engine, manual clock), in the scheduler that
sends roles, and in the simulator."""

from __future__ import annotations

import math
import threading

import pytest

from experiments.workloads import WorkloadRequest
from llumnix_py.engines.types import Request, SamplingParams
from llumnix_py.errors import UnknownRoleError
from llumnix_py.llumlet import Llumlet
from llumnix_py.llumlet_core import LlumletCore
from llumnix_py.llumlet_types import LlumletConfig
from llumnix_py.load import InstanceLoad
from llumnix_py.prefill_hold import PrefillHold
from llumnix_py.scheduler.core import GlobalScheduler, SchedulerConfig
from llumnix_py.scheduler.daemon import SchedulerDaemon
from llumnix_py.sim import SimCluster, SimConfig
from llumnix_py.tokens import CallbackSink
from migration.driver import LocalPort, MigrationDriver
from migration.protocol import MigrationConfig, MigrationStatus, SourceMigration
from tests.cluster_helpers import ManualClock, wait_for
from tests.factories import make_engine
from tests.test_llumlet import Recorder, reference_tokens
from tests.test_llumlet import request as llumlet_request
from tests.test_payoff import ScriptedLauncher


def inst(role: str = "both") -> InstanceLoad:
    return InstanceLoad(total_blocks=100, used_blocks=0, role=role)


def make_core(hold_s: float = 1.0, num_blocks: int = 64) -> LlumletCore:
    engine = make_engine("sim", num_blocks=num_blocks, max_batch_size=8)
    return LlumletCore(LlumletConfig("d0", transport="inproc", lease_timeout_s=None, decode_hold_s=hold_s), engine)


def request(rid: str, n: int = 20, max_tokens: int = 8) -> Request:
    return Request(rid, tuple(range(3, 3 + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   reply_to="local://frontend")


def waiting(core: LlumletCore) -> list[str]:
    return [r.request_id for r in core.engine.load().waiting]


# ----- the bookkeeping ---------------------------------------------------------------------------
def test_a_hold_runs_from_its_start_for_hold_s_and_forgets_requests_that_left():
    hold = PrefillHold(2.0)
    assert hold.begin(["a", "b"], now=10.0) and hold.ids == {"a", "b"}
    assert not hold.begin(["a"], now=11.0)  # already held: it keeps its start
    assert hold.begin(["c"], now=11.0)
    here = {"a", "c"}.__contains__  # b finished or left
    assert hold.expire(11.9, here) and hold.ids == {"a", "c"} and hold.expired == 0
    assert hold.expire(12.0, here) and hold.ids == {"c"} and hold.expired == 1
    assert not hold.expire(12.5, here)
    assert hold.release_all() and not hold and not hold.release_all()
    assert not PrefillHold(0.0).begin(["a"], now=0.0)  # 0: nothing is ever held


# ----- the core ----------------------------------------------------------------------------------
def test_a_decode_instance_holds_new_requests_until_their_time_is_up_then_prefills_them():
    core = make_core(hold_s=1.0)
    core.set_role("decode", now=0.0)
    core.submit(request("r"))
    core.admit(now=5.0)
    load = core.load(core.engine.load())
    assert load.role == "decode" and [r.request_id for r in load.waiting] == ["r"]
    assert core.engine.has_unfinished() and not core.step_due() and core.held_prefills()
    core.on_timer(5.999)
    assert not core.step_due()
    core.on_timer(6.0)  # one second after its admission
    assert core.step_due() and not core.held_prefills()
    out, _ = core.step()
    core.on_published(out)
    assert out.num_prefill_tokens == 20
    assert (core.stats.decode_prefill_tokens, core.stats.decode_holds_expired) == (20, 1)


def test_becoming_decode_holds_the_queued_prefill_work_and_lets_the_running_requests_decode():
    core = make_core()
    core.submit(request("running", max_tokens=50))
    core.admit(now=0.0)
    core.step()  # prefilled: it decodes from now on
    core.submit(request("queued"))
    core.admit(now=0.0)
    core.set_role("decode", now=0.0)
    assert waiting(core) == ["queued"]
    for _ in range(3):
        out, _ = core.step()
        assert (out.num_prefill_tokens, out.num_decode_tokens) == (0, 1)
    assert waiting(core) == ["queued"]
    core.set_role("both", now=0.0)  # any other role releases at once
    assert not core.held_prefills()
    out, _ = core.step()
    assert out.num_prefill_tokens == 20 and waiting(core) == []


@pytest.mark.parametrize("engine_kw", [dict(batch_policy="edf"), dict(batch_policy="jit"), dict(fairness=True)],
                         ids=["edf", "jit", "fair"])
def test_every_batch_policy_leaves_held_requests_waiting(engine_kw):
    engine = make_engine("sim", num_blocks=64, max_batch_size=8, **engine_kw)
    core = LlumletCore(LlumletConfig("d0", transport="inproc", lease_timeout_s=None), engine)
    core.submit(request("running", max_tokens=50))
    core.admit(now=0.0)
    core.step()
    core.set_role("decode", now=0.0)
    for i, client in enumerate(("x", "y")):
        core.submit(Request(f"q{i}", tuple(range(3, 40)), SamplingParams(max_tokens=8, ignore_eos=True),
                            reply_to="local://frontend", client_id=client))
    core.admit(now=0.0)
    for _ in range(3):
        out, _ = core.step()
        assert (out.num_prefill_tokens, out.num_decode_tokens) == (0, 1)
    assert sorted(waiting(core)) == ["q0", "q1"]
    core.on_timer(1.0)
    out, _ = core.step()
    assert out.num_prefill_tokens == 2 * 37 and waiting(core) == []


def test_a_held_request_leaves_as_a_waiting_request_and_its_hold_is_forgotten():
    src, dst = make_core(), make_core()
    src.set_role("decode", now=0.0)
    src.submit(request("r"))
    src.admit(now=0.0)
    assert src.begin_migration("r", "m1")
    driver = MigrationDriver(src.engine, LocalPort(dst, src.engine, now=lambda: 0.0), clock=lambda: 0.0)
    result = driver.run(SourceMigration("m1", "r", waiting=True, config=MigrationConfig()))
    src.end_migration(result)
    assert result.status == MigrationStatus.FINISHED
    src.on_timer(0.1)
    assert not src.held_prefills() and not src.engine.has_unfinished()
    assert waiting(dst) == ["r"] and dst.step_due()  # the destination is no decode instance: it prefills
    assert src.stats.decode_holds_expired == 0


def test_a_hold_of_zero_and_an_engine_that_cannot_hold_prefill_as_before():
    core = make_core(hold_s=0.0)
    core.set_role("decode", now=0.0)
    core.submit(request("r"))
    core.admit(now=0.0)
    assert core.step_due() and not core.held_prefills()

    core = make_core()
    core.engine.hold_waiting = lambda ids: False  # e.g. vLLM: no hold
    core.set_role("decode", now=0.0)
    core.submit(request("r"))
    core.admit(now=0.0)
    assert core.step_due() and not core.held_prefills()


@pytest.mark.parametrize("role", ["", "Decoder", None, 3])
def test_an_unknown_role_is_refused(role):
    with pytest.raises(UnknownRoleError):
        make_core().set_role(role, now=0.0)


@pytest.mark.parametrize("hold", [-0.1, math.nan, math.inf, 3601.0])
def test_the_hold_must_be_a_sane_number_of_seconds(hold):
    with pytest.raises(ValueError, match="decode_hold_s"):
        LlumletConfig("x", decode_hold_s=hold)
    with pytest.raises(ValueError, match="decode_hold_s"):
        SimConfig(decode_hold_s=hold)


# ----- a threaded llumlet --------------------------------------------------------------------------
def test_a_threaded_decode_llumlet_steps_its_batch_but_never_the_held_prefill_until_the_hold_ends():
    """``busy`` decodes on ``a`` while ``held`` waits there: the loop steps three times with
    ``held`` in its queue and does not prefill it. ``held`` leaves for ``b`` as a waiting
    request and is prefilled there; ``late`` is prefilled on ``a`` once the manual clock passes
    its hold. Every request gives exactly the tokens of a run alone on one engine."""
    rec = Recorder()
    clock = ManualClock(100.0)
    kw = dict(dtype="float64", num_blocks=64, max_batch_size=8)
    a = Llumlet(LlumletConfig(instance_id="a", transport="inproc", decode_hold_s=5.0), make_engine(**kw),
                CallbackSink(rec), clock=clock)
    b = Llumlet(LlumletConfig(instance_id="b", transport="inproc"), make_engine(**kw), CallbackSink(rec))
    steps = [0]
    engine_step, counted = a.engine.step, threading.Lock()

    def counting_step():
        with counted:
            steps[0] += 1
        return engine_step()

    a.engine.step = counting_step
    a.start()
    b.start()
    try:
        a.add_request(llumlet_request("busy", max_tokens=300))
        wait_for(lambda: rec.tokens.get("busy"), 60, "busy's first token")
        a.set_role("decode")
        a.add_request(llumlet_request("held"))
        wait_for(a.core.held_prefills, 60, "held admitted into a's engine, and held")
        seen = steps[0]
        wait_for(lambda: steps[0] >= seen + 3, 60, "three steps of a with held queued")
        assert "held" in [r.request_id for r in a.load().waiting] and not rec.tokens.get("held")
        assert "busy" not in rec.done, "busy finished: the steps above did not run beside held"
        assert a.migrate_out("held", b.address, "m-held", waiting=True)
        rec.wait(["held"])
        wait_for(lambda: not a.core.held_prefills(), 60, "held's hold forgotten on a once it left")
        a.add_request(llumlet_request("late"))
        wait_for(a.core.held_prefills, 60, "late admitted into a's engine, and held")
        clock.advance(5.0)
        rec.wait(["busy", "late"])
    finally:
        a.stop()
        b.stop()
    assert rec.tokens == reference_tokens(["held", "late"]) | reference_tokens(["busy"], max_tokens=300)
    assert (a.stats.decode_prefill_tokens, a.stats.decode_holds_expired) == (20, 1)  # late's prompt only
    assert rec.misrouted == 0


# ----- the scheduler sends roles -----------------------------------------------------------------
def test_the_scheduler_sends_a_role_until_the_instances_load_shows_it():
    sched = GlobalScheduler(SchedulerConfig(pd_ratio=(1, 1)))
    sched.register("p", "p", now=0.0)
    sched.register("d", "d", now=0.0)
    assert sched.roles_to_send() == {}  # no load yet
    sched.on_load("p", inst(), now=0.0)
    sched.on_load("d", inst(), now=0.0)  # a llumlet starts as "both"
    assert sched.roles_to_send() == {"p": "prefill", "d": "decode"}
    sched.on_load("d", inst(role="decode"), now=0.1)
    assert sched.roles_to_send() == {"p": "prefill"}
    sched.flip_role("d", "both", now=0.2)
    assert sched.roles_to_send() == {"p": "prefill", "d": "both"}


def test_the_daemon_tells_each_instance_its_role_every_tick_until_it_has_it():
    clock = ManualClock(0.0)
    daemon = SchedulerDaemon(SchedulerConfig(pd_ratio=(1, 1)), ScriptedLauncher(), clock=clock)
    p, d = (daemon.handles[i] for i in daemon.launch(2))
    daemon.tick()
    daemon.tick()
    assert (p.roles, d.roles) == (["prefill", "prefill"], ["decode", "decode"])
    p.snapshot, d.snapshot = inst(role="prefill"), inst(role="decode")
    daemon.tick()
    assert (len(p.roles), len(d.roles)) == (2, 2)


# ----- the simulator -------------------------------------------------------------------------------
RACED = "req-000001"  # dispatched to the decode instance, as if its flip to decode were on the way


def raced_run(hold_s: float, redirect: bool = True) -> tuple[SimCluster, str]:
    """Two instances 1:1; the second request goes to the decode instance, idle at the time."""
    cluster = SimCluster(SimConfig(num_instances=2, pd_ratio=(1, 1), decode_hold_s=hold_s))
    decode = next(i for i, r in cluster.scheduler.instances.items() if r.role.value == "decode")
    dispatch = cluster.scheduler.dispatch
    cluster.scheduler.dispatch = lambda view: decode if view.request_id == RACED else dispatch(view)
    if not redirect:
        cluster.scheduler.redirect_round = lambda now: []
    cluster.run([WorkloadRequest(0.0, 300, 20), WorkloadRequest(2.0, 300, 20)], progress=False)
    return cluster, decode


def test_in_the_simulator_a_request_raced_onto_a_decode_instance_is_redirected_not_prefilled_there():
    cluster, decode = raced_run(hold_s=1.0)
    raced = cluster.records[RACED]
    assert raced.done and raced.num_tokens == 20 and raced.migrations == 2  # redirected, then handed off
    assert cluster.scheduler.num_redirects == 1
    stats = cluster.instances[decode].core.stats
    assert cluster.instances[decode].core.role.value == "decode"
    assert (stats.decode_prefill_tokens, stats.decode_holds_expired) == (0, 0)

    cluster, decode = raced_run(hold_s=0.0)  # no hold: the idle decode instance prefills it at once
    assert cluster.instances[decode].core.stats.decode_prefill_tokens == 300


def test_in_the_simulator_a_hold_that_is_never_redirected_ends_and_the_request_is_served():
    cluster, decode = raced_run(hold_s=1.0, redirect=False)
    raced = cluster.records[RACED]
    assert raced.done and raced.num_tokens == 20 and raced.migrations == 0
    assert raced.first_token_time - raced.arrival_time >= 1.0
    stats = cluster.instances[decode].core.stats
    assert (stats.decode_prefill_tokens, stats.decode_holds_expired) == (300, 1)
