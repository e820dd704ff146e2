"""A migrated request's fairness state: its client's lead travels on the migration state,
the destination lifts the client's counter on commit as VTC does for an arrival, and
service is charged where it is given, so a client's service summed over instances equals
that of a run without migration (nothing lost, nothing counted twice)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llumnix_py.engines.sequence import cdiv
from llumnix_py.engines.types import MigrationRequestState, Request, SamplingParams, SeqStatus
from llumnix_py.errors import InvalidRequestError, MigrationError
from policies.fairness import lead, lift, lift_migrated
from tests.factories import make_engine

CLIENTS = ["a", "b", "c", "d"]
counters_st = st.dictionaries(st.sampled_from(CLIENTS), st.floats(0, 1e6, allow_nan=False), max_size=4)
active_st = st.sets(st.sampled_from(CLIENTS), max_size=4)
lead_st = st.floats(0, 1e6, allow_nan=False)


# ----- the pure rules ---------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(counters=counters_st, client=st.sampled_from(CLIENTS), active=active_st)
def test_lead_is_the_clients_excess_over_the_least_served_active_client(counters, client, active):
    got = lead(counters, client, active)
    values = [counters.get(a, 0.0) for a in active | {client}]
    assert got >= 0
    assert got == pytest.approx(counters.get(client, 0.0) - min(values))
    if counters.get(client, 0.0) == min(values):
        assert got == 0.0


@settings(max_examples=300, deadline=None)
@given(counters=counters_st, client=st.sampled_from(CLIENTS), active=active_st, lead_=lead_st, more=lead_st)
def test_a_migrated_in_client_keeps_its_lead_and_is_never_favoured(counters, client, active, lead_, more):
    out = lift_migrated(counters, client, active, lead_)
    assert lift_migrated(counters, client, active, 0.0) == lift(counters, client, active)  # lead 0: VTC's lift
    others = {k: v for k, v in counters.items() if k != client}
    assert {k: v for k, v in out.items() if k != client} == others  # nobody else moves
    assert out[client] >= counters.get(client, 0.0)  # a counter never falls
    if client in active and client in counters:
        assert out == dict(counters)  # an active client's counter already measures its service here
    else:
        floor = min((counters.get(a, 0.0) for a in active if a != client), default=0.0)
        assert out[client] == max(counters.get(client, 0.0), floor + lead_)
        assert out[client] >= floor  # not ahead of the least-served active client: never favoured
    assert lift_migrated(counters, client, active, lead_ + more)[client] >= out[client]  # monotone in the lead
    with pytest.raises(ValueError):
        lift_migrated(counters, client, active, -1.0)


# ----- on the engine core ---------------------------------------------------------------------
BS = 4
SP = SamplingParams(max_tokens=14, ignore_eos=True)


def fair_engine(**kw):
    kw.setdefault("fairness", True)
    return make_engine(dtype="float64", num_blocks=96, block_size=BS, watermark=0.0, **kw)


def requests() -> list[Request]:
    heavy = [Request(f"h{i}", tuple(range(1 + i, 15 + i)), SP, arrival_time=float(i), client_id="heavy")
             for i in range(3)]
    return heavy + [Request("l0", tuple(range(60, 70)), SP, arrival_time=3.0, client_id="light")]


def steps(engine, n: int, tokens: dict) -> None:
    for _ in range(n):
        for o in engine.step().outputs:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
        engine.check_invariants()


def finish(engine, tokens: dict) -> None:
    while engine.has_unfinished():
        steps(engine, 1, tokens)


def migrate(src, dst, rid: str) -> MigrationRequestState:
    """One stop-and-copy migration of a running request, over the wire format."""
    state = src.freeze(rid)
    assert state is not None and state.status == SeqStatus.RUNNING
    state = MigrationRequestState.from_wire(state.to_wire())
    ids = dst.pre_alloc(rid, cdiv(state.num_computed_tokens, BS))
    assert ids is not None
    dst.write_blocks(ids, src.read_blocks(src.incremental_blocks(rid, 0, include_last=True)))
    dst.commit_dst(state)
    src.free_src(rid)
    return state


def other_client_busy(dst, tokens: dict) -> None:
    dst.add_request(Request("o0", tuple(range(100, 112)), SP, client_id="other"))
    steps(dst, 3, tokens)


def test_lead_travels_and_the_destination_lifts_with_it_and_service_sums_exactly():
    ref = fair_engine()
    ref_tokens: dict = {}
    for r in requests():
        ref.add_request(r)
    ref.add_request(Request("o0", tuple(range(100, 112)), SP, client_id="other"))
    finish(ref, ref_tokens)

    src, dst, tokens = fair_engine(), fair_engine(), {}
    for r in requests():
        src.add_request(r)
    steps(src, 4, tokens)
    other_client_busy(dst, tokens)
    counters = dict(src.fair.counters)
    assert counters["heavy"] > counters["light"]  # three heavy requests against one light one
    state = migrate(src, dst, "h0")
    assert state.fair_lead == pytest.approx(counters["heavy"] - counters["light"])
    # heavy was idle on the destination: lifted to the least-served active client plus its lead,
    # not left at 0 (which would put it ahead of the destination's own clients)
    assert dst.fair.counters["heavy"] == pytest.approx(dst.fair.counters["other"] + state.fair_lead)
    assert dst.fair.served.get("heavy", 0.0) == 0.0  # a lift is no service
    finish(src, tokens)
    finish(dst, tokens)
    assert tokens == ref_tokens  # exact tokens, migrated or not
    # every token charged once, where it was computed: the sums equal the unmigrated run's books
    for client in ("heavy", "light", "other"):
        total = src.fair.served.get(client, 0.0) + dst.fair.served.get(client, 0.0)
        assert total == ref.fair.served[client], client
    assert ref.fair.served["heavy"] == sum(14 + 2 * 14 for _ in range(3))  # prompt 14, 14 outputs of weight 2
    assert src.fair.served["heavy"] > 0 and dst.fair.served["heavy"] > 0


def test_a_dropped_parked_copy_leaves_the_destination_counters_as_before():
    src, dst, tokens = fair_engine(), fair_engine(), {}
    for r in requests():
        src.add_request(r)
    steps(src, 4, tokens)
    other_client_busy(dst, tokens)
    before = (dict(dst.fair.counters), dict(dst.fair.served))
    state = src.freeze("h0")
    assert state is not None and state.fair_lead > 0
    ids = dst.pre_alloc("h0", cdiv(state.num_computed_tokens, BS))
    dst.write_blocks(ids, src.read_blocks(src.incremental_blocks("h0", 0, include_last=True)))
    dst.commit_dst(state)
    assert dst.freeze("h0") is not None  # parked, as a destination does until the source activates it
    assert dst.fair.counters["heavy"] > 0
    dst.free_src("h0")  # the abort that drops the parked copy
    src.unfreeze("h0")
    assert (dict(dst.fair.counters), dict(dst.fair.served)) == ({**before[0], "heavy": 0.0}, before[1])
    dst.check_invariants()
    # an activated copy keeps its lift, and a later step does not undo it
    state = src.freeze("h0")
    ids = dst.pre_alloc("h0", cdiv(state.num_computed_tokens, BS))
    dst.write_blocks(ids, src.read_blocks(src.incremental_blocks("h0", 0, include_last=True)))
    dst.commit_dst(state)
    dst.freeze("h0")
    dst.unfreeze("h0")
    src.free_src("h0")
    lifted = dst.fair.counters["heavy"]
    assert lifted >= dst.fair.counters["other"]
    steps(dst, 1, tokens)
    assert dst.fair.counters["heavy"] == lifted + 2.0  # one more token of weight 2, nothing taken back


def test_a_source_that_does_not_share_fairly_sends_no_lead_and_the_destination_lifts_plainly():
    src, dst, tokens = fair_engine(fairness=False), fair_engine(), {}
    for r in requests():
        src.add_request(r)
    steps(src, 4, tokens)
    other_client_busy(dst, tokens)
    state = migrate(src, dst, "h0")
    assert state.fair_lead is None and "fair_lead" not in state.to_wire()
    assert dst.fair.counters["heavy"] == dst.fair.counters["other"]  # VTC's lift: the floor
    # and a fair source to an unfair destination: the key travels, nothing reads it
    src2, dst2 = fair_engine(), fair_engine(fairness=False)
    for r in requests():
        src2.add_request(r)
    steps(src2, 4, tokens)
    assert migrate(src2, dst2, "h1").fair_lead > 0
    dst2.check_invariants()


@pytest.mark.parametrize("bad", [-1.0, "3", True, None, math.inf, math.nan, 1e16, [1.0]])
def test_a_bad_lead_on_the_wire_is_rejected(bad):
    src = fair_engine()
    src.add_request(requests()[0])
    steps(src, 2, {})
    wire = src.freeze("h0").to_wire()
    assert isinstance(wire["fair_lead"], float)
    assert MigrationRequestState.from_wire(dict(wire)).fair_lead == wire["fair_lead"]
    assert MigrationRequestState.from_wire({**wire, "fair_lead": 7}).fair_lead == 7.0
    with pytest.raises(InvalidRequestError, match="fair_lead"):
        MigrationRequestState.from_wire({**wire, "fair_lead": bad})
    if not isinstance(bad, (str, list)) and bad is not None:  # the engine refuses it too, changing nothing
        dst = fair_engine()
        state = dataclasses.replace(MigrationRequestState.from_wire(wire), fair_lead=float(bad))
        dst.pre_alloc("h0", cdiv(state.num_computed_tokens, BS))
        if not 0 <= float(bad) <= 1e15:
            with pytest.raises(MigrationError, match="fair_lead"):
                dst.commit_dst(state)
            assert "h0" not in dst.seqs and dst.fair.counters == {}
            dst.free_pre_alloc("h0")
            dst.check_invariants()
    without = dict(wire)
    del without["fair_lead"]
    assert MigrationRequestState.from_wire(without) == dataclasses.replace(
        MigrationRequestState.from_wire(wire), fair_lead=None)
