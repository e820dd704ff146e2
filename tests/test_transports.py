"""Migration transports, parametrized over backends: data integrity, errors, bad input, processes."""

from __future__ import annotations

import multiprocessing as mp
import threading
from typing import Any, Optional

import msgpack
import pytest
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from llumnix_py.engines.types import MigrationRequestState, SamplingParams, SeqStatus
from llumnix_py.errors import UnknownTransportError
from migration import wire
from migration.transports import (MigrationServer, MigrationTransport, TransportError, get_transport,
                                  register_transport, transport_names)
from migration.transports.inproc import InprocMigrationServer

TRANSPORTS = [
    "zmq", "gloo", "inproc",
    pytest.param("nccl", marks=pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                  reason="nccl needs two CUDA devices")),
]
TIMEOUT_S = 2.0


class Recorder:
    """A destination handler that records what it was sent; ``fail`` makes it raise."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.blocks: dict[int, torch.Tensor] = {}
        self.block_order: list[int] = []
        self.fail: Optional[str] = None
        self.lock = threading.Lock()

    def __call__(self, msg: Any, payload: Optional[torch.Tensor]) -> dict:
        with self.lock:
            self.messages.append(msg)
            if self.fail:
                raise RuntimeError(self.fail)
            if isinstance(msg, wire.PreAlloc):
                if msg.num_blocks > 1000:
                    return wire.Reply(False, "not enough free blocks").to_header()
                return wire.Reply(True, block_ids=tuple(range(msg.num_blocks))).to_header()
            if isinstance(msg, wire.Blocks):
                assert payload is not None and payload.shape[0] == len(msg.dst_block_ids)
                for i, b in enumerate(msg.dst_block_ids):
                    self.blocks[b] = payload[i].cpu().clone()
                    self.block_order.append(b)
            return wire.Reply(True).to_header()


def make_pair(name: str, handler: Any, **server_kw: Any) -> tuple[MigrationServer, MigrationTransport]:
    server_cls, transport_cls = get_transport(name)
    server = server_cls(handler, **server_kw)
    client = transport_cls(server.start(), timeout_s=TIMEOUT_S, chunk_blocks=16)
    client.connect()
    return server, client


def make_state(request_id: str = "req-1") -> MigrationRequestState:
    return MigrationRequestState(request_id=request_id, prompt_token_ids=(1, 2, 3), output_token_ids=(4,),
                                 sampling=SamplingParams(seed=3), priority=0, arrival_time=0.0,
                                 num_preemptions=0, status=SeqStatus.RUNNING, num_computed_tokens=3)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.mark.parametrize("name", TRANSPORTS)
def test_control_and_blocks_round_trip(name, recorder):
    server, client = make_pair(name, recorder)
    try:
        assert client.call(wire.Ping()).ok
        assert client.call(wire.PreAlloc("mig-1", "req-1", 200)) == wire.Reply(True, None, tuple(range(200)))
        refused = client.call(wire.PreAlloc("mig-1", "req-1", 5000))  # the handler's refusal is a value
        assert refused.ok is False and refused.error == "not enough free blocks"
        g = torch.Generator().manual_seed(0)
        data = torch.randn(200, 4096, generator=g)
        ids = torch.randperm(1000, generator=g)[:200].tolist()
        client.send_blocks("mig-1", ids, data)
        client.flush()
        assert client.call(wire.Commit("mig-1", make_state())).ok
    finally:
        client.close()
        server.stop()
    assert recorder.block_order == ids
    for i, b in enumerate(ids):
        assert torch.equal(recorder.blocks[b], data[i])
    kinds = [type(m).__name__ for m in recorder.messages]
    assert kinds[:3] == ["Ping", "PreAlloc", "PreAlloc"] and kinds[-1] == "Commit"
    assert kinds.count("Blocks") == 13  # ceil(200 / 16)
    assert recorder.messages[-1].state == make_state()


@pytest.mark.parametrize("name", TRANSPORTS)
def test_bfloat16_round_trip(name, recorder):
    server, client = make_pair(name, recorder)
    try:
        data = torch.randn(37, 2, 8, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        client.send_blocks("mig-2", list(range(100, 137)), data)
        client.flush()
    finally:
        client.close()
        server.stop()
    assert sorted(recorder.blocks) == list(range(100, 137))
    for i in range(37):
        got = recorder.blocks[100 + i]
        assert got.dtype == torch.bfloat16 and torch.equal(got, data[i])


@pytest.mark.parametrize("name", TRANSPORTS)
def test_handler_error_becomes_transport_error(name, recorder):
    server, client = make_pair(name, recorder)
    try:
        recorder.fail = "disk on fire"
        with pytest.raises(TransportError, match="disk on fire"):
            client.call(wire.Abort("mig-3", "test"))
        client.send_blocks("mig-3", [1, 2, 3], torch.ones(3, 8))
        with pytest.raises(TransportError, match="disk on fire"):
            client.flush()
        recorder.fail = None
        client.send_blocks("mig-3", [4], torch.ones(1, 8))  # the connection still works afterwards
        client.flush()
        assert client.call(wire.Ping()).ok
    finally:
        client.close()
        server.stop()
    assert torch.equal(recorder.blocks[4], torch.ones(8))


@pytest.mark.parametrize("name", TRANSPORTS)
def test_oversized_payload_rejected_before_handler(name, recorder):
    server, client = make_pair(name, recorder, max_message_bytes=1024)
    try:
        client.send_blocks("mig-4", [0, 1], torch.zeros(2, 1024))  # 8 KiB in one chunk
        with pytest.raises(TransportError, match="max_message_bytes"):
            client.flush()
        client.send_blocks("mig-4", [0, 1], torch.ones(2, 64))  # 512 bytes: fine
        client.flush()
        assert client.call(wire.Ping()).ok
    finally:
        client.close()
        server.stop()
    assert [type(m).__name__ for m in recorder.messages] == ["Blocks", "Ping"]


@pytest.mark.parametrize("name", TRANSPORTS)
def test_stopped_server_raises_within_timeout(name, recorder):
    server, client = make_pair(name, recorder)
    try:
        client.send_blocks("mig-5", [0], torch.ones(1, 4))
        client.flush()
        server.stop()
        # Each call ends in a TransportError once its timeout passes, instead of hanging
        # (pytest-timeout would catch a hang; no wall-clock bound is asserted here).
        with pytest.raises(TransportError):
            client.call(wire.Ping())
        with pytest.raises(TransportError):
            client.send_blocks("mig-5", [1], torch.ones(1, 4))
            client.flush()
    finally:
        client.close()
        server.stop()


def test_zmq_destination_restart_on_same_address(recorder):
    server, client = make_pair("zmq", recorder)
    address = server.address
    try:
        server.stop()
        with pytest.raises(TransportError):
            client.call(wire.Ping())
        server_cls, _ = get_transport("zmq")
        server = server_cls(recorder, bind=address)
        server.start()
        assert client.call(wire.Ping()).ok  # the late reply of the timed-out Ping cannot confuse this one
    finally:
        client.close()
        server.stop()


def test_zmq_ipc_address(recorder, tmp_path):
    server, client = make_pair("zmq", recorder, bind=f"ipc://{tmp_path}/migration.sock")
    try:
        assert server.address.startswith("ipc://")
        client.send_blocks("m", [7], torch.full((1, 4), 2.0))
        client.flush()
    finally:
        client.close()
        server.stop()
    assert torch.equal(recorder.blocks[7], torch.full((4,), 2.0))


def _raw_request(sock: zmq.Socket, frames: list[bytes]) -> dict:
    sock.send_multipart(frames)
    assert sock.poll(5000), "server did not answer"
    reply_frames = sock.recv_multipart()
    assert len(reply_frames) == 1
    return msgpack.unpackb(reply_frames[0], raw=False)


def _pack(h: Any) -> bytes:
    return msgpack.packb(h, use_bin_type=True)


def test_zmq_garbage_frames_get_error_replies(recorder):
    server_cls, _ = get_transport("zmq")
    server = server_cls(recorder, max_message_bytes=1 << 16)
    address = server.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    blocks = {**wire.Blocks("m", (1, 2), "float32", (2, 4)).to_header(), "seq": 3}
    bad = [
        [b"\xc1\xc1 not msgpack"],
        [_pack([1, 2, 3])],
        [_pack({"type": "ping"})],  # no seq
        [_pack({"type": "ping", "seq": True})],
        [_pack({"type": "ping", "seq": 1, "x": {"ctl": "connect"}})],  # zmq takes no extension
        [_pack({**blocks, "shape": [2, 1 << 40]}), b"\0" * 32],  # huge declared shape
        [_pack(blocks), b"\0" * 31],  # payload size mismatch
        [_pack(blocks)],  # payload missing
        [_pack({"type": "ping", "seq": 4}), b"\0" * 8],  # unexpected payload
        [_pack(blocks), b"\0" * 32, b"extra frame"],
        [_pack({"type": "pre_alloc", "migration_id": "m", "request_id": "r", "num_blocks": -3, "seq": 5})],
    ]
    try:
        for frames in bad:
            reply = _raw_request(sock, frames)
            assert reply["ok"] is False and reply["fault"] is True and reply["error"], frames
        oversized = _raw_request(sock, [_pack({**blocks, "seq": 9}), b"\0" * (1 << 17)])
        assert oversized["ok"] is False and "max_message_bytes" in oversized["error"]
        assert recorder.messages == []  # the handler never saw any of it
        assert _raw_request(sock, [_pack({"type": "ping", "seq": 77})]) == {
            "ok": True, "error": None, "block_ids": [], "seq": 77}
        huge_seq = _raw_request(sock, [_pack({**blocks, "seq": 8, "shape": [2, 1 << 40]}), b"\0" * 32])
        assert huge_seq["seq"] == 8  # the reply names the request it refuses
    finally:
        sock.close()
        ctx.term()
        server.stop()


def test_zmq_frame_beyond_maxmsgsize_does_not_kill_server(recorder):
    server, client = make_pair("zmq", recorder, max_message_bytes=1 << 10)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(server.address)
        sock.send_multipart([_pack({"type": "ping", "seq": 1}), b"\0" * (17 << 20)])  # zmq drops the peer
        assert monitor.poll(timeout=60_000), "the server never dropped the peer"  # wait for that, then ping
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
        sock.disable_monitor()
        monitor.close()
        assert client.call(wire.Ping()).ok
    finally:
        sock.close()
        ctx.term()
        client.close()
        server.stop()
    assert [type(m).__name__ for m in recorder.messages] == ["Ping"]


def test_inproc_rejects_what_zmq_rejects(recorder):
    server = InprocMigrationServer(recorder)
    server.start()
    try:
        reply = msgpack.unpackb(server.deliver([_pack({"type": "ping", "seq": 1, "extra": 1})], 1.0), raw=False)
        assert reply["ok"] is False and "unexpected" in reply["error"]
        assert recorder.messages == []
    finally:
        server.stop()
    _, transport_cls = get_transport("inproc")
    client = transport_cls(server.address or "inproc://gone", timeout_s=0.5)
    client.connect()
    with pytest.raises(TransportError, match="no migration server"):
        client.call(wire.Ping())


def test_registry():
    assert {"zmq", "gloo", "nccl", "inproc"} <= set(transport_names())
    with pytest.raises(UnknownTransportError, match="zmq"):
        get_transport("carrier-pigeon")
    with pytest.raises(ValueError):
        register_transport("bad", object, object)  # type: ignore[arg-type]
    zmq_pair = get_transport("zmq")
    register_transport("zmq", *zmq_pair)  # re-registering the same pair is harmless
    with pytest.raises(ValueError, match="already"):
        register_transport("zmq", *get_transport("inproc"))


# ---------------------------------------------------------------- server in another process

def _expected_blocks(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 256, generator=torch.Generator().manual_seed(42)).to(torch.float16)


def _checking_handler(msg: Any, payload: Optional[torch.Tensor]) -> dict:
    if isinstance(msg, wire.Blocks):
        want = _expected_blocks(64)[list(msg.dst_block_ids)]
        if payload is None or not torch.equal(payload, want):
            return wire.Reply(False, "payload differs from the expected blocks").to_header()
        return wire.Reply(True, block_ids=msg.dst_block_ids).to_header()
    return wire.Reply(True).to_header()


def _serve_in_child(name: str, addresses: Any, stop: Any) -> None:
    server_cls, _ = get_transport(name)
    server = server_cls(_checking_handler)
    addresses.put(server.start())
    stop.wait(60)
    server.stop()


@pytest.mark.parametrize("name", ["zmq", "gloo"])
def test_server_in_separate_process(name):
    ctx = mp.get_context("spawn")
    addresses, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve_in_child, args=(name, addresses, stop), daemon=True)
    proc.start()
    try:
        address = addresses.get(timeout=60)
        _, transport_cls = get_transport(name)
        client = transport_cls(address, timeout_s=10.0, chunk_blocks=5)
        client.connect()
        try:
            assert client.call(wire.Ping()).ok
            order = torch.randperm(64, generator=torch.Generator().manual_seed(5)).tolist()
            client.send_blocks("mig-x", order, _expected_blocks(64)[order])
            client.flush()  # the child replies ok=False (-> TransportError) on any mismatch
            with pytest.raises(TransportError, match="differs"):
                client.send_blocks("mig-x", [0], torch.zeros(1, 3, 256, dtype=torch.float16))
                client.flush()
        finally:
            client.close()
    finally:
        stop.set()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
