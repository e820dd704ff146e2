"""Fairness: the VTC policy as pure functions (properties), and an engine that honours it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llumnix_py.engines.core import EngineConfig
from llumnix_py.engines.types import Request, SamplingParams
from policies.fairness import (
    FairItem,
    VtcWeights,
    charge,
    fair_order,
    fair_victim,
    lift,
    max_service_gap,
    switch_victim,
)
from tests.factories import make_engine, run_to_completion

CLIENTS = ["a", "b", "c", "d"]
counters_st = st.dictionaries(st.sampled_from(CLIENTS), st.floats(0, 1e6, allow_nan=False), max_size=4)
tokens_st = st.dictionaries(st.sampled_from(CLIENTS), st.integers(0, 1000), max_size=4)


@st.composite
def items(draw, min_size=0):
    n = draw(st.integers(min_size, 8))
    return [FairItem(f"r{i}", draw(st.sampled_from(CLIENTS)), draw(st.integers(0, 2)),
                     draw(st.floats(0, 100, allow_nan=False))) for i in range(n)]


@settings(max_examples=200, deadline=None)
@given(counters=counters_st, p=tokens_st, o=tokens_st)
def test_charge_adds_exactly_the_weighted_service(counters, p, o):
    w = VtcWeights(1.0, 2.0)
    out = charge(counters, p, o, w)
    for c in set(counters) | set(p) | set(o):
        assert out[c] == pytest.approx(counters.get(c, 0.0) + p.get(c, 0) + 2 * o.get(c, 0))
        assert out[c] >= counters.get(c, 0.0)


@settings(max_examples=200, deadline=None)
@given(counters=counters_st, client=st.sampled_from(CLIENTS), active=st.sets(st.sampled_from(CLIENTS)))
def test_lift_gives_an_idle_client_no_credit_and_takes_nothing(counters, client, active):
    out = lift(counters, client, active)
    others = [a for a in active if a != client]
    for c in counters:
        if c != client:
            assert out[c] == counters[c]  # nobody else moves
    assert out[client] >= counters.get(client, 0.0) or client not in counters and out[client] >= 0
    if client not in active and others:
        assert out[client] >= min(counters.get(a, 0.0) for a in others)
    if client in active:
        assert out[client] == counters.get(client, out[client])


@settings(max_examples=200, deadline=None)
@given(xs=items(), counters=counters_st)
def test_fair_order_serves_higher_priority_then_the_least_served_client(xs, counters):
    order = fair_order(xs, counters)
    assert sorted(order) == sorted(i.request_id for i in xs)
    pos = {r: k for k, r in enumerate(order)}
    for x in xs:
        for y in xs:
            if x.priority > y.priority:
                assert pos[x.request_id] < pos[y.request_id]
            elif x.priority == y.priority and counters.get(x.client_id, 0.0) < counters.get(y.client_id, 0.0):
                assert pos[x.request_id] < pos[y.request_id]


@settings(max_examples=200, deadline=None)
@given(xs=items(min_size=1), counters=counters_st)
def test_fair_victim_is_lowest_priority_most_served(xs, counters):
    v = next(i for i in xs if i.request_id == fair_victim(xs, counters))
    assert v.priority == min(i.priority for i in xs)
    same = [i for i in xs if i.priority == v.priority]
    assert counters.get(v.client_id, 0.0) == max(counters.get(i.client_id, 0.0) for i in same)


@settings(max_examples=200, deadline=None)
@given(xs=items(min_size=1), counters=counters_st, head_client=st.sampled_from(CLIENTS),
       head_priority=st.integers(0, 2), margin=st.floats(0, 1e5, allow_nan=False))
def test_a_request_yields_only_to_a_less_served_client_beyond_the_margin(xs, counters, head_client,
                                                                          head_priority, margin):
    head = FairItem("head", head_client, head_priority)
    rid = switch_victim(head, xs, counters, margin)
    if rid is None:
        return
    v = next(i for i in xs if i.request_id == rid)
    assert rid == fair_victim(xs, counters)
    assert v.client_id != head_client and v.priority <= head_priority
    assert counters.get(v.client_id, 0.0) - counters.get(head_client, 0.0) > margin


def test_max_service_gap():
    assert max_service_gap({"a": 5.0, "b": 1.0}, ["a", "b", "c"]) == 5.0
    assert max_service_gap({}, []) == 0.0


# ----- the engine honours it --------------------------------------------------------------------
def flood(n_heavy: int, n_light: int, max_tokens: int = 12) -> list[Request]:
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    heavy = [Request(f"h{i}", tuple(range(1 + i, 13 + i)), sp, arrival_time=float(i), client_id="heavy")
             for i in range(n_heavy)]
    light = [Request(f"l{i}", tuple(range(40 + i, 52 + i)), sp, arrival_time=float(n_heavy + i), client_id="light")
             for i in range(n_light)]
    return heavy + light


def first_token_step(engine, requests) -> dict[str, int]:
    for r in requests:
        engine.add_request(r)
    first: dict[str, int] = {}
    step = 0
    while engine.has_unfinished():
        step += 1
        for o in engine.step().outputs:
            first.setdefault(o.request_id, step)
        engine.check_invariants()
    return first


def test_a_light_client_is_served_before_a_heavy_clients_backlog():
    requests = flood(12, 2)
    fifo = first_token_step(make_engine("sim", num_blocks=24, block_size=4, max_batch_size=2), requests)
    fair = first_token_step(make_engine("sim", num_blocks=24, block_size=4, max_batch_size=2, fairness=True),
                            requests)
    assert max(fair[f"l{i}"] for i in range(2)) < max(fifo[f"l{i}"] for i in range(2))
    # under FCFS the light client waits behind the whole backlog; fairly it overtakes it
    assert all(fair[f"l{i}"] < fair["h11"] for i in range(2))


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_a_heavy_client_yields_a_running_request_and_tokens_stay_exact(mode):
    """The heavy client fills the batch; the light client arrives; a heavy request is switched
    out (swap or recompute) and the light one runs. Every request's tokens are exact."""
    requests = flood(4, 2, max_tokens=24)
    e = make_engine(dtype="float64", num_blocks=28, block_size=4, watermark=0.0, max_batch_size=4,
                    fairness=True, fairness_margin=8.0, num_host_blocks=64, preemption_mode=mode)
    for r in requests[:4]:
        e.add_request(r)
    for _ in range(6):
        e.step()
    res_tokens: dict[str, list[int]] = {}
    first = {}
    for r in requests[4:]:
        e.add_request(r)
    step = 0
    while e.has_unfinished():
        step += 1
        for o in e.step().outputs:
            res_tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            first.setdefault(o.request_id, step)
        e.check_invariants()
    assert e.fair.switches > 0, "no running request yielded"
    if mode == "swap":
        assert e.swapper.meter.copies > 0
    ref = run_to_completion(make_engine(dtype="float64", num_blocks=256, block_size=4), requests=requests)
    for rid, toks in res_tokens.items():
        assert ref[rid][-len(toks):] == toks
    assert set(ref) == {r.request_id for r in requests}


def test_config_validates_the_margin():
    with pytest.raises(ValueError):
        EngineConfig(fairness_margin=-1.0)


# ----- across instances: the most-served client's request migrates out ---------------------------
def test_most_served_client_migrates_out():
    from llumnix_py.load import InstanceLoad, RequestLoad
    from policies.selection import select_migrate_out

    def req(rid, client, blocks, migrating=False):
        return RequestLoad(request_id=rid, num_blocks=blocks, blocks_needed=blocks, client_id=client,
                           migrating=migrating)

    running = (req("a1", "a", 2), req("b1", "b", 9), req("b2", "b", 5), req("c1", "c", 1))
    inst = InstanceLoad(instance_id="i", total_blocks=100, used_blocks=17, running=running,
                        client_service=(("a", 10.0), ("b", 50.0), ("c", 5.0)))
    assert select_migrate_out(inst, "most_served").request_id == "b2"  # b is most served; b2 moves fastest
    inst = InstanceLoad(instance_id="i", total_blocks=100, used_blocks=17,
                        running=running[:2] + (req("b2", "b", 5, migrating=True),) + running[3:],
                        client_service=(("a", 10.0), ("b", 50.0)))
    assert select_migrate_out(inst, "most_served").request_id == "b1"
    # no counters: every client at 0, so the fewest blocks, as ``shortest``
    plain = InstanceLoad(instance_id="i", total_blocks=100, used_blocks=17, running=running)
    assert select_migrate_out(plain, "most_served").request_id == "c1"
    gone = InstanceLoad(instance_id="i", total_blocks=100, used_blocks=2, running=(req("x", "a", 2, True),))
    assert select_migrate_out(gone, "most_served") is None


def test_a_fair_engine_reports_its_counters_and_clients():
    e = make_engine("sim", num_blocks=24, block_size=4, fairness=True)
    e.add_request(Request("x", tuple(range(1, 9)), SamplingParams(max_tokens=4, ignore_eos=True), client_id="a"))
    e.step()
    load = e.load()
    assert load.running[0].client_id == "a"
    assert load.client_service == (("a", 8.0 + 2.0),)  # 8 prompt tokens, 1 generated (weight 2)
    assert make_engine("sim").load().client_service == ()



def test_an_over_budget_prompt_first_in_fair_order_gets_a_step_of_its_own():
    """A prompt longer than ``max_batched_tokens`` that the fairness order puts first, though it
    is not the oldest request, runs alone in a step (as the oldest would), and the queue behind
    it moves on. The engine used to plan empty steps forever: the over-budget rule looked at the
    arrival order's head, the admissions stopped at the fairness order's."""
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    e = make_engine("sim", num_blocks=64, block_size=4, max_batch_size=4, fairness=True, max_batched_tokens=32)
    e.add_request(Request("l0", tuple(range(1, 5)), sp, arrival_time=0.0, client_id="light"))
    e.add_request(Request("h0", tuple(range(10, 34)), sp, arrival_time=0.0, client_id="heavy"))
    e.step()  # both prefilled: the heavy client has been served 24 prompt tokens, the light one 4
    e.add_request(Request("h1", tuple(range(40, 50)), sp, arrival_time=1.0, client_id="heavy"))
    e.add_request(Request("l1", tuple(range(60, 100)), sp, arrival_time=2.0, client_id="light"))  # 40 > 32
    assert [s.request_id for s in e.scheduler.fair.order(e.scheduler.waiting)] == ["l1", "h1"]
    done: set[str] = set()
    for _ in range(60):
        if not e.has_unfinished():
            break
        out = e.step()
        e.check_invariants()
        done |= {o.request_id for o in out.outputs if o.finish_reason is not None}
    assert done == {"l0", "h0", "h1", "l1"}, f"stuck with {sorted(done)} finished"
