"""torch.distributed transports: ``gloo`` (CPU tensors) and ``nccl`` (CUDA tensors), one code path.

Headers and control messages travel over an embedded zmq connection (the zmq
classes, by composition); Blocks payloads travel point to point over a process
group of world size 2 that belongs to this one connection (never the global
default group, so an instance can hold many)::

    source (rank 0)                                  destination (rank 1)
      zmq {"x": {"ctl": "connect"}}       ------->    new key; reply store host/port + key
      ProcessGroup(PrefixStore(key, TCPStore), 0, 2)  ProcessGroup(PrefixStore(key, TCPStore), 1, 2)
      zmq Blocks header, x={conn, nbytes, tag} --->   validate header (size first!)
      pg.send([chunk], 1, tag)            =======>    t = empty(shape, dtype); pg.recv([t], 0, tag)
                                                      handler(Blocks, t) -> reply over zmq

If the destination rejects a header it still receives (and drops) the announced
payload when its size is within ``max_message_bytes``; otherwise, or when a
receive fails, it drops the whole connection and the source reconnects on its
next ``send_blocks``.
"""

from __future__ import annotations

import collections
import datetime
import threading
import uuid
from concurrent.futures import Future
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from llumnix_py.errors import ProtocolError
from migration import wire
from migration.transports.base import (DEFAULT_MAX_MESSAGE_BYTES, Handler, MigrationServer, MigrationTransport,
                                       OutOfBandPayloads, TransportError, check_blocks_args, chunk_bounds,
                                       reply_from_header)
from migration.security import SecretArg
from migration.transports.zmq_transport import ZmqMigrationServer, ZmqMigrationTransport

MAX_CONNECTIONS = 64  # per server; the oldest connection is dropped beyond this
_MAX_TAG = 2**31 - 1
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _make_pg(backend: str, store: Any, key: str, rank: int, timeout_s: float, host: str) -> Any:
    """A world-size-2 process group for one connection (blocks until both ranks join)."""
    prefixed = dist.PrefixStore(f"llumnix-migration/{key}", store)
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host) if host in _LOOPBACK
                         else dist.ProcessGroupGloo.create_default_device()]
        return dist.ProcessGroupGloo(prefixed, rank, 2, opts)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, 2, opts)
    raise ValueError(f"unknown torch.distributed backend {backend!r}")


def _drop_pg(pg: Any) -> None:
    try:
        pg.abort()
    except Exception:  # already broken: nothing more to release
        pass


class _DestinationSide(OutOfBandPayloads):
    """The destination's half: hosts the TCPStore, builds one process group per connection."""

    def __init__(self, backend: str, host: str, timeout_s: float, max_message_bytes: int, device: torch.device) -> None:
        self.backend, self.host, self.timeout_s = backend, host, timeout_s
        self.max_message_bytes, self.device = max_message_bytes, device
        self.store: Any = None
        self._conns: "collections.OrderedDict[str, Future]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def start(self) -> None:
        self.store = dist.TCPStore(self.host, 0, None, True, datetime.timedelta(seconds=self.timeout_s),
                                   wait_for_workers=False)

    def stop(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), collections.OrderedDict()
        for fut in conns:
            if fut.done() and fut.exception() is None:
                _drop_pg(fut.result())
        self.store = None

    # -- OutOfBandPayloads

    def control(self, seq: int, x: dict, header: dict) -> Optional[dict]:
        if header or set(x) - {"ctl", "conn"}:
            raise ProtocolError("transport control request carries unexpected fields")
        ctl = x.get("ctl")
        if ctl == "connect":
            key = uuid.uuid4().hex
            fut: Future = Future()
            with self._lock:
                self._conns[key] = fut
                evicted = [self._conns.popitem(last=False)[1] for _ in range(len(self._conns) - MAX_CONNECTIONS)]
            for old in evicted:
                if old.done() and old.exception() is None:
                    _drop_pg(old.result())
            threading.Thread(target=self._build, args=(key, fut), daemon=True, name=f"pg-{key[:8]}").start()
            return {**wire.Reply(True).to_header(),
                    "x": {"conn": key, "store_host": self.host, "store_port": self.store.port}}
        if ctl == "disconnect":
            self._drop(x.get("conn"))
            return wire.Reply(True).to_header()
        raise ProtocolError(f"unknown transport control request {ctl!r}")

    def _build(self, key: str, fut: Future) -> None:
        try:
            fut.set_result(_make_pg(self.backend, self.store, key, 1, self.timeout_s, self.host))
        except Exception as exc:
            fut.set_exception(TransportError(f"process group for connection {key} failed: {exc}"))
            self._drop(key)

    def _drop(self, key: Any) -> None:
        with self._lock:
            fut = self._conns.pop(key, None) if isinstance(key, str) else None
        if fut is not None and fut.done() and fut.exception() is None:
            _drop_pg(fut.result())

    def _pg_and_tag(self, x: dict) -> tuple[str, Any, int]:
        key, tag = x.get("conn"), x.get("tag")
        if set(x) != {"conn", "nbytes", "tag"}:
            raise ProtocolError(f"blocks: transport fields must be conn, nbytes, tag; got {sorted(map(str, x))}")
        if isinstance(tag, bool) or not isinstance(tag, int) or not 0 <= tag <= _MAX_TAG:
            raise ProtocolError("blocks: invalid payload tag")
        with self._lock:
            fut = self._conns.get(key) if isinstance(key, str) else None
        if fut is None:
            raise TransportError("unknown or dropped connection; reconnect")
        try:
            return key, fut.result(timeout=self.timeout_s), tag
        except Exception as exc:
            self._drop(key)
            raise TransportError(f"connection not established: {exc}") from None

    def _recv_into(self, key: str, pg: Any, t: torch.Tensor, tag: int) -> None:
        try:
            pg.recv([t], 0, tag).wait(datetime.timedelta(seconds=self.timeout_s))
        except Exception as exc:
            self._drop(key)
            raise TransportError(f"payload not received, connection dropped: {exc}") from None

    def receive(self, x: dict, msg: wire.Blocks) -> torch.Tensor:
        key, pg, tag = self._pg_and_tag(x)  # header and size were validated before we get here
        t = torch.empty(msg.shape, dtype=wire.torch_dtypes()[msg.dtype], device=self.device)
        self._recv_into(key, pg, t, tag)
        return t

    def discard(self, x: dict) -> None:
        nbytes = x.get("nbytes")
        try:
            key, pg, tag = self._pg_and_tag(x)
        except ProtocolError:
            self._drop(x.get("conn"))
            raise TransportError("connection dropped") from None
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 <= nbytes <= self.max_message_bytes:
            self._drop(key)
            raise TransportError("payload too large to drain, connection dropped")
        self._recv_into(key, pg, torch.empty(nbytes, dtype=torch.uint8, device=self.device), tag)


class GlooMigrationServer(MigrationServer):
    """Destination: a zmq server for headers plus per-connection process groups for payloads.

    Args:
        timeout_s: how long to wait for a process group to form or a payload to arrive.
        device: where received payloads are allocated (``cpu`` for gloo, a CUDA device for nccl).
        bind: explicit zmq address for the header connection.
        secret: shared secret for the zmq header connection (``migration.security``). The
            process group's TCPStore and gloo/NCCL payload links are not authenticated: only a
            source that passed the zmq handshake learns the per-connection key.
    """

    name = "gloo"
    backend = "gloo"

    def __init__(self, handler: Handler, *, host: str = "127.0.0.1",
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, timeout_s: float = 5.0,
                 device: Optional[str] = None, bind: Optional[str] = None, secret: SecretArg = None) -> None:
        super().__init__(handler, host=host, max_message_bytes=max_message_bytes, secret=secret)
        dev = torch.device(device) if device is not None else self._default_device()
        self._dst = _DestinationSide(self.backend, host, timeout_s, max_message_bytes, dev)
        self._zmq = ZmqMigrationServer(handler, host=host, max_message_bytes=max_message_bytes, bind=bind,
                                       oob=self._dst, secret=self.secret)

    @staticmethod
    def _default_device() -> torch.device:
        return torch.device("cpu")

    def start(self) -> str:
        self._dst.start()
        try:
            return self._zmq.start()
        except Exception:
            self._dst.stop()
            raise

    def stop(self) -> None:
        self._zmq.stop()
        self._dst.stop()


class GlooMigrationTransport(MigrationTransport):
    """Source: control over zmq, Blocks payloads over this connection's own process group."""

    name = "gloo"
    backend = "gloo"

    def __init__(self, address: str, *, timeout_s: float = 5.0, chunk_blocks: int = 64,
                 secret: SecretArg = None) -> None:
        super().__init__(address, timeout_s=timeout_s, chunk_blocks=chunk_blocks, secret=secret)
        self._ctl = ZmqMigrationTransport(address, timeout_s=timeout_s, chunk_blocks=chunk_blocks,
                                          secret=self.secret)
        self._pg: Any = None
        self._conn: Optional[str] = None
        self._store: Any = None
        self._works: list = []
        self._tag = 0

    def _device(self) -> torch.device:
        return torch.device("cpu")

    def connect(self) -> None:
        self._ctl.connect()  # the process group forms lazily, on the first send_blocks

    def _ensure_pg(self) -> Any:
        if self._pg is not None:
            return self._pg
        header = self._ctl.request({"x": {"ctl": "connect"}})
        x = header.get("x")
        reply, is_fault = reply_from_header(dict(header))
        if is_fault or not reply.ok or not isinstance(x, dict):
            raise TransportError(f"{self.address} refused a {self.backend} connection: {reply.error}")
        host, port, key = x.get("store_host"), x.get("store_port"), x.get("conn")
        if not (isinstance(host, str) and isinstance(port, int) and isinstance(key, str)):
            raise TransportError(f"malformed {self.backend} handshake reply from {self.address}")
        try:
            self._store = dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=self.timeout_s))
            self._pg = _make_pg(self.backend, self._store, key, 0, self.timeout_s, host)
        except Exception as exc:
            self._store = None
            raise TransportError(f"{self.backend} process group with {self.address} failed: {exc}") from None
        self._conn, self._tag = key, 0
        return self._pg

    def _drop(self) -> None:
        if self._pg is not None:
            _drop_pg(self._pg)
        self._pg, self._conn, self._store, self._works = None, None, None, []

    def call(self, message: wire.Message) -> wire.Reply:
        return self._ctl.call(message)

    def send_blocks(self, migration_id: str, dst_block_ids: Sequence[int], data: torch.Tensor) -> None:
        ids = check_blocks_args(dst_block_ids, data)
        data = data.detach().to(self._device()).contiguous()
        pg = self._ensure_pg()
        for s, e in chunk_bounds(len(ids), self.chunk_blocks):
            chunk = data[s:e]
            header = wire.Blocks(migration_id, tuple(ids[s:e]), wire.dtype_name(chunk.dtype),
                                 tuple(chunk.shape)).to_header()
            self._tag = self._tag % _MAX_TAG + 1
            nbytes = chunk.numel() * chunk.element_size()
            try:
                self._ctl.post({**header, "x": {"conn": self._conn, "nbytes": nbytes, "tag": self._tag}}, None, chunk)
                self._works.append((pg.send([chunk], 1, self._tag), chunk))
            except TransportError:
                self._drop()
                raise
            except Exception as exc:
                self._drop()
                raise TransportError(f"{self.backend} send to {self.address} failed: {exc}") from None

    def flush(self) -> None:
        try:
            self._ctl.flush()
        except TransportError:
            self._drop()
            raise
        works, self._works = self._works, []
        try:
            for work, _chunk in works:  # every payload was received: these complete at once
                work.wait(datetime.timedelta(seconds=self.timeout_s))
        except Exception as exc:
            self._drop()
            raise TransportError(f"{self.backend} send to {self.address} failed: {exc}") from None

    def close(self) -> None:
        if self._conn is not None and self._ctl.is_open:
            try:
                self._ctl.timeout_s = min(self.timeout_s, 1.0)
                self._ctl.request({"x": {"ctl": "disconnect", "conn": self._conn}})
            except TransportError:
                pass  # best effort: the destination drops stale connections itself
        self._drop()
        self._ctl.close()


class NcclMigrationServer(GlooMigrationServer):
    """Destination over NCCL: payloads land on a CUDA device (default: the current one)."""

    name = "nccl"
    backend = "nccl"

    @staticmethod
    def _default_device() -> torch.device:
        return torch.device("cuda", torch.cuda.current_device())


class NcclMigrationTransport(GlooMigrationTransport):
    """Source over NCCL: Blocks data must be (or is moved) on the current CUDA device."""

    name = "nccl"
    backend = "nccl"

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device())


GLOO_TRANSPORT = (GlooMigrationServer, GlooMigrationTransport)  # named by the transport registry
NCCL_TRANSPORT = (NcclMigrationServer, NcclMigrationTransport)
