"""Fuzzing every decoder of network input, offline and on live sockets.

- ``decode_batch`` (token batches), ``wire.decode_request``/``decode_reply``
  (migration headers, Commit states) and ``base.process_request`` (a server's
  whole frame path) on byte-level mutations of valid messages: only
  ``ProtocolError`` (or an ``ok=False`` fault reply), never another exception.
- A live ``ZmqMigrationServer`` fed raw multipart garbage from a plain DEALER,
  and a live ``TokenReceiver`` fed garbage from a PUSH socket: every bad message
  is answered with a fault (or counted as rejected), the thread stays up, and a
  valid message afterwards still works.
- A live ``Llumlet``: garbage and partially valid migration sequences at its
  migration address; afterwards no reservation or block leaks and the engine's
  invariants hold.

All hypothesis runs are derandomized (reproducible) with modest example counts.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Optional

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llumnix_py.engines.types import FinishReason, MigrationRequestState, RequestOutput, SamplingParams, SeqStatus, TokenLogprob
from llumnix_py.errors import ProtocolError
from llumnix_py.frontend.receiver import TokenReceiver
from llumnix_py.llumlet import Llumlet
from llumnix_py.llumlet_types import LlumletConfig
from llumnix_py.tokens import MAX_BATCH_BYTES, CallbackSink, decode_batch, encode_batch
from migration import wire
from migration.ownership import OwnershipArbiter
from migration.transports.base import MAX_HEADER_BYTES, pack, process_request
from migration.transports.zmq_transport import ZmqMigrationServer, ZmqMigrationTransport
from tests.factories import AcceptingHandler, make_engine

FUZZ = settings(derandomize=True, deadline=None, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIVE = settings(derandomize=True, deadline=None, max_examples=40,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
REPLY_TIMEOUT_MS = 3000


def make_state(**kw: Any) -> MigrationRequestState:
    d = dict(request_id="req-1", prompt_token_ids=(1, 2, 3), output_token_ids=(4, 5),
             sampling=SamplingParams(max_tokens=8, temperature=0.5, seed=7), priority=0, arrival_time=1.5,
             num_preemptions=0, status=SeqStatus.RUNNING, num_computed_tokens=4)
    d.update(kw)
    return MigrationRequestState(**d)


VALID_HEADERS = [
    wire.PreAlloc("m1", "req-1", 4).to_header(),
    wire.Blocks("m1", (3, 4), "float32", (2, 8)).to_header(),
    wire.Commit("m1", make_state()).to_header(),
    wire.Commit("m1", make_state(status=SeqStatus.WAITING, num_computed_tokens=0)).to_header(),
    wire.Abort("m1", "bye").to_header(),
    wire.Ping().to_header(),
]
VALID_REPLIES = [wire.Reply(True, None, (1, 2)).to_header(), wire.Reply(False, "no").to_header()]
VALID_BATCH = encode_batch("i0", [RequestOutput("r1", (1, 2, 3), 0, None),
                                  RequestOutput("r2", (9,), 7, FinishReason.LENGTH),
                                  RequestOutput("r3", (4,), 0, None, (TokenLogprob(-0.25, ((4, -0.25), (5, -2.0))),),
                                                (None, TokenLogprob(-1.5), TokenLogprob(float("-inf"), ((7, -0.1),))))])

# ---------------------------------------------------------------- strategies

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64 - 1), st.floats(),
                     st.text(max_size=20), st.binary(max_size=20))
_garbage = st.recursive(_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                        max_leaves=12)


def _packable(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return b"\xc1"  # never-used msgpack byte


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A valid encoding, then truncated, bit-flipped, spliced or extended."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "append"]))
        if op == "truncate":
            data = data[:draw(st.integers(0, len(data)))]
        elif op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            i = draw(st.integers(0, len(data) - 1))
            del data[i:i + draw(st.integers(1, 8))]
        else:
            data += draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@st.composite
def type_confused(draw, headers: list[dict]) -> dict:
    """A valid header with one field replaced by garbage, or a field added or removed."""
    h = dict(draw(st.sampled_from(headers)))
    key = draw(st.sampled_from(sorted(h)))
    op = draw(st.sampled_from(["replace", "drop", "add", "nested"]))
    if op == "replace":
        h[key] = draw(_garbage)
    elif op == "drop":
        del h[key]
    elif op == "add":
        h[draw(st.text(min_size=1, max_size=8))] = draw(_garbage)
    elif isinstance(h.get("state"), dict):
        state = dict(h["state"])
        state[draw(st.sampled_from(sorted(state)))] = draw(_garbage)
        h["state"] = state
    return h


_HEADER_SEEDS = [pack({**h, "seq": 1}) for h in VALID_HEADERS]
header_bytes = st.one_of(st.binary(max_size=64), _garbage.map(_packable), mutated(_HEADER_SEEDS),
                         type_confused(VALID_HEADERS).map(lambda h: _packable({**h, "seq": 1})))
batch_bytes = st.one_of(st.binary(max_size=64), _garbage.map(_packable), mutated([VALID_BATCH]),
                        type_confused([msgpack.unpackb(VALID_BATCH)]).map(_packable))

# ---------------------------------------------------------------- offline decoders


@FUZZ
@given(data=batch_bytes)
def test_decode_batch_raises_only_protocol_error(data: bytes) -> None:
    try:
        iid, outs = decode_batch(data)
    except ProtocolError as exc:
        assert str(exc)
        return
    assert decode_batch(encode_batch(iid, outs)) == (iid, outs)


def test_decode_batch_rejects_oversize_and_non_bytes() -> None:
    for bad in (b"\x00" * (MAX_BATCH_BYTES + 1), None, 12, "text"):
        with pytest.raises(ProtocolError):
            decode_batch(bad)  # type: ignore[arg-type]
    huge = msgpack.packb({"v": 2, "instance_id": "i", "outputs": [["r", 0, list(range(70_000)), None, None, None]]})
    with pytest.raises(ProtocolError):
        decode_batch(huge)


@FUZZ
@given(data=mutated(_HEADER_SEEDS) | type_confused(VALID_HEADERS).map(lambda h: _packable({**h, "seq": 1})),
       nbytes=st.one_of(st.none(), st.sampled_from([0, 64, 1 << 40])))
def test_wire_decode_request_on_mutated_bytes(data: bytes, nbytes: Optional[int]) -> None:
    try:
        header = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:
        return  # not msgpack: the transport rejects it before decode_request (next test)
    if isinstance(header, dict):
        header.pop("seq", None)
    try:
        wire.decode_request(header, nbytes)
    except ProtocolError:
        pass


@FUZZ
@given(header=type_confused(VALID_REPLIES) | _garbage)
def test_wire_decode_reply_raises_only_protocol_error(header: Any) -> None:
    try:
        reply = wire.decode_reply(header)
    except ProtocolError:
        return
    assert wire.decode_reply(reply.to_header()) == reply


@FUZZ
@given(header=header_bytes, payload=st.one_of(st.none(), st.binary(max_size=80)))
def test_process_request_never_raises(header: bytes, payload: Optional[bytes]) -> None:
    rec = AcceptingHandler()
    reply = process_request(header, payload, rec, max_message_bytes=1 << 16)
    assert set(reply) >= {"ok", "error", "block_ids", "seq"}
    wire.decode_reply({k: v for k, v in reply.items() if k in ("ok", "error", "block_ids")})
    if not rec.messages:
        assert reply["ok"] is False and reply.get("fault") is True and reply["error"]


def test_process_request_refuses_huge_declared_shapes_before_allocating() -> None:
    rec = AcceptingHandler()
    for shape in ([2, 1 << 40], [2, 2**62, 2**62], [2] + [1 << 20] * 7):
        h = {**wire.Blocks("m", (1, 2), "float32", (2, 1)).to_header(), "shape": shape, "seq": 3}
        reply = process_request(pack(h), b"\0" * 8, rec, max_message_bytes=1 << 16)
        assert reply["ok"] is False and reply["seq"] == 3
    big = {**wire.Blocks("m", (1,), "uint8", (1, 1 << 20)).to_header(), "seq": 4}
    reply = process_request(pack(big), b"\0" * (1 << 20), rec, max_message_bytes=1 << 16)
    assert reply["ok"] is False and "max_message_bytes" in reply["error"]
    assert rec.messages == []


# ---------------------------------------------------------------- live migration server


def _dealer(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def _exchange(sock: zmq.Socket, frames: list, timeout_ms: int = REPLY_TIMEOUT_MS) -> Optional[dict]:
    sock.send_multipart(frames)
    if not sock.poll(timeout_ms, zmq.POLLIN):
        return None
    reply = sock.recv_multipart()
    assert len(reply) == 1
    header = msgpack.unpackb(reply[0], raw=False)
    assert isinstance(header, dict)
    return header


_seq = itertools.count(100)


def _ping(sock: zmq.Socket) -> dict:
    seq = next(_seq)
    reply = _exchange(sock, [pack({"type": "ping", "seq": seq})])
    assert reply is not None, "server stopped answering"
    assert reply["ok"] is True and reply["seq"] == seq
    return reply


@pytest.fixture(scope="module")
def live_server():
    rec = AcceptingHandler()
    server = ZmqMigrationServer(rec, max_message_bytes=1 << 16)
    address = server.start()
    ctx = zmq.Context()
    sock = _dealer(ctx, address)
    yield server, rec, sock, ctx
    sock.close(0)
    ctx.term()
    server.stop()


frame_lists = st.lists(st.one_of(header_bytes, st.binary(max_size=200)), min_size=1, max_size=4)


@LIVE
@given(frames=frame_lists)
def test_live_server_answers_garbage_and_keeps_serving(live_server, frames: list[bytes]) -> None:
    server, rec, sock, _ = live_server
    before = len(rec.messages)
    reply = _exchange(sock, frames)
    assert reply is not None, "no reply to a malformed request"
    if len(rec.messages) == before:
        assert reply["ok"] is False and reply["fault"] is True and reply["error"]
    _ping(sock)


@pytest.mark.parametrize("frames,match", [
    ([pack({"type": "ping", "seq": 1})[:-1]], "msgpack"),  # truncated msgpack
    ([b"\x92\x01"], "msgpack"),  # array header promising 2 items, only 1 there
    ([b"\xdd\xff\xff\xff\xff"], "msgpack"),  # array32 declaring 4G items
    ([pack({**wire.Blocks("m", (1,), "float32", (1, 1 << 40)).to_header(), "seq": 2}), b"\0" * 16], ""),
    ([pack({"type": "ping", "seq": 3}), b"x", b"y"], "frames"),  # extra frames
    ([pack({"type": "pre_alloc", "migration_id": 5, "request_id": [], "num_blocks": "4", "seq": 4})], ""),
    ([pack({"type": "blocks", "migration_id": "m", "dst_block_ids": [1], "dtype": "float32",
            "shape": [1, 2], "seq": 5})], "payload"),  # payload missing
    ([pack({"type": "ping", "seq": 6}), b"\0" * 8], "payload"),  # payload on a control message
    ([pack({"type": "commit", "migration_id": "m", "state": {"request_id": 1}, "seq": 7})], "state"),
    ([pack({**wire.Blocks("m", (1,), "uint8", (1, 70_000)).to_header(), "seq": 8}), b"\0" * 70_000],
     "max_message_bytes"),  # payload larger than the server takes
    ([pack(["not", "a", "map"])], "mapping"),
    ([pack({"type": "ping"})], "seq"),
    ([pack({"type": "ping", "seq": True})], "seq"),
])
def test_live_server_rejects_known_bad_messages(live_server, frames: list, match: str) -> None:
    server, rec, sock, _ = live_server
    before = len(rec.messages)
    reply = _exchange(sock, frames)
    assert reply is not None and reply["ok"] is False and reply["fault"] is True
    assert match in reply["error"], reply["error"]
    assert len(rec.messages) == before
    _ping(sock)


def test_live_server_survives_oversize_frames(live_server) -> None:
    """A frame above MAXMSGSIZE makes zmq drop that connection (no allocation); the server serves others."""
    server, rec, sock, ctx = live_server
    rogue = _dealer(ctx, server.address)
    try:
        assert _exchange(rogue, [pack({"type": "ping", "seq": 1}), b"\0" * (MAX_HEADER_BYTES + 1024)],
                         timeout_ms=1000) is None
    finally:
        rogue.close(0)
    _ping(sock)
    with ZmqMigrationTransport(server.address, timeout_s=5.0) as client:
        assert client.call(wire.Ping()).ok


# ---------------------------------------------------------------- live token receiver


@pytest.fixture(scope="module")
def live_receiver():
    got: list[tuple[str, list[RequestOutput]]] = []
    cond = threading.Condition()

    def on_batch(iid: str, outs: list[RequestOutput]) -> None:
        with cond:
            got.append((iid, outs))
            cond.notify_all()

    receiver = TokenReceiver(on_batch)
    address = receiver.start()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(address)
    yield receiver, push, got, cond
    push.close(0)
    ctx.term()
    receiver.stop()


_marker = itertools.count()


def _send_marker(push: zmq.Socket, got: list, cond: threading.Condition) -> None:
    rid = f"marker-{next(_marker)}"
    push.send(encode_batch("marker", [RequestOutput(rid, (1,), 0, None)]))
    with cond:
        assert cond.wait_for(lambda: any(outs and outs[0].request_id == rid for _, outs in got), timeout=5), \
            "token receiver stopped delivering"


@LIVE
@given(frames=st.lists(batch_bytes, min_size=1, max_size=3))
def test_live_receiver_rejects_garbage_and_keeps_delivering(live_receiver, frames: list[bytes]) -> None:
    receiver, push, got, cond = live_receiver
    rejected, accepted = receiver.rejected, receiver.accepted
    push.send_multipart(frames)
    _send_marker(push, got, cond)
    valid = len(frames) == 1 and _is_valid_batch(frames[0])
    assert receiver.accepted - accepted == 1 + valid
    assert receiver.rejected - rejected == (0 if valid else 1)


def _is_valid_batch(data: bytes) -> bool:
    try:
        decode_batch(data)
        return True
    except ProtocolError:
        return False


def test_live_receiver_survives_oversize_and_type_confused_batches(live_receiver) -> None:
    receiver, push, got, cond = live_receiver
    rejected = receiver.rejected
    bad = [
        msgpack.packb({"v": 2, "instance_id": "i", "outputs": [["r", -1, [1], None, None, None]]}),
        msgpack.packb({"v": 2, "instance_id": "i", "outputs": [["r", 0, [True], None, None, None]]}),
        msgpack.packb({"v": 2, "instance_id": "i", "outputs": [["r", 0, [1], "exploded", None, None]]}),
        msgpack.packb({"v": 2, "instance_id": "i", "outputs": [["r", 0, [1], [1], None, None]]}),
        msgpack.packb({"v": 2, "instance_id": "i", "outputs": [["r", 0, [1], None]]}),
        msgpack.packb({"v": 1, "instance_id": "i", "outputs": []}),
        msgpack.packb({"v": 2, "instance_id": "i" * 300, "outputs": []}),
        msgpack.packb({"v": 2, "instance_id": "i", "outputs": [["r", 0, [1], None, [[float("nan"), []]], None]]}),
        msgpack.packb({"v": 2, "instance_id": "i", "outputs": [["r", 0, [1, 2], None, [[-0.5, []]], None]]}),
        msgpack.packb({"v": 2, "instance_id": "i", "outputs": [["r", 0, [1], None, [[-0.5, [[1, -0.1]] * 21]],
                                                                 None]]}),
        msgpack.packb({"v": 2, "instance_id": "i", "outputs": [["r", 3, [1], None, None, [None, [-1.0, []]]]]}),
        msgpack.packb({"v": 2, "instance_id": "i", "outputs": [["r", 0, [1], None, None, [[-1.0, []]]]]}),
        VALID_BATCH[:-3],
    ]
    for data in bad:
        push.send(data)
    _send_marker(push, got, cond)
    assert receiver.rejected - rejected == len(bad)
    # Over MAXMSGSIZE: zmq drops the connection before allocating; the PUSH reconnects.
    push.send(b"\0" * (MAX_BATCH_BYTES + 1))
    _send_marker(push, got, cond)


# ---------------------------------------------------------------- live llumlet

MIGRATION_TIMEOUT_S = 0.3


@pytest.fixture(scope="module")
def live_llumlet():
    """A llumlet with an ownership arbiter, as in a cluster: a raw peer's commit that is never
    activated is claimed by this destination after the migration timeout, and then runs."""
    engine = make_engine(num_blocks=32, block_size=16)
    outputs: list = []
    arbiter = OwnershipArbiter()
    llumlet = Llumlet(LlumletConfig(instance_id="x", transport="zmq", migration_timeout_s=MIGRATION_TIMEOUT_S,
                                    max_incoming=2),
                      engine, CallbackSink(lambda iid, reply_to, outs: outputs.extend(outs)),
                      ownership=lambda mid, side: arbiter.claim(mid, side, time.monotonic()))
    address = llumlet.start()
    ctx = zmq.Context()
    sock = _dealer(ctx, address)
    block_shape = tuple(engine.read_blocks([0]).shape[1:])
    yield llumlet, engine, sock, block_shape
    sock.close(0)
    ctx.term()
    llumlet.stop()


def _settle(llumlet: Llumlet, engine: Any, timeout: float = 20.0) -> None:
    """Wait until stale reservations expired and committed requests finished (a parked copy
    that no source activates is claimed after the migration timeout); then check for leaks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if llumlet.is_idle() and llumlet.load().used_blocks == 0:
            break
        time.sleep(0.02)
    load = llumlet.load()
    assert load.used_blocks == 0 and load.reserved_blocks == 0, load
    assert not llumlet.dest.incoming
    with llumlet._locked():
        engine.check_invariants()


def _call(sock: zmq.Socket, header: dict, payload: Optional[bytes] = None) -> dict:
    frames = [pack({**header, "seq": next(_seq)})] + ([payload] if payload is not None else [])
    reply = _exchange(sock, frames)
    assert reply is not None, "llumlet's migration server stopped answering"
    return reply


def _blocks_payload(shape: tuple, n: int, dtype: torch.dtype = torch.float32) -> bytes:
    return torch.zeros((n, *shape), dtype=dtype).numpy().tobytes()


def test_llumlet_prealloc_then_garbage_blocks_frees_everything(live_llumlet) -> None:
    llumlet, engine, sock, shape = live_llumlet
    r = _call(sock, wire.PreAlloc("g1", "victim-1", 3).to_header())
    assert r["ok"] and len(r["block_ids"]) == 3
    assert llumlet.load().used_blocks == 3
    ids = r["block_ids"]
    bad = [
        ({**wire.Blocks("g1", tuple(ids[:1]), "float32", (1, 7)).to_header()}, b"\0" * 28),  # wrong KV shape
        ({**wire.Blocks("g1", tuple(ids[:1]), "float16", (1, *shape)).to_header()},
         _blocks_payload(shape, 1, torch.float16)),  # wrong dtype
        ({**wire.Blocks("g1", (999,), "float32", (1, *shape)).to_header()}, _blocks_payload(shape, 1)),  # not reserved
        ({"type": "blocks", "migration_id": "g1", "dst_block_ids": ids, "dtype": "float32",
          "shape": [len(ids), 1 << 40]}, b"\0" * 8),  # huge declared shape
    ]
    for header, payload in bad:
        assert _call(sock, header, payload)["ok"] is False
    _settle(llumlet, engine)


def test_llumlet_prealloc_then_silence_expires(live_llumlet) -> None:
    llumlet, engine, sock, shape = live_llumlet
    r = _call(sock, wire.PreAlloc("s1", "victim-2", 4).to_header())
    assert r["ok"] and llumlet.load().used_blocks == 4
    r = _call(sock, wire.Blocks("s1", tuple(r["block_ids"][:2]), "float32", (2, *shape)).to_header(),
              _blocks_payload(shape, 2))
    assert r["ok"]
    _settle(llumlet, engine, timeout=60.0)  # the silent migration's reservation expires (its timeout) and goes
    # A commit after the expiry is refused: nothing to adopt.
    r = _call(sock, wire.Commit("s1", make_state(request_id="victim-2", num_computed_tokens=0)).to_header())
    assert r["ok"] is False
    _settle(llumlet, engine)


def test_llumlet_commit_before_all_blocks_is_refused(live_llumlet) -> None:
    llumlet, engine, sock, shape = live_llumlet
    r = _call(sock, wire.PreAlloc("c1", "victim-3", 2).to_header())
    assert r["ok"]
    state = make_state(request_id="victim-3", prompt_token_ids=tuple(range(1, 20)), output_token_ids=(5,),
                       num_computed_tokens=19)
    assert _call(sock, wire.Commit("c1", state).to_header())["ok"] is False
    _settle(llumlet, engine)


def test_llumlet_valid_raw_migration_still_works(live_llumlet) -> None:
    """After all the garbage, a well-formed migration from a raw peer commits and the request runs."""
    llumlet, engine, sock, shape = live_llumlet
    prompt = tuple(range(1, 20))
    r = _call(sock, wire.PreAlloc("ok1", "fine-1", 2).to_header())
    assert r["ok"]
    ids = tuple(r["block_ids"])
    assert _call(sock, wire.Blocks("ok1", ids, "float32", (2, *shape)).to_header(), _blocks_payload(shape, 2))["ok"]
    state = make_state(request_id="fine-1", prompt_token_ids=prompt, output_token_ids=(5,),
                       sampling=SamplingParams(max_tokens=4, ignore_eos=True), num_computed_tokens=len(prompt))
    assert _call(sock, wire.Commit("ok1", state).to_header())["ok"], "a valid commit was refused"
    assert _call(sock, wire.Activate("ok1").to_header())["ok"]  # the commit parks it until activated
    _settle(llumlet, engine)
    assert llumlet.dest.num_committed >= 1


_mids = st.sampled_from(["h1", "h2", "h3"])


@st.composite
def migration_steps(draw) -> list[tuple[str, Any]]:
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["garbage", "prealloc", "blocks", "commit", "abort"]))
        mid = draw(_mids)
        if kind == "garbage":
            steps.append(("raw", draw(frame_lists)))
        elif kind == "prealloc":
            steps.append(("prealloc", (mid, draw(st.sampled_from(["ra", "rb"])), draw(st.integers(0, 40)))))
        elif kind == "blocks":
            steps.append(("blocks", (mid, draw(st.integers(0, 3)), draw(st.booleans()))))
        elif kind == "commit":
            steps.append(("commit", (mid, draw(st.sampled_from(["ra", "rb"])), draw(st.booleans()),
                                     draw(st.integers(0, 40)))))
        else:
            steps.append(("abort", mid))
    return steps


@settings(derandomize=True, deadline=None, max_examples=15,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(steps=migration_steps())
def test_llumlet_random_partial_migrations_never_leak(live_llumlet, steps: list) -> None:
    llumlet, engine, sock, shape = live_llumlet
    assert steps
    reserved: dict[str, list[int]] = {}
    for kind, arg in steps:
        if kind == "raw":
            assert _exchange(sock, arg) is not None
        elif kind == "prealloc":
            mid, rid, n = arg
            r = _call(sock, wire.PreAlloc(mid, rid, n).to_header())
            if r["ok"]:
                reserved.setdefault(mid, []).extend(r["block_ids"])
        elif kind == "blocks":
            mid, n, right_ids = arg
            ids = reserved.get(mid, [])[:n] if right_ids else list(range(n))
            if ids:
                _call(sock, wire.Blocks(mid, tuple(ids), "float32", (len(ids), *shape)).to_header(),
                      _blocks_payload(shape, len(ids)))
        elif kind == "commit":
            mid, rid, running, plen = arg
            prompt = tuple(range(1, plen + 2))
            state = make_state(request_id=rid, prompt_token_ids=prompt, output_token_ids=(),
                               sampling=SamplingParams(max_tokens=2, ignore_eos=True),
                               status=SeqStatus.RUNNING if running else SeqStatus.WAITING,
                               num_computed_tokens=len(prompt) if running else 0)
            _call(sock, wire.Commit(mid, state).to_header())
        else:
            _call(sock, wire.Abort(arg, "fuzz").to_header())
    _settle(llumlet, engine)
    _ping(sock)
