"""Transports that carry migration messages between instances, chosen by name."""

from migration.transports.base import Handler, MigrationServer, MigrationTransport, TransportError
from migration.transports.registry import (DEFAULT_TRANSPORT, check_transport_name, get_transport, register_transport,
                                          transport_names)

__all__ = ["DEFAULT_TRANSPORT", "Handler", "MigrationServer", "MigrationTransport", "TransportError",
           "check_transport_name", "get_transport", "register_transport", "transport_names"]
