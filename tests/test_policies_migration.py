"""Which request migrates out, and migration pairing."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llumnix_py.errors import UnknownPolicyError
from llumnix_py.load import InstanceLoad, RequestLoad
from policies.config import PolicyConfig
from policies.pairing import head_blocked, pair_migrations, plan_migrations, room_behind_head
from policies.selection import find_request, select_migrate_out
from policies.types import MigrateOut, MigrationPair
from policies.virtual_usage import freeness

SELECTIONS = ["shortest", "last", "longest", "lowest_priority", "waiting_head"]


def make_req(rid: str, blocks: int = 0, needed: int | None = None, **kw) -> RequestLoad:
    return RequestLoad(request_id=rid, num_blocks=blocks, blocks_needed=blocks if needed is None else needed, **kw)


def make_inst(iid: str, running=(), waiting=(), total: int = 880, **kw) -> InstanceLoad:
    running, waiting = tuple(running), tuple(waiting)
    return InstanceLoad(instance_id=iid, total_blocks=total, used_blocks=sum(r.num_blocks for r in running),
                        running=running, waiting=waiting, **kw)


def busy(iid: str, n: int = 4, blocks: int = 200) -> InstanceLoad:
    """``n`` running requests of ``blocks``, ``blocks + 1``, ...: 8 x 105 -> freeness 1.5."""
    return make_inst(iid, running=[make_req(f"{iid}r{k}", blocks + k) for k in range(n)])


# --- selection ----------------------------------------------------------------------

MIXED = make_inst(
    "a",
    running=[
        make_req("r1", 50, arrival_time=1.0, priority=1),
        make_req("r2", 10, arrival_time=2.0, priority=0, migrating=True),
        make_req("r3", 30, arrival_time=3.0, priority=0),
        make_req("r4", 90, arrival_time=0.5, priority=2),
    ],
    waiting=[make_req("w1", 0, 40, migrating=True), make_req("w2", 0, 60)],
)


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("shortest", MigrateOut("r3")),
        ("longest", MigrateOut("r4")),
        ("last", MigrateOut("r3")),
        ("lowest_priority", MigrateOut("r3")),
        ("waiting_head", MigrateOut("w2", waiting=True)),
    ],
)
def test_selection_policies_skip_migrating_requests(policy, expected):
    assert select_migrate_out(MIXED, policy) == expected


def test_selection_ties_by_arrival_then_id():
    inst = make_inst(
        "a",
        running=[make_req("b", 10, arrival_time=1.0), make_req("a", 10, arrival_time=1.0), make_req("c", 10)],
    )
    assert select_migrate_out(inst, "shortest") == MigrateOut("c")
    assert select_migrate_out(dataclasses.replace(inst, running=inst.running[:2]), "shortest") == MigrateOut("a")


def test_selection_none_when_nothing_can_move():
    assert select_migrate_out(make_inst("a"), "shortest") is None
    only_migrating = make_inst("a", running=[make_req("r", 5, migrating=True)])
    for policy in SELECTIONS:
        assert select_migrate_out(only_migrating, policy) is None


def test_terminating_instance_drains_running_first_then_waiting():
    inst = make_inst("a", running=[make_req("r1", 20)], waiting=[make_req("w1", 0, 5)], terminating=True)
    assert select_migrate_out(inst, "waiting_head") == MigrateOut("r1")
    assert select_migrate_out(inst, "longest") == MigrateOut("r1")
    queued_only = dataclasses.replace(inst, running=(), used_blocks=0)
    assert select_migrate_out(queued_only, "shortest") == MigrateOut("w1", waiting=True)


def test_unknown_selection_policy():
    with pytest.raises(UnknownPolicyError):
        select_migrate_out(MIXED, "heaviest")


# --- pairing: hand-built -------------------------------------------------------------


def test_lowest_source_pairs_with_highest_destination():
    cluster = [
        busy("s1", 8, 105),  # (880 - 868) / 8 = 1.5
        busy("s2", 4, 215),  # (880 - 866) / 4 = 3.5: a destination (> 3)
        make_inst("d1"),  # 880
        busy("d2", 2, 100),  # (880 - 201) / 2 = 339.5
        busy("mid", 4, 217),  # (880 - 874) / 4 = 1.5: ties with s1, "mid" < "s1"
    ]
    f = {inst.instance_id: freeness(inst, PolicyConfig()) for inst in cluster}
    assert f["s1"] < 3 and f["mid"] < 3 and f["s2"] > 3
    pairs = pair_migrations(cluster, PolicyConfig())
    assert pairs, "expected at least one pair"
    assert pairs == [MigrationPair("mid", "d1"), MigrationPair("s1", "d2")]


def test_balanced_cluster_has_no_pairs():
    cluster = [busy(f"i{k}", 4, 100) for k in range(5)]
    assert pair_migrations(cluster, PolicyConfig()) == []
    assert pair_migrations([], PolicyConfig()) == []


def test_all_busy_cluster_has_no_destination():
    cluster = [busy(f"i{k}", 8, 108) for k in range(4)]
    assert all(freeness(i, PolicyConfig()) < 3 for i in cluster)
    assert pair_migrations(cluster, PolicyConfig()) == []


def test_terminating_instance_is_the_first_source_and_always_kept():
    cluster = [
        busy("x", 8, 105),
        make_inst("t", running=[make_req("t1", 10)], terminating=True),
        make_inst("free"),
        busy("half", 2, 100),
    ]
    plans = plan_migrations(cluster, PolicyConfig())
    assert plans, "expected pairs"
    assert plans[0].pair == MigrationPair("t", "free") and plans[0].src_before == -math.inf
    assert plans[0].request == MigrateOut("t1")
    # An empty terminating instance is not a source; it is never a destination.
    drained = [make_inst("t", terminating=True), make_inst("free")]
    assert pair_migrations(drained, PolicyConfig()) == []


def test_head_of_line_blocking_makes_a_source():
    # Little physical load but a head request that needs 800 blocks: V = 100 + 800 > 880.
    blocked = make_inst("b", running=[make_req("b1", 100)], waiting=[make_req("w", 0, 800)])
    idle = make_inst("idle")
    assert freeness(blocked, PolicyConfig()) < 0
    plans = plan_migrations([blocked, idle], PolicyConfig())
    assert [p.pair for p in plans] == [MigrationPair("b", "idle")]
    assert plans[0].request == MigrateOut("b1")  # frees room for the head
    # Moving the head itself flips the freeness gap (780 vs 80), but the head is
    # blocked and fits on "idle": the de-fragmentation exception keeps the move.
    plans = plan_migrations([blocked, idle], PolicyConfig(migrate_out="waiting_head"))
    assert [(p.pair, p.request) for p in plans] == [(MigrationPair("b", "idle"), MigrateOut("w", waiting=True))]
    # The defrag pairing moves it wherever it fits too.
    plans = plan_migrations([blocked, idle], PolicyConfig(pairing="defrag", migrate_out="waiting_head"))
    assert [(p.pair, p.request) for p in plans] == [(MigrationPair("b", "idle"), MigrateOut("w", waiting=True))]
    too_small = make_inst("small", running=[make_req("s1", 200)])
    assert pair_migrations([blocked, too_small], PolicyConfig(pairing="defrag", migrate_out="waiting_head")) == []


def test_blocked_heads_first_moves_a_fitting_head_before_balancing():
    # "b" is a source with a blocked head that fits on "idle": by default the shortest
    # running request goes for balance (rule 4 keeps it); heads-first moves the head.
    blocked = make_inst("b", running=[make_req("b1", 100), make_req("b2", 150)], waiting=[make_req("w", 0, 700)])
    idle = make_inst("idle")
    assert head_blocked(blocked) and room_behind_head(idle) >= 700
    assert [p.request for p in plan_migrations([blocked, idle], PolicyConfig())] == [MigrateOut("b1")]
    first = PolicyConfig(blocked_heads_first=True)
    plans = plan_migrations([blocked, idle], first)
    assert [(p.pair, p.request) for p in plans] == [(MigrationPair("b", "idle"), MigrateOut("w", waiting=True))]
    assert plans[0].src_after > plans[0].src_before  # its virtual demand leaves with it
    # A head that does not fit, or is already moving, leaves the balancing choice as it was.
    small = make_inst("small", running=[make_req("s1", 300)])
    assert room_behind_head(small) < 700
    assert [p.request for p in plan_migrations([blocked, small], first)] == \
        [p.request for p in plan_migrations([blocked, small], PolicyConfig())]
    moving = make_inst("b", running=blocked.running, waiting=[make_req("w", 0, 700, migrating=True)])
    assert [p.request for p in plan_migrations([moving, idle], first)] == [MigrateOut("b1")]
    # A source whose head is not blocked: the flag changes nothing.
    open_head = make_inst("o", running=[make_req(f"o{k}", 105) for k in range(8)], waiting=[make_req("w2", 0, 2)])
    assert not head_blocked(open_head)
    assert plan_migrations([open_head, idle], first) == plan_migrations([open_head, idle], PolicyConfig())


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(1, 300), max_size=5), st.integers(0, 900)), min_size=2, max_size=6))
def test_blocked_heads_first_only_moves_heads_that_land_where_they_fit(spec):
    cluster = [make_inst(f"i{k}", running=[make_req(f"i{k}r{j}", b) for j, b in enumerate(run)][:4]
                         if sum(run[:4]) <= 880 else [], waiting=[make_req(f"i{k}w", 0, need)] if need else [])
               for k, (run, need) in enumerate(spec)]
    by_id = {i.instance_id: i for i in cluster}
    base = {p.pair.src: p for p in plan_migrations(cluster, PolicyConfig())}
    for p in plan_migrations(cluster, PolicyConfig(blocked_heads_first=True)):
        src, dst = by_id[p.pair.src], by_id[p.pair.dst]
        if p.request.waiting:
            head = src.waiting[0]
            assert p.request.request_id == head.request_id and head_blocked(src)
            assert head.blocks_needed <= room_behind_head(dst)
        else:  # no fitting blocked head: the paper's choice for this pair
            assert not (head_blocked(src) and src.waiting[0].blocks_needed <= room_behind_head(dst))
            if p.pair.src in base and base[p.pair.src].pair == p.pair:
                assert base[p.pair.src].request == p.request


def test_a_move_that_would_flip_the_gap_is_rejected():
    # Source slightly below the threshold, destination slightly above, big request.
    src = make_inst("s", running=[make_req("s1", 300), make_req("s2", 577)])  # (880-877)/2 = 1.5
    dst = make_inst("d", running=[make_req("d1", 860)])  # 20
    assert pair_migrations([src, dst], PolicyConfig()) == []


def test_a_rejected_source_leaves_the_destination_to_the_next():
    # "a" (freeness 0.5) would move its 870-block request: the gap flips, rejected.
    huge = make_inst("a", running=[make_req("a1", 870), make_req("a2", 9)])
    small = busy("b", 8, 105)
    dst = make_inst("d", running=[make_req("d1", 500)])
    plans = plan_migrations([huge, small, dst], PolicyConfig(migrate_out="longest"))
    assert plans, "expected the second source to get the destination"
    assert all(p.pair.src != "a" for p in plans)
    assert plans[0].pair == MigrationPair("b", "d")


def test_a_blocked_head_is_moved_even_if_the_order_flips():
    # The issue-6 case: "b" runs one huge request and its long head prompt does not
    # fit behind it. Moving the running request (shortest = the only one) does not
    # fit anywhere useful and flips the gap; the head itself fits on "d": moved.
    blocked = make_inst("b", running=[make_req("b1", 600)], waiting=[make_req("w", 0, 400)])
    dst = make_inst("d", running=[make_req(f"d{k}", 30) for k in range(10)])  # 580 free, freeness 58
    assert freeness(blocked, PolicyConfig()) < 3 < freeness(dst, PolicyConfig())
    plans = plan_migrations([blocked, dst], PolicyConfig())
    assert [(p.pair, p.request) for p in plans] == [(MigrationPair("b", "d"), MigrateOut("w", waiting=True))]
    assert plans[0].src_after > plans[0].dst_after  # flipped, and kept
    # Not when the head would not fit on the destination either.
    crowded = make_inst("d", running=[make_req(f"d{k}", 50) for k in range(10)])  # 380 free
    assert freeness(crowded, PolicyConfig()) > 3
    assert plan_migrations([blocked, crowded], PolicyConfig()) == []


def test_a_running_request_whose_departure_unblocks_the_head_is_kept():
    # The head (300) is blocked; moving the shortest running request (250) frees
    # enough, fits on "d", but flips the order: kept by the de-fragmentation rule.
    blocked = make_inst("b", running=[make_req("b1", 250), make_req("b2", 400)], waiting=[make_req("w", 0, 300)])
    dst = make_inst("d", running=[make_req(f"d{k}", 25) for k in range(20)],
                    waiting=[make_req("dw", 0, 60)])  # 380 free, 320 behind its head: the head (300) fits
    cfg = PolicyConfig(migrate_out="shortest")
    plans = plan_migrations([blocked, dst], cfg)
    assert [(p.pair, p.request) for p in plans] == [(MigrationPair("b", "d"), MigrateOut("w", waiting=True))]
    tight = dataclasses.replace(dst, waiting=(make_req("dw", 0, 100),))  # 280 behind its head: only b1 fits
    plans = plan_migrations([blocked, tight], cfg)
    assert [(p.pair, p.request) for p in plans] == [(MigrationPair("b", "d"), MigrateOut("b1"))]


def test_a_destination_threshold_keeps_instances_between_the_two_out_of_pairing():
    src = busy("a", n=4, blocks=218)  # freeness (880 - 878) / 4 = 0.5: a source
    mid = make_inst("b", running=(make_req("b0", 500),))  # freeness 380
    roomy = make_inst("c", running=(make_req("c0", 100),))  # freeness 780
    paper = PolicyConfig()
    assert paper.destination_threshold == paper.migrate_out_threshold == 3.0
    assert pair_migrations([src, mid], paper) == [MigrationPair("a", "b")]
    reserve = PolicyConfig(migrate_in_threshold=400.0)
    assert pair_migrations([src, mid], reserve) == []  # b keeps its room for arrivals
    assert pair_migrations([src, mid, roomy], reserve) == [MigrationPair("a", "c")]
    assert pair_migrations([src, mid], PolicyConfig(migrate_in_threshold=3.0)) == pair_migrations([src, mid], paper)
    # A draining instance still moves its requests into the room a destination keeps.
    draining = dataclasses.replace(src, instance_id="d", terminating=True)
    assert pair_migrations([draining, mid], reserve) == [MigrationPair("d", "b")]
    # A blocked queued request does not take it either, though it would fit (300 of 380):
    # letting it made S-L's P99 prefill 7x worse (experiments/RESULTS.md, session 12).
    blocked = make_inst("e", running=[make_req("e1", 600)], waiting=[make_req("w", 0, 300)])
    assert head_blocked(blocked) and pair_migrations([blocked, mid], reserve) == []
    assert pair_migrations([blocked, mid], paper) == [MigrationPair("e", "b")]


@pytest.mark.parametrize("value", [1.0, math.nan, math.inf, True, "20"])
def test_a_destination_threshold_below_the_source_one_or_not_a_number_is_rejected(value):
    with pytest.raises(ValueError, match="migrate_in_threshold"):
        PolicyConfig(migrate_out_threshold=3.0, migrate_in_threshold=value)


def test_pairing_aliases_and_unknown_names():
    cluster = [busy("x", 8, 105), make_inst("free")]
    assert pair_migrations(cluster, PolicyConfig(pairing="balanced")) == pair_migrations(cluster, PolicyConfig())
    with pytest.raises(UnknownPolicyError):
        PolicyConfig(pairing="nearest")


def test_duplicate_ids_are_rejected():
    with pytest.raises(ValueError):
        pair_migrations([make_inst("a"), make_inst("a")], PolicyConfig())


def test_custom_select_fn_is_used():
    cluster = [busy("x", 8, 105), make_inst("free")]
    plans = plan_migrations(cluster, PolicyConfig(), select_fn=lambda inst: MigrateOut(inst.running[-1].request_id))
    assert [p.request.request_id for p in plans] == ["xr7"]
    assert plan_migrations(cluster, PolicyConfig(), select_fn=lambda inst: None) == []


def test_defrag_pairs_blocked_instances_with_the_most_free_blocks():
    cfg = PolicyConfig(pairing="defrag")
    blocked = make_inst("b", running=[make_req("b1", 500), make_req("b2", 50)], waiting=[make_req("w", 0, 400)])
    roomy = make_inst("r", running=[make_req("r1", 100)])
    roomier = make_inst("rr")
    fine = make_inst("f", running=[make_req("f1", 300)], waiting=[make_req("fw", 0, 10)])
    plans = plan_migrations([blocked, roomy, roomier, fine], cfg)
    assert [p.pair for p in plans] == [MigrationPair("b", "rr")]
    assert plans[0].request == MigrateOut("b2")
    assert plans[0].src_after == blocked.free_blocks + 50 and plans[0].dst_after == 880 - 50
    assert pair_migrations([roomy, fine], cfg) == []


# --- properties ---------------------------------------------------------------------


@st.composite
def clusters(draw):
    n = draw(st.integers(0, 10))
    out = []
    for k in range(n):
        running = tuple(
            make_req(
                f"i{k}r{j}",
                draw(st.integers(0, 250)),
                priority=draw(st.integers(0, 2)),
                arrival_time=float(draw(st.integers(0, 9))),
                migrating=draw(st.booleans()),
            )
            for j in range(draw(st.integers(0, 6)))
        )
        waiting = tuple(
            make_req(f"i{k}w{j}", 0, draw(st.integers(1, 500)), priority=draw(st.integers(0, 2)),
                     migrating=draw(st.booleans()))
            for j in range(draw(st.integers(0, 3)))
        )
        inst = make_inst(f"i{k}", running=running, waiting=waiting, terminating=draw(st.integers(0, 5)) == 0,
                         watermark_blocks=draw(st.sampled_from([0, 8])))
        out.append(dataclasses.replace(inst, used_blocks=inst.used_blocks + draw(st.integers(0, 40))))
    return out


@st.composite
def configs(draw):
    out = draw(st.sampled_from([0.0, 3.0, 50.0]))
    return PolicyConfig(
        pairing=draw(st.sampled_from(["freeness", "balanced", "defrag"])),
        migrate_out=draw(st.sampled_from(SELECTIONS)),
        migrate_out_threshold=out,
        migrate_in_threshold=draw(st.sampled_from([None, out, out + 20.0, out + 200.0])),
        headroom_blocks=draw(st.sampled_from([(), ((1, 150),), ((1, 100), (2, 300))])),
    )


CONFIG = configs()


def _after(src: InstanceLoad, dst: InstanceLoad, req: RequestLoad, waiting: bool):
    """The two snapshots once ``req`` has moved (rebuilt, not incremental)."""
    if waiting:
        return (
            dataclasses.replace(src, waiting=tuple(r for r in src.waiting if r is not req)),
            dataclasses.replace(dst, waiting=dst.waiting + (req,)),
        )
    return (
        dataclasses.replace(
            src, running=tuple(r for r in src.running if r is not req), used_blocks=src.used_blocks - req.num_blocks
        ),
        dataclasses.replace(dst, running=dst.running + (req,), used_blocks=dst.used_blocks + req.num_blocks),
    )


@settings(max_examples=250, deadline=None)
@given(cluster=clusters(), cfg=CONFIG)
def test_property_pairs_are_disjoint_and_never_widen_the_gap(cluster, cfg):
    by_id = {inst.instance_id: inst for inst in cluster}
    plans = plan_migrations(cluster, cfg)
    seen: set[str] = set()
    for plan in plans:
        src, dst = by_id[plan.pair.src], by_id[plan.pair.dst]
        assert src.instance_id != dst.instance_id
        assert src.instance_id not in seen and dst.instance_id not in seen
        seen |= {src.instance_id, dst.instance_id}
        assert not dst.terminating
        req = find_request(src, plan.request)
        assert req is not None and not req.migrating
        if cfg.pairing == "defrag":
            continue
        f_src, f_dst = freeness(src, cfg), freeness(dst, cfg)
        assert f_src < cfg.migrate_out_threshold < f_dst
        if src.terminating:
            continue  # a draining source may use the room a destination keeps
        assert f_dst > cfg.destination_threshold
        src_after, dst_after = _after(src, dst, req, plan.request.waiting)
        fs2, fd2 = freeness(src_after, cfg), freeness(dst_after, cfg)
        if fs2 <= fd2 + 1e-9 and abs(fs2 - fd2) < abs(f_src - f_dst):
            continue  # rule 4: narrows the gap without flipping it
        # Otherwise only the de-fragmentation exception (rule 5) may keep it: the
        # source's head is blocked, and the move unblocks it or moves it, landing
        # where it fits behind the destination's own head.
        assert head_blocked(src), "flipped or widened the gap without a blocked head"
        head = src.waiting[0]
        if plan.request.waiting:
            assert req is head and req.blocks_needed <= room_behind_head(dst)
        else:
            assert req.num_blocks <= room_behind_head(dst)
            assert src.free_blocks - src.watermark_blocks + req.num_blocks >= head.blocks_needed
            assert not head_blocked(src_after)
        assert not head_blocked(dst_after) or head_blocked(dst), "the move blocked the destination"


@settings(max_examples=250, deadline=None)
@given(cluster=clusters(), policy=st.sampled_from(SELECTIONS))
def test_property_selection_returns_a_movable_request_on_that_instance(cluster, policy):
    for inst in cluster:
        choice = select_migrate_out(inst, policy)
        movable = [r for r in inst.running + inst.waiting if not r.migrating]
        if choice is None:
            if inst.terminating:
                assert not movable
            continue
        req = find_request(inst, choice)
        assert req is not None and not req.migrating
        if inst.terminating and any(not r.migrating for r in inst.running):
            assert not choice.waiting


def test_hand_built_snapshots_cover_the_loops():
    # Guard against vacuous property loops: the strategy does produce pairs.
    cluster = [busy("x", 8, 105), make_inst("t", running=[make_req("t1", 10)], terminating=True), make_inst("f1"),
               make_inst("f2")]
    assert len(plan_migrations(cluster, PolicyConfig())) == 2
