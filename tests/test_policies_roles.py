"""Instance roles (``policies.roles``) as pure functions, and the scheduler and simulator over them."""

from __future__ import annotations

import pytest

from llumnix_py.config import ClusterConfig
from llumnix_py.load import InstanceLoad, RequestLoad
from llumnix_py.scheduler.core import GlobalScheduler, SchedulerConfig
from llumnix_py.sim.cluster import SimCluster
from llumnix_py.sim.config import SimConfig
from policies.config import PolicyConfig
from policies.dispatch import DispatchState, dispatch
from policies.roles import Role, assign_role, parse_pd_ratio, parse_role, plan_handoffs, roles_for
from policies.types import Handoff

CFG = PolicyConfig()


def req(rid: str, blocks: int = 4, out: int = 1, migrating: bool = False, t: float = 0.0) -> RequestLoad:
    return RequestLoad(request_id=rid, num_blocks=blocks, blocks_needed=blocks, prompt_len=blocks * 16,
                       output_len=out, migrating=migrating, arrival_time=t)


def inst(iid: str, role: str, running=(), used: int = 0, total: int = 100) -> InstanceLoad:
    used = used or sum(r.num_blocks for r in running)
    return InstanceLoad(instance_id=iid, total_blocks=total, used_blocks=used, running=tuple(running), role=role)


@pytest.mark.parametrize("bad", ["", "prefil", "1:3", None, 3])
def test_an_unknown_role_is_an_error_naming_the_roles(bad):
    with pytest.raises(ValueError, match="prefill, decode, both"):
        parse_role(bad)


def test_roles_parse_case_insensitively():
    assert [parse_role(x) for x in ("prefill", "DECODE", " both ")] == [Role.PREFILL, Role.DECODE, Role.BOTH]


@pytest.mark.parametrize("bad,match", [("0:3", "at least one prefill and one decode"),
                                       ("2:0", "at least one prefill and one decode"), ("1", "two integers"),
                                       ("a:b", "two integers"), ("1:-2", "two integers"), ("1:2:3", "two integers"),
                                       ((1, 0), "at least one"), ((True, 1), "pair of integers"), (1.5, "P:D")])
def test_a_bad_pd_ratio_is_an_error(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_pd_ratio(bad)


def test_roles_follow_the_ratio_in_registration_order():
    assert parse_pd_ratio(" 1:3 ") == (1, 3)
    assert roles_for(4, (1, 3)) == [Role.PREFILL, Role.DECODE, Role.DECODE, Role.DECODE]
    assert roles_for(4, (1, 1)) == [Role.PREFILL, Role.DECODE, Role.PREFILL, Role.DECODE]
    assert roles_for(5, (2, 3)).count(Role.PREFILL) == 2
    assert roles_for(3, None) == [Role.BOTH] * 3
    # a replacement takes the role the cluster is short of
    assert assign_role([Role.PREFILL, Role.DECODE, Role.DECODE], (1, 3)) == Role.DECODE
    assert assign_role([Role.DECODE, Role.DECODE, Role.DECODE], (1, 3)) == Role.PREFILL


def test_a_cluster_config_whose_split_has_too_few_instances_is_an_error():
    with pytest.raises(ValueError, match="needs at least 4 instances"):
        ClusterConfig(num_instances=3, runtime="local", scheduler=SchedulerConfig(pd_ratio="1:3"))
    with pytest.raises(ValueError, match="at least one prefill"):
        SchedulerConfig(pd_ratio="0:2")
    with pytest.raises(ValueError, match="needs at least 2 instances"):
        SimConfig(num_instances=1, pd_ratio=(1, 1))


def test_dispatch_never_sends_a_new_request_to_a_decode_instance():
    loads = [inst("a", "decode"), inst("b", "prefill", [req("x", 50)]), inst("c", "decode")]
    new = RequestLoad.queued("n", prompt_len=32, block_size=16)
    assert dispatch(loads, new, CFG, DispatchState()).instance_id == "b"
    assert dispatch([inst("a", "decode")], new, CFG, DispatchState()) is None


def test_hand_offs_go_to_the_freest_decode_instance_counting_earlier_ones():
    p = inst("p", "prefill", [req("r1", 10, t=1), req("r2", 10, t=2), req("wait", 10, out=0),
                              req("moving", 10, migrating=True)])
    d1 = inst("d1", "decode", [req("o1", 30)])
    d2 = inst("d2", "decode", [req("o2", 20)])
    both = inst("b", "both")
    plans = plan_handoffs([p, d1, d2, both], CFG, slots_out={"p": 5}, slots_in={"d1": 5, "d2": 5, "b": 5})
    # r1 to d2 (freer: (100-30)/2 > (100-40)/2); then d2 holds 30 blocks in 2... d1: (100-40)/2 = 30,
    # d2: (100-40)/3 = 20: r2 to d1. Not-yet-prefilled and migrating requests stay; ``both`` takes none.
    assert plans == [Handoff("r1", "p", "d2"), Handoff("r2", "p", "d1")]


def test_hand_offs_respect_skip_slots_and_room():
    p = inst("p", "prefill", [req("r1", 10, t=1), req("r2", 10, t=2)])
    d = inst("d", "decode", [req("o", 50)])
    assert plan_handoffs([p, d], CFG, skip={"r1"}, slots_out={"p": 5}, slots_in={"d": 5}) == [Handoff("r2", "p", "d")]
    assert plan_handoffs([p, d], CFG, slots_out={"p": 1}, slots_in={"d": 5}) == [Handoff("r1", "p", "d")]
    assert plan_handoffs([p, d], CFG, slots_out={"p": 5}, slots_in={"d": 1}) == [Handoff("r1", "p", "d")]
    assert plan_handoffs([p, d], CFG, slots_out={}, slots_in={"d": 5}) == []
    full = inst("d", "decode", [req("o", 95)])
    assert plan_handoffs([p, full], CFG, slots_out={"p": 5}, slots_in={"d": 5}) == []
    assert plan_handoffs([p, inst("b", "both")], CFG, slots_out={"p": 5}, slots_in={"b": 5}) == []


def test_the_scheduler_assigns_roles_orders_each_hand_off_once_and_keeps_prefill_out_of_balancing():
    core = GlobalScheduler(SchedulerConfig(pd_ratio=(1, 2)))
    for i in "abc":
        core.register(i, f"addr-{i}", 0.0)
    assert [core.role(i) for i in "abc"] == [Role.PREFILL, Role.DECODE, Role.DECODE]
    core.on_load("a", inst("", "both", [req("r", 4)], total=100), 0.0)
    # b overloaded, c empty: a load-balancing pair b -> c, never a -> anything
    core.on_load("b", inst("", "both", [req(f"q{k}", 24) for k in range(4)], total=100), 0.0)
    core.on_load("c", inst("", "both", total=100), 0.0)
    assert {x.instance_id: x.role for x in core.loads()} == {"a": "prefill", "b": "decode", "c": "decode"}
    orders = core.handoff_round(1.0)
    assert [(o.request_id, o.src, o.dst, o.handoff) for o in orders] == [("r", "a", "c", True)]
    core.on_migration_result(orders[0].migration_id, "r", False, 0, 1.1)  # it failed: r stays on a
    core.on_load("a", inst("", "both", [req("r", 5, out=2)], total=100), 1.2)
    assert core.handoff_round(1.3) == []
    balance = core.migration_round(1.4)
    assert [(o.src, o.dst, o.handoff) for o in balance] == [("b", "c", False)]
    core.set_role("a", "both")
    assert core.handoff_round(1.5) == []
    with pytest.raises(ValueError):
        core.set_role("a", "nope")


def test_the_simulator_disaggregates_every_request_through_its_prefill_instance():
    from experiments.workloads import WorkloadRequest

    work = [WorkloadRequest(0.2 * i, 300, 40) for i in range(20)]
    cluster = SimCluster(SimConfig(num_instances=3, pd_ratio="1:2"))
    result = cluster.run(work, progress=False)
    assert {r.dispatched_to for r in result.requests} == {"instance-000"}
    assert all(r.done and r.num_tokens == 40 for r in result.requests)
    assert len(result.migrations) == 20
    assert all(r.migrations == 1 for r in result.requests)
    # every request ended on a decode instance: the prefill engine is empty, the decode ones ran tokens
    engines = cluster.engines()
    assert engines["instance-000"].blocks.num_used == 0
    assert cluster.instances["instance-001"].core.stats.tokens > 0
    assert cluster.instances["instance-002"].core.stats.tokens > 0


# ----- run-time role flipping ------------------------------------------------------------------

from policies.roles import FlipState, RoleFlip, RoleFlipConfig, plan_role_flip  # noqa: E402


def waiting(rid: str, blocks: int) -> RequestLoad:
    return RequestLoad(request_id=rid, num_blocks=0, blocks_needed=blocks, prompt_len=blocks * 16)


def test_a_prefill_backlog_with_idle_decode_flips_the_least_busy_decode_instance_after_a_streak():
    flip = RoleFlipConfig(backlog_blocks=10, decode_free_steps=50, decode_tight_steps=5, rounds=3)
    p = InstanceLoad(instance_id="p", total_blocks=100, used_blocks=0, waiting=(waiting("w1", 8), waiting("w2", 8)),
                     role="prefill")
    d1 = inst("d1", "decode", [req("a", 2), req("b", 2)])
    d2 = inst("d2", "decode", [req("c", 2)])
    state = FlipState()
    got = [plan_role_flip([p, d1, d2], CFG, flip, state) for _ in range(3)]
    assert got == [None, None, RoleFlip("d2", Role.PREFILL)]
    assert [plan_role_flip([p, d1, d2], CFG, flip, state) for _ in range(3)] == [None] * 3  # cooldown
    # a streak is broken by one round without the condition
    state = FlipState()
    quiet = InstanceLoad(instance_id="p", total_blocks=100, used_blocks=0, role="prefill")
    assert [plan_role_flip(x, CFG, flip, state) for x in ([p, d1, d2], [p, d1, d2], [quiet, d1, d2],
                                                          [p, d1, d2], [p, d1, d2])] == [None] * 5


def test_tight_decode_without_backlog_flips_a_prefill_instance_and_each_phase_keeps_one():
    flip = RoleFlipConfig(backlog_blocks=10, decode_free_steps=50, decode_tight_steps=5, rounds=1)
    p1, p2 = inst("p1", "prefill", [req("x", 1)]), inst("p2", "prefill")
    tight = inst("d", "decode", [req(f"r{k}", 24) for k in range(4)])
    assert plan_role_flip([p1, p2, tight], CFG, flip, FlipState()) == RoleFlip("p2", Role.DECODE)
    assert plan_role_flip([p1, tight], CFG, flip, FlipState()) is None  # the last prefill instance stays
    backlog = InstanceLoad(instance_id="p", total_blocks=100, used_blocks=0, waiting=(waiting("w", 80),),
                           role="prefill")
    idle = inst("d", "decode")
    assert plan_role_flip([backlog, idle], CFG, flip, FlipState()) is None  # the last decode instance stays
    with pytest.raises(ValueError, match="flap"):
        RoleFlipConfig(decode_free_steps=5, decode_tight_steps=10)
    with pytest.raises(ValueError, match="rounds"):
        RoleFlipConfig(rounds=0)


def test_a_role_flip_under_a_shifting_load_loses_nothing_in_the_simulator():
    """Decode-heavy traffic, then a burst of long prompts: decode instances flip to prefill;
    their decoding requests leave by hand-off. Every request finishes with every token, each
    once and in order (``RequestRecord.on_tokens`` checks the index of each delivery), and no
    KV block stays used on any instance."""
    from experiments.workloads import WorkloadRequest

    work = [WorkloadRequest(0.1 * i, 32, 300) for i in range(100)]
    work += [WorkloadRequest(10.0 + 0.05 * i, 3000, 4) for i in range(120)]
    cluster = SimCluster(SimConfig(num_instances=4, pd_ratio=(1, 3), profile="opt-13b-a100",
                                   role_flip=RoleFlipConfig(rounds=5)))
    result = cluster.run(work, progress=False)
    flips = cluster.scheduler.role_flips
    assert flips and all(role == "prefill" for _, _, role in flips)
    assert all(r.done and r.num_tokens == r.output_len for r in result.requests)
    assert all(e.blocks.num_used == 0 for e in cluster.engines().values())
    flipped = {iid for _, iid, _ in flips}
    assert any(r.dispatched_to in flipped for r in result.requests)  # new requests went to a flipped instance
