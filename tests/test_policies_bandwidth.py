"""Link-aware decisions (``policies.bandwidth``): the measured bandwidth, the hand-off pick
among decode instances of similar freeness, and the decline rule of load-balancing moves."""

from __future__ import annotations

import math

import pytest

from llumnix_py.load import InstanceLoad, RequestLoad
from llumnix_py.scheduler.core import GlobalScheduler, SchedulerConfig
from llumnix_py.sim.cluster import SimCluster
from llumnix_py.sim.config import SimConfig
from policies.bandwidth import copy_time_s, migration_pays, pick_by_link, smooth
from policies.config import PolicyConfig


def test_smooth_starts_at_the_first_sample_then_weights_new_ones():
    assert smooth(None, 4.0) == 4.0
    assert smooth(4.0, 2.0, alpha=0.5) == 3.0
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            smooth(1.0, bad)
    with pytest.raises(ValueError):
        smooth(1.0, 1.0, alpha=0.0)


def test_pick_by_link_prefers_the_fastest_link_among_similar_freeness_only():
    cands = [("a", 100.0, 1.0), ("b", 95.0, 10.0), ("c", 50.0, 100.0), ("d", 99.0, None)]
    assert pick_by_link(cands, 0.1) == "b"  # a, b, d are within 10% of 100; b's link is fastest
    assert pick_by_link(cands, 0.0) == "a"  # only the freest competes
    assert pick_by_link(cands, 1.0) == "c"
    assert pick_by_link([("x", 10.0, None), ("y", 9.5, None)], 0.1) == "x"  # unmeasured: freeness
    assert pick_by_link([("x", 10.0, None), ("y", 9.5, 0.1)], 0.1) == "y"  # measured beats unmeasured
    assert pick_by_link([], 0.1) is None


def test_the_decline_rule_compares_predicted_copy_time_with_the_room_it_buys():
    # 100 blocks of 8 MiB over 2 GB/s: 0.42 s; the source gains 10 steps of 50 ms = 0.5 s: pays
    assert copy_time_s(100, 8 << 20, 2.0) == pytest.approx(100 * (8 << 20) / 2e9)
    assert migration_pays(100, 8 << 20, 2.0, 10.0, 0.05)
    assert not migration_pays(100, 8 << 20, 2.0, 5.0, 0.05)  # 0.25 s of room < 0.42 s of copy
    assert migration_pays(100, 8 << 20, None, 0.0, 0.05)  # no measurement: not declined
    assert migration_pays(100, 8 << 20, 2.0, 5.0, None)
    assert not migration_pays(100, 8 << 20, 2.0, -1.0, 0.05)


def req(rid: str, blocks: int, out: int = 1) -> RequestLoad:
    return RequestLoad(request_id=rid, num_blocks=blocks, blocks_needed=blocks, prompt_len=16 * blocks, output_len=out)


def snapshot(running=(), links=(), step_s: float = 0.05, total: int = 100) -> InstanceLoad:
    return InstanceLoad(total_blocks=total, used_blocks=sum(r.num_blocks for r in running), running=tuple(running),
                        links=tuple(links), kv_block_bytes=8 << 20, step_s=step_s)


def test_a_hand_off_goes_over_the_faster_measured_link_among_similar_decode_instances():
    core = GlobalScheduler(SchedulerConfig(pd_ratio=(1, 2)))
    for i in "pde":
        core.register(i, f"addr-{i}", 0.0)
    core.on_load("p", snapshot([req("r", 4)], links=[("addr-d", 1.0), ("addr-e", 20.0)]), 0.0)
    core.on_load("d", snapshot([req("o1", 10)]), 0.0)  # a little freer than e
    core.on_load("e", snapshot([req("o2", 12)]), 0.0)
    assert [(o.request_id, o.dst) for o in core.handoff_round(0.1)] == [("r", "e")]


def test_without_measurements_the_freest_decode_instance_takes_the_hand_off():
    core = GlobalScheduler(SchedulerConfig(pd_ratio=(1, 2)))
    for i in "pde":
        core.register(i, f"addr-{i}", 0.0)
    core.on_load("p", snapshot([req("r", 4)]), 0.0)
    core.on_load("d", snapshot([req("o1", 10)]), 0.0)
    core.on_load("e", snapshot([req("o2", 12)]), 0.0)
    assert [o.dst for o in core.handoff_round(0.1)] == ["d"]


@pytest.mark.parametrize("gbps,declined", [(0.01, True), (100.0, False)])
def test_a_load_balancing_migration_slower_than_its_benefit_is_declined(gbps, declined):
    core = GlobalScheduler(SchedulerConfig(policy=PolicyConfig(decline_slow_migrations=True)))
    core.register("s", "addr-s", 0.0)
    core.register("t", "addr-t", 0.0)
    core.on_load("s", snapshot([req(f"q{k}", 24) for k in range(4)], links=[("addr-t", gbps)]), 0.0)
    core.on_load("t", snapshot(), 0.0)
    orders = core.migration_round(0.1)
    assert (orders == [], core.num_declined) == ((True, 1) if declined else (False, 0))
    off = GlobalScheduler(SchedulerConfig(policy=PolicyConfig()))  # off by default
    off.register("s", "addr-s", 0.0)
    off.register("t", "addr-t", 0.0)
    off.on_load("s", snapshot([req(f"q{k}", 24) for k in range(4)], links=[("addr-t", gbps)]), 0.0)
    off.on_load("t", snapshot(), 0.0)
    assert len(off.migration_round(0.1)) == 1


def test_the_llumlet_core_measures_each_peer_in_the_simulator():
    from experiments.workloads import WorkloadRequest

    cluster = SimCluster(SimConfig(num_instances=3, pd_ratio="1:2"))
    cluster.run([WorkloadRequest(0.3 * i, 400, 20) for i in range(12)], progress=False)
    core = cluster.instances["instance-000"].core
    assert set(core.links) == {"instance-001", "instance-002"}
    link = cluster.profile.hw.link_gbps
    assert all(0 < g <= link for g in core.links.values())  # achieved, round trips included
    load = core.load(cluster.instances["instance-000"].engine.load())
    assert dict(load.links) == core.links and load.kv_block_bytes == cluster.profile.kv_block_bytes
    assert load.step_s > 0


def test_a_bad_link_tolerance_is_an_error():
    with pytest.raises(ValueError, match="link_tolerance"):
        PolicyConfig(link_tolerance=-0.1)


def test_a_draining_source_is_never_declined():
    assert migration_pays(100, 8 << 20, 0.001, math.nan, 0.05)
    assert migration_pays(100, 8 << 20, 0.001, math.inf, 0.05)
    core = GlobalScheduler(SchedulerConfig(policy=PolicyConfig(decline_slow_migrations=True)))
    core.register("s", "addr-s", 0.0)
    core.register("t", "addr-t", 0.0)
    core.on_load("s", snapshot([req("q", 24)], links=[("addr-t", 0.001)]), 0.0)
    core.on_load("t", snapshot(), 0.0)
    core.mark_terminating("s")
    assert [o.src for o in core.migration_round(0.1)] == ["s"] and core.num_declined == 0


# ----- the simulator's per-pair links: same node, cross node ------------------------------------


def test_a_cross_node_copy_takes_the_profiles_network_bandwidth():
    from llumnix_py.engines.sim.profiles import OPT_13B_A100

    hw, blocks = OPT_13B_A100.hw, 100
    assert hw.pair_link_gbps(False) == hw.link_gbps == 25.0 and hw.pair_link_gbps(True) == 25.0 / 8
    data = blocks * OPT_13B_A100.kv_block_bytes
    assert OPT_13B_A100.migration_time(blocks) == pytest.approx(hw.link_latency_s + data / 25e9)
    assert OPT_13B_A100.migration_time(blocks, cross_node=True) == pytest.approx(hw.link_latency_s + data / 3.125e9)
    a10 = SimConfig().cost_profile  # no network figure: every pair at the same link
    assert a10.migration_time(blocks, cross_node=True) == a10.migration_time(blocks)
    with pytest.raises(ValueError, match="instances_per_node"):
        SimConfig(instances_per_node=0)


def handoff_pairs(per_node, seed: int = 0):
    """4 simulated A100s, roles prefill, decode, prefill, decode; 200 requests; the measured
    links of the prefill instances and the (src, dst) of every finished hand-off."""
    import random

    from experiments.workloads import WorkloadRequest

    rng = random.Random(seed)
    work = [WorkloadRequest(0.05 * i, rng.randint(200, 1500), rng.randint(50, 300)) for i in range(200)]
    # four hand-offs at once (serve's default with roles): with one at a time a decode instance's
    # single slot, taken by one prefill instance's hand-off, decides where the other's goes, and
    # the pairs follow the step timing (on one node 19% or 83% same-"node" pairs, by timing alone)
    cluster = SimCluster(SimConfig(num_instances=4, pd_ratio="1:1", profile="opt-13b-a100",
                                   instances_per_node=per_node, max_migrations_out=4, max_migrations_in=4))
    result = cluster.run(work, progress=False)
    assert all(r.done and r.num_tokens == r.output_len for r in result.requests)
    pairs = [(r.src, r.dst) for r in cluster.scheduler.payoff.records if r.finished]
    assert pairs
    return cluster, pairs


def test_the_link_aware_pick_prefers_a_decode_instance_on_the_same_node_in_the_simulator():
    """Two nodes of two A100s: instance-000 (prefill) and 001 (decode) on node 0, 002 (prefill)
    and 003 (decode) on node 1. The prefill instances measure their links on their hand-offs
    (same node 25 GB/s, across nodes 3.125 GB/s, less the control round trips) and then hand
    most requests to the decode instance on their own node, among similar freeness; on one
    node (no network) the same run spreads them over both."""
    cluster, pairs = handoff_pairs(2)
    assert {i: inst.node for i, inst in cluster.instances.items()} == {
        "instance-000": 0, "instance-001": 0, "instance-002": 1, "instance-003": 1}
    links = cluster.instances["instance-000"].core.links
    assert links["instance-001"] > 3 * links["instance-003"]
    assert links["instance-003"] <= 25.0 / 8
    node = {"instance-000": 0, "instance-001": 0, "instance-002": 1, "instance-003": 1}
    same = sum(node[s] == node[d] for s, d in pairs) / len(pairs)
    _, flat_pairs = handoff_pairs(None)
    flat_same = sum(node[s] == node[d] for s, d in flat_pairs) / len(flat_pairs)
    assert same >= 0.6 and same > flat_same + 0.2, (same, flat_same)
