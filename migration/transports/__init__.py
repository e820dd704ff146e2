"""Transports that carry migration messages between instances, chosen by name."""

from migration.transports.base import Handler, MigrationServer, MigrationTransport, TransportError
from migration.transports.registry import DEFAULT_TRANSPORT, get_transport, register_transport, transport_names

__all__ = ["DEFAULT_TRANSPORT", "Handler", "MigrationServer", "MigrationTransport", "TransportError",
           "get_transport", "register_transport", "transport_names"]
