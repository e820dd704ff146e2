"""Virtual usage, freeness, the policy config and the registries."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llumnix_py.errors import UnknownPolicyError
from llumnix_py.lazy_registry import LazyRegistry, check_callable
from llumnix_py.load import InstanceLoad, RequestLoad
from policies.config import PolicyConfig
from policies.dispatch import DispatchState
from policies.registry import DISPATCH, MIGRATE_OUT, PAIRING, SCALING
from policies.virtual_usage import (
    freeness,
    freeness_after_addition,
    freeness_after_removal,
    summarize,
    virtual_usage,
)

HEADROOM = PolicyConfig(headroom_blocks=((1, 400),))


def make_req(rid: str, blocks: int = 0, needed: int | None = None, **kw) -> RequestLoad:
    return RequestLoad(request_id=rid, num_blocks=blocks, blocks_needed=blocks if needed is None else needed, **kw)


def make_inst(iid: str, running=(), waiting=(), total: int = 880, used: int | None = None, **kw) -> InstanceLoad:
    running, waiting = tuple(running), tuple(waiting)
    if used is None:
        used = sum(r.num_blocks for r in running)
    return InstanceLoad(instance_id=iid, total_blocks=total, used_blocks=used, running=running, waiting=waiting, **kw)


# --- hand-built -------------------------------------------------------------------


def test_empty_instance_freeness_is_its_free_blocks():
    cfg = PolicyConfig()
    inst = make_inst("a")
    assert virtual_usage(inst, cfg) == 0
    assert freeness(inst, cfg) == 880


def test_running_blocks_over_batch_size():
    cfg = PolicyConfig()
    inst = make_inst("a", running=[make_req("r1", 100), make_req("r2", 60)])
    assert virtual_usage(inst, cfg) == 160
    assert freeness(inst, cfg) == (880 - 160) / 2


def test_used_blocks_include_reservations():
    cfg = PolicyConfig()
    inst = make_inst("a", running=[make_req("r1", 100)], used=150, migrating_in=1)
    assert virtual_usage(inst, cfg) == 150
    stale = make_inst("b", running=[make_req("r1", 100)], used=40)
    assert virtual_usage(stale, cfg) == 100


def test_head_of_line_counts_for_migration_rest_only_for_dispatch():
    cfg = PolicyConfig()
    inst = make_inst(
        "a",
        running=[make_req("r1", 100)],
        waiting=[make_req("w1", 0, 300), make_req("w2", 0, 50)],
        pending_dispatch=(make_req("p1", 0, 20),),
    )
    assert virtual_usage(inst, cfg, purpose="migration") == 100 + 300
    assert virtual_usage(inst, cfg, purpose="dispatch") == 100 + 300 + 50 + 20
    extra = (make_req("x", 0, 7),)
    assert virtual_usage(inst, cfg, purpose="dispatch", extra_pending=extra) == 477
    assert virtual_usage(inst, cfg, purpose="migration", extra_pending=extra) == 400


def test_terminating_is_infinitely_busy():
    cfg = PolicyConfig()
    inst = make_inst("a", running=[make_req("r1", 10)], terminating=True)
    assert virtual_usage(inst, cfg) == math.inf
    assert freeness(inst, cfg) == -math.inf
    assert freeness(inst, cfg, purpose="dispatch", for_priority=1) == -math.inf


def test_unknown_purpose_is_rejected():
    with pytest.raises(ValueError):
        freeness(make_inst("a"), PolicyConfig(), purpose="scaling")  # type: ignore[arg-type]


def test_headroom_only_charged_to_other_priorities():
    high = [make_req("h1", 50, priority=1), make_req("h2", 30, priority=1)]
    inst = make_inst("a", running=[*high, make_req("n1", 100)])
    plain = make_inst("b", running=[make_req("n1", 100), make_req("n2", 50), make_req("n3", 30)])
    # Shares h/n_p add up to the whole headroom once.
    assert virtual_usage(inst, HEADROOM) == 180 + 400
    normal = freeness(inst, HEADROOM, for_priority=0, purpose="dispatch")
    urgent = freeness(inst, HEADROOM, for_priority=1, purpose="dispatch")
    assert urgent > normal
    assert urgent == (880 - 180) / 3
    # A normal request sees the instance hosting high-priority work as busier than a
    # like-loaded plain one; a high-priority request sees them alike.
    assert normal < freeness(plain, HEADROOM, purpose="dispatch")
    assert urgent == freeness(plain, HEADROOM, for_priority=1, purpose="dispatch")
    # No headroom without a request of that priority.
    assert virtual_usage(plain, HEADROOM) == 180


def test_headroom_counts_waiting_members_of_the_class():
    inst = make_inst("a", running=[make_req("n", 100)],
                     waiting=[make_req("w", 0, 10), make_req("h", 0, 20, priority=1)])
    assert virtual_usage(inst, HEADROOM, purpose="migration") == 100 + 10 + 400
    assert virtual_usage(inst, HEADROOM, purpose="migration", for_priority=1) == 110


# --- config and registries --------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"dispatch_top_k": 0},
        {"scale_period_rounds": 0},
        {"min_instances": 0},
        {"min_instances": 5, "max_instances": 4},
        {"scale_out_threshold": 70.0},
        {"migrate_out_threshold": math.nan},
        {"headroom_blocks": ((0, 10),)},
        {"headroom_blocks": ((1, -1),)},
        {"headroom_blocks": ((1, 10), (1, 20))},
        {"headroom_blocks": ((1, 2, 3),)},
        {"dispatch": ""},
    ],
)
def test_config_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        PolicyConfig(**kw)


@pytest.mark.parametrize("field", ["dispatch", "pairing", "migrate_out", "scaling"])
def test_config_rejects_unknown_policy_names(field):
    with pytest.raises(UnknownPolicyError, match="known"):
        PolicyConfig(**{field: "no-such-policy"})


def test_config_headroom_lookup_and_normalization():
    cfg = PolicyConfig(headroom_blocks=[[2, 10], (1, 400), (3, 0)])  # type: ignore[arg-type]
    assert cfg.headroom_blocks == ((1, 400), (2, 10))
    assert cfg.headroom(1) == 400 and cfg.headroom(3) == 0 and cfg.headroom(0) == 0
    assert cfg == PolicyConfig(headroom_blocks=((1, 400), (2, 10)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dispatch = "load"  # type: ignore[misc]


def test_registry_validates():
    reg: LazyRegistry = LazyRegistry("demo policy", UnknownPolicyError, check=check_callable)
    reg.register("a", lambda: 1)
    with pytest.raises(ValueError):
        reg.register("a", lambda: 2)
    with pytest.raises(TypeError):
        reg.register("b", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        reg.register("", lambda: 3)
    with pytest.raises(UnknownPolicyError, match="known: a"):
        reg.get("zzz")
    assert reg.names() == ["a"] and "a" in reg and len(reg) == 1


def test_builtin_registries_hold_the_paper_policies():
    assert {"freeness", "load", "queue", "round_robin", "random"} <= set(DISPATCH.names())
    assert {"freeness", "balanced", "defrag"} <= set(PAIRING.names())
    assert {"shortest", "last", "longest", "lowest_priority", "waiting_head"} <= set(MIGRATE_OUT.names())
    assert {"freeness", "none"} <= set(SCALING.names())


# --- properties ---------------------------------------------------------------------


@st.composite
def requests(draw, prefix: str, waiting: bool, max_n: int = 6):
    n = draw(st.integers(0, max_n))
    out = []
    for k in range(n):
        blocks = 0 if waiting else draw(st.integers(0, 120))
        needed = draw(st.integers(1, 200)) if waiting else blocks
        out.append(
            RequestLoad(
                request_id=f"{prefix}{k}",
                num_blocks=blocks,
                blocks_needed=needed,
                priority=draw(st.integers(0, 2)),
                arrival_time=float(draw(st.integers(0, 5))),
                migrating=draw(st.booleans()),
            )
        )
    return tuple(out)


@st.composite
def instances(draw, iid: str = "i0"):
    running = draw(requests(f"{iid}r", False))
    waiting = draw(requests(f"{iid}w", True))
    pending = draw(requests(f"{iid}p", True, max_n=2))
    used = sum(r.num_blocks for r in running) + draw(st.integers(-20, 60))
    return InstanceLoad(
        instance_id=iid,
        total_blocks=draw(st.sampled_from([200, 880])),
        used_blocks=max(0, used),
        running=running,
        waiting=waiting,
        pending_dispatch=pending,
        terminating=draw(st.booleans()),
    )


CONFIGS = st.sampled_from([PolicyConfig(), HEADROOM, PolicyConfig(headroom_blocks=((1, 100), (2, 250)))])


@settings(max_examples=200, deadline=None)
@given(inst=instances(), extra=requests("x", True, max_n=3), cfg=CONFIGS, prio=st.integers(0, 2))
def test_cached_dispatch_freeness_matches_formula(inst, extra, cfg, prio):
    state = DispatchState(seed=0)
    for r in extra:
        state.on_dispatch(inst.instance_id, r)
    expected = freeness(inst, cfg, for_priority=prio, purpose="dispatch", extra_pending=extra)
    got = state.dispatch_freeness(inst, cfg, prio)
    if inst.terminating:
        assert expected == -math.inf
    else:
        assert got == pytest.approx(expected)


@settings(max_examples=200, deadline=None)
@given(src=instances("s"), dst=instances("d"), cfg=CONFIGS, data=st.data())
def test_incremental_freeness_matches_rebuilt_snapshots(src, dst, cfg, data):
    src = dataclasses.replace(src, terminating=False)
    dst = dataclasses.replace(dst, terminating=False)
    movable = [(r, False) for r in src.running] + [(r, True) for r in src.waiting]
    if not movable:
        return
    req, waiting = data.draw(st.sampled_from(movable))
    if waiting:
        src_after = dataclasses.replace(src, waiting=tuple(r for r in src.waiting if r is not req))
        dst_after = dataclasses.replace(dst, waiting=dst.waiting + (req,))
    else:
        src_after = dataclasses.replace(
            src, running=tuple(r for r in src.running if r is not req), used_blocks=src.used_blocks - req.num_blocks
        )
        dst_after = dataclasses.replace(
            dst, running=dst.running + (req,), used_blocks=dst.used_blocks + req.num_blocks
        )
    ss = summarize(src, cfg)
    sd = summarize(dst, cfg)
    assert freeness_after_removal(src, ss, cfg, req, waiting=waiting) == pytest.approx(freeness(src_after, cfg))
    assert freeness_after_addition(dst, sd, cfg, req, waiting=waiting) == pytest.approx(freeness(dst_after, cfg))
