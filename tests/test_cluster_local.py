"""The whole system in one process (runtime ``local``): dispatch, live migration, drain, priorities.

Every test uses the small float64 model, so greedy tokens are identical whatever the
batch composition, and compares each request's tokens with an unmigrated run of the
same requests on a single engine.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from typing import Iterator

from llumnix_py.config import (
    ClusterConfig,
    EngineConfig,
    EngineSpec,
    PolicyConfig,
    SchedulerConfig,
)
from llumnix_py.engines.types import SamplingParams
from llumnix_py.frontend.cluster import Cluster
from tests.cluster_helpers import SMALL_MODEL as MODEL
from tests.cluster_helpers import HoldOutputs, InLockstep, assert_no_leak, prompts, reference, wait_all, wait_for


def spec(num_blocks: int = 128, max_batch_size: int = 32) -> EngineSpec:
    return EngineSpec(engine=EngineConfig(num_blocks=num_blocks, max_batch_size=max_batch_size), model=MODEL)


def config(num_instances: int, engine: EngineSpec, policy: PolicyConfig = PolicyConfig()) -> ClusterConfig:
    return ClusterConfig(num_instances=num_instances, runtime="local", engine=engine,
                         scheduler=SchedulerConfig(policy=policy, poll_interval_s=0.01, migration_interval_s=0.02))


@contextlib.contextmanager
def running_cluster(cfg: ClusterConfig) -> Iterator[Cluster]:
    cluster = Cluster.start(cfg)
    try:
        yield cluster
    finally:
        cluster.stop()


def migrations_finished(cluster: Cluster) -> int:
    return cluster.state()["migrations"].get("finished", 0)


# ----- load balancing -------------------------------------------------------------------------


def test_imbalanced_start_is_evened_out_by_live_migration():
    engine = spec(num_blocks=128)
    max_tokens = 150
    ps = prompts(12)
    expected = reference(engine, ps, max_tokens)
    with running_cluster(config(1, engine)) as cluster:
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        with contextlib.ExitStack() as stack:
            # Every instance steps once per migration round until each newcomer took a request:
            # the scheduler sees each state, and the instances keep pace, however fast they decode.
            gates = [stack.enter_context(HoldOutputs(cluster, "instance-000"))]
            gates[0].hold()
            handles = [cluster.submit(p, sp) for p in ps]
            assert {h.instance_id for h in handles} == {"instance-000"}  # the only instance
            new = cluster.control.daemon.launch(2)  # two empty instances join
            assert sorted(new) == ["instance-001", "instance-002"]
            gates += [stack.enter_context(HoldOutputs(cluster, iid)) for iid in new]
            for gate in gates[1:]:
                gate.hold()
            InLockstep(cluster, gates).run_until(
                lambda: all(cluster.control.instance(i).stats()["migrations_in"] for i in new),
                "a migration into each new instance")
        got = wait_all(handles)
        for i, (tokens, want) in enumerate(zip(got, expected)):
            assert len(tokens) == max_tokens
            assert tokens == want, f"request {i}: tokens differ from the unmigrated run"
        assert all(h.finish_reason is not None and h.finish_reason.value == "length" for h in handles)
        migrated = [h for h in handles if len(set(h.instances_seen)) > 1]
        assert migrations_finished(cluster) > 0
        assert migrated, "no request moved off the overloaded instance"
        served = {iid for h in handles for iid in h.instances_seen}
        assert served == {"instance-000", "instance-001", "instance-002"}, served
        for iid in new:  # each new instance really ran requests
            assert cluster.control.instance(iid).stats()["migrations_in"] > 0
        assert cluster.state()["duplicates_dropped"] == 0 or migrated  # duplicates only come from moves
        assert_no_leak(cluster)


def test_a_higher_threshold_spreads_the_load_further():
    """With ``migrate_out_threshold`` 30 more requests leave the crowded instance."""
    engine = spec(num_blocks=256)
    max_tokens = 200
    ps = prompts(12)
    expected = reference(engine, ps, max_tokens)
    with running_cluster(config(1, engine, PolicyConfig(migrate_out_threshold=30.0))) as cluster:
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        with contextlib.ExitStack() as stack:
            gates = [stack.enter_context(HoldOutputs(cluster, "instance-000"))]
            gates[0].hold()  # every instance one step per migration round (see above)
            handles = [cluster.submit(p, sp) for p in ps]
            new = cluster.control.daemon.launch(2)
            gates += [stack.enter_context(HoldOutputs(cluster, iid)) for iid in new]
            for gate in gates[1:]:
                gate.hold()
            InLockstep(cluster, gates).run_until(
                lambda: migrations_finished(cluster) >= 3 and all(
                    cluster.control.instance(i).stats()["migrations_in"] for i in new),
                "three migrations, into each new instance")
        got = wait_all(handles)
        assert got == expected
        assert migrations_finished(cluster) >= 3
        served = {iid for h in handles for iid in h.instances_seen}  # who produced tokens
        assert {"instance-001", "instance-002"} <= served, served
        assert_no_leak(cluster)


# ----- scale-in by draining -------------------------------------------------------------------


def test_drain_migrates_running_requests_away_with_zero_dropped():
    engine = spec(num_blocks=128)
    max_tokens = 400
    ps = prompts(9, base_len=20, step=3)
    expected = reference(engine, ps, max_tokens)
    victim = "instance-001"
    with running_cluster(config(3, engine)) as cluster:
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        victim_handle = cluster.control.instance(victim)
        with HoldOutputs(cluster, victim) as engine_gate:
            # The victim is held from its first batch on: its requests are running, and still
            # there, when it is drained; migration needs no step of it.
            engine_gate.hold()
            handles = [cluster.submit(p, sp) for p in ps]
            on_victim = [h for h in handles if h.instance_id == victim]
            assert len(on_victim) >= 2, [h.instance_id for h in handles]
            engine_gate.run_until(lambda: len(victim_handle.load().running) == len(on_victim), "the victim's batch")
            assert victim_handle.load().running, "the victim should hold running requests when drained"
            assert not any(h.finished for h in on_victim)
            cluster.drain(victim)
            extra = cluster.submit(ps[0], sp)  # dispatch never picks a draining instance
            assert extra.instance_id != victim
            handles.append(extra)
            wait_for(lambda: not victim_handle.load().running, what="the drain to move the victim's requests")
        expected.append(expected[0])
        got = wait_all(handles)
        assert got == expected  # nothing dropped, nothing cut short
        for h in on_victim:
            assert h.instances_seen[0] == victim and h.instances_seen[-1] != victim, h.instances_seen
        wait_for(lambda: victim not in cluster.instance_ids(), what="the drained victim to stop")
        state = cluster.state()
        assert ("in", victim) in [(ev[1], ev[2]) for ev in state["scale_events"]]
        assert state["migrations"].get("finished", 0) >= len(on_victim)
        assert victim not in [i["instance_id"] for i in state["instances"]]
        # The drained engine gave every block back before it stopped.
        victim_load = victim_handle.llumlet.engine.load()
        assert victim_load.used_blocks == 0 and not victim_load.running and not victim_load.waiting
        victim_handle.llumlet.engine.check_invariants()
        assert_no_leak(cluster)


# ----- priorities -----------------------------------------------------------------------------


class BatchRecorder:
    """Records, for every engine step of every instance, the size of its batch (the requests
    that produced a token in it) for each of its requests' priorities: exact, not sampled."""

    def __init__(self, cluster: Cluster) -> None:
        self.priority: dict[str, int] = {}
        self.batches: dict[int, list[int]] = defaultdict(list)
        self._lock = threading.Lock()
        inner = cluster.on_outputs

        def record(instance_id, outputs):
            with self._lock:
                for o in outputs:
                    self.batches[self.priority[o.request_id]].append(len(outputs))
            inner(instance_id, outputs)

        cluster.on_outputs = record  # type: ignore[method-assign]

    def mean(self, priority: int) -> float:
        with self._lock:
            seen = list(self.batches[priority])
        assert seen, f"no step ran a request of priority {priority}"
        return sum(seen) / len(seen)


def test_high_priority_requests_run_in_smaller_batches():
    engine = spec(num_blocks=128)
    max_tokens = 120
    headroom = 96
    ps = prompts(14, base_len=20, step=3)
    high = {0, 7}  # interleaved with normal-priority requests
    expected = reference(engine, ps, max_tokens)
    policy = PolicyConfig(headroom_blocks=((1, headroom),))
    with running_cluster(config(2, engine, policy)) as cluster:
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        sampler = BatchRecorder(cluster)
        handles = []
        for i, p in enumerate(ps):
            priority = 1 if i in high else 0
            rid = f"p{i}"
            sampler.priority[rid] = priority  # known before its first token can arrive
            handles.append(cluster.submit(p, sp, priority=priority, request_id=rid))
        got = wait_all(handles)
        assert got == expected
        mean_high, mean_normal = sampler.mean(1), sampler.mean(0)
        assert mean_high < mean_normal, (mean_high, mean_normal)
        # Normal requests avoided the instance(s) chosen for the high-priority ones at dispatch.
        high_instances = {handles[i].instance_id for i in high}
        normal_on_high = [h for i, h in enumerate(handles) if i not in high and h.instance_id in high_instances]
        assert len(normal_on_high) < (len(ps) - len(high)) / 2
        assert_no_leak(cluster)
