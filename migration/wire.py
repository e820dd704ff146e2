"""Migration messages: schemas and strict validation of everything read off the network.

A message is a msgpack header (a dict, never pickle) plus, for KV data, one
tensor payload. The source sends requests, the destination answers each with a
``Reply``::

    source                                   destination
      PreAlloc(migration_id, request_id, n) ->  reserve n blocks  -> Reply(block_ids=...)
      Blocks(migration_id, ids, dtype, shape)
        + payload (shape[0] == len(ids))    ->  write KV blocks   -> Reply(ok)
      Commit(migration_id, state)           ->  adopt, parked     -> Reply(ok)
      Hold(migration_id, hold_s,            ->  start no step until  -> Reply(ok)
           [freeze_in_s])                       this migration activates or aborts,
                                                for hold_s at most past the source's
                                                freeze, due in freeze_in_s (answered
                                                at the step boundary; refused when
                                                waiting for that freeze would idle
                                                more than a part of a step here)
      Activate(migration_id)                ->  join running batch -> Reply(ok)
      Abort(migration_id, reason)           ->  free reservation  -> Reply(ok)
                                                (or a parked copy)
      Ping()                                ->                    -> Reply(ok)

A refusal the source must act on carries a typed ``ReplyCode`` beside its text
(``Abort`` of a migration the destination already committed answers
``ALREADY_COMMITTED``: the request lives on there, the source must not resume it).
A commit only parks the request; ``Activate`` (idempotent) lets it run, and an
``Abort`` that finds it parked drops it and answers ok: it never ran there
(``migration.ownership`` decides when neither message gets through).

``decode_request`` and ``decode_reply`` accept arbitrary decoded msgpack and
raise only ``ProtocolError``. Transports add their own envelope keys (``seq``)
and remove them before calling the decoders.
"""

from __future__ import annotations

import enum
import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

from llumnix_py.engines.types import MigrationRequestState
from llumnix_py.errors import InvalidRequestError, ProtocolError
from migration.protocol import MAX_HOLD_S

MAX_BLOCKS_PER_MESSAGE = 65536
MAX_PAYLOAD_BYTES = 1 << 30  # one Blocks payload, at most
MAX_ID_LEN = 256  # migration and request ids
MAX_TEXT_LEN = 4096  # abort reasons and reply errors
MAX_SHAPE_DIMS = 8
_MAX_INT = 2**63 - 1

if TYPE_CHECKING:
    import torch

# The dtypes a payload may have: wire name -> bytes per element. Checking a message needs
# no torch; ``torch_dtypes()`` (the names' torch dtypes) imports it on first use, so that the
# configs and the CLI, which import this module, start without it.
DTYPE_ITEMSIZE: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "uint8": 1}


@functools.cache
def torch_dtypes() -> dict[str, "torch.dtype"]:
    """Wire name -> torch dtype, for every name of ``DTYPE_ITEMSIZE``."""
    import torch

    return {name: getattr(torch, name) for name in DTYPE_ITEMSIZE}


@functools.cache
def _dtype_names() -> dict["torch.dtype", str]:
    return {v: k for k, v in torch_dtypes().items()}




@dataclass(frozen=True)
class PreAlloc:
    """Ask the destination to reserve ``num_blocks`` blocks for one migration stage."""

    migration_id: str
    request_id: str
    num_blocks: int
    TYPE = "pre_alloc"

    def to_header(self) -> dict[str, Any]:
        return {"type": self.TYPE, "migration_id": self.migration_id,
                "request_id": self.request_id, "num_blocks": self.num_blocks}


@dataclass(frozen=True)
class Blocks:
    """KV data of ``len(dst_block_ids)`` blocks; the tensor payload has ``shape``, ``shape[0]`` blocks."""

    migration_id: str
    dst_block_ids: tuple[int, ...]
    dtype: str
    shape: tuple[int, ...]
    TYPE = "blocks"

    @property
    def payload_nbytes(self) -> int:
        return payload_nbytes(self.dtype, self.shape)

    def to_header(self) -> dict[str, Any]:
        return {"type": self.TYPE, "migration_id": self.migration_id,
                "dst_block_ids": list(self.dst_block_ids), "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Commit:
    """Stop-and-copy is done: the destination adopts the request with this state."""

    migration_id: str
    state: MigrationRequestState
    TYPE = "commit"

    def to_header(self) -> dict[str, Any]:
        return {"type": self.TYPE, "migration_id": self.migration_id, "state": self.state.to_wire()}


@dataclass(frozen=True)
class Abort:
    """The migration is over without a commit: free what was reserved for it."""

    migration_id: str
    reason: str
    TYPE = "abort"

    def to_header(self) -> dict[str, Any]:
        return {"type": self.TYPE, "migration_id": self.migration_id, "reason": self.reason}


@dataclass(frozen=True)
class Activate:
    """The source freed its copy: the parked request joins the destination's batch."""

    migration_id: str
    TYPE = "activate"

    def to_header(self) -> dict[str, Any]:
        return {"type": self.TYPE, "migration_id": self.migration_id}


@dataclass(frozen=True)
class Hold:
    """The source is about to stop-and-copy this migration: the destination should start
    no engine step until it activates or aborts (or ``hold_s`` passed after the freeze), so
    that the last messages find its engine between steps and the request joins its very next
    step. ``freeze_in_s``: when the source expects to freeze the request (the rest of its
    step in progress; 0: at once), and ``source_step_s`` how long its steps take (0: unknown),
    so the destination can tell whether waiting for that freeze is worth idling for, and when
    the next one comes if it answers after it."""

    migration_id: str
    hold_s: float
    freeze_in_s: float = 0.0
    source_step_s: float = 0.0
    TYPE = "hold"

    def to_header(self) -> dict[str, Any]:
        header = {"type": self.TYPE, "migration_id": self.migration_id, "hold_s": float(self.hold_s)}
        for key in ("freeze_in_s", "source_step_s"):
            if getattr(self, key):
                header[key] = float(getattr(self, key))
        return header


@dataclass(frozen=True)
class Ping:
    """Liveness check."""

    TYPE = "ping"

    def to_header(self) -> dict[str, Any]:
        return {"type": self.TYPE}


Message = Union[PreAlloc, Blocks, Commit, Activate, Abort, Hold, Ping]


class ReplyCode(enum.Enum):
    """A refusal that the source acts on by its kind, not by its text."""

    ALREADY_COMMITTED = "already_committed"  # the destination adopted the request: never resume it on the source


@dataclass(frozen=True)
class Reply:
    """The destination's answer to one request.

    Attributes:
        ok: the request was carried out.
        error: why not, when ``ok`` is False (for people).
        block_ids: the blocks reserved by a ``PreAlloc``.
        code: the kind of refusal, when the source must act on it (only with ``ok`` False);
            on the wire only when set.
    """

    ok: bool
    error: Optional[str] = None
    block_ids: tuple[int, ...] = field(default=())
    code: Optional[ReplyCode] = None

    def __post_init__(self) -> None:
        if self.ok and self.code is not None:
            raise ValueError(f"a successful reply carries no refusal code, got {self.code}")

    @classmethod
    def already_committed(cls) -> "Reply":
        """The refusal of an ``Abort`` (or a repeated ``PreAlloc``) after the destination committed."""
        return cls(ok=False, error="already committed", code=ReplyCode.ALREADY_COMMITTED)

    @property
    def is_already_committed(self) -> bool:
        return self.code is ReplyCode.ALREADY_COMMITTED

    def to_header(self) -> dict[str, Any]:
        header: dict[str, Any] = {"ok": self.ok, "error": self.error, "block_ids": list(self.block_ids)}
        if self.code is not None:
            header["code"] = self.code.value
        return header


# ---------------------------------------------------------------- validation helpers


def _fields(header: Any, what: str, need: set[str], optional: frozenset[str] = frozenset()) -> dict:
    if not isinstance(header, dict):
        raise ProtocolError(f"{what}: header must be a mapping, got {type(header).__name__}")
    keys = set(header)
    bad_keys = [k for k in keys if not isinstance(k, str)]
    if bad_keys:
        raise ProtocolError(f"{what}: header keys must be strings")
    missing, extra = need - keys, keys - need - optional
    if missing or extra:
        raise ProtocolError(f"{what}: missing fields {sorted(missing)}, unexpected fields {sorted(extra)}")
    return header


def _int(v: Any, what: str, lo: int = 0, hi: int = _MAX_INT) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(f"{what} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ProtocolError(f"{what} must be in [{lo}, {hi}], got {v}")
    return v


def _seconds(v: Any, what: str, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ProtocolError(f"{what} must be a number, got {type(v).__name__}")
    if not (math.isfinite(v) and 0 < v <= hi):
        raise ProtocolError(f"{what} must be in (0, {hi}] seconds, got {v}")
    return float(v)


def _seconds_or_0(v: Any, what: str) -> float:
    """0 (none, or at once) or a duration in (0, ``MAX_HOLD_S``]."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != 0:
        return _seconds(v, what, MAX_HOLD_S)
    return 0.0


def _str(v: Any, what: str, max_len: int = MAX_ID_LEN, allow_empty: bool = False) -> str:
    if not isinstance(v, str):
        raise ProtocolError(f"{what} must be a string, got {type(v).__name__}")
    if len(v) > max_len:
        raise ProtocolError(f"{what} is longer than {max_len} characters")
    if not v and not allow_empty:
        raise ProtocolError(f"{what} must not be empty")
    return v


def _int_list(v: Any, what: str, max_len: int) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)):
        raise ProtocolError(f"{what} must be a list, got {type(v).__name__}")
    if len(v) > max_len:
        raise ProtocolError(f"{what} has {len(v)} entries, more than {max_len}")
    return tuple(_int(x, f"{what} entry") for x in v)


def payload_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``dtype`` (a name in ``DTYPE_ITEMSIZE``) and ``shape``."""
    return math.prod(shape) * DTYPE_ITEMSIZE[dtype]


# ---------------------------------------------------------------- decoders


def _decode_blocks(h: dict, payload_nbytes_: Optional[int]) -> Blocks:
    _fields(h, "blocks", {"type", "migration_id", "dst_block_ids", "dtype", "shape"})
    mid = _str(h["migration_id"], "migration_id")
    ids = _int_list(h["dst_block_ids"], "dst_block_ids", MAX_BLOCKS_PER_MESSAGE)
    if not ids:
        raise ProtocolError("blocks: dst_block_ids is empty")
    dtype = h["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_ITEMSIZE:
        raise ProtocolError(f"blocks: dtype {dtype!r} is not one of {sorted(DTYPE_ITEMSIZE)}")
    shape = _int_list(h["shape"], "shape", MAX_SHAPE_DIMS)
    if not shape:
        raise ProtocolError("blocks: shape is empty")
    if shape[0] != len(ids):
        raise ProtocolError(f"blocks: shape[0]={shape[0]} but {len(ids)} dst_block_ids")
    nbytes = payload_nbytes(dtype, shape)  # Python ints: no overflow
    if nbytes > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"blocks: payload of {nbytes} bytes exceeds MAX_PAYLOAD_BYTES={MAX_PAYLOAD_BYTES}")
    if payload_nbytes_ is None:
        raise ProtocolError("blocks: payload missing")
    if payload_nbytes_ != nbytes:
        raise ProtocolError(f"blocks: payload has {payload_nbytes_} bytes, header declares {nbytes}")
    return Blocks(mid, ids, dtype, shape)


def _decode_commit(h: dict) -> Commit:
    _fields(h, "commit", {"type", "migration_id", "state"})
    mid = _str(h["migration_id"], "migration_id")
    try:
        state = MigrationRequestState.from_wire(h["state"])
    except (InvalidRequestError, TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
        raise ProtocolError(f"commit: invalid request state: {exc}") from None
    if len(state.request_id) > MAX_ID_LEN:
        raise ProtocolError(f"commit: request_id is longer than {MAX_ID_LEN} characters")
    return Commit(mid, state)


def decode_request(header: Any, payload_nbytes: Optional[int]) -> Message:
    """Validate a decoded request header (envelope keys removed) and build its message.

    Args:
        header: whatever msgpack decoded.
        payload_nbytes: size of the tensor payload that came with it, ``None`` when none did.

    Raises:
        ProtocolError: on any deviation from the schema.
    """
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a mapping, got {type(header).__name__}")
    kind = header.get("type")
    if kind == Blocks.TYPE:
        return _decode_blocks(header, payload_nbytes)
    if payload_nbytes is not None:
        raise ProtocolError(f"{kind!r} message must not carry a payload")
    if kind == PreAlloc.TYPE:
        h = _fields(header, "pre_alloc", {"type", "migration_id", "request_id", "num_blocks"})
        return PreAlloc(_str(h["migration_id"], "migration_id"), _str(h["request_id"], "request_id"),
                        _int(h["num_blocks"], "num_blocks", 0, MAX_BLOCKS_PER_MESSAGE))
    if kind == Commit.TYPE:
        return _decode_commit(header)
    if kind == Abort.TYPE:
        h = _fields(header, "abort", {"type", "migration_id", "reason"})
        return Abort(_str(h["migration_id"], "migration_id"),
                     _str(h["reason"], "reason", MAX_TEXT_LEN, allow_empty=True))
    if kind == Activate.TYPE:
        h = _fields(header, "activate", {"type", "migration_id"})
        return Activate(_str(h["migration_id"], "migration_id"))
    if kind == Hold.TYPE:
        h = _fields(header, "hold", {"type", "migration_id", "hold_s"}, frozenset({"freeze_in_s", "source_step_s"}))
        return Hold(_str(h["migration_id"], "migration_id"), _seconds(h["hold_s"], "hold_s", MAX_HOLD_S),
                    _seconds_or_0(h.get("freeze_in_s", 0.0), "freeze_in_s"),
                    _seconds_or_0(h.get("source_step_s", 0.0), "source_step_s"))
    if kind == Ping.TYPE:
        _fields(header, "ping", {"type"})
        return Ping()
    shown = kind if isinstance(kind, str) and len(kind) <= 64 else type(kind).__name__
    raise ProtocolError(f"unknown message type {shown!r}")


def decode_reply(header: Any) -> Reply:
    """Validate a decoded reply header (envelope keys removed). Raises ``ProtocolError``."""
    h = _fields(header, "reply", {"ok", "error", "block_ids"}, frozenset({"code"}))
    if not isinstance(h["ok"], bool):
        raise ProtocolError("reply: ok must be a boolean")
    err = h["error"]
    if err is not None:
        err = _str(err, "reply error", MAX_TEXT_LEN, allow_empty=True)
    ids = _int_list(h["block_ids"], "reply block_ids", MAX_BLOCKS_PER_MESSAGE)
    code = _reply_code(h["code"]) if "code" in h else None
    if code is not None and h["ok"]:
        raise ProtocolError("reply: a successful reply carries no refusal code")
    return Reply(h["ok"], err, ids, code)


_REPLY_CODES = {c.value: c for c in ReplyCode}


def _reply_code(v: Any) -> ReplyCode:
    if not isinstance(v, str) or v not in _REPLY_CODES:
        shown = v if isinstance(v, str) and len(v) <= 64 else type(v).__name__
        raise ProtocolError(f"reply: code {shown!r} is not one of {sorted(_REPLY_CODES)}")
    return _REPLY_CODES[v]


def error_reply(error: str) -> dict[str, Any]:
    """The header of a failure reply, with ``error`` cut to ``MAX_TEXT_LEN``."""
    return Reply(False, str(error)[:MAX_TEXT_LEN]).to_header()


# ---------------------------------------------------------------- tensor payloads


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype; ``ProtocolError`` when the dtype cannot travel."""
    try:
        return _dtype_names()[dtype]
    except KeyError:
        raise ProtocolError(f"dtype {dtype} cannot be sent; supported: {sorted(DTYPE_ITEMSIZE)}") from None


def tensor_to_payload(t: torch.Tensor) -> tuple[str, tuple[int, ...], memoryview]:
    """``(dtype name, shape, bytes)`` of a contiguous CPU tensor, without copying.

    The memoryview aliases the tensor's memory (and keeps it alive): do not
    write to the tensor until the payload is sent.
    """
    if t.device.type != "cpu":
        raise ValueError(f"tensor_to_payload needs a CPU tensor, got {t.device}")
    if not t.is_contiguous():
        raise ValueError("tensor_to_payload needs a contiguous tensor")
    import torch

    name = dtype_name(t.dtype)
    # bfloat16 has no numpy dtype: view the same memory as bytes first.
    flat = t.detach().reshape(-1).view(torch.uint8)
    return name, tuple(t.shape), memoryview(flat.numpy()).cast("B")


def payload_to_tensor(buf: Any, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of ``dtype``/``shape`` over ``buf`` (any bytes-like object), without copying.

    The tensor keeps ``buf`` alive. A read-only ``buf`` gives a tensor one must not write to.
    """
    import torch

    mv = memoryview(buf).cast("B")
    if mv.nbytes != payload_nbytes(dtype, tuple(shape)):
        raise ProtocolError(f"payload has {mv.nbytes} bytes, {dtype}{list(shape)} needs "
                            f"{payload_nbytes(dtype, tuple(shape))}")
    if mv.nbytes == 0:
        return torch.empty(tuple(shape), dtype=torch_dtypes()[dtype])
    flat = _frombuffer(mv)
    return flat.view(torch_dtypes()[dtype]).view(tuple(shape))


def _frombuffer(mv: memoryview) -> "torch.Tensor":
    import torch

    if mv.readonly:
        # Received frames are read-only; torch warns once about that. The handler
        # only reads (copies into its KV cache), so the warning is noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(mv, dtype=torch.uint8)
    return torch.frombuffer(mv, dtype=torch.uint8)
