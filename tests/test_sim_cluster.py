"""The discrete-event simulator: determinism, exact token counts, no leaked blocks,
the real migration protocol (stages, destination refusal), scale-in draining, and
Llumnix's tail-latency advantage on an overloaded scenario."""

from __future__ import annotations

from experiments.workloads import WorkloadRequest, make_workload
from llumnix_py.sim import SimCluster, SimConfig, SimResult
from migration.protocol import MigrationConfig, MigrationStatus
from policies.config import PolicyConfig


def run_sim(workload, **kw) -> tuple[SimCluster, SimResult]:
    cluster = SimCluster(SimConfig(**kw))
    return cluster, cluster.run(workload, progress=False)


def assert_complete_and_clean(cluster: SimCluster, result: SimResult) -> None:
    assert result.requests, "no requests ran"
    for rec in result.requests:
        assert rec.done, f"{rec.request_id} did not finish"
        assert rec.num_tokens == rec.output_len, rec
    engines = cluster.engines()
    assert engines
    for iid, engine in engines.items():
        engine.check_invariants()
        assert engine.blocks.num_free == engine.config.num_blocks, f"{iid} leaked blocks"
        assert not engine.seqs and not engine.has_unfinished()


def _summary_wo_wall(result: SimResult) -> dict:
    s = result.summary()
    s.pop("wall_s")
    s.pop("cpu_s")
    return s


def test_run_is_deterministic_for_a_seed():
    wl = make_workload("L-L", 60, 1.0, seed=3)
    kw = dict(num_instances=3, seed=7)
    _, a = run_sim(wl, **kw)
    _, b = run_sim(wl, **kw)
    assert _summary_wo_wall(a) == _summary_wo_wall(b)
    assert [r.first_token_time for r in a.requests] == [r.first_token_time for r in b.requests]
    assert a.num_steps == b.num_steps and a.num_events == b.num_events


def test_every_request_completes_exactly_and_no_blocks_leak_with_migration():
    # A small pool forces preemptions; keep every request small enough to fit it
    # (the engine ends a request that outgrows its instance, with fewer tokens).
    wl = [WorkloadRequest(w.arrival_time, min(w.prompt_len, 2000), min(w.output_len, 3000))
          for w in make_workload("L-L", 120, 1.2, seed=1)]
    cluster, result = run_sim(wl, num_instances=4, num_blocks=400)
    assert_complete_and_clean(cluster, result)
    assert result.summary()["migrations"] > 0, "the scenario should exercise migration"
    assert result.summary()["preemptions"] > 0, "the scenario should exercise preemption"


def test_hand_migration_of_a_long_request_follows_the_protocol_stages():
    cfg = MigrationConfig(max_stages=3, last_stage_max_blocks=2)
    wl = [WorkloadRequest(0.0, 3000, 400)]
    cluster = SimCluster(SimConfig(num_instances=2, enable_migration=False, migration=cfg))
    cluster.schedule_migration(2.0, "req-000000", "instance-000", "instance-001")
    result = cluster.run(wl, progress=False)
    assert_complete_and_clean(cluster, result)
    assert len(result.migrations) == 1
    m = result.migrations[0]
    assert m.status == MigrationStatus.FINISHED, m
    assert 2 <= m.stages <= cfg.max_stages  # at least one pre-copy stage and the stop-and-copy
    assert m.blocks >= 3000 // 16
    # Pre-copy overlaps decoding: downtime is the small last stage, far below the whole copy.
    assert 0 < m.downtime_s < 0.05 < m.total_s
    rec = result.requests[0]
    assert rec.migrations == 1 and rec.migration_downtime == m.downtime_s
    assert result.summary()["migrations"] == 1


def test_destination_refusal_aborts_and_the_request_continues_on_the_source():
    # Round-robin puts req 0 on instance-000 and the big req 1 on instance-001, which
    # then has too few free blocks for req 0's 94 blocks: the pre-allocation is refused.
    wl = [WorkloadRequest(0.0, 1500, 200), WorkloadRequest(0.001, 2400, 400)]
    cluster = SimCluster(SimConfig(num_instances=2, num_blocks=200, enable_migration=False,
                                   policy=PolicyConfig(dispatch="round_robin")))
    cluster.schedule_migration(1.0, "req-000000", "instance-000", "instance-001")
    result = cluster.run(wl, progress=False)
    assert_complete_and_clean(cluster, result)
    assert [m.status for m in result.migrations] == [MigrationStatus.ABORTED_DST]
    assert result.migrations[0].stages == 0
    assert result.requests[0].migrations == 0
    assert result.requests[0].dispatched_to == "instance-000"


def test_scale_in_drains_instances_without_dropping_requests():
    wl = make_workload("M-M", 150, 2.0, seed=2)
    cluster, result = run_sim(wl, num_instances=4, enable_scaling=True, min_instances=1, max_instances=4)
    removed = [e for e in result.scale_events if e[1] == "removed"]
    assert removed, "the light load should scale in"
    assert len(cluster.instances) < 4
    assert result.average_instances() < 4
    assert_complete_and_clean(cluster, result)


def test_llumnix_cuts_preemption_loss_without_a_worse_tail_on_a_loaded_cluster():
    # S-L (short prompts, long outputs) at 1.5 req/s on 4 instances: memory runs out
    # as outputs grow; migration relieves the instances before they preempt.
    wl = make_workload("S-L", 300, 1.5, seed=0)
    _, base = run_sim(wl, num_instances=4, policy=PolicyConfig(dispatch="load"), enable_migration=False)
    _, ours = run_sim(wl, num_instances=4, policy=PolicyConfig(dispatch="freeness"), enable_migration=True)
    assert ours.summary()["migrations"] > 0
    assert base.summary()["preemption_loss"] > 0
    assert ours.summary()["preemption_loss"] < base.summary()["preemption_loss"]
    assert ours.summary()["prefill_p99"] <= base.summary()["prefill_p99"]


def _blocked_long_prompt_workload() -> list[WorkloadRequest]:
    # req 0: one huge request; by t=100 s it holds ~560 of 880 blocks. req 1: small.
    # req 2: a 6000-token prompt (375 blocks) that does not fit beside req 0.
    return [WorkloadRequest(0.0, 6000, 5000), WorkloadRequest(0.001, 30, 3000), WorkloadRequest(100.0, 6000, 10)]


def test_freeness_dispatch_sends_a_long_prompt_where_it_fits():
    # Without the request's own demand, instance-000 (one request, ~320 blocks free)
    # looked freest and the long prompt would wait there for req 0 to finish.
    cluster, result = run_sim(_blocked_long_prompt_workload(), num_instances=2, enable_migration=False,
                              policy=PolicyConfig(dispatch="freeness"))
    assert_complete_and_clean(cluster, result)
    long = result.requests[2]
    assert result.requests[0].dispatched_to != long.dispatched_to
    assert long.prefill_latency < 3.0


def test_migration_unblocks_a_long_prompt_stuck_behind_a_huge_request():
    # Round-robin puts the long prompt beside req 0, where it does not fit. Moving
    # req 0 would flip the freeness order; the de-fragmentation rule moves the
    # blocked head itself to the instance where it fits.
    wl = _blocked_long_prompt_workload()
    cluster, result = run_sim(wl, num_instances=2, enable_migration=True, policy=PolicyConfig(dispatch="round_robin"))
    assert_complete_and_clean(cluster, result)
    long = result.requests[2]
    assert long.dispatched_to == result.requests[0].dispatched_to
    assert long.migrations == 1
    assert long.prefill_latency < 3.0
    _, stuck = run_sim(wl, num_instances=2, enable_migration=False, policy=PolicyConfig(dispatch="round_robin"))
    assert stuck.requests[2].prefill_latency > 30.0


def test_stranded_memory_is_the_room_elsewhere_while_a_head_waits():
    # Round-robin without migration: the long prompt waits on instance-000 for ~300 s while
    # instance-001 (one small request, at most 190 of 880 blocks) has the 375 blocks it needs.
    wl = _blocked_long_prompt_workload()
    _, stuck = run_sim(wl, num_instances=2, enable_migration=False, policy=PolicyConfig(dispatch="round_robin"))
    tl = stuck.timeline
    assert len(tl.stranded) == len(tl.heads_waiting) == len(tl.heads_fit_elsewhere) == len(tl.times)
    waiting = [i for i, n in enumerate(tl.heads_waiting) if n]
    assert waiting and all((tl.stranded[i] is None) == (i not in waiting) for i in range(len(tl.times)))
    assert all(tl.heads_waiting[i] == tl.heads_fit_elsewhere[i] == 1 for i in waiting)
    assert all((880 - 190) / 1760 <= tl.stranded[i] <= 0.5 for i in waiting)
    s = stuck.summary()
    assert s["head_waiting_share"] == len(waiting) / len(tl.times) > 0.2
    assert s["heads_fit_elsewhere"] == 1.0
    assert s["stranded_mean"] == sum(tl.stranded[i] for i in waiting) / len(waiting)
    # Migration moves the head where it fits: its wait, and the memory stranded meanwhile, end.
    _, moved = run_sim(wl, num_instances=2, enable_migration=True, policy=PolicyConfig(dispatch="round_robin"))
    assert moved.summary()["head_waiting_share"] < s["head_waiting_share"] / 10
    _, alone = run_sim(wl[:2], num_instances=2, enable_migration=False, policy=PolicyConfig(dispatch="round_robin"))
    a = alone.summary()
    assert (a["head_waiting_share"], a["stranded_mean"], a["heads_fit_elsewhere"]) == (0.0, 0.0, 0.0)


def test_a_poll_during_a_step_reports_the_prompt_tokens_it_prefills():
    # The simulator applies a step when it starts, so its effect shows in a poll taken while it
    # runs: a one-token prompt in flight is already gone from the queues. The poll reports its
    # tokens beside (``InstanceLoad.prefill_in_flight``), for prefill-queue dispatch, and the
    # first poll after the step shows none.
    from policies.dispatch import prefill_backlog

    workload = [WorkloadRequest(0.0, 2000, 1), WorkloadRequest(0.1, 16, 1), WorkloadRequest(0.6, 16, 1)]
    cluster = SimCluster(SimConfig(num_instances=2, enable_migration=False,
                                   policy=PolicyConfig(dispatch="prefill_queue")))
    polled: list[tuple[float, str, int]] = []
    on_load = cluster.scheduler.on_load

    def spy(iid, load, now):
        polled.append((now, iid, prefill_backlog(load)))
        return on_load(iid, load, now)

    cluster.scheduler.on_load = spy
    result = cluster.run(workload, progress=False)
    assert_complete_and_clean(cluster, result)
    first = result.requests[0]
    assert first.dispatched_to == "instance-000" and first.first_token_time > 0.2
    during = [b for t, iid, b in polled if iid == "instance-000" and t < first.first_token_time]
    after = [b for t, iid, b in polled if iid == "instance-000" and t >= first.first_token_time]
    assert during and all(b == 2000 for b in during)
    assert after and after[0] == 0

