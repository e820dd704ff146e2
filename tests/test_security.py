"""Shared-secret authentication of the internal ZeroMQ sockets (``migration.security``).

With a secret, a peer without it (or with another one) never reaches the
migration handler or the token callback; with it, everything works. Both
mechanisms are tested: CURVE (when libzmq has it) and the HMAC-tag fallback.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import pytest
import torch
import zmq

from llumnix_py.engines.types import FinishReason, RequestOutput
from llumnix_py.frontend.receiver import TokenReceiver
from llumnix_py.tokens import ZmqTokenSink
from migration import wire
from migration.security import (AuthenticationError, SharedSecret, as_secret, curve_available,
                                is_loopback_address, warn_if_exposed)
from migration.transports import TransportError
from migration.transports.inproc import InprocMigrationServer, InprocMigrationTransport
from migration.transports.zmq_transport import ZmqMigrationServer, ZmqMigrationTransport
from tests.factories import AcceptingHandler

SECRET = "correct horse battery staple"
MECHANISMS = [pytest.param("curve", marks=pytest.mark.skipif(not curve_available(), reason="no libsodium")),
              "hmac"]
TIMEOUT_S = 1.0


def wait_for(pred, timeout: float = 60.0) -> bool:
    """Wait for ``pred``; ``timeout`` bounds a condition that never comes (it is no pause)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


# ---------------------------------------------------------------- keys


def test_keys_are_deterministic_and_secret_dependent() -> None:
    a, b = SharedSecret(SECRET, "hmac"), SharedSecret(SECRET, "hmac")
    assert a.tag(b"x") == b.tag(b"x")
    assert SharedSecret("other", "hmac").tag(b"x") != a.tag(b"x")
    assert SECRET not in repr(a)
    if curve_available():
        c, d = SharedSecret(SECRET, "curve"), SharedSecret(SECRET, "curve")
        assert c.server_public == d.server_public and c.client_secret == d.client_secret
        assert c.server_public != SharedSecret("other", "curve").server_public
        assert zmq.curve_public(c.server_secret) == c.server_public


def test_bad_secret_arguments() -> None:
    with pytest.raises(ValueError):
        SharedSecret("")
    with pytest.raises(ValueError):
        SharedSecret(SECRET, "rot13")
    with pytest.raises(TypeError):
        as_secret(b"bytes")  # type: ignore[arg-type]
    assert as_secret(None) is None


def test_hmac_unwrap_rejects_missing_and_wrong_tags() -> None:
    s = SharedSecret(SECRET, "hmac")
    assert s.unwrap(s.wrap([b"header", b"payload"])) == [b"header", b"payload"]
    with pytest.raises(AuthenticationError):
        s.unwrap([b"header"])
    with pytest.raises(AuthenticationError):
        s.unwrap([b"\0" * 32, b"header"])
    with pytest.raises(AuthenticationError):
        s.unwrap(SharedSecret("other", "hmac").wrap([b"header"]))
    tagged = s.wrap([b"header"])
    with pytest.raises(AuthenticationError):
        s.unwrap([tagged[0], b"headeR"])  # tampered header


@pytest.mark.parametrize("address,local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://localhost:1", True), ("tcp://[::1]:1", True),
    ("ipc:///tmp/x", True), ("inproc://x", True), ("tcp://0.0.0.0:1", False), ("tcp://*:1", False),
    ("tcp://10.0.0.3:1", False), ("tcp://example.com:1", False),
])
def test_loopback_detection(address: str, local: bool) -> None:
    assert is_loopback_address(address) is local


def test_exposed_server_without_secret_warns(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="migration.security"):
        assert warn_if_exposed("tcp://0.0.0.0:1", None, "thing")
        assert not warn_if_exposed("tcp://0.0.0.0:1", SharedSecret(SECRET, "hmac"), "thing")
        assert not warn_if_exposed("tcp://127.0.0.1:1", None, "thing")
    assert sum("without a shared secret" in r.message for r in caplog.records) == 1
    caplog.clear()
    server = ZmqMigrationServer(AcceptingHandler(), host="0.0.0.0")
    with caplog.at_level(logging.WARNING, logger="migration.security"):
        server.start()
    server.stop()
    assert any("migration server" in r.message for r in caplog.records)


# ---------------------------------------------------------------- migration server


def _secret(mechanism: str, value: str = SECRET) -> SharedSecret:
    return SharedSecret(value, mechanism)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_migration_with_the_secret_works(mechanism: str) -> None:
    rec = AcceptingHandler()
    server = ZmqMigrationServer(rec, secret=_secret(mechanism))
    address = server.start()
    try:
        with ZmqMigrationTransport(address, timeout_s=5.0, chunk_blocks=2, secret=_secret(mechanism)) as client:
            assert client.call(wire.Ping()).ok
            assert client.call(wire.PreAlloc("m", "r", 3)).block_ids == (0, 1, 2)
            client.send_blocks("m", [0, 1, 2], torch.arange(12, dtype=torch.float32).view(3, 4))
            client.flush()
        assert sum(isinstance(m, wire.Blocks) for m in rec.messages) == 2
        assert server.denied == 0
    finally:
        server.stop()


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("client_secret", [None, "another secret"])
def test_migration_without_the_secret_is_refused(mechanism: str, client_secret: Optional[str]) -> None:
    rec = AcceptingHandler()
    server = ZmqMigrationServer(rec, secret=_secret(mechanism))
    address = server.start()
    try:
        secret = _secret(mechanism, client_secret) if client_secret else None
        with ZmqMigrationTransport(address, timeout_s=TIMEOUT_S, secret=secret) as client:
            with pytest.raises(TransportError):
                client.call(wire.PreAlloc("m", "r", 3))
        assert rec.messages == []
        if mechanism == "hmac":
            assert server.denied >= 1
        # The server keeps serving peers that hold the secret.
        with ZmqMigrationTransport(address, timeout_s=5.0, secret=_secret(mechanism)) as good:
            assert good.call(wire.Ping()).ok
        assert len(rec.messages) == 1
    finally:
        server.stop()


@pytest.mark.skipif(not curve_available(), reason="no libsodium")
def test_curve_peer_knowing_only_the_server_public_key_is_denied() -> None:
    """A leaked server public key is not enough: the ZAP handler allows only the secret's client key."""
    rec = AcceptingHandler()
    server = ZmqMigrationServer(rec, secret=_secret("curve"))
    address = server.start()
    try:
        impostor = _secret("curve", "another secret")
        impostor.server_public = _secret("curve").server_public
        with ZmqMigrationTransport(address, timeout_s=TIMEOUT_S, secret=impostor) as client:
            with pytest.raises(TransportError):
                client.call(wire.Ping())
        assert rec.messages == []
        assert wait_for(lambda: server.denied >= 1)
    finally:
        server.stop()


def test_plain_client_with_plain_server_still_works() -> None:
    rec = AcceptingHandler()
    server = ZmqMigrationServer(rec)
    try:
        with ZmqMigrationTransport(server.start(), timeout_s=5.0) as client:
            assert client.call(wire.Ping()).ok
    finally:
        server.stop()


def test_inproc_secret_mismatch_is_refused() -> None:
    rec = AcceptingHandler()
    server = InprocMigrationServer(rec, secret=_secret("hmac"))
    address = server.start()
    try:
        with InprocMigrationTransport(address, secret=_secret("hmac", "other")) as client:
            with pytest.raises(TransportError, match="secret"):
                client.call(wire.Ping())
        with InprocMigrationTransport(address) as client:
            with pytest.raises(TransportError, match="secret"):
                client.call(wire.Ping())
        with InprocMigrationTransport(address, secret=_secret("hmac")) as client:
            assert client.call(wire.Ping()).ok
        assert len(rec.messages) == 1
    finally:
        server.stop()


# ---------------------------------------------------------------- token path


def _out(rid: str, index: int = 0) -> RequestOutput:
    return RequestOutput(rid, (5, 6), index, FinishReason.LENGTH)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_tokens_need_the_secret(mechanism: str) -> None:
    got: list[tuple[str, list[RequestOutput]]] = []
    receiver = TokenReceiver(lambda iid, outs: got.append((iid, outs)), secret=_secret(mechanism))
    address = receiver.start()
    intruders = [ZmqTokenSink(), ZmqTokenSink(secret=_secret(mechanism, "another secret"))]
    good = ZmqTokenSink(secret=_secret(mechanism))
    try:
        for k, sink in enumerate(intruders):
            sink.emit("evil", address, [_out(f"bad{k}")])
        time.sleep(0.5)  # a negative check: accepted intruders would show by now (speed cannot fail it)
        good.emit("i0", address, [_out("good")])
        assert wait_for(lambda: len(got) >= 1)
        time.sleep(0.1)
        if mechanism == "hmac":  # the intruders' messages arrived and were refused
            assert wait_for(lambda: receiver.rejected == 2)
        assert [(iid, [o.request_id for o in outs]) for iid, outs in got] == [("i0", ["good"])]
    finally:
        for sink in [*intruders, good]:
            sink.close()
        receiver.stop()
