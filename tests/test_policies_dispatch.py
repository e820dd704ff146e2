"""Dispatch policies: hand-built snapshots and properties."""

from __future__ import annotations

import dataclasses

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llumnix_py.errors import UnknownPolicyError
from llumnix_py.load import InstanceLoad, RequestLoad
from policies.config import PolicyConfig
from policies.dispatch import DispatchState, dispatch, prefill_backlog
from policies.registry import DISPATCH
from policies.types import Dispatch
from policies.virtual_usage import freeness_with_request

POLICIES = ["freeness", "load", "queue", "prefill_queue", "round_robin", "random"]


def make_req(rid: str, blocks: int = 0, needed: int | None = None, **kw) -> RequestLoad:
    return RequestLoad(request_id=rid, num_blocks=blocks, blocks_needed=blocks if needed is None else needed, **kw)


def make_inst(iid: str, running=(), waiting=(), total: int = 880, **kw) -> InstanceLoad:
    running, waiting = tuple(running), tuple(waiting)
    return InstanceLoad(instance_id=iid, total_blocks=total, used_blocks=sum(r.num_blocks for r in running),
                        running=running, waiting=waiting, **kw)


def make_cluster(n: int, blocks: int = 100, **kw) -> list[InstanceLoad]:
    return [make_inst(f"i{k}", running=[make_req(f"i{k}r", blocks)], **kw) for k in range(n)]


def pick(instances, request, cfg, state) -> str | None:
    d = dispatch(instances, request, cfg, state)
    return None if d is None else d.instance_id


def test_picks_the_freest_instance():
    cluster = [
        make_inst("a", running=[make_req("a1", 500)]),
        make_inst("b", running=[make_req("b1", 100)]),
        make_inst("c", running=[make_req("c1", 300)]),
    ]
    assert dispatch(cluster, make_req("x", 0, 10), PolicyConfig(), DispatchState()) == Dispatch("b")


def test_ties_go_to_the_lowest_id_whatever_the_input_order():
    cluster = make_cluster(4)
    for order in (cluster, cluster[::-1]):
        assert pick(order, make_req("x", 0, 10), PolicyConfig(), DispatchState()) == "i0"


def test_empty_and_all_terminating_give_none():
    for policy in POLICIES:
        cfg = PolicyConfig(dispatch=policy)
        assert dispatch([], make_req("x", 0, 10), cfg, DispatchState()) is None
        assert dispatch(make_cluster(3, terminating=True), make_req("x", 0, 10), cfg, DispatchState()) is None


@pytest.mark.parametrize("policy", POLICIES)
def test_never_a_terminating_instance(policy):
    cluster = [make_inst("a", terminating=True), make_inst("b", running=[make_req("b1", 800)])]
    state = DispatchState(seed=3)
    for k in range(10):
        assert pick(cluster, make_req(f"x{k}", 0, 10), PolicyConfig(dispatch=policy), state) == "b"


def test_pending_requests_spread_dispatches_between_polls():
    cfg = PolicyConfig()
    cluster = make_cluster(2)
    state = DispatchState()
    first = pick(cluster, make_req("x1", 0, 50), cfg, state)
    assert first is not None
    state.on_dispatch(first, make_req("x1", 0, 50))
    second = pick(cluster, make_req("x2", 0, 50), cfg, state)
    assert {first, second} == {"i0", "i1"}
    state.on_dispatch(second, make_req("x2", 0, 50))
    # After a poll the fresh load includes the request; with stale snapshots the
    # cleared instance looks free again.
    state.on_poll("i1")
    assert state.pending("i1") == () and len(state.pending("i0")) == 1
    assert pick(cluster, make_req("x3", 0, 50), cfg, state) == "i1"


def test_snapshot_pending_dispatch_counts():
    cluster = [make_inst("a", pending_dispatch=(make_req("p", 0, 100),)), make_inst("b")]
    assert pick(cluster, make_req("x", 0, 1), PolicyConfig(), DispatchState()) == "b"
    assert pick(cluster, make_req("x", 0, 1), PolicyConfig(dispatch="queue"), DispatchState()) == "b"


def test_dispatch_counts_every_queued_request():
    # "a" has less running work but a long queue.
    a = make_inst("a", running=[make_req("a1", 100)], waiting=[make_req("w1", 0, 300), make_req("w2", 0, 300)])
    b = make_inst("b", running=[make_req("b1", 200)])
    assert pick([a, b], make_req("x", 0, 10), PolicyConfig(), DispatchState()) == "b"
    assert pick([a, b], make_req("x", 0, 10), PolicyConfig(dispatch="load"), DispatchState()) == "b"


def test_priority_sees_its_own_headroom_as_free():
    cfg = PolicyConfig(headroom_blocks=((1, 400),))
    # "h" hosts one high-priority request (charged 400 headroom to others); "n" is busier physically.
    h = make_inst("h", running=[make_req("h1", 100, priority=1)])
    n = make_inst("n", running=[make_req("n1", 300)])
    assert pick([h, n], make_req("x", 0, 10), cfg, DispatchState()) == "n"
    assert pick([h, n], make_req("y", 0, 10, priority=1), cfg, DispatchState()) == "h"


def test_round_robin_cycles_in_id_order_and_survives_membership_change():
    cfg = PolicyConfig(dispatch="round_robin")
    cluster = make_cluster(3)
    state = DispatchState()
    got = [pick(cluster, make_req(f"x{k}", 0, 1), cfg, state) for k in range(7)]
    assert got == ["i0", "i1", "i2", "i0", "i1", "i2", "i0"]
    shrunk = [cluster[0], cluster[2]]  # i1 left
    assert pick(shrunk, make_req("y", 0, 1), cfg, state) == "i2"
    assert pick(shrunk, make_req("z", 0, 1), cfg, state) == "i0"


def test_top_k_random_choice_is_reproducible_and_stays_in_the_top_k():
    cfg = PolicyConfig(dispatch_top_k=3)
    cluster = make_cluster(3, blocks=100) + [make_inst("busy", running=[make_req("b", 800)])]

    def run(seed: int) -> list[str | None]:
        state = DispatchState(seed=seed)
        return [pick(cluster, make_req(f"x{k}", 0, 1), cfg, state) for k in range(40)]

    a, b = run(7), run(7)
    assert a == b
    assert set(a) == {"i0", "i1", "i2"}
    assert run(8) != a


def test_random_policy_is_seeded():
    cfg = PolicyConfig(dispatch="random")
    cluster = make_cluster(5)

    def run(seed: int) -> list[str | None]:
        state = DispatchState(seed=seed)
        return [pick(cluster, make_req(f"x{k}", 0, 1), cfg, state) for k in range(30)]

    assert run(1) == run(1)
    assert len(set(run(1))) > 1


def test_queue_policy_prefers_short_queue():
    a = make_inst("a", waiting=[make_req("w1", 0, 1), make_req("w2", 0, 1)])
    b = make_inst("b", waiting=[make_req("w3", 0, 500)])
    assert pick([a, b], make_req("x", 0, 1), PolicyConfig(dispatch="queue"), DispatchState()) == "b"


def test_prefill_backlog_counts_what_must_be_prefilled_first():
    inst = make_inst(
        "a",
        running=[make_req("new", 10, prompt_len=300), make_req("decoding", 20, prompt_len=900, output_len=5)],
        waiting=[make_req("queued", 0, 4, prompt_len=50), make_req("preempted", 0, 9, prompt_len=100, output_len=30)],
    )
    # the admitted prompt with no token out yet, the queued one, the preempted one again with
    # its outputs; not the one decoding
    assert prefill_backlog(inst) == 300 + 50 + 130
    assert prefill_backlog(inst, [make_req("p", 0, 2, prompt_len=25)]) == 480 + 25
    # the dispatcher's cached reading: the snapshot once, its own dispatches since added each time
    state = DispatchState()
    assert state.prefill_backlog(inst) == 480
    state.on_dispatch("a", make_req("p", 0, 2, prompt_len=25))
    assert state.prefill_backlog(inst) == 505
    newer = make_inst("a", waiting=[make_req("q", 0, 1, prompt_len=7)])
    assert state.prefill_backlog(newer) == 7 + 25  # a new snapshot is read again
    # a snapshot that already shows the step in progress applied reports its prompts beside
    assert prefill_backlog(dataclasses.replace(newer, prefill_in_flight=400)) == 407


def test_prefill_queue_skips_an_instance_busy_prefilling_though_it_has_more_memory():
    # "a" has most memory free but a long prompt in its next step; "b" only decodes.
    a = make_inst("a", running=[make_req("a1", 30, prompt_len=480)])
    b = make_inst("b", running=[make_req(f"b{k}", 60, prompt_len=200, output_len=9) for k in range(3)])
    req = make_req("x", 0, 2, prompt_len=20)
    assert pick([a, b], req, PolicyConfig(), DispatchState()) == "a"
    assert pick([a, b], req, PolicyConfig(dispatch="prefill_queue"), DispatchState()) == "b"


def test_prefill_queue_counts_its_own_dispatches_until_the_poll_shows_them():
    cfg = PolicyConfig(dispatch="prefill_queue")
    state = DispatchState()
    cluster = [make_inst("a"), make_inst("b", running=[make_req("b1", 300, prompt_len=100, output_len=4)])]
    first = make_req("x1", 0, 2, prompt_len=64)
    assert pick(cluster, first, cfg, state) == "a"  # both have nothing to prefill: "a" is freer
    state.on_dispatch("a", first)
    assert pick(cluster, make_req("x2", 0, 2, prompt_len=64), cfg, state) == "b"


def test_snapshot_cache_is_refreshed_for_a_new_snapshot():
    cfg = PolicyConfig()
    state = DispatchState()
    a, b = make_inst("a"), make_inst("b", running=[make_req("b1", 10)])
    assert pick([a, b], make_req("x", 0, 1), cfg, state) == "a"
    a2 = make_inst("a", running=[make_req("a1", 700)])
    assert pick([a2, b], make_req("x", 0, 1), cfg, state) == "b"


def test_misbehaving_policy_is_an_error():
    name = "test-returns-terminating"
    if name not in DISPATCH:
        DISPATCH.register(name, lambda eligible, request, cfg, state: "ghost")
    with pytest.raises(ValueError, match="ineligible"):
        dispatch(make_cluster(2), make_req("x", 0, 1), PolicyConfig(dispatch=name), DispatchState())


def test_unknown_policy_name():
    with pytest.raises(UnknownPolicyError):
        PolicyConfig(dispatch="least-loaded-ish")
    with pytest.raises(UnknownPolicyError):
        DISPATCH.get("least-loaded-ish")


# --- properties ---------------------------------------------------------------------


@st.composite
def clusters(draw):
    n = draw(st.integers(0, 8))
    out = []
    for k in range(n):
        running = tuple(
            make_req(f"i{k}r{j}", draw(st.integers(0, 200)), priority=draw(st.integers(0, 1)),
                     prompt_len=draw(st.integers(1, 500)), output_len=draw(st.sampled_from([0, 0, 1, 40])))
            for j in range(draw(st.integers(0, 4)))
        )
        waiting = tuple(make_req(f"i{k}w{j}", 0, draw(st.integers(1, 300)), prompt_len=draw(st.integers(1, 500)),
                                 output_len=draw(st.sampled_from([0, 0, 7])))
                        for j in range(draw(st.integers(0, 3))))
        out.append(make_inst(f"i{k}", running=running, waiting=waiting, terminating=draw(st.booleans())))
    return out


@settings(max_examples=150, deadline=None)
@given(
    cluster=clusters(),
    policy=st.sampled_from(POLICIES),
    top_k=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    n_requests=st.integers(1, 6),
)
def test_property_never_terminating_and_none_only_without_candidates(cluster, policy, top_k, seed, n_requests):
    cfg = PolicyConfig(dispatch=policy, dispatch_top_k=top_k, headroom_blocks=((1, 200),))
    state = DispatchState(seed=seed)
    eligible = {inst.instance_id for inst in cluster if not inst.terminating}
    for k in range(n_requests):
        req = make_req(f"x{k}", 0, 10 * k + 1, priority=k % 2)
        d = dispatch(cluster, req, cfg, state)
        if not eligible:
            assert d is None
            continue
        assert d is not None and d.instance_id in eligible
        state.on_dispatch(d.instance_id, req)


def dispatch_checked(cluster, req, cfg, state) -> tuple[Dispatch | None, list[InstanceLoad]]:
    """The dispatch and the eligible instances; None exactly when none is eligible."""
    d = dispatch(cluster, req, cfg, state)
    eligible = [inst for inst in cluster if not inst.terminating]
    assert (d is None) == (not eligible)
    return d, eligible


@settings(max_examples=100, deadline=None)
@given(cluster=clusters(), seed=st.integers(0, 2**16))
def test_property_freeness_dispatch_is_an_argmax(cluster, seed):
    cfg = PolicyConfig()
    state = DispatchState(seed=seed)
    req = make_req("x", 0, 5)
    d, eligible = dispatch_checked(cluster, req, cfg, state)
    if d is None:
        return
    # The score is the freeness with the request virtually added (its demand and
    # its place in the batch), from the reference formula.
    scores = {inst.instance_id: freeness_with_request(inst, cfg, req) for inst in eligible}
    best = max(scores.values())
    assert scores[d.instance_id] == best
    assert d.instance_id == min(i for i, f in scores.items() if f == best)


@settings(max_examples=150, deadline=None)
@given(cluster=clusters(), n_pending=st.integers(0, 3), prompt=st.integers(1, 400))
def test_property_prefill_queue_picks_the_least_backlog_then_the_freest(cluster, n_pending, prompt):
    cfg = PolicyConfig(dispatch="prefill_queue")
    state = DispatchState()
    for k in range(n_pending):
        if cluster:
            state.on_dispatch(cluster[k % len(cluster)].instance_id, make_req(f"p{k}", 0, 3, prompt_len=17 * k + 1))
    req = make_req("x", 0, 5, prompt_len=prompt)
    d, eligible = dispatch_checked(cluster, req, cfg, state)
    if d is None:
        return
    backlog = {i.instance_id: prefill_backlog(i, state.pending(i.instance_id)) for i in eligible}
    least = min(backlog.values())
    assert backlog[d.instance_id] == least
    tied = [i for i in eligible if backlog[i.instance_id] == least]
    free = {i.instance_id: freeness_with_request(i, cfg, req, extra_pending=state.pending(i.instance_id)) for i in tied}
    best = max(free.values())
    assert free[d.instance_id] == pytest.approx(best)
    assert d.instance_id == min(i for i, f in free.items() if f == pytest.approx(best))


@settings(max_examples=150, deadline=None)
@given(cluster=clusters(), n_pending=st.integers(0, 4), need=st.integers(0, 400), prio=st.integers(0, 2))
def test_property_cached_dispatch_freeness_equals_the_reference(cluster, n_pending, need, prio):
    cfg = PolicyConfig(headroom_blocks=((1, 200), (2, 50)))
    state = DispatchState()
    for k in range(n_pending):
        for inst in cluster:
            state.on_dispatch(inst.instance_id, make_req(f"p{k}", 0, 7 * k + 1, priority=k % 3))
    req = make_req("x", 0, need, priority=prio)
    for inst in cluster:
        expected = freeness_with_request(inst, cfg, req, extra_pending=state.pending(inst.instance_id))
        got = state.dispatch_freeness(inst, cfg, request=req)
        assert got == pytest.approx(expected) or (got == expected == -math.inf)


def test_a_long_prompt_goes_where_it_fits_not_beside_one_huge_request():
    # "a" runs one 700-block request: (880 - 700) / 1 = 180 looks freest without the
    # request's own term, but a 300-block prompt does not fit there. "b" has room.
    a = make_inst("a", running=[make_req("a1", 700)])
    b = make_inst("b", running=[make_req(f"b{k}", 30) for k in range(10)])
    long_prompt = make_req("x", 0, 300)
    assert pick([a, b], long_prompt, PolicyConfig(), DispatchState()) == "b"
    cfg = PolicyConfig()
    assert freeness_with_request(a, cfg, long_prompt) < 0 < freeness_with_request(b, cfg, long_prompt)
    # A short request still goes to the instance that stays freest with it.
    assert pick([a, b], make_req("y", 0, 1), PolicyConfig(), DispatchState()) == "a"


def test_when_nothing_fits_the_smallest_deficit_wins_not_the_biggest_batch():
    # Both overloaded. "big" is 100 blocks short with 19 running (-100/20 = -5 if
    # divided); "small" is 10 short with one running (-10/2). The deficit decides.
    big = make_inst("big", running=[make_req(f"b{k}", 46) for k in range(19)], waiting=[make_req("bw", 0, 106)])
    small = make_inst("small", running=[make_req("s1", 800)], waiting=[make_req("sw", 0, 86)])
    req = make_req("x", 0, 4)
    assert freeness_with_request(big, PolicyConfig(), req) == 880 - 874 - 106 - 4
    assert freeness_with_request(small, PolicyConfig(), req) == 880 - 800 - 86 - 4
    assert pick([big, small], req, PolicyConfig(), DispatchState()) == "small"


def test_a_poll_that_does_not_show_a_request_keeps_it_pending():
    """A request dispatched just before a poll may reach its instance just after it."""
    cfg = PolicyConfig()
    cluster = make_cluster(2)
    state = DispatchState()
    state.on_dispatch("i0", make_req("x1", 0, 50))
    state.on_dispatch("i0", make_req("x2", 0, 50))
    state.on_poll("i0", seen={"x1"})  # x1 arrived, x2 not yet
    assert [r.request_id for r in state.pending("i0")] == ["x2"]
    assert pick(cluster, make_req("x3", 0, 50), cfg, state) == "i1"
    for _ in range(3):  # never seen (it finished before a poll, or was lost): dropped after 3 polls
        state.on_poll("i0", seen=set())
    assert state.pending("i0") == ()


def test_a_burst_between_polls_spreads_instead_of_herding_onto_an_idle_instance():
    # i0 is idle, i1 and i2 each show one running request. Nine requests arrive before
    # any poll. Dispatched requests count in the batch they will join, not only in the
    # usage: with the running batch alone, i0's (M - V) / 1 stays twice i1's
    # (M - V) / 2 for the whole burst and i0 would get all nine.
    cluster = [make_inst("i0"), make_inst("i1", running=[make_req("r1", 20)]),
               make_inst("i2", running=[make_req("r2", 20)])]
    state = DispatchState()
    counts = {inst.instance_id: len(inst.running) for inst in cluster}  # requests on each afterwards
    for k in range(9):
        req = make_req(f"x{k}", 0, 20)
        chosen = pick(cluster, req, PolicyConfig(), state)
        state.on_dispatch(chosen, req)
        counts[chosen] += 1
    assert max(counts.values()) - min(counts.values()) <= 1, counts


def test_queued_requests_count_in_the_dispatch_batch():
    # Same blocks in use and queued; "q" has four waiting requests, "r" runs its five.
    # Llumnix's dispatch load divides by running + waiting, so the two are equal,
    # and a pending (dispatched, not yet polled) request counts the same way.
    q = make_inst("q", running=[make_req("q0", 100)], waiting=[make_req(f"qw{k}", 0, 25) for k in range(4)])
    r = make_inst("r", running=[make_req("r0", 100)] + [make_req(f"r{k}", 25) for k in range(1, 5)])
    req = make_req("x", 0, 10)
    cfg = PolicyConfig()
    assert freeness_with_request(q, cfg, req) == freeness_with_request(r, cfg, req) == (880 - 200 - 10) / 6
    state = DispatchState()
    state.on_dispatch("q", make_req("p", 0, 30))
    assert state.dispatch_freeness(q, cfg, request=req) == (880 - 230 - 10) / 7
    assert pick([q, r], req, cfg, state) == "r"
