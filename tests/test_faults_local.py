"""Fault injection in one process (runtime ``local``): instances die, hang, or die mid-migration.

An instance "dies" through ``LocalInstance.crash()``: its llumlet stops abruptly
(no more steps, tokens or migration messages) and every call to its handle raises
``InstanceDiedError``, as a killed Ray actor does. Every test checks the three
promises of issue 7:

- every request either completes with exactly the tokens of a fault-free run
  (greedy and seeded: float64 model, sampling seeded by (seed, output index)) or
  ends with an explicit error;
- no KV block leaks on a surviving instance (and its engine invariants hold);
- no request is served twice: among the surviving instances, each output position
  of each request is produced once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections import defaultdict
from typing import Iterator

import pytest

from llumnix_py.config import (
    ClusterConfig,
    EngineConfig,
    EngineSpec,
    LlumletConfig,
    PolicyConfig,
    SchedulerConfig,
)
from llumnix_py.engines.types import FinishReason, Objective, Request, SamplingParams
from llumnix_py.frontend.cluster import Cluster
from llumnix_py.frontend.handles import RequestFailedError
from llumnix_py.healing import RestartPolicy
from llumnix_py.llumlet import Llumlet
from llumnix_py.instance import InstanceDiedError
from llumnix_py.runtime.local import LocalInstance
from llumnix_py.tokens import CallbackSink
from migration import wire
from policies.jit import Group
from tests.cluster_helpers import (
    HoldOutputs,
    InLockstep,
    ManualClock,
    assert_no_leak,
    RESULT_TIMEOUT_S,
    prompts,
    reference,
    samplings,
    wait_all,
    wait_for,
)
from tests.cluster_helpers import SMALL_MODEL as MODEL
from tests.factories import make_engine


def spec(num_blocks: int = 128) -> EngineSpec:
    return EngineSpec(engine=EngineConfig(num_blocks=num_blocks, max_batch_size=32), model=MODEL)


def config(num_instances: int, engine: EngineSpec, *, migration: bool = True, heartbeat_s: float = 1.5,
           lease_s: float = 30.0, replace_dead: bool = False) -> ClusterConfig:
    """Dead instances are not replaced unless ``replace_dead``: most tests here check what
    happens to requests at a death, with the survivors only."""
    return ClusterConfig(
        num_instances=num_instances, runtime="local", engine=engine,
        scheduler=SchedulerConfig(poll_interval_s=0.01, migration_interval_s=0.02, enable_migration=migration,
                                  heartbeat_timeout_s=heartbeat_s,
                                  instance_restart=RestartPolicy(enabled=replace_dead)),
        llumlet=LlumletConfig(instance_id="template", transport="inproc", migration_timeout_s=1.0,
                              lease_timeout_s=lease_s))


class Emissions:
    """Records which instance sent each output position of each request (wraps ``on_outputs``)."""

    def __init__(self, cluster: Cluster) -> None:
        self.lock = threading.Lock()
        self.by_position: dict[tuple[str, int], list[str]] = defaultdict(list)
        inner = cluster.on_outputs

        def record(instance_id, outputs):
            with self.lock:
                for o in outputs:
                    for k in range(len(o.new_token_ids)):
                        self.by_position[(o.request_id, o.index + k)].append(instance_id)
            inner(instance_id, outputs)

        cluster.on_outputs = record  # type: ignore[method-assign]

    def assert_served_once(self, dead: set[str]) -> None:
        with self.lock:
            assert self.by_position
            twice = {k: v for k, v in self.by_position.items() if len([i for i in v if i not in dead]) > 1}
        assert not twice, f"positions produced more than once by live instances: {dict(list(twice.items())[:5])}"


@contextlib.contextmanager
def running(cfg: ClusterConfig) -> Iterator[tuple[Cluster, Emissions, list[LocalInstance]]]:
    cluster = Cluster.start(cfg)
    crashed: list[LocalInstance] = []
    try:
        yield cluster, Emissions(cluster), crashed
    finally:
        cluster.stop()
        for inst in crashed:
            inst.stop()  # release a crashed llumlet's threads


def local(cluster: Cluster, iid: str) -> LocalInstance:
    inst = cluster.control.instance(iid)
    assert isinstance(inst, LocalInstance)
    return inst


# ----- an instance dies with requests running -----------------------------------------------------


def test_instance_death_resumes_its_requests_with_the_same_tokens():
    engine = spec(num_blocks=256)
    n, max_tokens = 12, 120
    ps, sps = prompts(n), samplings(n, max_tokens)
    expected = reference(engine, ps, sps)
    victim = "instance-001"
    with running(config(3, engine, migration=False)) as (cluster, emitted, crashed), \
            HoldOutputs(cluster, victim) as engine_gate:
        engine_gate.hold()  # the victim runs one batch at a time, so its requests are mid-way when it dies
        handles = [cluster.submit(p, sp) for p, sp in zip(ps, sps)]
        on_victim = [h for h in handles if h.instance_id == victim]
        assert len(on_victim) >= 2, [h.instance_id for h in handles]
        engine_gate.run_until(lambda: all(len(h.token_ids) >= 5 for h in on_victim), "tokens from the victim")
        assert not any(h.finished for h in on_victim)
        inst = local(cluster, victim)
        inst.crash()
        crashed.append(inst)
        engine_gate.release()
        # New requests right after the death: dispatch may still pick the victim; they must not fail.
        extra = [cluster.submit(ps[i], sps[i]) for i in range(3)]
        got = wait_all(handles + extra)
        assert got == expected + expected[:3]
        wait_for(lambda: victim not in cluster.instance_ids(), what="the victim to be removed")
        state = cluster.state()
        assert state["dead_instances"] == [victim]
        assert state["resumed_requests"] >= len(on_victim)
        assert state["failed_requests"] == 0
        for h in on_victim:
            assert h.resumes >= 1 and h.instances_seen[0] == victim and h.instances_seen[-1] != victim
        assert all(h.finish_reason == FinishReason.LENGTH and h.error is None for h in handles + extra)
        assert all(h.instance_id != victim or h.resumes for h in extra)
        emitted.assert_served_once({victim})
        assert_no_leak(cluster)


def test_a_hung_instance_is_declared_dead_fenced_and_its_requests_resumed():
    """An instance that stops answering (but whose engine still runs) is removed after the
    heartbeat timeout and fenced, so its requests never run in two places. Its engine is
    held while it hangs, so its requests are still there when the timeout comes, however
    fast the machine."""
    engine = spec(num_blocks=256)
    n, max_tokens = 8, 200
    ps, sps = prompts(n), samplings(n, max_tokens)
    expected = reference(engine, ps, sps)
    victim = "instance-000"
    with running(config(2, engine, migration=False, heartbeat_s=0.5)) as (cluster, emitted, crashed), \
            HoldOutputs(cluster, victim) as engine_gate:
        handles = [cluster.submit(p, sp) for p, sp in zip(ps, sps)]
        on_victim = [h for h in handles if h.instance_id == victim]
        assert on_victim
        wait_for(lambda: all(h.token_ids for h in on_victim), what="tokens from the victim")
        inst = local(cluster, victim)
        crashed.append(inst)
        hang = threading.Event()
        original_load = inst.llumlet.load

        def stuck_load():
            hang.wait(60)  # the RPC never returns
            return original_load()

        inst.llumlet.load = stuck_load  # type: ignore[method-assign]
        engine_gate.hold()  # the victim's requests make no progress while it hangs
        try:
            wait_for(lambda: inst.llumlet.dead, 60, "the unresponsive instance to be fenced")
            assert all(not h.finished for h in on_victim)
        finally:
            hang.set()
            engine_gate.release()
        got = wait_all(handles)
        assert got == expected
        assert inst.llumlet.dead, "the unresponsive instance was not fenced"
        assert cluster.state()["dead_instances"] == [victim]
        assert all(h.resumes >= 1 for h in on_victim if h.finish_reason is not None and victim in h.instances_seen
                   and h.instances_seen[-1] != victim)
        emitted.assert_served_once({victim})
        assert_no_leak(cluster)


def test_a_resumed_job_call_keeps_its_objective_priority_and_jobs_kv_on_its_new_instance():
    """A job call resumed after its instance died is, on its new instance, the call it was: the
    JIT policy there judges it by its objective (a margin, not best effort), it keeps its priority,
    and when it ends its KV is kept under its job's key, where the job's next call will look."""
    block = 8
    engine = EngineSpec(engine=EngineConfig(num_blocks=128, block_size=block, max_batch_size=16, batch_policy="jit",
                                            num_host_blocks=64, conversation_host_blocks=48), model=MODEL)
    cfg = config(2, engine, migration=False)
    cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, policy=PolicyConfig(dispatch="jobs")))
    obj = Objective(job_id="agent", job_deadline_ms=3_600_000.0, job_calls_left=2)  # an hour: never missed here
    p, sp = prompts(1, base_len=37)[0], SamplingParams(max_tokens=30, ignore_eos=True)
    with running(cfg) as (cluster, _, crashed), contextlib.ExitStack() as stack:
        gates = {iid: stack.enter_context(HoldOutputs(cluster, iid)) for iid in cluster.instance_ids()}
        for g in gates.values():
            g.hold()
        h = cluster.submit(p, sp, priority=1, objective=obj)
        victim = h.instance_id
        (dest,) = [i for i in gates if i != victim]
        gates[victim].run_until(lambda: len(h.token_ids) >= 5, "tokens from the victim")
        inst = local(cluster, victim)
        inst.crash()
        crashed.append(inst)
        gates[victim].release()
        gates[dest].wait_held()  # the destination delivered the resumed call's first batch
        engine_there = local(cluster, dest).llumlet.engine
        seq = engine_there.seqs[h.request_id]
        assert (seq.objective, seq.priority, seq.conversation_id) == (obj, 1, "job:agent")
        plan = engine_there.scheduler.batch_policy.last
        assert plan is not None and plan.groups[h.request_id] is not Group.BEST_EFFORT
        assert math.isfinite(plan.margins[h.request_id])
        (seen,) = [r for r in local(cluster, dest).load().running if r.request_id == h.request_id]
        assert seen.priority == 1 and math.isfinite(seen.slo_margin_s)
        gates[dest].release()
        (tokens,) = wait_all([h])
        assert h.resumes == 1 and h.instances_seen[-1] == dest
        assert [tokens] == reference(engine, [p], 30)
        wait_for(lambda: "job:agent" in engine_there.conversations, what="the job's KV kept on its new instance")
        assert_no_leak(cluster)


def test_death_of_the_last_instance_ends_requests_with_an_error():
    engine = spec(num_blocks=128)
    with running(config(1, engine, migration=False)) as (cluster, _, crashed), \
            HoldOutputs(cluster, "instance-000") as engine_gate:
        engine_gate.hold()
        handles = [cluster.submit(p, SamplingParams(max_tokens=300, ignore_eos=True)) for p in prompts(3)]
        engine_gate.run_until(lambda: all(h.token_ids for h in handles), "first tokens")
        inst = local(cluster, "instance-000")
        inst.crash()
        crashed.append(inst)
        engine_gate.release()
        for h in handles:
            events = list(h.events(timeout=RESULT_TIMEOUT_S))
            assert events[-1].finished and events[-1].error and "no other instance" in events[-1].error
            assert h.finish_reason == FinishReason.ABORT and h.error == events[-1].error
            with pytest.raises(RequestFailedError, match="no other instance"):
                h.result(timeout=RESULT_TIMEOUT_S)
        assert cluster.active_requests() == []
        assert cluster.state()["failed_requests"] == 3
        with pytest.raises(Exception):
            cluster.submit(prompts(1)[0], SamplingParams(max_tokens=4))


def test_a_dead_instance_is_replaced_by_a_new_incarnation_that_serves():
    engine = spec(num_blocks=256)
    ps, sps = prompts(8), samplings(8, 60)
    expected = reference(engine, ps, sps)
    victim = "instance-001"
    with running(config(2, engine, migration=False, replace_dead=True)) as (cluster, emitted, crashed), \
            HoldOutputs(cluster, victim) as engine_gate:
        engine_gate.hold()
        handles = [cluster.submit(p, sp) for p, sp in zip(ps[:4], sps[:4])]
        on_victim = [h for h in handles if h.instance_id == victim]
        assert on_victim, [h.instance_id for h in handles]
        engine_gate.run_until(lambda: all(h.token_ids for h in on_victim), "tokens from the victim")
        inst = local(cluster, victim)
        old = inst.incarnation
        inst.crash()
        crashed.append(inst)
        engine_gate.release()
        wait_for(lambda: cluster.instance_ids() == ["instance-000", "instance-002"], what="a replacement")
        assert wait_all(handles) == expected[:4]  # the victim's requests resumed, exactly
        # The launch is counted when the scheduler's loop collects it, a tick after the instance is listed.
        wait_for(lambda: cluster.control.membership()["healing"]["replaced"] == 1, what="the replacement counted")
        m = cluster.control.membership()
        assert m["incarnations"]["instance-002"] not in (old, m["incarnations"]["instance-000"])
        assert m["healing"]["target"] == 2
        assert cluster.health().status == "ok"
        cluster.drain("instance-000")  # scale in by hand: the replacement alone takes new requests
        wait_for(lambda: cluster.instance_ids() == ["instance-002"], what="the drain")
        more = [cluster.submit(p, sp) for p, sp in zip(ps[4:], sps[4:])]
        assert {h.instance_id for h in more} == {"instance-002"}
        assert wait_all(more) == expected[4:]
        assert cluster.health().status == "ok"  # a drained instance is not missed: the count followed it
        emitted.assert_served_once({victim})
        assert_no_leak(cluster)


# ----- an instance dies in the middle of a migration ----------------------------------------------

STAGES = {"prealloc": wire.PreAlloc, "blocks": wire.Blocks, "commit": wire.Commit}


@pytest.mark.parametrize("victim_side,stage,when", [
    ("dst", "prealloc", "before"), ("dst", "blocks", "before"), ("dst", "commit", "before"),
    ("dst", "commit", "after"),
    ("src", "prealloc", "after"), ("src", "blocks", "after"), ("src", "commit", "after"),
])
def test_death_during_a_migration(monkeypatch, victim_side, stage, when):
    """One loaded instance, two empty ones join: the first migration (always out of the loaded
    instance) loses its source or its destination when the destination sees ``stage``
    (``before`` handling it, or ``after``: the message took effect, the reply is lost)."""
    engine = spec(num_blocks=96)
    n, max_tokens = 8, 120
    ps, sps = prompts(n), samplings(n, max_tokens)
    expected = reference(engine, ps, sps)
    cfg = config(1, engine)
    fired = threading.Event()
    victims: list[str] = []
    lock = threading.Lock()
    original = Llumlet._handle_migration_message
    cluster_box: dict[str, Cluster] = {}

    def hooked(self, msg, payload):
        with lock:
            go = not fired.is_set() and isinstance(msg, STAGES[stage])
            if go:
                fired.set()
        if not go:
            return original(self, msg, payload)
        src = local(cluster_box["c"], "instance-000")
        victim = self if victim_side == "dst" else src.llumlet
        victims.append(victim.instance_id)
        if when == "before":
            victim.crash()
            return original(self, msg, payload)
        reply = original(self, msg, payload)
        victim.crash()
        return reply

    monkeypatch.setattr(Llumlet, "_handle_migration_message", hooked)
    with running(cfg) as (cluster, emitted, crashed):
        cluster_box["c"] = cluster
        with HoldOutputs(cluster, "instance-000") as engine_gate:
            # The source steps once per migration round until the migration reached the stage,
            # so its requests cannot finish first, however fast it decodes.
            engine_gate.hold()
            lockstep = InLockstep(cluster, [engine_gate])
            handles = [cluster.submit(p, sp) for p, sp in zip(ps, sps)]
            src = local(cluster, "instance-000")
            cluster.control.daemon.launch(2)
            joined = [local(cluster, i) for i in ("instance-001", "instance-002")]
            lockstep.run_until(fired.is_set, f"a migration to reach {stage}")
        crashed.extend(i for i in [src] + joined if i.instance_id in victims)
        got = wait_all(handles)
        assert got == expected
        (victim,) = victims
        wait_for(lambda: victim not in cluster.instance_ids(), what="the victim to be removed")
        assert cluster.state()["dead_instances"] == [victim]
        if victim_side == "src":
            assert cluster.state()["resumed_requests"] > 0
        emitted.assert_served_once({victim})
        assert_no_leak(cluster)  # a surviving destination freed the dead source's reservation


def test_resume_frees_a_reservation_left_by_the_dead_source():
    """The dead source had pre-allocated blocks for the same request on the instance that
    resumes it: the reservation goes when the request is resumed there, nothing leaks."""
    rec = []
    dst = Llumlet(LlumletConfig(instance_id="d", transport="inproc", migration_timeout_s=60.0),
                  make_engine(dtype="float64", num_blocks=64), CallbackSink(lambda i, rt, outs: rec.extend(outs)))
    dst.start()
    try:
        reply = dst._handle_migration_message(wire.PreAlloc("m1", "r1", 4), None)
        assert reply["ok"] and dst.load().used_blocks == 4
        from llumnix_py.engines.types import MigrationRequestState, SeqStatus

        sp = SamplingParams(max_tokens=10, ignore_eos=True)
        state = MigrationRequestState("r1", tuple(range(3, 40)), (7, 8), sp, 0, 0.0, 0, SeqStatus.WAITING, 0, "x")
        assert dst.resume_request(state) is True
        assert dst.resume_request(state) is False  # already here
        wait_for(dst.is_idle, what="the resumed request to finish")
        assert [o.index for o in rec if o.request_id == "r1"] == list(range(2, 10))
        assert dst.load().used_blocks == 0 and not dst.dest.incoming
        dst.engine.check_invariants()
    finally:
        dst.stop()


# ----- the frontend dies: leases --------------------------------------------------------------------


def test_llumlet_aborts_requests_of_a_frontend_whose_lease_lapsed():
    """Leases run on the llumlet's clock (a ``ManualClock`` here). The engine is held after
    its first step while the test moves time past one frontend's lease and renews the
    other's, so the outcome does not depend on how fast the engine decodes."""
    outs: list = []
    first_step = threading.Event()
    go_on = threading.Event()

    def sink(iid, rt, o):
        outs.extend((rt, x) for x in o)
        first_step.set()
        go_on.wait()  # the engine loop waits here (outside its lock) until the test lets it go

    clock = ManualClock()
    llumlet = Llumlet(LlumletConfig(instance_id="a", transport="inproc", lease_timeout_s=0.3),
                      make_engine(dtype="float64", num_blocks=128), CallbackSink(sink), clock=clock)
    sp = SamplingParams(max_tokens=100, ignore_eos=True)
    long_sp = SamplingParams(max_tokens=400, ignore_eos=True)
    # Queued before the loop starts, so all three are admitted (and both leases begin) at t=0.
    llumlet.add_request(Request("gone", tuple(range(3, 30)), long_sp, reply_to="tcp://gone"))
    llumlet.add_request(Request("alive", tuple(range(3, 30)), long_sp, reply_to="tcp://alive"))
    llumlet.add_request(Request("nobody", tuple(range(3, 30)), sp, reply_to=""))  # no frontend: no lease
    llumlet.start()
    try:
        try:
            wait_for(first_step.is_set, 60, "the first step")
            clock.now = 0.2
            llumlet.renew_lease("tcp://alive")
            clock.now = 0.4  # "gone": 0.4 s since its lease began (> 0.3); "alive": 0.2 s since renewed
        finally:
            go_on.set()
        wait_for(lambda: llumlet.stats.lease_aborts == 1, 60, "the lapsed lease to abort its request")
        assert llumlet.held(["gone", "alive"]) == ["alive"]
        aborts = [(rt, o) for rt, o in outs if o.finish_reason == FinishReason.ABORT]
        assert [(rt, o.request_id) for rt, o in aborts] == [("tcp://gone", "gone")]
        wait_for(llumlet.is_idle, 60, "the renewed request to finish")
        finished = {o.request_id: o.finish_reason for _, o in outs if o.finish_reason is not None}
        assert finished == {"gone": FinishReason.ABORT, "alive": FinishReason.LENGTH, "nobody": FinishReason.LENGTH}
        assert llumlet.stats.lease_aborts == 1
        assert llumlet.load().used_blocks == 0
        llumlet.engine.check_invariants()
    finally:
        llumlet.stop()


def test_a_dead_frontend_does_not_keep_instances_generating():
    """Leases run on a ``ManualClock`` (set on each llumlet) and the engines are held, so
    nothing depends on how fast they decode: renewals keep the requests alive past the
    lease; once the frontend stops renewing, the next iteration aborts them."""
    engine = spec(num_blocks=1024)
    max_tokens, lease = 400, 0.5
    clock = ManualClock()
    with running(config(2, engine, migration=False, lease_s=lease)) as (cluster, _, _crashed), \
            contextlib.ExitStack() as stack:
        renewed: dict[str, float] = {}  # instance -> the clock at its latest lease renewal
        for iid in cluster.instance_ids():
            llumlet = local(cluster, iid).llumlet
            llumlet.clock = clock
            renew = llumlet.renew_lease

            def renew_and_note(reply_to, _iid=iid, _renew=renew):
                _renew(reply_to)
                renewed[_iid] = clock()

            llumlet.renew_lease = renew_and_note  # type: ignore[method-assign]
        gates = {iid: stack.enter_context(HoldOutputs(cluster, iid)) for iid in cluster.instance_ids()}
        for gate in gates.values():
            gate.hold()
        handles = [cluster.submit(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for p in prompts(4)]
        busy = {h.instance_id for h in handles}
        for iid in busy:
            gates[iid].run_until(lambda: all(h.token_ids for h in handles if h.instance_id == iid), "first tokens")
        clock.advance(2 * lease)  # past the lease: only renewals keep the requests alive now
        wait_for(lambda: all(renewed.get(iid) == clock() for iid in busy), what="lease renewals after the lapse")
        for iid in busy:
            assert gates[iid].step()  # an engine iteration at the new time: the renewed leases hold
        assert sum(local(cluster, i).stats()["lease_aborts"] for i in busy) == 0
        assert not any(h.finished for h in handles)
        cluster.stop_supervisor()  # the frontend "dies": no more renewals
        clock.advance(2 * lease)
        stack.close()  # the engines run on, and their next iteration finds the leases lapsed
        for iid in cluster.instance_ids():
            inst = local(cluster, iid)
            wait_for(lambda: inst.llumlet.is_idle(), 30, f"{iid} to drop the dead frontend's requests")
        assert sum(local(cluster, i).stats()["lease_aborts"] for i in cluster.instance_ids()) == 4
        assert all(h.finish_reason == FinishReason.ABORT for h in handles)
        assert all(len(h.token_ids) < max_tokens for h in handles)
        assert_no_leak(cluster)


def test_client_abort_mid_stream_frees_blocks_everywhere():
    engine = spec(num_blocks=128)
    with running(config(2, engine)) as (cluster, _, _crashed), contextlib.ExitStack() as stack:
        gates = {iid: stack.enter_context(HoldOutputs(cluster, iid)) for iid in cluster.instance_ids()}
        for gate in gates.values():
            gate.hold()
        h = cluster.submit(prompts(1)[0], SamplingParams(max_tokens=400, ignore_eos=True))
        gates[h.instance_id].run_until(lambda: len(h.token_ids) >= 3, "first tokens")
        cluster.abort(h.request_id)  # mid-stream: its engine is held after its third token
        stack.close()
        assert h.finish_reason == FinishReason.ABORT and h.error is None
        assert_no_leak(cluster)


def test_a_dead_handle_raises_instance_died():
    engine = spec(num_blocks=64)
    with running(config(1, engine, migration=False)) as (cluster, _, crashed):
        inst = local(cluster, "instance-000")
        inst.crash()
        crashed.append(inst)
        with pytest.raises(InstanceDiedError):
            inst.load()
        wait_for(lambda: cluster.instance_ids() == [], what="the dead instance to be removed")
        assert cluster.state()["dead_instances"] == ["instance-000"]


# ----- what an HTTP client sees when its request cannot be continued ---------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_http_client_gets_an_error_when_the_last_instance_dies(stream):
    import httpx

    from llumnix_py.server.app import ServerThread, create_app

    engine = spec(num_blocks=128)
    with running(config(1, engine, migration=False)) as (cluster, _, crashed), \
            HoldOutputs(cluster, "instance-000") as engine_gate:
        engine_gate.hold()
        with ServerThread(create_app(cluster)) as srv:
            body = {"model": cluster.model_name, "prompt": list(range(5, 45)), "max_tokens": 400,
                    "ignore_eos": True, "stream": stream}
            with httpx.Client(timeout=RESULT_TIMEOUT_S) as client:
                if stream:
                    first_line = threading.Event()

                    def pump():
                        # One batch at a time until the client has its first line (the first
                        # tokens may not decode to text yet); the engine stays held after it.
                        engine_gate.wait_held()
                        while not first_line.is_set() and engine_gate.step():
                            pass

                    pumper = threading.Thread(target=pump)
                    pumper.start()
                    with client.stream("POST", srv.url + "/v1/completions", json=body) as r:
                        lines = r.iter_lines()
                        try:
                            first = next(line for line in lines if line.startswith("data: "))
                        finally:
                            first_line.set()
                            pumper.join()
                        assert "choices" in first
                        inst = local(cluster, "instance-000")
                        inst.crash()  # held after its first tokens: the request is still running
                        crashed.append(inst)
                        engine_gate.release()
                        rest = [line for line in lines if line.startswith("data: ")]
                    errors = [line for line in rest if '"error"' in line]
                    assert errors and '"instance_failed"' in errors[0], rest[-3:]
                    assert rest[-1] == "data: [DONE]"
                else:
                    def kill_once_running():
                        # The engine is held after the request's first tokens: it is accepted and
                        # cannot finish before the crash, however fast the engine decodes.
                        engine_gate.wait_held()  # the request's first tokens are out
                        inst = local(cluster, "instance-000")
                        inst.crash()
                        crashed.append(inst)
                        engine_gate.release()

                    killer = threading.Thread(target=kill_once_running)
                    killer.start()
                    try:
                        r = client.post(srv.url + "/v1/completions", json=body)
                    finally:
                        engine_gate.release()
                        killer.join()
                    assert r.status_code == 503, r.text
                    assert r.json()["error"]["code"] == "instance_failed"


# ----- fencing is by incarnation: an instance id can come back --------------------------------------


def test_a_reused_instance_id_is_a_new_incarnation_not_a_dead_instance():
    """An instance dies; a new instance is launched under the same id (as a replacement or a
    restarted scheduler's launch would be). The frontend fences the dead incarnation only:
    the new one takes requests, and its tokens count, as any live instance's."""
    engine = spec(num_blocks=128)
    ps = prompts(2)
    expected = reference(engine, ps, 24)
    with running(config(1, engine, migration=False)) as (cluster, emitted, crashed):
        old = local(cluster, "instance-000")
        old.crash()
        crashed.append(old)
        daemon = cluster.control.daemon
        # Both must know before the id comes back: the frontend may learn of the death on its
        # own (a failed call) before the scheduler's tick records it, and a new incarnation
        # added first would leave no death on the scheduler's record.
        wait_for(lambda: cluster.supervisor.is_dead("instance-000") and "instance-000" in daemon.membership()["dead"],
                 what="the frontend and the scheduler to learn the death")
        new = daemon.launcher.launch("instance-000")  # the same id, a new process
        assert new.incarnation != old.incarnation
        daemon.add_instance(new)
        wait_for(lambda: not cluster.supervisor.is_dead("instance-000"),
                 what="the frontend to learn the new incarnation")
        handles = [cluster.submit(p, SamplingParams(max_tokens=24, ignore_eos=True)) for p in ps]
        assert wait_all(handles) == expected
        assert all(h.resumes == 0 and h.error is None and h.instances_seen == ["instance-000"] for h in handles)
        assert cluster.state()["dead_instances"] == ["instance-000"]  # the old incarnation's death stays on record
        assert_no_leak(cluster)
