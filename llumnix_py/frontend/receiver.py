"""A frontend's end of the token path: one PULL socket that llumlets' ``ZmqTokenSink``s push to.

Batches arrive in the wire format of ``llumnix_py.tokens`` (msgpack, validated by
``decode_batch``); the receiver thread hands each valid one to ``on_batch`` (the
cluster's ``on_outputs``), which reorders them per request.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

import zmq

from llumnix_py.engines.types import RequestOutput
from llumnix_py.errors import ProtocolError
from llumnix_py.tokens import MAX_BATCH_BYTES, decode_batch
from migration.security import SecretArg, ServerGuard, as_secret, warn_if_exposed

log = logging.getLogger(__name__)


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
