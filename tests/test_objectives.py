"""Per-request objectives: validation, margins, and that they travel with a request everywhere
(the engine's sequence, the migration state and its wire format)."""

from __future__ import annotations

import dataclasses
import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llumnix_py.engines.sequence import Sequence
from llumnix_py.engines.types import MigrationRequestState, Objective, Request, SamplingParams, SeqStatus
from llumnix_py.errors import InvalidRequestError
from tests.factories import make_engine


def test_kinds_and_targets():
    assert Objective(ttft_ms=200, tbt_ms=50).kind == "stream"
    assert Objective(deadline_ms=3000).kind == "deadline"
    job = Objective(job_id="j1", job_deadline_ms=9000, job_calls_left=3)
    assert job.kind == "job" and job.target_ms == 3000
    assert Objective(job_id="j1", job_deadline_ms=9000).target_ms == 4500  # unknown calls left count as two
    assert Objective(ttft_ms=1, tbt_ms=1).target_ms == math.inf


@pytest.mark.parametrize("kw", [
    {}, {"ttft_ms": 100}, {"tbt_ms": 10}, {"ttft_ms": 100, "tbt_ms": 10, "deadline_ms": 5},
    {"deadline_ms": 0}, {"deadline_ms": -1}, {"deadline_ms": math.nan}, {"deadline_ms": math.inf},
    {"deadline_ms": "5"}, {"deadline_ms": True}, {"deadline_ms": 1e12},
    {"job_id": "j"}, {"job_deadline_ms": 5}, {"job_id": "", "job_deadline_ms": 5},
    {"job_id": "x" * 200, "job_deadline_ms": 5}, {"job_id": 3, "job_deadline_ms": 5},
    {"job_id": "j", "job_deadline_ms": 5, "job_calls_left": 0},
    {"job_id": "j", "job_deadline_ms": 5, "job_calls_left": 1.5},
    {"job_id": "j", "job_deadline_ms": 5, "deadline_ms": 5},
])
def test_invalid_objectives_are_refused(kw):
    with pytest.raises(InvalidRequestError):
        Objective(**kw)


def test_margin_of_a_stream_is_its_tightest_token():
    o = Objective(ttft_ms=100, tbt_ms=50)  # tokens due at 0.10, 0.15, 0.20 s after arrival
    assert o.margin_s(10.0, [10.05, 10.10, 10.15]) == pytest.approx(0.05)
    assert o.margin_s(10.0, [10.05, 10.10, 10.30]) == pytest.approx(-0.10)  # the last one was late
    assert o.margin_s(10.0, [10.0, 10.0, 10.0]) == pytest.approx(0.10)


def test_margin_of_a_deadline_is_its_last_token():
    o = Objective(deadline_ms=1000)
    assert o.margin_s(0.0, [0.9, 0.95, 1.2]) == pytest.approx(-0.2)
    assert o.margin_s(0.0, [5.0, 0.95]) == pytest.approx(0.05)  # only the end counts
    with pytest.raises(ValueError):
        o.margin_s(0.0, [])


@settings(max_examples=60, deadline=None)
@given(ttft=st.floats(1, 1e4), tbt=st.floats(1, 1e3), gaps=st.lists(st.floats(0, 2.0), min_size=1, max_size=30))
def test_stream_margin_is_nonnegative_iff_every_token_is_in_time(ttft, tbt, gaps):
    o = Objective(ttft_ms=ttft, tbt_ms=tbt)
    times, t = [], 0.0
    for g in gaps:
        t += g
        times.append(t)
    in_time = all(times[k] <= o.due_s(k, len(times)) for k in range(len(times)))
    assert (o.margin_s(0.0, times) >= 0) == in_time


def _state(objective):
    return MigrationRequestState("r", (1, 2, 3), (4,), SamplingParams(max_tokens=8), 0, 1.5, 0,
                                 SeqStatus.RUNNING, 3, "tcp://127.0.0.1:1", objective)


@pytest.mark.parametrize("objective", [None, Objective(ttft_ms=100, tbt_ms=20), Objective(deadline_ms=7),
                                       Objective(job_id="j", job_deadline_ms=50, job_calls_left=2),
                                       Objective(job_id="j", job_deadline_ms=50)])
def test_migration_state_carries_the_objective_over_msgpack(objective):
    s = _state(objective)
    wire = msgpack.unpackb(msgpack.packb(s.to_wire()), raw=False)
    assert ("objective" in wire) == (objective is not None)  # an optional key: old peers see no change
    assert MigrationRequestState.from_wire(wire) == s


@pytest.mark.parametrize("bad", [5, "x", {}, {"deadline_ms": -1}, {"deadline_ms": 5, "evil": 1},
                                 {"ttft_ms": 5}, {"job_id": "j"}, [1, 2]])
def test_a_bad_objective_on_the_wire_is_refused(bad):
    wire = _state(None).to_wire()
    wire["objective"] = bad
    with pytest.raises(InvalidRequestError):
        MigrationRequestState.from_wire(wire)


def test_sequence_keeps_the_objective_through_a_migration_state():
    o = Objective(deadline_ms=123)
    seq = Sequence.from_request(Request("r", (1, 2), objective=o))
    assert seq.objective == o
    state = seq.to_migration_state(SeqStatus.WAITING)
    assert state.objective == o and Sequence.from_migration(state).objective == o


def test_request_refuses_a_non_objective():
    with pytest.raises(InvalidRequestError):
        Request("r", (1,), objective={"deadline_ms": 5})  # type: ignore[arg-type]


def test_engine_commit_keeps_the_objective():
    src, dst = make_engine(), make_engine()
    o = Objective(ttft_ms=50, tbt_ms=5)
    src.add_request(Request("r", (1, 2, 3), SamplingParams(max_tokens=4, ignore_eos=True), objective=o))
    src.step()
    state = src.freeze("r")
    assert state is not None and state.objective == o
    waiting = dataclasses.replace(state, status=SeqStatus.WAITING, num_computed_tokens=0)  # by recomputation
    dst.commit_dst(MigrationRequestState.from_wire(waiting.to_wire()))
    assert dst.seqs["r"].objective == o
