"""Compound-job placement over the real stack (built-in engine, local runtime, ``jobs`` dispatch,
JIT batching): a job's next call goes to the instance keeping the previous call's KV and prefills
only its new tokens, or, when that instance is predicted to miss the job's deadline, elsewhere;
either way its tokens equal a run without reuse."""

from __future__ import annotations

import pytest

from llumnix_py.config import ClusterConfig, EngineConfig, EngineSpec, PolicyConfig, SchedulerConfig
from llumnix_py.engines.types import Objective, SamplingParams
from llumnix_py.frontend.cluster import Cluster
from tests.cluster_helpers import SMALL_MODEL, assert_no_leak, prompts, reference, wait_all, wait_for

BLOCK = 8
MAX_TOKENS = 12
HOUR_MS = 3_600_000.0  # a deadline no measured step time on any machine comes near


@pytest.fixture
def cluster():
    engine = EngineConfig(num_blocks=128, block_size=BLOCK, max_batch_size=16, batch_policy="jit",
                          num_host_blocks=64, conversation_host_blocks=48)
    cfg = ClusterConfig(num_instances=2, runtime="local", engine=EngineSpec(engine=engine, model=SMALL_MODEL),
                        scheduler=SchedulerConfig(policy=PolicyConfig(dispatch="jobs"), poll_interval_s=0.01,
                                                  enable_migration=False))
    c = Cluster.start(cfg)
    yield c
    c.stop()


def engine_of(cluster: Cluster, iid: str):
    return cluster.control.instance(iid).llumlet.engine


def scheduler_sees(cluster: Cluster, iid: str, cond) -> bool:
    return any(load.instance_id == iid and cond(load) for load in cluster.control.daemon.core.loads())


def first_call(cluster: Cluster, job: str) -> tuple[str, tuple[int, ...], list[int]]:
    """Run a job's first call; wait until the scheduler sees its KV kept. Returns (instance, prompt, tokens)."""
    p1 = prompts(1, base_len=37)[0]
    sp = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    h = cluster.submit(p1, sp, objective=Objective(job_id=job, job_deadline_ms=HOUR_MS, job_calls_left=2))
    (t1,) = wait_all([h])
    home = h.instances_seen[-1]
    assert f"job:{job}" in engine_of(cluster, home).conversations
    wait_for(lambda: scheduler_sees(cluster, home, lambda l: any(c == f"job:{job}" for c, _ in l.conversations)),
             what="the scheduler to see the job's KV")
    return home, p1, t1


def test_the_next_call_goes_to_its_jobs_kv_and_prefills_only_its_new_tokens(cluster):
    home, p1, t1 = first_call(cluster, "agent-1")
    # the home predicts 5 s per step (the other instance its measured milliseconds): job-blind
    # ``slo`` dispatch would go to the other; 5 s times any length bound (<= 512) keeps the hour
    engine_of(cluster, home).scheduler.batch_policy.step_time = lambda prefill, decodes, ctx: 5.0
    wait_for(lambda: scheduler_sees(cluster, home, lambda l: l.step_s_next >= 5.0),
             what="the scheduler to see the home's slower step time")
    store = engine_of(cluster, home).conversations
    kept = len(store.entries()["job:agent-1"].tokens)
    assert kept >= len(p1) - BLOCK  # the first call's full blocks
    p2 = p1 + tuple(t1) + tuple(range(200, 211))  # the tool's result appended
    hits, restored = store.hits, store.restored_tokens
    sp = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    h2 = cluster.submit(p2, sp, objective=Objective(job_id="agent-1", job_deadline_ms=HOUR_MS, job_calls_left=1))
    (t2,) = wait_all([h2])
    assert h2.instances_seen == [home]
    assert store.hits == hits + 1 and store.restored_tokens - restored == kept  # only p2[kept:] was prefilled
    assert "job:agent-1" not in store  # the job's last call (calls left: 1) keeps nothing for later
    spec = EngineSpec(engine=EngineConfig(num_blocks=128, block_size=BLOCK), model=SMALL_MODEL)
    assert [t1, t2] == reference(spec, [p1, p2], MAX_TOKENS)
    assert_no_leak(cluster)


def test_the_next_call_goes_elsewhere_when_its_jobs_kv_is_on_an_instance_that_would_miss(cluster):
    home, p1, t1 = first_call(cluster, "agent-2")
    (other,) = [i for i in cluster.instance_ids() if i != home]
    engine_of(cluster, home).scheduler.batch_policy.step_time = lambda prefill, decodes, ctx: 100.0  # 100 s/step
    wait_for(lambda: scheduler_sees(cluster, home, lambda l: l.step_s_next >= 100.0),
             what="the scheduler to see the home's slow step time")
    p2 = p1 + tuple(t1) + tuple(range(200, 211))
    restored = {i: engine_of(cluster, i).conversations.restored_tokens for i in (home, other)}
    sp = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    obj = Objective(job_id="agent-2", job_deadline_ms=60_000.0, job_calls_left=1)  # 60 s: < one step at home
    h2 = cluster.submit(p2, sp, objective=obj)
    (t2,) = wait_all([h2])
    assert h2.instances_seen == [other]
    assert {i: engine_of(cluster, i).conversations.restored_tokens for i in (home, other)} == restored  # no reuse
    spec = EngineSpec(engine=EngineConfig(num_blocks=128, block_size=BLOCK), model=SMALL_MODEL)
    assert [t1, t2] == reference(spec, [p1, p2], MAX_TOKENS)
    assert_no_leak(cluster)
