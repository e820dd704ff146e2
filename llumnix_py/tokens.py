"""The token path: llumlets push each step's tokens to frontends; frontends reorder.

Wire format (one ZeroMQ message, msgpack, never pickle)::

    {"v": 1, "instance_id": str, "outputs": [[request_id, index, [token, ...], finish_reason | None], ...]}

``index`` is the output position of the first token, so a frontend drops
duplicates and reorders by position: a stream stays exact across migrations.

A ``secret`` (``migration.security``) on both the sinks and the receiver keeps
peers that do not hold it from injecting tokens (CURVE, or an HMAC tag frame).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import msgpack
import zmq

from llumnix_py.engines.types import FinishReason, RequestOutput
from llumnix_py.errors import ProtocolError
from migration.security import SecretArg, ServerGuard, as_secret, warn_if_exposed

log = logging.getLogger(__name__)

MAX_BATCH_BYTES = 16 << 20
MAX_OUTPUTS = 65536
MAX_TOKENS_PER_OUTPUT = 65536


def encode_batch(instance_id: str, outputs: Sequence[RequestOutput]) -> bytes:
    return msgpack.packb({
        "v": 1,
        "instance_id": instance_id,
        "outputs": [[o.request_id, o.index, list(o.new_token_ids), o.finish_reason.value if o.finish_reason else None]
                    for o in outputs],
    })


def decode_batch(data: bytes) -> tuple[str, list[RequestOutput]]:
    """Validate and decode a token batch; raises ``ProtocolError`` on anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) > MAX_BATCH_BYTES:
        raise ProtocolError("token batch missing or too large")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True, max_array_len=MAX_OUTPUTS,
                              max_bin_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several types for malformed input
        raise ProtocolError(f"token batch is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(msg, dict) or set(msg) != {"v", "instance_id", "outputs"} or msg["v"] != 1:
        raise ProtocolError("token batch must be a map with keys v=1, instance_id, outputs")
    iid, outs = msg["instance_id"], msg["outputs"]
    if not isinstance(iid, str) or not 0 < len(iid) <= 256 or not isinstance(outs, list):
        raise ProtocolError("token batch instance_id or outputs malformed")
    result = []
    for item in outs:
        if not isinstance(item, list) or len(item) != 4:
            raise ProtocolError("token output must be [request_id, index, tokens, finish_reason]")
        rid, index, toks, fin = item
        if not isinstance(rid, str) or not 0 < len(rid) <= 256:
            raise ProtocolError("token output request_id malformed")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 1 << 31:
            raise ProtocolError("token output index malformed")
        if not isinstance(toks, list) or len(toks) > MAX_TOKENS_PER_OUTPUT or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 31 for t in toks):
            raise ProtocolError("token output tokens malformed")
        try:
            reason = FinishReason(fin) if fin is not None else None
        except ValueError:
            raise ProtocolError(f"unknown finish reason {fin!r}") from None
        result.append(RequestOutput(rid, tuple(toks), index, reason))
    return iid, result


class CallbackSink:
    """In-process sink: hands each batch to a function."""

    def __init__(self, fn: Callable[[str, str, Sequence[RequestOutput]], None]) -> None:
        self.fn = fn

    def emit(self, instance_id: str, reply_to: str, outputs: Sequence[RequestOutput]) -> None:
        self.fn(instance_id, reply_to, outputs)

    def close(self) -> None:
        pass


class ZmqTokenSink:
    """Pushes batches to each ``reply_to`` address over ZeroMQ PUSH sockets.

    Used from the engine-loop thread only. A frontend that is gone or too slow
    does not block the engine: sends are non-blocking and dropped when the queue
    (high-water mark) is full.

    Args:
        high_water_mark: messages queued per frontend before new ones are dropped.
        secret: the frontends' shared secret (``None``: no authentication).
    """

    def __init__(self, high_water_mark: int = 10_000, *, secret: SecretArg = None) -> None:
        self.hwm = high_water_mark
        self.secret = as_secret(secret)
        self._ctx: Optional[zmq.Context] = None
        self._socks: dict[str, zmq.Socket] = {}
        self.dropped = 0

    def emit(self, instance_id: str, reply_to: str, outputs: Sequence[RequestOutput]) -> None:
        if not reply_to:
            return
        sock = self._socks.get(reply_to)
        if sock is None:
            if self._ctx is None:
                self._ctx = zmq.Context()
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, self.hwm)
            if self.secret is not None:
                self.secret.secure_client(sock)
            sock.connect(reply_to)
            self._socks[reply_to] = sock
        data = encode_batch(instance_id, outputs)
        try:
            if self.secret is not None:
                sock.send_multipart(self.secret.wrap([data]), zmq.NOBLOCK)
            else:
                sock.send(data, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    def close(self) -> None:
        for s in self._socks.values():
            s.close(0)
        self._socks.clear()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None


class TokenReceiver:
    """A frontend's PULL socket: decodes batches on its own thread and calls ``on_batch``.

    Malformed or unauthenticated messages are counted (``rejected``) and
    dropped; the thread keeps going.

    Args:
        on_batch: called with ``(instance_id, outputs)`` of each valid batch, on the receiver thread.
        host: interface to bind (loopback by default; others log a warning without a secret).
        secret: shared secret the llumlets' sinks must hold (``None``: no authentication).
    """

    def __init__(self, on_batch: Callable[[str, list[RequestOutput]], None], host: str = "127.0.0.1", *,
                 secret: SecretArg = None) -> None:
        self.on_batch = on_batch
        self.host = host
        self.secret = as_secret(secret)
        self.address = ""
        self.rejected = 0
        self.accepted = 0
        self._guard: Optional[ServerGuard] = None
        self._ctx: Optional[zmq.Context] = None
        self._sock: Optional[zmq.Socket] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    def start(self) -> str:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_BATCH_BYTES)
        if self.secret is not None:
            self._guard = self.secret.secure_server(self._ctx, self._sock)
        port = self._sock.bind_to_random_port(f"tcp://{self.host}")
        self.address = f"tcp://{self.host}:{port}"
        warn_if_exposed(self.address, self.secret, "token receiver")
        self._thread = threading.Thread(target=self._run, name="token-receiver", daemon=True)
        self._thread.start()
        return self.address

    def _run(self) -> None:
        assert self._sock is not None
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            frames = self._sock.recv_multipart()
            try:
                if self.secret is not None:
                    frames = self.secret.unwrap(frames)
                if len(frames) != 1:
                    raise ProtocolError(f"token batch must be one frame, got {len(frames)}")
                iid, outputs = decode_batch(frames[0])
            except ProtocolError as exc:
                self.rejected += 1
                log.warning("dropped a malformed token batch: %s", exc)
                continue
            self.accepted += 1
            try:
                self.on_batch(iid, outputs)
            except Exception:
                log.exception("token batch handler failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self._guard is not None:
            self._guard.close()
            self._guard = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    @property
    def denied(self) -> int:
        """Peers refused at the CURVE handshake (unauthenticated messages count in ``rejected``)."""
        return self._guard.denied if self._guard is not None else 0


@dataclass
class OrderedStream:
    """Reassembles one request's tokens in output order, whatever instance sent them.

    ``push`` returns the tokens that became deliverable (in order) and whether the
    request is now finished; duplicates (an index already delivered or buffered) are dropped.
    """

    next_index: int = 0
    pending: dict[int, int] = field(default_factory=dict)
    finish_at: Optional[int] = None  # index of the last token
    finish_reason: Optional[FinishReason] = None
    owner: str = ""
    duplicates: int = 0

    def push(self, instance_id: str, out: RequestOutput) -> tuple[list[int], bool]:
        self.owner = instance_id
        for k, tok in enumerate(out.new_token_ids):
            i = out.index + k
            if i < self.next_index or i in self.pending:
                self.duplicates += 1
                continue
            self.pending[i] = tok
        if out.finish_reason is not None and self.finish_at is None:
            self.finish_at = out.index + len(out.new_token_ids) - 1
            self.finish_reason = out.finish_reason
        ready = []
        while self.next_index in self.pending:
            ready.append(self.pending.pop(self.next_index))
            self.next_index += 1
        done = self.finish_at is not None and self.next_index > self.finish_at
        return ready, done
