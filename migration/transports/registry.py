"""Transports by name: ``zmq`` (default), ``gloo``, ``nccl``, ``inproc``."""

from __future__ import annotations

import threading

from llumnix_py.errors import UnknownPolicyError
from migration.transports.base import MigrationServer, MigrationTransport

DEFAULT_TRANSPORT = "zmq"

_REGISTRY: dict[str, tuple[type[MigrationServer], type[MigrationTransport]]] = {}
_LOCK = threading.Lock()


def register_transport(name: str, server_cls: type[MigrationServer], transport_cls: type[MigrationTransport]) -> None:
    """Register a (server, client) class pair under ``name``.

    Raises:
        ValueError: empty name, classes of the wrong kind, or the name already taken by another pair.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("transport name must be a non-empty string")
    if not (isinstance(server_cls, type) and issubclass(server_cls, MigrationServer)):
        raise ValueError(f"{server_cls!r} is not a MigrationServer subclass")
    if not (isinstance(transport_cls, type) and issubclass(transport_cls, MigrationTransport)):
        raise ValueError(f"{transport_cls!r} is not a MigrationTransport subclass")
    with _LOCK:
        old = _REGISTRY.get(name)
        if old is not None and old != (server_cls, transport_cls):
            raise ValueError(f"transport {name!r} is already registered")
        _REGISTRY[name] = (server_cls, transport_cls)


def get_transport(name: str) -> tuple[type[MigrationServer], type[MigrationTransport]]:
    """The (server, client) classes of ``name``; ``UnknownPolicyError`` listing known names otherwise."""
    with _LOCK:
        try:
            return _REGISTRY[name]
        except (KeyError, TypeError):
            raise UnknownPolicyError(f"unknown transport {name!r}; known: {sorted(_REGISTRY)}") from None


def transport_names() -> list[str]:
    with _LOCK:
        return sorted(_REGISTRY)


def _register_builtins() -> None:
    from migration.transports.inproc import InprocMigrationServer, InprocMigrationTransport
    from migration.transports.torch_dist import (GlooMigrationServer, GlooMigrationTransport, NcclMigrationServer,
                                                 NcclMigrationTransport)
    from migration.transports.zmq_transport import ZmqMigrationServer, ZmqMigrationTransport

    register_transport("zmq", ZmqMigrationServer, ZmqMigrationTransport)
    register_transport("gloo", GlooMigrationServer, GlooMigrationTransport)
    register_transport("nccl", NcclMigrationServer, NcclMigrationTransport)
    register_transport("inproc", InprocMigrationServer, InprocMigrationTransport)


_register_builtins()
