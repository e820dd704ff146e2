"""A shared secret for llumnix-py's internal ZeroMQ sockets (migration, token path).

On loopback no secret is needed (the default). Across hosts, every process of
a deployment is given the same secret string, and each socket is secured with
one of two mechanisms, chosen once per ``SharedSecret``:

- ``curve`` (when libzmq has libsodium, ``zmq.has("curve")``): ZeroMQ CURVE.
  A server key pair and a client key pair are derived deterministically from
  the secret (PBKDF2-HMAC-SHA256 with a per-role label -> 32 bytes -> Z85
  secret key, ``zmq.curve_public`` -> public key). Servers accept only the
  derived client public key (a ZAP handler on the server's context), clients
  accept only the derived server key: a peer without the secret cannot
  complete the handshake, so nothing it sends reaches the application.
  Traffic is also encrypted.
- ``hmac`` (fallback): every message carries a leading tag frame,
  HMAC-SHA256(key, header frame). Receivers drop messages whose tag does not
  match (constant-time compare). Authenticates headers only; payload frames
  are bound by the header's declared dtype/shape, and nothing is encrypted::

      [tag = HMAC(k, header)] [header] [payload ...]

Neither mechanism protects against replay of a captured message in ``hmac``
mode; use ``curve`` (the default where available) when that matters.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import logging
import threading
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from llumnix_py.errors import ProtocolError

if TYPE_CHECKING:
    import zmq

# zmq is imported where a socket is secured, not here: configs that only validate a
# secret (and transports other than zmq) do not load it.

log = logging.getLogger(__name__)

MECHANISMS = ("curve", "hmac")
_KDF_ITERATIONS = 100_000
_KDF_SALT = b"llumnix-py/zmq-secret/v1"
_TAG_BYTES = 32


class AuthenticationError(ProtocolError):
    """A message (or a peer) did not prove knowledge of the shared secret."""


def curve_available() -> bool:
    """Whether this libzmq supports CURVE (built with libsodium)."""
    import zmq

    return bool(zmq.has("curve"))


@functools.lru_cache(maxsize=32)
def _derive(secret: str, label: str) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", secret.encode("utf-8"), _KDF_SALT + b"/" + label.encode(), _KDF_ITERATIONS, 32)


class _ClientKeyCheck:
    """ZAP credentials provider: allows exactly one client public key; counts refusals."""

    def __init__(self, allowed_z85: bytes) -> None:
        self.allowed = allowed_z85
        self.denied = 0
        self._lock = threading.Lock()

    def callback(self, domain: str, key: bytes) -> bool:
        ok = hmac.compare_digest(bytes(key), self.allowed)
        if not ok:
            with self._lock:
                self.denied += 1
            log.warning("refused a ZeroMQ peer without the shared secret (CURVE key mismatch)")
        return ok


class ServerGuard:
    """What ``SharedSecret.secure_server`` leaves running; ``close`` it with the socket's context."""

    def __init__(self, authenticator: Any = None, check: Optional[_ClientKeyCheck] = None) -> None:
        self._auth = authenticator
        self._check = check

    @property
    def denied(self) -> int:
        """Peers refused at the handshake (``curve``)."""
        return self._check.denied if self._check is not None else 0

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


class SharedSecret:
    """One deployment secret, and how it secures sockets.

    Args:
        secret: the shared secret string (non-empty; use a long random one).
        mechanism: ``"curve"``, ``"hmac"``, or ``"auto"`` (curve when available).

    Raises:
        ValueError: empty secret, unknown mechanism, or ``curve`` without libsodium.
    """

    def __init__(self, secret: str, mechanism: str = "auto") -> None:
        if not isinstance(secret, str) or not secret:
            raise ValueError("secret must be a non-empty string")
        if mechanism == "auto":
            mechanism = "curve" if curve_available() else "hmac"
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS} or 'auto', got {mechanism!r}")
        if mechanism == "curve" and not curve_available():
            raise ValueError("this libzmq has no CURVE support (libsodium); use mechanism='hmac'")
        self.mechanism = mechanism
        self._hmac_key = _derive(secret, "hmac")
        if mechanism == "curve":
            import zmq
            from zmq.utils import z85

            self.server_secret = z85.encode(_derive(secret, "curve-server"))
            self.server_public = zmq.curve_public(self.server_secret)
            self.client_secret = z85.encode(_derive(secret, "curve-client"))
            self.client_public = zmq.curve_public(self.client_secret)

    def __repr__(self) -> str:  # never print key material
        return f"SharedSecret(mechanism={self.mechanism!r})"

    # ----- sockets -----------------------------------------------------------------------
    def secure_server(self, ctx: zmq.Context, sock: zmq.Socket) -> ServerGuard:
        """Configure a binding socket before ``bind``; returns what to close with the context."""
        if self.mechanism != "curve":
            return ServerGuard()
        from zmq.auth.thread import ThreadAuthenticator

        check = _ClientKeyCheck(self.client_public)
        auth = ThreadAuthenticator(ctx, log=log.getChild("zap"))
        auth.start()
        auth.configure_curve_callback("*", credentials_provider=check)
        sock.curve_secretkey = self.server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True
        return ServerGuard(auth, check)

    def secure_client(self, sock: zmq.Socket) -> None:
        """Configure a connecting socket before ``connect``."""
        if self.mechanism != "curve":
            return
        sock.curve_secretkey = self.client_secret
        sock.curve_publickey = self.client_public
        sock.curve_serverkey = self.server_public

    # ----- per-message tags (hmac) --------------------------------------------------------
    def tag(self, header: Any) -> bytes:
        return hmac.new(self._hmac_key, memoryview(header).cast("B"), hashlib.sha256).digest()

    def wrap(self, frames: Sequence[Any]) -> list:
        """Frames to send: a tag over ``frames[0]`` first (``hmac``); unchanged with ``curve``."""
        if self.mechanism != "hmac":
            return list(frames)
        return [self.tag(frames[0]), *frames]

    def unwrap(self, frames: Sequence[Any]) -> list:
        """The frames of a received message without its tag; ``AuthenticationError`` if it is wrong."""
        if self.mechanism != "hmac":
            return list(frames)
        if len(frames) < 2:
            raise AuthenticationError("message has no authentication tag")
        tag = bytes(_buffer(frames[0]))
        if len(tag) != _TAG_BYTES or not hmac.compare_digest(tag, self.tag(_buffer(frames[1]))):
            raise AuthenticationError("message authentication tag does not match the shared secret")
        return list(frames[1:])


def _buffer(frame: Any) -> Any:
    import zmq  # loaded already: frames come from a zmq socket

    return frame.buffer if isinstance(frame, zmq.Frame) else frame


SecretArg = Union[None, str, SharedSecret]


def as_secret(secret: SecretArg) -> Optional[SharedSecret]:
    """``None`` (no authentication), a secret string (mechanism ``auto``), or a ``SharedSecret``."""
    if secret is None or isinstance(secret, SharedSecret):
        return secret
    if isinstance(secret, str):
        return SharedSecret(secret)
    raise TypeError(f"secret must be None, a string or a SharedSecret, got {type(secret).__name__}")


def is_loopback_address(address: str) -> bool:
    """Whether a ZeroMQ endpoint (``tcp://host:port``, ``ipc://``, ``inproc://``) stays on this host."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, an interface name or "*": may be reachable from elsewhere


def warn_if_exposed(address: str, secret: Optional[SharedSecret], what: str) -> bool:
    """Log a warning when ``address`` is reachable from other hosts and no secret guards it."""
    if secret is None and not is_loopback_address(address):
        log.warning("%s binds %s, reachable from other hosts, without a shared secret: "
                    "anyone who can reach it can send it messages (pass secret=...)", what, address)
        return True
    return False
