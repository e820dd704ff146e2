"""Fault injection on Ray actors: an instance actor is killed, the scheduler actor is killed.

Nothing is lost at the moment of a death, and the cluster returns to its configured
shape by itself: the frontend's watchdog restarts a killed scheduler, the scheduler
replaces a killed instance. Every wait is for a condition (a watchdog's restart count,
the instance list), never a duration.

Uses the session's Ray (``ray_session`` in conftest). Every test removes the actors
of its namespace in ``finally``, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import signal

import pytest

from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec, SchedulerConfig
from llumnix_py.engines.types import FinishReason
from llumnix_py.healing import RestartPolicy
from llumnix_py.runtime.ray_runtime import INSTANCE_PREFIX, SCHEDULER_NAME
from tests.cluster_helpers import (
    assert_no_leak,
    RESULT_TIMEOUT_S,
    prompts,
    reference,
    samplings,
    wait_all,
    wait_for,
)
from tests.cluster_helpers import SMALL_MODEL as MODEL
from tests.cluster_helpers import named_actors as _named_actors
from tests.cluster_helpers import running_ray_cluster as running_cluster
from tests.ray_gates import held_engines

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NAMESPACE = "llumnix-test-faults"


def spec(num_blocks: int = 256) -> EngineSpec:
    return EngineSpec(engine=EngineConfig(num_blocks=num_blocks, max_batch_size=32), model=MODEL)


def config(num_instances: int, engine: EngineSpec, restart_scheduler: bool = True) -> ClusterConfig:
    return ClusterConfig(num_instances=num_instances, runtime="ray", engine=engine, ray_namespace=NAMESPACE,
                         scheduler=SchedulerConfig(poll_interval_s=0.02, migration_interval_s=0.05),
                         scheduler_restart=RestartPolicy(enabled=restart_scheduler))


def workload(n: int, max_tokens: int, seed_base: int):
    """The engine, ``n`` prompts and samplings, and their tokens from an undisturbed run."""
    engine = spec()
    ps, sps = prompts(n, base_len=20, step=2), samplings(n, max_tokens, seed_base=seed_base)
    return engine, ps, sps, reference(engine, ps, sps)


def every_request_running(cluster, instance_id: str, handles):
    """A condition the instance answers: every request dispatched to it is running there."""
    mine = sum(h.instance_id == instance_id for h in handles)
    inst = cluster.control.instance(instance_id)
    return lambda: len(inst.load().running) == mine


def kill_process(ray, actor) -> None:
    """SIGKILL the actor's worker process (a crash Ray did not ask for)."""
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["ray_kill", "sigkill"])
def test_killing_an_instance_actor_resumes_its_requests_elsewhere(ray_session, how):
    engine, ps, sps, expected = workload(20, 120, seed_base=500)
    victim = "instance-001"
    with running_cluster(ray_session, config(3, engine)) as cluster:
        with held_engines(ray_session, cluster, [victim]) as gates:
            # The victim is held from its first batch on: its requests are running, and still
            # there, when it is killed (its gate goes with it).
            handles = [cluster.submit(p, sp) for p, sp in zip(ps, sps)]
            on_victim = [h for h in handles if h.instance_id == victim]
            assert len(on_victim) >= 2, [h.instance_id for h in handles]
            victim_handle = cluster.control.instance(victim)
            gates[victim].run_until(lambda: len(victim_handle.load().running) == len(on_victim),
                                    "every victim request running")
            wait_for(lambda: all(h.token_ids for h in on_victim), what="tokens from the victim")
            assert not all(h.finished for h in on_victim)
            actor = ray_session.get_actor(INSTANCE_PREFIX + victim, namespace=NAMESPACE)
            if how == "sigkill":
                kill_process(ray_session, actor)
            else:
                ray_session.kill(actor, no_restart=True)
        got = wait_all(handles)
        assert got == expected  # no token lost, none repeated, greedy and seeded alike
        assert all(h.finish_reason == FinishReason.LENGTH and h.error is None for h in handles)
        wait_for(lambda: victim not in cluster.instance_ids(), what="the victim to be removed")
        state = cluster.state()
        assert state["dead_instances"] == [victim]
        assert state["resumed_requests"] >= 1 and state["failed_requests"] == 0
        assert all(h.instances_seen[-1] != victim for h in on_victim if not h.finished or h.resumes)
        extra = cluster.submit(ps[0], sps[0])  # the dead instance is never chosen again
        assert extra.instance_id != victim and extra.result(timeout=RESULT_TIMEOUT_S) == expected[0]
        # ... and a new one takes its place: the configured count is back.
        wait_for(lambda: len(cluster.instance_ids()) == 3, RESULT_TIMEOUT_S, "a replacement instance")
        assert victim not in cluster.instance_ids() and cluster.health().status == "ok"
        assert_no_leak(cluster)


def test_killing_the_scheduler_keeps_requests_running_and_a_restarted_one_reattaches(ray_session):
    """With the watchdog off: the frontend's fallback dispatch, then a restart by hand."""
    engine, ps, sps, expected = workload(12, 150, seed_base=500)
    with running_cluster(ray_session, config(3, engine, restart_scheduler=False)) as cluster:
        ids = cluster.instance_ids()
        assert ids == ["instance-000", "instance-001", "instance-002"]
        with held_engines(ray_session, cluster, ids) as gates:
            # Every instance is held from its first batch on, so the requests are still running
            # when the scheduler dies, and when the frontend dispatches without it.
            handles = [cluster.submit(p, sp) for p, sp in zip(ps[:8], sps[:8])]
            for iid in {h.instance_id for h in handles}:
                gates[iid].run_until(every_request_running(cluster, iid, handles), f"{iid}'s requests running")
            wait_for(lambda: all(h.token_ids for h in handles), what="first tokens")
            assert not any(h.finished for h in handles)
            ray_session.kill(ray_session.get_actor(SCHEDULER_NAME, namespace=NAMESPACE), no_restart=True)
            wait_for(lambda: not cluster.control.scheduler_reachable or cluster.control.actor is None, 30,
                     "the frontend to notice")
            # The instances outlive the scheduler (they are not owned by it) ...
            assert set(INSTANCE_PREFIX + i for i in ids) <= set(_named_actors(ray_session, NAMESPACE))
            # ... new requests are dispatched by the frontend itself, over its last known loads.
            more = [cluster.submit(p, sp) for p, sp in zip(ps[8:], sps[8:])]
            assert {h.instance_id for h in more} <= set(ids)
            assert not any(h.finished for h in handles)
        got = wait_all(handles + more)
        assert got == expected
        assert all(h.error is None for h in handles + more)
        cluster.restart_scheduler()
        assert cluster.instance_ids() == ids  # attached, none launched
        state = cluster.state()
        assert [i["instance_id"] for i in state["instances"]] == ids
        after = [cluster.submit(p, sp) for p, sp in zip(ps[:3], sps[:3])]
        assert wait_all(after) == expected[:3]
        assert cluster.state()["dispatched"] == 3  # through the new scheduler
        assert_no_leak(cluster)
    assert _named_actors(ray_session, NAMESPACE) == []


def test_a_killed_scheduler_and_a_killed_instance_come_back_by_themselves_under_load(ray_session):
    engine, ps, sps, expected = workload(16, 120, seed_base=700)
    victim = "instance-001"
    with running_cluster(ray_session, config(3, engine)) as cluster:
        ids = cluster.instance_ids()
        assert cluster.health().status == "ok"
        with held_engines(ray_session, cluster, ids) as gates:
            # Every instance is held from its first batch on: requests are running everywhere
            # when the scheduler and the victim die (both SIGKILLed, no call from the test after).
            handles = [cluster.submit(p, sp) for p, sp in zip(ps[:10], sps[:10])]
            assert any(h.instance_id == victim for h in handles), [h.instance_id for h in handles]
            for iid in {h.instance_id for h in handles}:
                gates[iid].run_until(every_request_running(cluster, iid, handles), f"{iid}'s requests running")
            wait_for(lambda: all(h.token_ids for h in handles), what="first tokens")
            kill_process(ray_session, ray_session.get_actor(SCHEDULER_NAME, namespace=NAMESPACE))
            kill_process(ray_session, ray_session.get_actor(INSTANCE_PREFIX + victim, namespace=NAMESPACE))
        more = [cluster.submit(p, sp) for p, sp in zip(ps[10:], sps[10:])]  # load goes on meanwhile
        assert wait_all(handles + more) == expected  # nothing lost, nothing repeated
        assert all(h.error is None for h in handles + more)
        wait_for(lambda: cluster.control.healing()["restarts"] >= 1, RESULT_TIMEOUT_S, "the scheduler restarted")
        wait_for(lambda: len(cluster.instance_ids()) == 3 and victim not in cluster.instance_ids(),
                 RESULT_TIMEOUT_S, "the victim replaced")
        wait_for(lambda: cluster.health().status == "ok", RESULT_TIMEOUT_S, "health back to ok")
        now = cluster.instance_ids()
        assert set(ids) - {victim} < set(now) and not set(now) & {victim}
        state = cluster.state()
        assert state["stale"] is False and state["dead_instances"] in ([], [victim])
        before = state["dispatched"]
        after = [cluster.submit(p, sp) for p, sp in zip(ps[:6], sps[:6])]
        assert wait_all(after) == expected[:6]
        assert cluster.state()["dispatched"] - before == 6  # through the restarted scheduler
        assert_no_leak(cluster)
    assert _named_actors(ray_session, NAMESPACE) == []


def test_the_scheduler_command_restarts_its_killed_daemon(ray_session, monkeypatch):
    """``llumnix-py scheduler``'s foreground process watches the detached daemon: a SIGKILLed
    daemon comes back by itself and attaches the instance it left."""
    from llumnix_py import cli
    from llumnix_py.runtime.ray_runtime import get_scheduler, kill_instances, scheduler_alive

    ns = NAMESPACE + "-cli"
    seen: dict[str, object] = {}

    def kill_and_wait_instead_of_watching(namespace: str) -> int:
        assert namespace == ns
        old = get_scheduler(ns)
        seen["before"] = ray_session.get(old.call.remote("instance_ids"), timeout=60)
        kill_process(ray_session, old)
        wait_for(lambda: scheduler_alive(ns) and get_scheduler(ns)._actor_id != old._actor_id, RESULT_TIMEOUT_S,
                 "a new daemon")
        new = get_scheduler(ns)
        wait_for(lambda: ray_session.get(new.call.remote("membership"), timeout=60) is not None, RESULT_TIMEOUT_S,
                 "the new daemon to attach its instances")
        seen["after"] = ray_session.get(new.call.remote("instance_ids"), timeout=60)
        return 0

    monkeypatch.setattr(cli, "_watch_daemon", kill_and_wait_instead_of_watching)
    args = cli.build_parser().parse_args(["scheduler", "--instances", "1", "--engine", "sim", "--namespace", ns,
                                          "--num-blocks", "64"])
    try:
        assert cli.cmd_scheduler(args) == 0
        assert seen["before"] == seen["after"] == ["instance-000"]
    finally:
        with contextlib.suppress(Exception):
            actor = get_scheduler(ns)
            ray_session.get(actor.call.remote("stop", (True,)), timeout=60)
            ray_session.kill(actor)
        kill_instances(ns)
    wait_for(lambda: _named_actors(ray_session, ns) == [], 60, "the daemon's actors to go")
