"""In-process transport for tests and the simulator: no sockets, same validation.

The server registers itself under ``inproc://<name>`` in a process-wide table;
a client calls the server's handler directly on the caller's thread (one call
at a time per server), after packing the header with msgpack and running the
full ``process_request`` path, so bad input is rejected exactly as over zmq.
Payload bytes are copied, as if they had moved. Nothing leaves the process, so
a ``secret`` is accepted (same signature as every transport) and checked the
only way that matters here: a client whose secret differs from the server's
is refused.
"""

from __future__ import annotations

import threading
import uuid
from typing import Optional, Sequence

import torch

from migration import wire
from migration.security import SecretArg, SharedSecret
from migration.transports.base import (DEFAULT_MAX_MESSAGE_BYTES, Handler, MigrationServer, MigrationTransport,
                                       TransportError, check_blocks_args, chunk_bounds, pack, process_request,
                                       reply_from_header, take_seq, unpack_header)

_SERVERS: dict[str, "InprocMigrationServer"] = {}
_SERVERS_LOCK = threading.Lock()
PREFIX = "inproc://"


class InprocMigrationServer(MigrationServer):
    """A handler reachable at ``inproc://<name>`` (a fresh unique name unless ``bind`` gives one)."""

    name = "inproc"

    def __init__(self, handler: Handler, *, host: str = "127.0.0.1",
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, bind: Optional[str] = None,
                 secret: SecretArg = None) -> None:
        super().__init__(handler, host=host, max_message_bytes=max_message_bytes, secret=secret)
        if bind is not None and not bind.startswith(PREFIX):
            raise ValueError(f"inproc address must start with {PREFIX!r}, got {bind!r}")
        self.bind = bind
        self.address: Optional[str] = None
        self._lock = threading.Lock()

    def start(self) -> str:
        address = self.bind or f"{PREFIX}{uuid.uuid4().hex}"
        with _SERVERS_LOCK:
            if address in _SERVERS:
                raise TransportError(f"{address} is already in use")
            _SERVERS[address] = self
        self.address = address
        return address

    def stop(self) -> None:
        with _SERVERS_LOCK:
            if self.address is not None and _SERVERS.get(self.address) is self:
                del _SERVERS[self.address]
        self.address = None

    def deliver(self, frames: list[bytes], timeout_s: float) -> bytes:
        """Process one request (header[, payload] frames) and return the packed reply."""
        if not self._lock.acquire(timeout=timeout_s):
            raise TransportError(f"{self.address} busy for more than {timeout_s}s")
        try:
            payload = frames[1] if len(frames) == 2 else None
            return pack(process_request(frames[0], payload, self.handler, max_message_bytes=self.max_message_bytes))
        finally:
            self._lock.release()


class InprocMigrationTransport(MigrationTransport):
    """Calls an ``InprocMigrationServer`` of this process synchronously."""

    name = "inproc"

    def __init__(self, address: str, *, timeout_s: float = 5.0, chunk_blocks: int = 64,
                 secret: SecretArg = None) -> None:
        super().__init__(address, timeout_s=timeout_s, chunk_blocks=chunk_blocks, secret=secret)
        self._connected = False
        self._seq = 0
        self._errors: list[str] = []

    def connect(self) -> None:
        self._connected = True

    def close(self) -> None:
        self._connected = False
        self._errors.clear()

    def _roundtrip(self, header: dict, payload: Optional[bytes]) -> dict:
        if not self._connected:
            raise TransportError(f"connection to {self.address} is closed (call connect())")
        with _SERVERS_LOCK:
            server = _SERVERS.get(self.address)
        if server is None:
            raise TransportError(f"no migration server at {self.address}")
        if _mechanism_key(server.secret) != _mechanism_key(self.secret):
            raise TransportError(f"{self.address} refused the connection: shared secret mismatch")
        self._seq += 1
        frames = [pack({**header, "seq": self._seq})] + ([payload] if payload is not None else [])
        reply = unpack_header(server.deliver(frames, self.timeout_s))
        if not isinstance(reply, dict) or take_seq(reply) != self._seq:
            raise TransportError(f"reply from {self.address} does not match its request")
        return reply

    def call(self, message: wire.Message) -> wire.Reply:
        reply, is_fault = reply_from_header(self._roundtrip(message.to_header(), None))
        if is_fault:
            raise TransportError(f"{self.address} failed {type(message).__name__}: {reply.error}")
        return reply

    def send_blocks(self, migration_id: str, dst_block_ids: Sequence[int], data: torch.Tensor) -> None:
        ids = check_blocks_args(dst_block_ids, data)
        data = data.detach().cpu().contiguous()
        for s, e in chunk_bounds(len(ids), self.chunk_blocks):
            dtype, shape, buf = wire.tensor_to_payload(data[s:e])
            header = wire.Blocks(migration_id, tuple(ids[s:e]), dtype, shape).to_header()
            reply, _ = reply_from_header(self._roundtrip(header, bytes(buf)))  # bytes(): the data moves
            if not reply.ok:
                self._errors.append(reply.error or "rejected")

    def flush(self) -> None:
        errors, self._errors = self._errors, []
        if errors:
            raise TransportError(f"{self.address} rejected {len(errors)} block messages: {errors[0]}")


def _mechanism_key(secret: Optional[SharedSecret]) -> Optional[bytes]:
    return None if secret is None else secret.tag(b"inproc")


INPROC_TRANSPORT = (InprocMigrationServer, InprocMigrationTransport)  # named by the transport registry
