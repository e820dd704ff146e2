"""ZeroMQ transport (the default): msgpack headers plus zero-copy payload frames.

    source (DEALER)                                  destination (ROUTER, own thread)
      [header]            ----- control ----->        process_request -> handler
      [header, payload]   ----- Blocks k  ---->       (payload frame -> tensor, no copy)
      [header, payload]   ----- Blocks k+1 --->
      <----------------- [reply(seq)] ----------      replies in arrival order

``send_blocks`` queues every chunk (a view of the caller's tensor, sent with
``copy=False``) and returns; zmq's I/O thread sends chunk k while the caller
queues chunk k+1 or packs its next stage. ``flush`` collects the replies.
On a timeout the client drops its socket and opens a fresh one, so nothing
queued before the timeout reaches the destination afterwards.

With ``secret=`` (``migration.security``) both ends authenticate: CURVE keys
derived from the secret, or an HMAC tag frame in front of every message.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional, Sequence

import torch
import zmq

from migration import wire
from migration.security import AuthenticationError, SecretArg, ServerGuard, warn_if_exposed
from migration.transports.base import (DEFAULT_MAX_MESSAGE_BYTES, MAX_HEADER_BYTES, Handler, MigrationServer,
                                       MigrationTransport, OutOfBandPayloads, TransportError, chunk_bounds,
                                       check_blocks_args, fault, pack, process_request, reply_from_header,
                                       take_seq, unpack_header)

logger = logging.getLogger(__name__)

_POLL_MS = 50  # how often the server thread checks for stop()


class ZmqMigrationServer(MigrationServer):
    """ROUTER socket served by one thread.

    Args:
        handler: the destination's message handler.
        host: interface for the default ``tcp://host:<free port>`` address.
        max_message_bytes: largest payload accepted; zmq drops larger frames
            (``MAXMSGSIZE``, before allocating) and the header check refuses them.
        bind: an explicit address to bind instead (``tcp://...``, ``ipc://...``).
        oob: out-of-band payload hooks (torch.distributed composes this server).
        secret: shared secret peers must hold (``None``: no authentication, fine on loopback).
    """

    name = "zmq"

    def __init__(self, handler: Handler, *, host: str = "127.0.0.1",
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, bind: Optional[str] = None,
                 oob: Optional[OutOfBandPayloads] = None, secret: SecretArg = None) -> None:
        super().__init__(handler, host=host, max_message_bytes=max_message_bytes, secret=secret)
        self.bind = bind
        self.oob = oob
        self.address: Optional[str] = None
        self.unauthenticated = 0  # messages dropped for a missing or wrong tag (hmac)
        self._guard: Optional[ServerGuard] = None
        self._ctx: Optional[zmq.Context] = None
        self._sock: Optional[zmq.Socket] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()

    def start(self) -> str:
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max(self.max_message_bytes, MAX_HEADER_BYTES))
        sock.setsockopt(zmq.SNDHWM, 0)  # replies are small; never drop one
        try:
            if self.secret is not None:
                self._guard = self.secret.secure_server(self._ctx, sock)
            sock.bind(self.bind or f"tcp://{self.host}:*")
        except zmq.ZMQError as exc:
            sock.close()
            self._close_guard()
            self._ctx.term()
            raise TransportError(f"cannot bind {self.bind or self.host}: {exc}") from exc
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        warn_if_exposed(self.address, self.secret, "migration server")
        self._sock = sock
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name=f"zmq-migration-server-{self.address}", daemon=True)
        self._thread.start()
        return self.address

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join()
        self._thread = None
        self._close_guard()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def _close_guard(self) -> None:
        if self._guard is not None:
            self._guard.close()
            self._guard = None

    @property
    def denied(self) -> int:
        """Peers or messages refused for lacking the shared secret."""
        return self.unauthenticated + (self._guard.denied if self._guard is not None else 0)

    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                if not poller.poll(_POLL_MS):
                    continue
                frames = sock.recv_multipart(copy=False)
                identity, body = frames[0].bytes, frames[1:]
                if self.secret is not None:
                    try:
                        body = self.secret.unwrap(body)
                    except AuthenticationError as exc:
                        self.unauthenticated += 1  # no reply: an outsider learns nothing
                        logger.warning("migration server %s: %s", self.address, exc)
                        continue
                try:
                    reply = pack(self._process(body))
                    out = self.secret.wrap([reply]) if self.secret is not None else [reply]
                    sock.send_multipart([identity, *out])
                except Exception:  # keep serving whatever happens to one message
                    logger.exception("migration server %s: failed to answer a request", self.address)
        finally:
            sock.close(linger=0)
            self._sock = None

    def _process(self, body: list) -> dict[str, Any]:
        if len(body) not in (1, 2):
            seq = None
            if body:
                try:
                    h = unpack_header(body[0].buffer)
                    seq = take_seq(h) if isinstance(h, dict) else None
                except Exception:
                    pass
            return fault(seq, f"expected 1 or 2 frames (header[, payload]), got {len(body)}")
        payload = body[1].buffer if len(body) == 2 else None
        return process_request(body[0].buffer, payload, self.handler,
                               max_message_bytes=self.max_message_bytes, oob=self.oob)


class ZmqMigrationTransport(MigrationTransport):
    """DEALER connection to one ``ZmqMigrationServer``. Use from one thread at a time."""

    name = "zmq"

    def __init__(self, address: str, *, timeout_s: float = 5.0, chunk_blocks: int = 64,
                 secret: SecretArg = None) -> None:
        super().__init__(address, timeout_s=timeout_s, chunk_blocks=chunk_blocks, secret=secret)
        self._ctx: Optional[zmq.Context] = None
        self._sock: Optional[zmq.Socket] = None
        self._seq = 0
        self._pending: dict[int, Any] = {}  # seq -> what must stay alive until its reply
        self._errors: list[str] = []
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- connection

    def connect(self) -> None:
        if self._ctx is not None:
            return
        self._ctx = zmq.Context()
        self._open()

    def _open(self) -> None:
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a live connection
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        if self.secret is not None:
            self.secret.secure_client(sock)
        sock.connect(self.address)
        self._sock = sock

    def _reset(self) -> None:
        """Drop the socket (and everything queued on it) after a failure; open a fresh one."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self._pending.clear()
        if self._ctx is not None:
            self._open()

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None
            if self._ctx is not None:
                self._ctx.term()
                self._ctx = None
            self._pending.clear()
            self._errors.clear()

    # ---------------------------------------------------------------- low level (also used by torch_dist)

    def _check_open(self) -> zmq.Socket:
        if self._sock is None:
            raise TransportError(f"connection to {self.address} is closed (call connect())")
        return self._sock

    def _send(self, frames: list, deadline: float) -> None:
        sock = self._check_open()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._reset()
                raise TransportError(f"cannot send to {self.address}: no connection within {self.timeout_s}s")
            if sock.poll(int(left * 1000) + 1, zmq.POLLOUT):
                try:
                    out = self.secret.wrap(frames) if self.secret is not None else frames
                    sock.send_multipart(out, flags=zmq.NOBLOCK, copy=False)
                    return
                except zmq.Again:
                    continue

    def _recv(self, deadline: float) -> Optional[tuple[int, dict]]:
        """One reply ``(seq, header)``, or ``None`` at the deadline; malformed replies are dropped."""
        sock = self._check_open()
        left = deadline - time.monotonic()
        if left <= 0 or not sock.poll(int(left * 1000) + 1, zmq.POLLIN):
            return None
        frames = sock.recv_multipart()
        try:
            if self.secret is not None:
                frames = self.secret.unwrap(frames)
            header = unpack_header(frames[0]) if len(frames) == 1 else None
        except Exception:
            header = None
        seq = take_seq(header) if isinstance(header, dict) else None
        if seq is None:
            logger.warning("dropping a malformed reply from %s", self.address)
            return (-1, {})
        return seq, header

    def _note_block_reply(self, seq: int, header: dict) -> None:
        del self._pending[seq]
        try:
            reply, _ = reply_from_header(header)
        except Exception as exc:
            self._errors.append(f"malformed reply: {exc}")
            return
        if not reply.ok:
            self._errors.append(reply.error or "rejected")

    def request(self, header: dict, payload: Any = None) -> dict:
        """Send one request and return its raw reply header (``seq`` removed)."""
        with self._lock:
            seq = self._seq = self._seq + 1
            deadline = time.monotonic() + self.timeout_s
            frames = [pack({**header, "seq": seq})] + ([payload] if payload is not None else [])
            self._send(frames, deadline)
            while True:
                got = self._recv(deadline)
                if got is None:
                    self._reset()
                    raise TransportError(f"no reply from {self.address} within {self.timeout_s}s")
                rseq, rheader = got
                if rseq == seq:
                    return rheader
                if rseq in self._pending:
                    self._note_block_reply(rseq, rheader)
                # else: a late reply to a request that timed out; drop it

    def post(self, header: dict, payload: Any, keep_alive: Any) -> None:
        """Queue one request whose reply ``flush`` collects; ``keep_alive`` lives until then."""
        with self._lock:
            seq = self._seq = self._seq + 1
            frames = [pack({**header, "seq": seq})] + ([payload] if payload is not None else [])
            self._send(frames, time.monotonic() + self.timeout_s)
            self._pending[seq] = keep_alive
            self._drain_nowait()

    def _drain_nowait(self) -> None:
        sock = self._check_open()
        while self._pending and sock.poll(0, zmq.POLLIN):
            got = self._recv(time.monotonic() + 1.0)
            if got is not None and got[0] in self._pending:
                self._note_block_reply(*got)

    # ---------------------------------------------------------------- MigrationTransport

    def call(self, message: wire.Message) -> wire.Reply:
        header = self.request(message.to_header())
        try:
            reply, is_fault = reply_from_header(header)
        except Exception as exc:
            raise TransportError(f"malformed reply from {self.address}: {exc}") from None
        if is_fault:
            raise TransportError(f"{self.address} failed {type(message).__name__}: {reply.error}")
        return reply

    def send_blocks(self, migration_id: str, dst_block_ids: Sequence[int], data: torch.Tensor) -> None:
        ids = check_blocks_args(dst_block_ids, data)
        data = data.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        data = data.contiguous()
        for s, e in chunk_bounds(len(ids), self.chunk_blocks):
            chunk = data[s:e]  # a contiguous view: no copy
            dtype, shape, buf = wire.tensor_to_payload(chunk)
            self.post(wire.Blocks(migration_id, tuple(ids[s:e]), dtype, shape).to_header(), buf, chunk)

    def flush(self) -> None:
        with self._lock:
            deadline = time.monotonic() + self.timeout_s
            while self._pending:
                got = self._recv(deadline)
                if got is None:
                    n = len(self._pending)
                    self._reset()
                    self._errors.clear()
                    raise TransportError(f"{n} block messages to {self.address} got no reply within {self.timeout_s}s")
                seq, header = got
                if seq in self._pending:
                    self._note_block_reply(seq, header)
                    deadline = time.monotonic() + self.timeout_s  # progress: the timeout is per reply
            errors, self._errors = self._errors, []
        if errors:
            raise TransportError(f"{self.address} rejected {len(errors)} block messages: {errors[0]}")


ZMQ_TRANSPORT = (ZmqMigrationServer, ZmqMigrationTransport)  # named by the transport registry
