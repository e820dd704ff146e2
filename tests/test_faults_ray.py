"""Fault injection on Ray actors: an instance actor is killed, the scheduler actor is killed.

Uses the session's Ray (``ray_session`` in conftest). Every test removes the actors
of its namespace in ``finally``, whatever happened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from typing import Iterator, Sequence

import pytest

from llumnix_py.cluster import Cluster, RequestHandle
from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec, SchedulerConfig
from llumnix_py.engines.registry import build_engine
from llumnix_py.engines.types import FinishReason, Request, SamplingParams
from llumnix_py.runtime.ray_runtime import INSTANCE_PREFIX, SCHEDULER_NAME
from tests.factories import run_to_completion

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = (("num_layers", 2), ("hidden_size", 64), ("intermediate_size", 128), ("num_heads", 4),
         ("num_kv_heads", 2), ("dtype", "float64"))
NAMESPACE = "llumnix-test-faults"
RESULT_TIMEOUT_S = 120.0


def spec(num_blocks: int = 256) -> EngineSpec:
    return EngineSpec(engine=EngineConfig(num_blocks=num_blocks, max_batch_size=32), model=MODEL)


def config(num_instances: int, engine: EngineSpec) -> ClusterConfig:
    return ClusterConfig(num_instances=num_instances, runtime="ray", engine=engine, ray_namespace=NAMESPACE,
                         scheduler=SchedulerConfig(poll_interval_s=0.02, migration_interval_s=0.05))


def named_actors(ray) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a.get("namespace") == NAMESPACE)


@contextlib.contextmanager
def running_cluster(ray, cfg: ClusterConfig) -> Iterator[Cluster]:
    assert named_actors(ray) == [], "a previous test left actors behind"
    cluster = Cluster.start(cfg)
    try:
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            for name in named_actors(ray):
                with contextlib.suppress(Exception):
                    ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)


def prompts(n: int, base_len: int = 20, step: int = 2) -> list[tuple[int, ...]]:
    return [tuple((7 * i + 13 * j) % 300 + 1 for j in range(base_len + step * i)) for i in range(n)]


def samplings(n: int, max_tokens: int) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=max_tokens, ignore_eos=True) if i % 2 == 0 else
            SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.9, seed=500 + i, ignore_eos=True)
            for i in range(n)]


def reference(engine: EngineSpec, ps: Sequence[tuple[int, ...]], sps: Sequence[SamplingParams]) -> list[list[int]]:
    big = dataclasses.replace(engine, engine=dataclasses.replace(engine.engine, num_blocks=4096))
    reqs = [Request(f"ref{i}", p, sp, arrival_time=float(i)) for i, (p, sp) in enumerate(zip(ps, sps))]
    tokens = run_to_completion(build_engine(big), requests=reqs)
    return [tokens[f"ref{i}"] for i in range(len(ps))]


def wait_for(cond, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def wait_all(handles: Sequence[RequestHandle]) -> list[list[int]]:
    assert handles
    return [h.result(timeout=RESULT_TIMEOUT_S) for h in handles]


def assert_no_leak(cluster: Cluster) -> None:
    ids = cluster.instance_ids()
    assert ids
    for iid in ids:
        inst = cluster.control.instance(iid)
        assert inst is not None
        wait_for(lambda: (lambda ld: not (ld.used_blocks or ld.running or ld.waiting))(inst.load()), 30,
                 f"{iid} to free its blocks")
        assert inst.load().reserved_blocks == 0


def kill_process(ray, actor) -> None:
    """SIGKILL the actor's worker process (a crash Ray did not ask for)."""
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["ray_kill", "sigkill"])
def test_killing_an_instance_actor_resumes_its_requests_elsewhere(ray_session, how):
    engine = spec()
    n, max_tokens = 20, 120
    ps, sps = prompts(n), samplings(n, max_tokens)
    expected = reference(engine, ps, sps)
    with running_cluster(ray_session, config(3, engine)) as cluster:
        handles = [cluster.submit(p, sp) for p, sp in zip(ps, sps)]
        victim = "instance-001"
        on_victim = [h for h in handles if h.instance_id == victim]
        assert len(on_victim) >= 2, [h.instance_id for h in handles]
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
        assert_no_leak(cluster)


def test_killing_the_scheduler_keeps_requests_running_and_a_restarted_one_reattaches(ray_session):
    engine = spec()
    n, max_tokens = 12, 150
    ps, sps = prompts(n), samplings(n, max_tokens)
    expected = reference(engine, ps, sps)
    with running_cluster(ray_session, config(3, engine)) as cluster:
        ids = cluster.instance_ids()
        assert ids == ["instance-000", "instance-001", "instance-002"]
        handles = [cluster.submit(p, sp) for p, sp in zip(ps[:8], sps[:8])]
        wait_for(lambda: all(h.token_ids for h in handles), what="first tokens")
        ray_session.kill(ray_session.get_actor(SCHEDULER_NAME, namespace=NAMESPACE), no_restart=True)
        wait_for(lambda: not cluster.control.scheduler_reachable or cluster.control.actor is None, 30,
                 "the frontend to notice")
        # The instances outlive the scheduler (they are not owned by it) ...
        assert set(INSTANCE_PREFIX + i for i in ids) <= set(named_actors(ray_session))
        # ... new requests are dispatched by the frontend itself, over its last known loads.
        more = [cluster.submit(p, sp) for p, sp in zip(ps[8:], sps[8:])]
        assert {h.instance_id for h in more} <= set(ids)
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
    assert named_actors(ray_session) == []
