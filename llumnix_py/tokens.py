"""The token path, llumlet side: the wire format of token batches and the sinks that send them.

Wire format (one ZeroMQ message, msgpack, never pickle)::

    {"v": 2, "instance_id": str,
     "outputs": [[request_id, index, [token, ...], finish_reason | None, logprobs, prompt_logprobs], ...]}

    logprobs:        None, or one [logprob, [[token, logprob], ...]] per token (the top alternatives)
    prompt_logprobs: None, or (only at index 0) one entry per prompt token: None for the first,
                     then [logprob, [[token, logprob], ...]]

``index`` is the output position of the first token, so a frontend drops
duplicates and reorders by position: a stream stays exact across migrations
(the frontend side, ``TokenReceiver`` and ``OrderedStream``, is in ``llumnix_py.frontend``).

A ``secret`` (``migration.security``) on both the sinks and the receiver keeps
peers that do not hold it from injecting tokens (CURVE, or an HMAC tag frame).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import msgpack
import zmq

from llumnix_py.engines.types import MAX_LOGPROBS, FinishReason, RequestOutput, TokenLogprob
from llumnix_py.errors import ProtocolError
from migration.security import SecretArg, as_secret

MAX_BATCH_BYTES = 16 << 20
MAX_OUTPUTS = 65536
MAX_TOKENS_PER_OUTPUT = 65536
MAX_PROMPT_LOGPROBS = 1 << 20
VERSION = 2


def encode_batch(instance_id: str, outputs: Sequence[RequestOutput]) -> bytes:
    return msgpack.packb({
        "v": VERSION,
        "instance_id": instance_id,
        "outputs": [[o.request_id, o.index, list(o.new_token_ids), o.finish_reason.value if o.finish_reason else None,
                     None if o.logprobs is None else [_lp(x) for x in o.logprobs],
                     None if o.prompt_logprobs is None else [None if x is None else _lp(x) for x in o.prompt_logprobs]]
                    for o in outputs],
    })


def _lp(x: TokenLogprob) -> list:
    return [x.logprob, [[t, v] for t, v in x.top]]


def _decode_lp(v: object) -> TokenLogprob:
    if not isinstance(v, list) or len(v) != 2 or not _logprob(v[0]) or not isinstance(v[1], list) \
            or len(v[1]) > MAX_LOGPROBS:
        raise ProtocolError("token logprob must be [logprob, [[token, logprob], ...]] (at most 20)")
    top = []
    for pair in v[1]:
        if not isinstance(pair, list) or len(pair) != 2 or not _token(pair[0]) or not _logprob(pair[1]):
            raise ProtocolError("top logprob must be [token, logprob]")
        top.append((pair[0], pair[1]))
    return TokenLogprob(v[0], tuple(top))


def _token(t: object) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 31


def _logprob(v: object) -> bool:
    """A float that is a log probability: not NaN, not +inf (-inf: a token with no chance)."""
    return isinstance(v, float) and v == v and v != float("inf")


def decode_batch(data: bytes) -> tuple[str, list[RequestOutput]]:
    """Validate and decode a token batch; raises ``ProtocolError`` on anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) > MAX_BATCH_BYTES:
        raise ProtocolError("token batch missing or too large")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True, max_array_len=MAX_OUTPUTS,
                              max_bin_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several types for malformed input
        raise ProtocolError(f"token batch is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(msg, dict) or set(msg) != {"v", "instance_id", "outputs"} or msg["v"] != VERSION:
        raise ProtocolError(f"token batch must be a map with keys v={VERSION}, instance_id, outputs")
    iid, outs = msg["instance_id"], msg["outputs"]
    if not isinstance(iid, str) or not 0 < len(iid) <= 256 or not isinstance(outs, list):
        raise ProtocolError("token batch instance_id or outputs malformed")
    result = []
    for item in outs:
        if not isinstance(item, list) or len(item) != 6:
            raise ProtocolError("token output must be [request_id, index, tokens, finish_reason, logprobs, "
                                "prompt_logprobs]")
        rid, index, toks, fin, lps, plps = item
        if not isinstance(rid, str) or not 0 < len(rid) <= 256:
            raise ProtocolError("token output request_id malformed")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 1 << 31:
            raise ProtocolError("token output index malformed")
        if not isinstance(toks, list) or len(toks) > MAX_TOKENS_PER_OUTPUT or not all(_token(t) for t in toks):
            raise ProtocolError("token output tokens malformed")
        if lps is not None and (not isinstance(lps, list) or len(lps) != len(toks)):
            raise ProtocolError("token output logprobs must be None or one entry per token")
        if plps is not None and (not isinstance(plps, list) or not 0 < len(plps) <= MAX_PROMPT_LOGPROBS
                                 or index != 0 or plps[0] is not None):
            raise ProtocolError("prompt logprobs must be None or, at index 0, a list starting with None")
        logprobs = None if lps is None else tuple(_decode_lp(x) for x in lps)
        prompt = None if plps is None else (None,) + tuple(_decode_lp(x) for x in plps[1:])
        try:
            reason = FinishReason(fin) if fin is not None else None
        except ValueError:
            raise ProtocolError(f"unknown finish reason {fin!r}") from None
        result.append(RequestOutput(rid, tuple(toks), index, reason, logprobs, prompt))
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
