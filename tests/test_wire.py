"""Migration wire messages: round trips, strict validation, fuzzing."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from llumnix_py.engines.types import MigrationRequestState, SamplingParams, SeqStatus
from llumnix_py.errors import ProtocolError
from migration import wire


def make_state(**kw) -> MigrationRequestState:
    d = dict(request_id="req-1", prompt_token_ids=(1, 2, 3), output_token_ids=(4, 5),
             sampling=SamplingParams(max_tokens=8, temperature=0.5, seed=7), priority=0, arrival_time=1.5,
             num_preemptions=0, status=SeqStatus.RUNNING, num_computed_tokens=4)
    d.update(kw)
    return MigrationRequestState(**d)


def roundtrip(header: dict) -> dict:
    return msgpack.unpackb(msgpack.packb(header, use_bin_type=True), raw=False)


def blocks_header(**kw) -> dict:
    h = wire.Blocks("m1", (3, 4), "float32", (2, 8)).to_header()
    h.update(kw)
    return h


MESSAGES = [
    (wire.PreAlloc("m1", "req-1", 12), None),
    (wire.PreAlloc("m1", "req-1", 0), None),
    (wire.Blocks("m1", (3, 4, 9), "bfloat16", (3, 2, 16)), 3 * 2 * 16 * 2),
    (wire.Commit("m1", make_state()), None),
    (wire.Abort("m1", "source finished the request"), None),
    (wire.Hold("m1", 0.05), None),
    (wire.Hold("m1", wire.MAX_HOLD_S), None),
    (wire.Hold("m1", 0.05, 0.012), None),
    (wire.Hold("m1", 0.05, 0.012, 0.2), None),
    (wire.Hold("m1", 0.05, 0.0, 0.2), None),
    (wire.Ping(), None),
]


@pytest.mark.parametrize("msg,nbytes", MESSAGES)
def test_request_round_trip(msg, nbytes):
    assert wire.decode_request(roundtrip(msg.to_header()), nbytes) == msg


@pytest.mark.parametrize("reply", [wire.Reply(True), wire.Reply(False, "no free blocks"),
                                   wire.Reply(True, None, (5, 6, 7))])
def test_reply_round_trip(reply):
    assert wire.decode_reply(roundtrip(reply.to_header())) == reply


def test_already_committed_is_a_typed_reply_code():
    reply = wire.Reply.already_committed()
    assert not reply.ok and reply.code is wire.ReplyCode.ALREADY_COMMITTED and reply.is_already_committed
    assert wire.decode_reply(roundtrip(reply.to_header())) == reply
    assert not wire.Reply(False, reply.error).is_already_committed  # the text alone means nothing
    assert "code" not in wire.Reply(False, "refused").to_header()  # the field travels only when set
    with pytest.raises(ValueError, match="no refusal code"):
        wire.Reply(True, code=wire.ReplyCode.ALREADY_COMMITTED)


@pytest.mark.parametrize("code,match", [
    ("already committed", "not one of"), (1, "not one of"), (None, "not one of"), ("x" * 5000, "not one of")])
def test_reply_code_rejected(code, match):
    with pytest.raises(ProtocolError, match=match):
        wire.decode_reply({"ok": False, "error": "e", "block_ids": [], "code": code})


def test_successful_reply_with_a_code_rejected():
    with pytest.raises(ProtocolError, match="no refusal code"):
        wire.decode_reply({"ok": True, "error": None, "block_ids": [], "code": "already_committed"})


@pytest.mark.parametrize("header,nbytes,match", [
    ({"type": "pre_alloc", "migration_id": "m", "request_id": "r"}, None, "missing"),
    ({"type": "pre_alloc", "migration_id": "m", "request_id": "r", "num_blocks": 1, "x": 1}, None, "unexpected"),
    ({"type": "pre_alloc", "migration_id": "m", "request_id": "r", "num_blocks": True}, None, "integer"),
    ({"type": "pre_alloc", "migration_id": "m", "request_id": "r", "num_blocks": -1}, None, "num_blocks"),
    ({"type": "pre_alloc", "migration_id": "m", "request_id": "r", "num_blocks": 65537}, None, "num_blocks"),
    ({"type": "pre_alloc", "migration_id": "m" * 257, "request_id": "r", "num_blocks": 1}, None, "longer"),
    ({"type": "pre_alloc", "migration_id": "", "request_id": "r", "num_blocks": 1}, None, "empty"),
    ({"type": "pre_alloc", "migration_id": "m", "request_id": "r", "num_blocks": 1}, 8, "payload"),
    ({"type": "ping"}, 0, "payload"),
    ({"type": "hold", "migration_id": "m", "hold_s": 0}, None, "hold_s"),
    ({"type": "hold", "migration_id": "m", "hold_s": -0.01}, None, "hold_s"),
    ({"type": "hold", "migration_id": "m", "hold_s": 1.5}, None, "hold_s"),
    ({"type": "hold", "migration_id": "m", "hold_s": float("nan")}, None, "hold_s"),
    ({"type": "hold", "migration_id": "m", "hold_s": float("inf")}, None, "hold_s"),
    ({"type": "hold", "migration_id": "m", "hold_s": True}, None, "number"),
    ({"type": "hold", "migration_id": "m", "hold_s": "0.05"}, None, "number"),
    ({"type": "hold", "migration_id": "m"}, None, "missing"),
    ({"type": "hold", "migration_id": "", "hold_s": 0.05}, None, "empty"),
    ({"type": "hold", "migration_id": "m", "hold_s": 0.05}, 8, "payload"),
    ({"type": "hold", "migration_id": "m", "hold_s": 0.05, "freeze_in_s": -0.01}, None, "freeze_in_s"),
    ({"type": "hold", "migration_id": "m", "hold_s": 0.05, "freeze_in_s": 1.5}, None, "freeze_in_s"),
    ({"type": "hold", "migration_id": "m", "hold_s": 0.05, "freeze_in_s": float("nan")}, None, "freeze_in_s"),
    ({"type": "hold", "migration_id": "m", "hold_s": 0.05, "freeze_in_s": False}, None, "number"),
    ({"type": "hold", "migration_id": "m", "hold_s": 0.05, "freeze_in_s": "0"}, None, "number"),
    ({"type": "hold", "migration_id": "m", "hold_s": 0.05, "source_step_s": -1.0}, None, "source_step_s"),
    ({"type": "hold", "migration_id": "m", "hold_s": 0.05, "source_step_s": float("inf")}, None, "source_step_s"),
    ({"type": "hold", "migration_id": "m", "hold_s": 0.05, "source_step_s": True}, None, "number"),
    ({"type": "ping", "seq": 1}, None, "unexpected"),
    ({"type": "pong"}, None, "unknown message type"),
    ({}, None, "unknown message type"),
    ([1, 2], None, "mapping"),
    (blocks_header(), None, "payload missing"),
    (blocks_header(), 63, "payload has 63 bytes"),
    (blocks_header(dtype="int64"), 64, "dtype"),
    (blocks_header(dtype=None), 64, "dtype"),
    (blocks_header(shape=[3, 8]), 96, "shape"),
    (blocks_header(shape=[]), 0, "shape"),
    (blocks_header(shape=[2, -8]), 64, "shape entry"),
    (blocks_header(shape=[2, 1 << 40]), 64, "MAX_PAYLOAD_BYTES"),
    (blocks_header(shape=[2] + [1] * 8), 8, "more than"),
    (blocks_header(dst_block_ids=[], shape=[0, 8]), 0, "empty"),
    (blocks_header(dst_block_ids=[1, False]), 64, "integer"),
    (blocks_header(dst_block_ids=list(range(65537)), shape=[65537]), 65537 * 4, "more than"),
    (blocks_header(dst_block_ids="ab"), 64, "list"),
    ({"type": "commit", "migration_id": "m", "state": {"request_id": "r"}}, None, "invalid request state"),
    ({"type": "commit", "migration_id": "m", "state": make_state(prompt_token_ids=()).to_wire()}, None, "state"),
    ({"type": "commit", "migration_id": "m",
      "state": {**make_state().to_wire(), "sampling": {"max_tokens": 1, 3: 4}}}, None, "state"),
    ({"type": "commit", "migration_id": "m",
      "state": {**make_state().to_wire(), "sampling": {"stop_token_ids": 5}}}, None, "state"),
    ({"type": "abort", "migration_id": "m", "reason": 5}, None, "string"),
    ({"type": "abort", "migration_id": "m", "reason": "x" * 5000}, None, "longer"),
])
def test_request_rejected(header, nbytes, match):
    with pytest.raises(ProtocolError, match=match):
        wire.decode_request(header, nbytes)


@pytest.mark.parametrize("header", [
    {"ok": 1, "error": None, "block_ids": []},
    {"ok": True, "error": None},
    {"ok": True, "error": None, "block_ids": [], "more": 1},
    {"ok": False, "error": 3, "block_ids": []},
    {"ok": True, "error": None, "block_ids": [True]},
    {"ok": True, "error": None, "block_ids": [-1]},
    {"ok": True, "error": None, "block_ids": list(range(65537))},
    "ok",
])
def test_reply_rejected(header):
    with pytest.raises(ProtocolError):
        wire.decode_reply(header)


_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_leaf = st.one_of(st.none(), st.booleans(), _ints, st.floats(allow_nan=True), st.text(max_size=20),
                  st.binary(max_size=20), st.sampled_from(list(wire.DTYPE_ITEMSIZE) + ["pre_alloc", "blocks", "commit",
                                                                               "abort", "ping", "m", "r"]))
_garbage = st.recursive(_leaf, lambda c: st.one_of(st.lists(c, max_size=5),
                                                   st.dictionaries(st.text(max_size=12), c, max_size=6)),
                        max_leaves=30)
_field_names = st.sampled_from(["type", "migration_id", "request_id", "num_blocks", "dst_block_ids", "dtype",
                                "shape", "state", "reason", "ok", "error", "block_ids"])
# Mostly well-typed headers with fields from the real schema, so the fuzzer reaches deep checks.
_near_miss = st.dictionaries(_field_names, _garbage, max_size=6)


@seed(1234)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=st.one_of(_garbage, _near_miss), nbytes=st.one_of(st.none(), st.integers(0, 1 << 31)))
def test_decode_request_fuzz_raises_only_protocol_error(header, nbytes):
    header = roundtrip(header)
    try:
        msg = wire.decode_request(header, nbytes)
    except ProtocolError:
        return
    assert wire.decode_request(roundtrip(msg.to_header()), nbytes) == msg


@seed(1234)
@settings(max_examples=300, deadline=None)
@given(header=st.one_of(_garbage, _near_miss))
def test_decode_reply_fuzz_raises_only_protocol_error(header):
    try:
        wire.decode_reply(roundtrip(header))
    except ProtocolError:
        pass


@seed(99)
@settings(max_examples=50, deadline=None)
@given(state=st.fixed_dictionaries({k: _garbage for k in make_state().to_wire()}))
def test_commit_state_fuzz(state):
    try:
        wire.decode_request(roundtrip({"type": "commit", "migration_id": "m", "state": state}), None)
    except ProtocolError:
        pass


@pytest.mark.parametrize("dtype", list(wire.torch_dtypes().values()))
def test_tensor_payload_round_trip(dtype):
    g = torch.Generator().manual_seed(0)
    t = (torch.rand(5, 3, 7, generator=g) * 100).to(dtype)
    name, shape, buf = wire.tensor_to_payload(t)
    assert (name, shape) == (wire.dtype_name(dtype), (5, 3, 7))
    assert buf.nbytes == t.numel() * t.element_size()
    back = wire.payload_to_tensor(bytes(buf), name, shape)  # a read-only copy, as received
    assert back.dtype == dtype and torch.equal(back, t)


def test_payload_is_zero_copy_and_keeps_buffer_alive():
    t = torch.arange(16, dtype=torch.float32)
    _, _, buf = wire.tensor_to_payload(t)
    t[0] = 42.0
    assert wire.payload_to_tensor(buf, "float32", (16,))[0].item() == 42.0
    data = bytearray(torch.arange(8, dtype=torch.float64).numpy().tobytes())
    out = wire.payload_to_tensor(data, "float64", (2, 4))
    del data
    assert torch.equal(out, torch.arange(8, dtype=torch.float64).view(2, 4))


def test_payload_size_mismatch_and_bad_tensors():
    with pytest.raises(ProtocolError):
        wire.payload_to_tensor(b"\0" * 7, "float32", (2,))
    with pytest.raises(ValueError):
        wire.tensor_to_payload(torch.zeros(4, 4).t())
    with pytest.raises(ProtocolError):
        wire.tensor_to_payload(torch.zeros(4, dtype=torch.int64))
    assert math.prod(wire.payload_to_tensor(b"", "float16", (3, 0)).shape) == 0
