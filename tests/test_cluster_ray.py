"""The whole system on Ray actors: live migration evens out an imbalanced start, drain, scheduler state.

Uses the session's Ray (``ray_session`` in conftest); every test stops its cluster,
even when it fails, so the named actors never outlive it.
"""

from __future__ import annotations

import pytest

from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec, SchedulerConfig
from llumnix_py.engines.types import SamplingParams
from llumnix_py.instance import InstanceDiedError, InstanceHandle
from llumnix_py.runtime.ray_runtime import INSTANCE_PREFIX, SCHEDULER_NAME
from policies.virtual_usage import freeness
from tests.cluster_helpers import SMALL_MODEL as MODEL
from tests.cluster_helpers import assert_no_leak
from tests.cluster_helpers import named_actors as _named_actors
from tests.cluster_helpers import prompts, reference, wait_all, wait_for
from tests.cluster_helpers import running_ray_cluster as running_cluster
from tests.ray_gates import held_engines

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NAMESPACE = "llumnix-test-cluster"


def spec(num_blocks: int) -> EngineSpec:
    return EngineSpec(engine=EngineConfig(num_blocks=num_blocks, max_batch_size=32), model=MODEL)


def config(num_instances: int, engine: EngineSpec) -> ClusterConfig:
    return ClusterConfig(num_instances=num_instances, runtime="ray", engine=engine, ray_namespace=NAMESPACE,
                         scheduler=SchedulerConfig(poll_interval_s=0.01, migration_interval_s=0.02))


def test_imbalanced_start_is_evened_out_by_live_migration_on_ray(ray_session):
    # One instance takes a burst that does not fit in its KV pool (about two requests
    # at a time), then two empty instances join: the crowded one is a migration source
    # (freeness < 3) until its queue is gone.
    engine = spec(num_blocks=96)
    max_tokens = 700
    ps = prompts(16)
    expected = reference(engine, ps, max_tokens)
    cfg = config(1, engine)
    with running_cluster(ray_session, cfg) as cluster:
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        with held_engines(ray_session, cluster, ["instance-000"]) as gates:
            # Held, one batch at a time, until it is a migration source, then held there: it is
            # still crowded when the others have joined, however fast it decodes; its running
            # requests migrate out without a step of it.
            handles = [cluster.submit(p, sp) for p in ps]
            assert {h.instance_id for h in handles} == {"instance-000"}
            crowded = cluster.control.instance("instance-000")
            policy = cfg.scheduler.policy
            gates["instance-000"].run_until(lambda: freeness(crowded.load(), policy) < policy.migrate_out_threshold,
                                            "instance-000 to be a migration source")
            new = cluster.launch(2)
            assert sorted(new) == ["instance-001", "instance-002"]
            wait_for(lambda: migrations_finished(cluster) > 0, what="a migration off the held instance")
        got = wait_all(handles)
        for i, (tokens, want) in enumerate(zip(got, expected)):
            assert tokens == want, f"request {i}: tokens differ from the unmigrated run"
        state = cluster.state()
        assert state["migrations"].get("finished", 0) > 0, state["migrations"]
        migrated = [h for h in handles if len(set(h.instances_seen)) > 1]
        assert migrated
        served = {iid for h in handles for iid in h.instances_seen}
        assert "instance-000" in served and len(served) >= 2, served
        assert state["migration_downtime_ms"] and all(d >= 0 for d in state["migration_downtime_ms"])
        assert_no_leak(cluster)


def migrations_finished(cluster) -> int:
    return cluster.state()["migrations"].get("finished", 0)


def test_drain_on_ray_moves_running_requests_away_with_zero_dropped(ray_session):
    engine = spec(num_blocks=128)
    max_tokens = 500
    ps = prompts(9, base_len=20, step=3)
    expected = reference(engine, ps, max_tokens)
    with running_cluster(ray_session, config(3, engine)) as cluster:
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        with held_engines(ray_session, cluster, cluster.instance_ids()) as gates:
            # Every instance is held from its first batch on, so whichever becomes the victim, its
            # requests are running, and still there, when it is drained; migration needs no step of it.
            handles = [cluster.submit(p, sp) for p in ps]
            # Drain the instance holding the most requests (dispatch timing decides which one that is:
            # a poll may or may not have shown earlier placements yet).
            victim = max(sorted({h.instance_id for h in handles}),
                         key=lambda i: sum(h.instance_id == i for h in handles))
            on_victim = [h for h in handles if h.instance_id == victim]
            assert len(on_victim) >= 2, [h.instance_id for h in handles]
            for iid, gate in gates.items():
                if iid != victim:
                    gate.release()
            victim_handle = cluster.control.instance(victim)
            gates[victim].run_until(lambda: len(victim_handle.load().running) == len(on_victim),
                                    "every victim request running")
            wait_for(lambda: all(h.token_ids for h in on_victim), what="a token of every victim request")
            assert not any(h.finished for h in on_victim)
            cluster.drain(victim)
            extra = cluster.submit(ps[0], sp)
            assert extra.instance_id != victim  # never dispatched to a draining instance
            wait_for(lambda: not running_on(victim_handle), what="the drain to move the victim's requests")
        got = wait_all(handles + [extra])
        assert got == expected + [expected[0]]  # zero dropped, none cut short
        for h in on_victim:
            assert h.instances_seen[0] == victim and h.instances_seen[-1] != victim, h.instances_seen
        wait_for(lambda: victim not in cluster.instance_ids(), what="the drained victim to stop")
        state = cluster.state()
        assert state["migrations"].get("finished", 0) >= len(on_victim)
        assert ("in", victim) in [(ev[1], ev[2]) for ev in state["scale_events"]]
        with pytest.raises(ValueError):  # its actor is gone
            ray_session.get_actor(INSTANCE_PREFIX + victim, namespace=NAMESPACE)
        assert_no_leak(cluster)


def running_on(handle: InstanceHandle) -> int:
    """Requests running on an instance; 0 once it is gone (a drained instance is stopped)."""
    try:
        return len(handle.load().running)
    except InstanceDiedError:
        return 0


def test_scheduler_actor_state_and_cleanup(ray_session):
    engine = spec(num_blocks=128)
    with running_cluster(ray_session, config(3, engine)) as cluster:
        ids = cluster.instance_ids()
        assert ids == ["instance-000", "instance-001", "instance-002"]
        assert _named_actors(ray_session, NAMESPACE) == sorted([SCHEDULER_NAME] + [INSTANCE_PREFIX + i for i in ids])
        sp = SamplingParams(max_tokens=24, ignore_eos=True)
        with held_engines(ray_session, cluster, ids):
            # Held after their first batch, the instances keep every request they were given
            # while the others are dispatched, however fast they decode.
            handles = [cluster.submit(p, sp) for p in prompts(6, base_len=10)]
            assert {h.instance_id for h in handles} == set(ids)  # spread over the empty instances
        assert all(len(t) == 24 for t in wait_all(handles))
        state = cluster.state()
        assert state["dispatched"] == 6
        assert state["active_requests"] == 0
        assert [i["instance_id"] for i in state["instances"]] == ids
        for inst in state["instances"]:
            assert inst["total_blocks"] == 128 and not inst["terminating"]
        assert state["scale_events"] == []
        assert_no_leak(cluster)
    assert _named_actors(ray_session, NAMESPACE) == []  # stop() removed the scheduler and every instance
