"""Typed errors of llumnix-py.

Shortage is a value (``None``), misuse is an exception: these classes are the
exceptions. Network-facing code maps them to clear error responses.
"""

from __future__ import annotations


class LlumnixError(Exception):
    """Base class of every error raised by llumnix-py."""


class InvalidRequestError(LlumnixError, ValueError):
    """A request (or one of its parameters) is malformed or out of range."""


class UnknownRequestError(LlumnixError, KeyError):
    """A request id that the engine does not hold."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable.
        return str(self.args[0]) if self.args else "unknown request"


class BlockManagerError(LlumnixError, RuntimeError):
    """Misuse of the block manager (double free, freeing a block one does not own)."""


class MigrationError(LlumnixError, RuntimeError):
    """A migration primitive was called in a state that does not allow it."""


class ProtocolError(LlumnixError, ValueError):
    """A message received from the network failed validation."""


class UnknownNameError(LlumnixError, KeyError):
    """A name that no registry holds; the message lists the names it does hold.

    A ``KeyError`` (a failed look-up), whose message is shown unquoted.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown name"


class UnknownPolicyError(UnknownNameError):
    """A dispatch, pairing, migrate-out, scaling or preemption policy name that is not registered."""


class UnknownEngineError(UnknownNameError):
    """An engine kind or a simulated engine's cost profile that is not registered."""


class UnknownTransportError(UnknownNameError):
    """A migration transport name that is not registered."""


class UnknownInstanceError(LlumnixError, KeyError):
    """An instance id that the scheduler does not know."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown instance"


class UnknownRoleError(LlumnixError, ValueError):
    """An instance role that is not one of ``policies.roles.ROLES``."""


class SchedulerUnavailableError(LlumnixError):
    """The global scheduler does not answer (killed, restarting)."""
