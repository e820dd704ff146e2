"""Instance roles (``policies.roles``) as pure functions, and the scheduler and simulator over them."""

from __future__ import annotations

import dataclasses

import pytest

from llumnix_py.config import ClusterConfig
from llumnix_py.load import InstanceLoad, RequestLoad
from llumnix_py.scheduler.core import GlobalScheduler, SchedulerConfig
from llumnix_py.sim.cluster import SimCluster
from llumnix_py.sim.config import SimConfig
from policies.config import PolicyConfig
from policies.dispatch import DispatchState, dispatch
from llumnix_py.errors import UnknownRoleError
from policies.roles import (PD_MIGRATIONS_AT_ONCE, Role, assign_role, parse_pd_ratio, parse_role, plan_handoffs,
                           roles_for)
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
    with pytest.raises(UnknownRoleError, match="prefill, decode, both") as err:
        parse_role(bad)
    assert isinstance(err.value, ValueError)  # and a typed error that crosses the Ray boundary as itself


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


def test_the_library_hands_off_several_at_once_with_roles_as_the_cli_does():
    assert (SchedulerConfig().max_migrations_out, SchedulerConfig().max_migrations_in) == (1, 1)
    for sched in (SchedulerConfig(pd_ratio="1:3"), SchedulerConfig(roles="prefill,decode")):
        assert (sched.max_migrations_out, sched.max_migrations_in) == (PD_MIGRATIONS_AT_ONCE,) * 2
    assert (SchedulerConfig(pd_ratio=(1, 1), max_migrations_out=2).max_migrations_in) == 2
    sim = SimConfig(num_instances=2, pd_ratio=(1, 1))
    assert (sim.max_migrations_out, sim.scheduler_config().max_migrations_in) == (PD_MIGRATIONS_AT_ONCE,) * 2
    assert SimConfig(num_instances=2).max_migrations_out == 1
    # the llumlets take what the scheduler orders
    cfg = ClusterConfig(num_instances=4, runtime="local", scheduler=SchedulerConfig(pd_ratio="1:3"))
    assert (cfg.llumlet.max_outgoing, cfg.llumlet.max_incoming) == (PD_MIGRATIONS_AT_ONCE,) * 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            SchedulerConfig(max_migrations_in=bad)


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


def test_a_refused_hand_off_is_ordered_again_and_a_failed_one_is_not():
    """A source llumlet at its own limit on concurrent migrations refuses an order before any
    copy starts: the request must not be left decoding on its prefill instance for that."""
    core = GlobalScheduler(SchedulerConfig(pd_ratio=(1, 1)))
    for i in "ab":
        core.register(i, f"addr-{i}", 0.0)
    core.on_load("a", inst("", "both", [req("r", 4)], total=100), 0.0)
    core.on_load("b", inst("", "both", total=100), 0.0)
    first = core.handoff_round(1.0)
    assert [(o.request_id, o.src, o.dst) for o in first] == [("r", "a", "b")]
    core.on_migration_refused(first[0].migration_id, "r", 1.1, "a", "b")
    assert core.loads()[0].migrating_out == 0  # the refused order is forgotten
    again = core.handoff_round(1.2)
    assert [(o.request_id, o.src, o.dst) for o in again] == [("r", "a", "b")]
    assert again[0].migration_id != first[0].migration_id
    core.on_migration_result(again[0].migration_id, "r", False, 3, 1.3)  # started, then failed: r stays on a
    assert core.handoff_round(1.4) == []


def test_the_daemon_orders_a_hand_off_again_after_the_source_llumlet_refused_it():
    from llumnix_py.scheduler.daemon import SchedulerDaemon
    from tests.cluster_helpers import ManualClock
    from tests.test_payoff import ScriptedLauncher

    clock = ManualClock(0.0)
    daemon = SchedulerDaemon(SchedulerConfig(pd_ratio=(1, 1)), ScriptedLauncher(), clock=clock)
    a, b = (daemon.handles[i] for i in daemon.launch(2))
    assert (daemon.core.role(a.instance_id), daemon.core.role(b.instance_id)) == (Role.PREFILL, Role.DECODE)
    refusals = []

    def at_its_limit_once(request_id, dst_address, migration_id, waiting):
        a.orders.append((migration_id, request_id))
        refusals.append(migration_id)
        a.migrate_out = lambda *args: (a.orders.append((args[2], args[0])), True)[1]
        return False

    a.migrate_out = at_its_limit_once
    a.snapshot = inst("", "both", [req("r", 4)])
    b.snapshot = inst("", "both")
    daemon.tick()
    clock.advance(0.1)
    daemon.tick()
    assert [rid for _, rid in a.orders] == ["r", "r"]  # refused, then ordered again
    assert a.orders[1][0] != refusals[0]


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


# ----- draining the phase a flipped instance no longer runs -----------------------------------

from policies.roles import plan_redirects  # noqa: E402
from policies.types import Redirect  # noqa: E402


def test_queued_never_prefilled_requests_on_decode_instances_go_where_the_dispatcher_would_put_them():
    d = InstanceLoad(instance_id="d", total_blocks=100, used_blocks=10, running=(req("dec", 10),),
                     waiting=(waiting("w1", 8), waiting("w2", 8),
                              RequestLoad(request_id="pre", num_blocks=0, blocks_needed=9, output_len=3)),
                     role="decode")
    p1 = inst("p1", "prefill", [req("x", 40)])
    p2 = inst("p2", "prefill", [req("y", 20)])
    both = inst("b", "both", [req("z", 70)])
    plans = plan_redirects([d, p1, p2, both], CFG, slots_out={"d": 5}, slots_in={"p1": 5, "p2": 5, "b": 5})
    # w1 to p2 (freest: (100-20-8)/2 = 36); then p2 (100-36)/3 = 21 vs p1 (100-48)/2 = 26: w2 to p1.
    # "pre" was preempted after decoding (output_len 3): decode-phase work, it stays; "dec" runs.
    assert plans == [Redirect("w1", "d", "p2"), Redirect("w2", "d", "p1")]
    assert plan_redirects([d, p1], CFG, slots_out={"d": 1}, slots_in={"p1": 5}) == [Redirect("w1", "d", "p1")]
    assert plan_redirects([d, p1], CFG, slots_out={"d": 5}, slots_in={"p1": 1}) == [Redirect("w1", "d", "p1")]
    assert plan_redirects([d, p1], CFG, slots_out={"d": 5}, slots_in={}) == []
    assert plan_redirects([d], CFG, slots_out={"d": 5}, slots_in={}) == []  # nowhere to go: they wait
    # a prefill instance's queue is its own work; a terminating target takes nothing
    p_queued = InstanceLoad(instance_id="p", total_blocks=100, used_blocks=0, waiting=(waiting("q", 4),),
                            role="prefill")
    assert plan_redirects([p_queued, inst("d", "decode")], CFG, slots_out={"p": 5}, slots_in={"d": 5}) == []
    gone = InstanceLoad(instance_id="p1", total_blocks=100, used_blocks=0, role="prefill", terminating=True)
    assert plan_redirects([d, gone], CFG, slots_out={"d": 5}, slots_in={"p1": 5}) == []


def test_a_flip_to_decode_redirects_its_queue_and_a_flip_to_prefill_hands_off_its_decoding_requests():
    """The scheduler core: after a flip (by hand or by the policy), the next tick orders the
    moves that empty the instance of the phase it no longer runs, each once while in flight."""
    core = GlobalScheduler(SchedulerConfig(pd_ratio=(2, 1), max_migrations_out=4, max_migrations_in=4))
    for i in "abc":
        core.register(i, f"addr-{i}", 0.0)
    assert [core.role(i) for i in "abc"] == [Role.PREFILL, Role.DECODE, Role.PREFILL]
    queued = InstanceLoad(instance_id="", total_blocks=100, used_blocks=8, running=(req("r-c", 8),),
                          waiting=(waiting("q1", 4), waiting("q2", 4)))
    core.on_load("a", inst("", "both"), 0.0)
    core.on_load("b", inst("", "both", [req("d1", 6), req("d2", 6)]), 0.0)
    core.on_load("c", queued, 0.0)
    assert core.redirect_round(0.1) == []  # nothing queued on a decode instance yet
    core.handoff_round(0.1)  # r-c's hand-off is ordered (and stays in flight)
    core.flip_role("c", "decode", 0.2)
    core.flip_role("b", "prefill", 0.2)
    core.flip_role("b", "prefill", 0.25)  # unchanged: not a flip
    assert core.role_flips == [(0.2, "c", "decode"), (0.2, "b", "prefill")]
    redirects = core.redirect_round(0.3)
    # the empty prefill instance a is the freest for both ((100-4)/1, then (100-8)/2 = 46 against
    # b's (100-12-4)/3 = 28)
    assert [(o.request_id, o.src, o.dst, o.waiting, o.redirect) for o in redirects] == [
        ("q1", "c", "a", True, True), ("q2", "c", "a", True, True)]
    assert core.redirect_round(0.35) == []  # in flight: not ordered twice
    handoffs = core.handoff_round(0.4)
    assert sorted((o.request_id, o.src, o.dst) for o in handoffs) == [("d1", "b", "c"), ("d2", "b", "c")]
    core.on_migration_result(redirects[0].migration_id, "q1", False, 0, 0.5)  # failed: q1 is still queued on c
    assert [o.request_id for o in core.redirect_round(0.6)] == ["q1"]
    assert core.num_redirects == 3
    with pytest.raises(ValueError, match="unknown instance role"):
        core.flip_role("a", "decoder", 0.7)


def test_the_role_flip_policy_flips_through_the_scheduler_and_the_queue_follows():
    flip = RoleFlipConfig(backlog_blocks=10, decode_free_steps=50, decode_tight_steps=5, rounds=1)
    core = GlobalScheduler(SchedulerConfig(pd_ratio=(2, 1), role_flip=flip))
    for i in "abc":
        core.register(i, f"addr-{i}", 0.0)
    core.on_load("a", inst("", "both", [req("x", 1)]), 0.0)
    core.on_load("b", inst("", "both", [req(f"r{k}", 24) for k in range(4)]), 0.0)  # decode is tight
    core.on_load("c", inst("", "both"), 0.0)  # no backlog anywhere
    core.migration_round(1.0)
    assert core.role_flips == [(1.0, "c", "decode")]
    late = InstanceLoad(instance_id="", total_blocks=100, used_blocks=0, waiting=(waiting("late", 3),))
    core.on_load("c", late, 1.1)  # a dispatch that raced the flip
    assert [(o.request_id, o.src, o.dst) for o in core.redirect_round(1.2)] == [("late", "c", "a")]


# ----- per-instance roles ---------------------------------------------------------------------

from policies.roles import parse_roles  # noqa: E402


@pytest.mark.parametrize("bad,match", [
    ("prefill,decoder", "unknown instance role 'decoder'; expected one of prefill, decode, both"),
    ("", "the list is empty"), ((), "the list is empty"), (3, "comma-separated"),
    ("decode,decode", "no instance takes new requests"),
    ("prefill,prefill", "list at least one 'decode'"), ("prefill,both", "list at least one 'decode'"),
    ("decode,both", "list at least one 'prefill'")])
def test_bad_per_instance_roles_are_errors_saying_what_is_wrong(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_roles(bad)


def test_per_instance_roles_are_given_in_order_and_a_replacement_takes_the_role_it_had():
    roles = parse_roles("decode, Prefill,decode")
    assert roles == (Role.DECODE, Role.PREFILL, Role.DECODE)
    assert parse_roles(["both", "both"]) == (Role.BOTH, Role.BOTH)
    assert roles_for(3, None, roles) == list(roles)
    assert assign_role([Role.DECODE, Role.DECODE], None, roles) == Role.PREFILL  # the prefill instance died
    assert assign_role([Role.PREFILL, Role.DECODE], None, roles) == Role.DECODE
    # beyond the list (a scale-out): the role furthest below its share, list order on a tie
    assert roles_for(6, None, roles) == [Role.DECODE, Role.PREFILL, Role.DECODE, Role.DECODE, Role.PREFILL,
                                         Role.DECODE]
    core = GlobalScheduler(SchedulerConfig(roles="prefill,decode,decode"))
    for i in "abc":
        core.register(i, f"addr-{i}", 0.0)
    assert [core.role(i) for i in "abc"] == [Role.PREFILL, Role.DECODE, Role.DECODE]
    core.remove("a")
    core.register("d", "addr-d", 1.0)
    assert core.role("d") == Role.PREFILL
    with pytest.raises(ValueError, match="not both"):
        SchedulerConfig(roles="prefill,decode", pd_ratio="1:1")
    with pytest.raises(ValueError, match="2 roles listed .prefill,decode. for 3 instances"):
        ClusterConfig(num_instances=3, runtime="local", scheduler=SchedulerConfig(roles="prefill,decode"))


# ----- load balancing leaves prefill-phase work to the redirects --------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from policies.roles import hold_prefill_work, never_prefilled  # noqa: E402


def test_balancing_never_moves_a_queued_never_prefilled_request_between_decode_instances():
    """b (decode) is overloaded and its queue's head, never prefilled, is blocked; c (decode) is
    empty. A policy that moves queued requests (here ``waiting_head``; the pairing's blocked-head
    rule skips a head marked migrating the same way) would move it b -> c, to be prefilled on
    another decode instance; held, it goes to the prefill instance a by redirect instead."""
    policy = PolicyConfig(migrate_out="waiting_head")
    core = GlobalScheduler(SchedulerConfig(policy=policy, pd_ratio=(1, 2), max_migrations_out=2, max_migrations_in=2))
    for i in "abc":
        core.register(i, f"addr-{i}", 0.0)
    core.on_load("a", inst("", "both"), 0.0)
    crowded = InstanceLoad(instance_id="", total_blocks=100, used_blocks=96,
                           running=tuple(req(f"d{k}", 24) for k in range(4)), waiting=(waiting("q", 8),))
    core.on_load("b", crowded, 0.0)
    core.on_load("c", inst("", "both"), 0.0)
    assert all(o.request_id != "q" for o in core.migration_round(0.1))
    assert [(o.request_id, o.src, o.dst) for o in core.redirect_round(0.2)] == [("q", "b", "a")]
    # the same snapshot without roles: the policy does move the queued head (the test can fail)
    plain = GlobalScheduler(SchedulerConfig(policy=policy))
    for i in "bc":
        plain.register(i, f"addr-{i}", 0.0)
    plain.on_load("b", crowded, 0.0)
    plain.on_load("c", inst("", "both"), 0.0)
    assert [(o.request_id, o.src, o.dst, o.waiting) for o in plain.migration_round(0.1)] == [("q", "b", "c", True)]


loads = st.builds(
    lambda iid, role, term, running, queued: InstanceLoad(
        instance_id=iid, total_blocks=100, used_blocks=sum(r.num_blocks for r in running), running=tuple(running),
        waiting=tuple(queued), role=role, terminating=term),
    st.sampled_from(["a", "b", "c"]), st.sampled_from(["prefill", "decode", "both"]), st.booleans(),
    st.lists(st.builds(req, st.sampled_from(["r1", "r2"]), st.integers(1, 8), st.integers(1, 5), st.booleans()),
             max_size=3),
    st.lists(st.builds(lambda rid, out, mig: RequestLoad(request_id=rid, num_blocks=0, blocks_needed=4,
                                                         prompt_len=64, output_len=out, migrating=mig),
                       st.sampled_from(["w1", "w2", "w3"]), st.integers(0, 3), st.booleans()), max_size=4))


@settings(max_examples=200, deadline=None)
@given(st.lists(loads, max_size=4))
def test_the_hold_marks_exactly_the_prefill_work_of_decode_instances_and_changes_nothing_else(snapshots):
    held = hold_prefill_work(snapshots)
    assert len(held) == len(snapshots)
    for before, after in zip(snapshots, held):
        assert dataclasses.replace(after, waiting=()) == dataclasses.replace(before, waiting=())
        assert [r.request_id for r in after.waiting] == [r.request_id for r in before.waiting]
        for b, a in zip(before.waiting, after.waiting):
            held_here = before.role == "decode" and not before.terminating and never_prefilled(b)
            assert a == (dataclasses.replace(b, migrating=True) if held_here else b)
            assert not (held_here and never_prefilled(a))  # nothing held is a candidate any more
