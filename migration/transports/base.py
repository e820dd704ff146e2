"""The transport interface: one server per destination instance, one connection per source.

Every transport moves the same messages (``migration.wire``) in the same
envelope: a msgpack header dict with the wire fields plus transport keys::

    request header  = {"seq": int, **wire_fields[, "x": {...transport extension...}]}
    request payload = tensor bytes (Blocks only), in a second frame or out of band
    reply header    = {"seq": int | None, "ok", "error", "block_ids"[, "fault": True][, "x": {...}]}

``seq`` pairs a reply with its request, so a reply arriving after its request
timed out is dropped. ``fault`` marks a reply the server produced itself (bad
input, handler raised) rather than the handler's own refusal; the client turns
faults into ``TransportError``.

``process_request`` is the destination's whole decode/validate/dispatch path,
shared by every server so that each one rejects bad input the same way.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import msgpack

from llumnix_py.errors import LlumnixError, ProtocolError
from migration import wire
from migration.security import SecretArg, SharedSecret, as_secret

if TYPE_CHECKING:  # annotations only: the configs and the CLI import this module without torch
    import torch

DEFAULT_MAX_MESSAGE_BYTES = wire.MAX_PAYLOAD_BYTES
MAX_HEADER_BYTES = 16 << 20  # a header frame, at most (a Commit of a long sequence is ~1 MiB)


class TransportError(LlumnixError, ConnectionError):
    """The destination could not be reached, timed out, or failed a request."""


Handler = Callable[[Any, Optional["torch.Tensor"]], dict]
"""(decoded wire message, payload tensor or None) -> reply header (``Reply(...).to_header()``)."""


def pack(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def unpack_header(frame: Any) -> Any:
    """Decode one msgpack header frame; ``ProtocolError`` on anything that is not msgpack."""
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header frame of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types (ExtraData, ValueError, TypeError, ...)
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}") from None


def take_seq(header: dict) -> Optional[int]:
    """Remove and validate the envelope's ``seq``; ``None`` when absent or invalid."""
    seq = header.pop("seq", None)
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**63:
        return None
    return seq


def fault(seq: Optional[int], error: str) -> dict[str, Any]:
    """A failure reply produced by the transport or by a handler that raised."""
    return {**wire.error_reply(error), "seq": seq, "fault": True}


class OutOfBandPayloads(abc.ABC):
    """Payloads that travel outside the header's connection (torch.distributed)."""

    @abc.abstractmethod
    def control(self, seq: int, x: dict, header: dict) -> Optional[dict]:
        """Handle a transport-only request (``x`` without ``nbytes``); return its reply header."""

    @abc.abstractmethod
    def receive(self, x: dict, msg: wire.Blocks) -> torch.Tensor:
        """Receive the payload of a validated ``Blocks`` announced by ``x``."""

    @abc.abstractmethod
    def discard(self, x: dict) -> None:
        """The request announced by ``x`` was rejected: consume (or give up) its payload."""


def process_request(header_frame: Any, payload: Optional[Any], handler: Handler, *,
                    max_message_bytes: int, oob: Optional[OutOfBandPayloads] = None) -> dict[str, Any]:
    """Decode, validate and dispatch one request; never raises, returns the reply header.

    Args:
        header_frame: the raw header bytes.
        payload: the payload buffer, or ``None``.
        handler: the destination's message handler.
        max_message_bytes: payloads larger than this are refused before anything is allocated.
        oob: out-of-band payloads and transport-only requests, announced by the
            envelope's ``x`` (``x["nbytes"]``: a Blocks payload follows out of band).
    """
    seq: Optional[int] = None
    x: Any = None
    received = False
    try:
        header = unpack_header(header_frame)
        if not isinstance(header, dict):
            raise ProtocolError(f"header must be a mapping, got {type(header).__name__}")
        seq = take_seq(header)
        if seq is None:
            raise ProtocolError("header lacks a valid seq")
        x = header.pop("x", None)
        if x is not None and (oob is None or not isinstance(x, dict)):
            x = None
            raise ProtocolError("this transport takes no extension field 'x'")
        if x is not None and "nbytes" not in x:
            return {**oob.control(seq, x, header), "seq": seq}  # type: ignore[union-attr]
        if x is not None and payload is not None:
            raise ProtocolError("payload sent both in band and out of band")
        if payload is not None:
            nbytes: Optional[int] = memoryview(payload).nbytes
        elif x is not None:
            nbytes = x["nbytes"]
            if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
                raise ProtocolError("x.nbytes must be a non-negative integer")
        else:
            nbytes = None
        if nbytes is not None and nbytes > max_message_bytes:
            raise ProtocolError(f"payload of {nbytes} bytes exceeds max_message_bytes={max_message_bytes}")
        msg = wire.decode_request(header, nbytes)
        tensor: Optional[torch.Tensor] = None
        if isinstance(msg, wire.Blocks):
            if payload is not None:
                tensor = wire.payload_to_tensor(payload, msg.dtype, msg.shape)
            else:
                received = True
                tensor = oob.receive(x, msg)  # type: ignore[union-attr,arg-type]
    except Exception as exc:  # bad input of any kind: answer, never crash the server
        if x is not None and "nbytes" in x and not received:
            try:
                oob.discard(x)  # type: ignore[union-attr]
            except Exception as exc2:
                exc = ProtocolError(f"{exc}; {exc2}")
        return fault(seq, str(exc) or type(exc).__name__)
    try:
        reply = handler(msg, tensor)
        if isinstance(reply, wire.Reply):
            reply = reply.to_header()
        wire.decode_reply(reply)  # a handler's bad reply fails here, not on the source
    except Exception as exc:
        return fault(seq, str(exc) or type(exc).__name__)
    return {**reply, "seq": seq}


class MigrationServer(abc.ABC):
    """Destination side: receives requests from any number of sources.

    Requests are handled one at a time, in arrival order, on the server's own
    thread; the handler's reply goes back to the sender. Bad input of any kind
    gets an ``ok=False`` reply and never reaches the handler. With a ``secret``
    (see ``migration.security``), peers that do not hold it never reach the
    handler either; servers bound beyond loopback without one log a warning.
    """

    name: str

    def __init__(self, handler: Handler, *, host: str = "127.0.0.1",
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, secret: SecretArg = None, **kw: Any) -> None:
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
        if kw:
            raise TypeError(f"{type(self).__name__}: unexpected options {sorted(kw)}")
        self.handler = handler
        self.host = host
        self.max_message_bytes = max_message_bytes
        self.secret: Optional[SharedSecret] = as_secret(secret)

    @abc.abstractmethod
    def start(self) -> str:
        """Bind, start serving, and return the address a source connects to."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop serving and release every resource (idempotent)."""


class MigrationTransport(abc.ABC):
    """Source side: a connection to one destination's ``MigrationServer``."""

    name: str

    def __init__(self, address: str, *, timeout_s: float = 5.0, chunk_blocks: int = 64, secret: SecretArg = None,
                 **kw: Any) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if chunk_blocks <= 0:
            raise ValueError(f"chunk_blocks must be positive, got {chunk_blocks}")
        if kw:
            raise TypeError(f"{type(self).__name__}: unexpected options {sorted(kw)}")
        self.address = address
        self.timeout_s = timeout_s
        self.chunk_blocks = chunk_blocks
        self.secret: Optional[SharedSecret] = as_secret(secret)

    @abc.abstractmethod
    def connect(self) -> None:
        """Open the connection (does not wait for the destination to be up)."""

    @abc.abstractmethod
    def call(self, message: wire.Message) -> wire.Reply:
        """Send a control message and wait for its reply.

        Returns the handler's reply, which may be a refusal (``ok=False``).

        Raises:
            TransportError: timeout, closed connection, or the destination failed
                the request (bad input, handler raised).
        """

    @abc.abstractmethod
    def send_blocks(self, migration_id: str, dst_block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Send KV data of ``len(dst_block_ids)`` blocks (``data.shape[0]`` blocks), pipelined in chunks.

        May return before the destination wrote them; ``data`` must stay unchanged until ``flush``.
        """

    @abc.abstractmethod
    def flush(self) -> None:
        """Wait for every ``Blocks`` sent so far; ``TransportError`` if any failed or timed out."""

    @abc.abstractmethod
    def close(self) -> None:
        """Drop the connection and anything pending (idempotent)."""

    def __enter__(self) -> "MigrationTransport":
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_blocks_args(dst_block_ids: Sequence[int], data: torch.Tensor) -> list[int]:
    """Validate ``send_blocks`` arguments on the source (misuse raises ``ValueError``)."""
    ids = [int(i) for i in dst_block_ids]
    if data.dim() < 1 or data.shape[0] != len(ids):
        raise ValueError(f"data.shape[0] must equal len(dst_block_ids)={len(ids)}, got shape {tuple(data.shape)}")
    if not ids:
        raise ValueError("send_blocks needs at least one block")
    wire.dtype_name(data.dtype)
    return ids


def chunk_bounds(n: int, chunk_blocks: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` splitting ``n`` blocks into chunks of at most ``chunk_blocks``."""
    return [(s, min(s + chunk_blocks, n)) for s in range(0, n, chunk_blocks)]


def reply_from_header(header: dict) -> tuple[wire.Reply, bool]:
    """(validated reply, is_fault) of a reply header whose ``seq`` was already taken."""
    is_fault = header.pop("fault", False) is True
    header.pop("x", None)
    return wire.decode_reply(header), is_fault
