"""``experiments/slo.py`` end to end (``--smoke``), and its workloads."""

from __future__ import annotations

import json

import pytest

from experiments import slo
from experiments.jobs_loop import MAX_CONTEXT, JobCluster, JobWorkload, job_results
from llumnix_py.sim.cluster import SimCluster
from llumnix_py.sim.config import SimConfig
from policies.config import PolicyConfig


def test_slo_smoke(tmp_path):
    out, js = tmp_path / "slo", tmp_path / "slo.json"
    returned = slo.main(["--smoke", "--no-progress", "--out", str(out), "--json", str(js)])
    assert (out / "slo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "slo.md").read_text()
    assert md.startswith("# ") and "|---|" in md
    data = json.loads(js.read_text())
    assert data == json.loads(json.dumps(returned))
    by_sys = data["results"]["mixture"]
    assert set(by_sys) == set(slo.MAIN_SYSTEMS)
    for by_rate in by_sys.values():
        assert by_rate
        for v in by_rate.values():
            assert 0 <= v["attainment"] <= 1 and v["goodput"] >= 0
            assert sum(k["n"] for k in v["by_kind"].values()) == data["config"]["requests"]
            assert v["offered"] >= v["goodput"] and (v["offered"] == v["goodput"]) == (v["attainment"] == 1)
    assert set(data["rate_at_90"]["mixture"]) == set(slo.MAIN_SYSTEMS)
    target = data["target"]["mixture"]
    assert target["best"] in slo.BASELINES and set(target["baselines"]) == set(slo.BASELINES)
    assert "Target" in md
    found = data["instances_for_90"]["mixture"]
    assert set(found["systems"]) == set(slo.MAIN_SYSTEMS) and set(found["jit_saving"]) == set(slo.BASELINES)
    for v in found["systems"].values():  # the count found meets 90%, and one fewer (run by bisection) does not
        n, tried = v["instances"], v["tried"]
        assert tried and str(found["max"]) in tried
        if n is None:
            assert tried[str(found["max"])]["attainment"] < 0.9
            continue
        assert tried[str(n)]["attainment"] >= 0.9
        assert n == 1 or tried[str(n - 1)]["attainment"] < 0.9
    jit = found["systems"]["jit"]["instances"]
    for b, saving in found["jit_saving"].items():
        nb = found["systems"][b]["instances"]
        assert saving == (1 - jit / nb if jit is not None and nb is not None else None)
    placement = data["job_placement"]["rates"]
    assert placement and "Job placement" in md
    for by_sys in placement.values():
        assert set(by_sys) == set(slo.JOB_SYSTEMS)
        for v in by_sys.values():
            assert 0 <= v["job_attainment"] <= 1 and 0 <= v["later_calls_home"] <= v["later_calls"]
            assert v["prefill_saved_tokens"] <= v["prompt_tokens"]
        assert by_sys["jit"]["prefill_saved_tokens"] == 0  # no host pool keeps anything
        assert by_sys["jit+jobs"]["prefill_saved_tokens"] > 0


def test_instance_search_returns_the_smallest_count_meeting_the_target():
    for needed in range(1, 9):  # a monotone target met from ``needed`` instances on (8: none of 1..7)
        calls: list[int] = []

        def meets(count: int) -> bool:
            calls.append(count)
            return count >= needed

        assert slo.smallest_instances(meets, 1, 7) == (needed if needed <= 7 else None)
        assert len(calls) <= 4  # the top of the range, then log2(7) halvings
    with pytest.raises(ValueError):
        slo.smallest_instances(lambda c: True, 3, 2)


def test_instance_search_on_a_tiny_simulated_case():
    wl = slo.make_slo_workload("deadline", 40, 8.0, seed=0)
    found = slo.instances_for_90(wl, "fcfs+rr", 4, seed=0)
    n = found["instances"]
    assert n is not None and n > 1  # the case needs more than one instance, so the search had to look
    assert slo.simulate(wl, "fcfs+rr", n, 0, False)["attainment"] >= 0.9
    assert slo.simulate(wl, "fcfs+rr", n - 1, 0, False)["attainment"] < 0.9


def test_workloads_carry_the_objectives_of_their_kind():
    for kind, kinds in (("chat", {"stream"}), ("deadline", {"deadline"}), ("agentic", {"job"}),
                        ("mixture", {"stream", "deadline", "job"})):
        wl = slo.make_slo_workload(kind, 300, 10.0, seed=1)
        assert len(wl) == 300
        assert {w.objective.kind for w in wl} == kinds
        assert [w.arrival_time for w in wl] == sorted(w.arrival_time for w in wl)
    jobs: dict[str, list] = {}
    for w in slo.make_slo_workload("agentic", 200, 5.0, seed=2):
        jobs.setdefault(w.objective.job_id, []).append(w)
    assert jobs
    for calls in jobs.values():  # the calls left count down and the job's time left shrinks
        lefts = [w.objective.job_calls_left for w in calls]
        assert lefts == sorted(lefts, reverse=True)
        assert all(a.objective.job_deadline_ms > b.objective.job_deadline_ms for a, b in zip(calls, calls[1:]))


def test_jit_with_rescue_runs_a_mixed_workload_to_completion_without_leaks():
    wl = slo.make_slo_workload("mixture", 150, 6.0, seed=3)
    cfg = SimConfig(num_instances=3, policy=PolicyConfig(dispatch="slo", rescue=True), batch_policy="jit")
    cluster = SimCluster(cfg)
    cluster.run(wl, progress=False)
    recs = list(cluster.records.values())
    assert recs and all(r.done and r.num_tokens == r.output_len for r in recs)
    assert all(r.slo_margin is not None for r in recs)
    for engine in cluster.engines().values():
        engine.check_invariants()
        assert engine.blocks.num_used == 0
    priors = [inst.core.length_prior for inst in cluster.instances.values()]
    assert sum(len(p) for p in priors) == len(recs)  # every finish fed the prior of its last instance


def test_rescue_behind_round_robin_dispatch_and_its_ablation():
    """``jit+rr`` rescues requests about to miss although round-robin dispatch is blind to load;
    its ablation never rescues. Both serve every request (attainment is over all of them)."""
    wl = slo.make_slo_workload("deadline", 160, 6.0, seed=3)
    with_rescue = slo.simulate(wl, "jit+rr", 3, 3, False)
    without = slo.simulate(wl, "jit+rr-no-rescue", 3, 3, False)
    assert with_rescue["rescues"] > 0 and without["rescues"] == 0
    for run in (with_rescue, without):
        assert run["by_kind"]["deadline"]["n"] == len(wl)
        assert 0 < run["goodput"] <= run["offered"]


def test_a_closed_loop_jobs_calls_extend_each_other():
    wl = slo.make_slo_workload("agentic-loop", 120, 2.0, seed=4)
    assert isinstance(wl, JobWorkload) and wl.num_calls >= 120
    assert wl == slo.make_slo_workload("agentic-loop", 120, 2.0, seed=4)  # seeded
    for job in wl.jobs:
        assert 1 <= job.num_calls <= 4 and job.tools_s[0] == 0
        assert job.prompt_len(job.num_calls - 1) + job.outputs[-1] <= MAX_CONTEXT or job.num_calls == 1
        for c in range(1, job.num_calls):
            assert job.prompt_len(c) == job.prompt_len(c - 1) + job.outputs[c - 1] + len(job.appended[c])


@pytest.mark.parametrize("system", ["jit", "jit+kv", "jit+jobs"])
def test_closed_loop_calls_follow_their_predecessor_and_jobs_dispatch_reuses_kv(system):
    """Jobs far apart (one at a time) on 2 instances: every later call arrives after its predecessor
    ended, with its prompt; with ``jobs`` dispatch each later call goes to its job's KV and reuses
    the previous call's full blocks; ``jit`` keeps nothing."""
    wl = slo.make_slo_workload("agentic-loop", 12, 0.02, seed=5)
    spec = slo.SYSTEMS[system]
    cfg = SimConfig(num_instances=2, policy=PolicyConfig(**spec["policy"]), batch_policy="jit",
                    conversation_blocks=slo.KV_BLOCKS if spec.get("kv") else 0)
    cluster = JobCluster(cfg, wl)
    cluster.run(cluster.requests(), progress=False)
    recs = [cluster.records[rid] for rid in cluster.request_ids]
    assert recs and all(r.done and r.num_tokens == r.output_len for r in recs)
    for k, ((j, c), r) in enumerate(zip(cluster.calls, recs)):
        assert r.prompt_len == wl.jobs[j].prompt_len(c) and r.objective.job_id == f"job-{j}"
        if c:
            prev = recs[k - 1]
            assert r.arrival_time == prev.finish_time + wl.jobs[j].tools_s[c]
            assert r.objective.job_calls_left == wl.jobs[j].num_calls - c
    stats = job_results(cluster)
    later = [(j, c) for j, c in cluster.calls if c]
    assert stats["later_calls"] == len(later) > 0
    block = cluster.engine_config.block_size
    if system == "jit+jobs":
        assert stats["later_calls_home"] == len(later)
        # each later call restores its predecessor's computed full blocks (prompt + output - 1 tokens)
        want = sum((wl.jobs[j].prompt_len(c - 1) + wl.jobs[j].outputs[c - 1] - 1) // block * block for j, c in later)
        assert stats["prefill_saved_tokens"] == want
    if system == "jit":
        assert stats["prefill_saved_tokens"] == 0 and stats["later_calls_home"] == 0
    for engine in cluster.engines().values():
        engine.check_invariants()
        assert engine.blocks.num_used == 0
