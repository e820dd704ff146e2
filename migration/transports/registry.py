"""Transports by name: ``zmq`` (default), ``gloo``, ``nccl``, ``inproc``.

Built-ins are import paths, imported on first ``get_transport``: validating a
name (``LlumletConfig(transport="gloo")``) imports neither zmq nor torch.distributed.
"""

from __future__ import annotations

from llumnix_py.errors import UnknownTransportError
from llumnix_py.lazy_registry import LazyRegistry
from migration.transports.base import MigrationServer, MigrationTransport

DEFAULT_TRANSPORT = "zmq"

TransportPair = tuple[type[MigrationServer], type[MigrationTransport]]


def _check_pair(name: str, pair: object) -> None:
    if not isinstance(pair, tuple) or len(pair) != 2:
        raise ValueError(f"transport {name!r} must be a (server class, transport class) pair")
    server_cls, transport_cls = pair
    if not (isinstance(server_cls, type) and issubclass(server_cls, MigrationServer)):
        raise ValueError(f"{server_cls!r} is not a MigrationServer subclass")
    if not (isinstance(transport_cls, type) and issubclass(transport_cls, MigrationTransport)):
        raise ValueError(f"{transport_cls!r} is not a MigrationTransport subclass")


_TRANSPORTS: LazyRegistry[TransportPair] = LazyRegistry("transport", UnknownTransportError, {
    "zmq": "migration.transports.zmq_transport:ZMQ_TRANSPORT",
    "gloo": "migration.transports.torch_dist:GLOO_TRANSPORT",
    "nccl": "migration.transports.torch_dist:NCCL_TRANSPORT",
    "inproc": "migration.transports.inproc:INPROC_TRANSPORT",
}, _check_pair)


def register_transport(name: str, server_cls: type[MigrationServer], transport_cls: type[MigrationTransport]) -> None:
    """Register a (server, client) class pair under ``name``.

    Raises:
        ValueError: empty name, classes of the wrong kind, or the name already taken by another pair.
    """
    _TRANSPORTS.register(name, (server_cls, transport_cls))


def get_transport(name: str) -> TransportPair:
    """The (server, client) classes of ``name``, imported on first use.

    Raises:
        UnknownTransportError: no transport of that name (the message lists the known ones).
    """
    return _TRANSPORTS.get(name)


def check_transport_name(name: str) -> None:
    """Raise ``UnknownTransportError`` unless ``name`` is a registered transport; imports nothing."""
    _TRANSPORTS.check_name(name)


def transport_names() -> list[str]:
    return _TRANSPORTS.names()
