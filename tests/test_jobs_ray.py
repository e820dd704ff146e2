"""Compound-job placement on Ray actors (``jobs`` dispatch, JIT batching, the built-in engine):
a job's next call goes to the instance keeping its previous call's KV, though job-blind ``slo``
dispatch would send it elsewhere, prefills only its new tokens there, and gives the tokens of a
run without reuse (greedy)."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec, PolicyConfig, SchedulerConfig
from llumnix_py.engines.types import Objective, SamplingParams
from tests.cluster_helpers import SMALL_MODEL, assert_no_leak, prompts, reference, wait_all, wait_for
from tests.cluster_helpers import running_ray_cluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NAMESPACE = "llumnix-test-jobs"
BLOCK = 8
MAX_TOKENS = 8
HOUR_MS = 3_600_000.0  # a job deadline no step time here comes near
SLOW_STEP_S = 5.0


def _predict_slow_steps(actor: Any, step_s: float) -> None:
    """Run inside an instance actor: its JIT policy predicts ``step_s`` for every step."""
    actor._endpoint.target.llumlet.engine.scheduler.batch_policy.step_time = lambda prefill, decodes, ctx: step_s


def _store_counts(actor: Any) -> tuple[int, int]:
    """Run inside an instance actor: its conversation store's hits and tokens restored from it."""
    store = actor._endpoint.target.llumlet.engine.conversations
    return store.hits, store.restored_tokens


def scheduler_sees(cluster, iid: str, cond) -> bool:
    return any(load.instance_id == iid and cond(load) for load in cluster.control.membership()["loads"])


def test_a_jobs_next_call_goes_to_its_kv_on_ray_with_exact_tokens(ray_session):
    engine = EngineSpec(engine=EngineConfig(num_blocks=96, block_size=BLOCK, max_batch_size=8, batch_policy="jit",
                                            num_host_blocks=48, conversation_host_blocks=32), model=SMALL_MODEL)
    cfg = ClusterConfig(num_instances=2, runtime="ray", engine=engine, ray_namespace=NAMESPACE,
                        scheduler=SchedulerConfig(policy=PolicyConfig(dispatch="jobs"), poll_interval_s=0.01,
                                                  enable_migration=False))
    sp = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    p1 = prompts(1, base_len=37)[0]
    with running_ray_cluster(ray_session, cfg) as cluster:
        h1 = cluster.submit(p1, sp, objective=Objective(job_id="agent", job_deadline_ms=HOUR_MS, job_calls_left=2))
        (t1,) = wait_all([h1])
        home = h1.instances_seen[-1]
        (other,) = [i for i in cluster.instance_ids() if i != home]
        wait_for(lambda: scheduler_sees(cluster, home, lambda l: dict(l.conversations).get("job:agent", 0) > 0),
                 what="the scheduler to see the job's KV kept")
        kept = dict(cluster.control.instance(home).load().conversations)["job:agent"]
        assert kept >= len(p1) - BLOCK  # the first call's full blocks at least
        # The home predicts 5 s a step, the other its measured milliseconds: job-blind ``slo`` dispatch
        # would pick the other; 5 s times any length bound still keeps the job's hour.
        ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        actor = cluster.control.instance(home).actor
        ray_session.get(actor.__ray_call__.remote(_predict_slow_steps, SLOW_STEP_S), timeout=120)
        wait_for(lambda: scheduler_sees(cluster, home, lambda l: l.step_s_next >= SLOW_STEP_S),
                 what="the scheduler to see the home's slower step time")
        assert scheduler_sees(cluster, other, lambda l: 0 < l.step_s_next < SLOW_STEP_S)
        hits, restored = ray_session.get(actor.__ray_call__.remote(_store_counts), timeout=120)
        p2 = p1 + tuple(t1) + tuple(range(200, 209))  # the tool's result appended
        h2 = cluster.submit(p2, sp, objective=Objective(job_id="agent", job_deadline_ms=HOUR_MS, job_calls_left=1))
        (t2,) = wait_all([h2])
        assert h2.instances_seen == [home]
        assert ray_session.get(actor.__ray_call__.remote(_store_counts), timeout=120) == (hits + 1, restored + kept)
        assert "job:agent" not in dict(cluster.control.instance(home).load().conversations)  # its last call
        assert [t1, t2] == reference(engine, [p1, p2], MAX_TOKENS)
        assert_no_leak(cluster)
