"""Validating name -> policy registries, one per kind of decision.

The built-in policies register themselves when their modules are imported;
``check_policy_names`` imports them first, so a lookup never misses a built-in.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from llumnix_py.errors import UnknownPolicyError

T = TypeVar("T", bound=Callable[..., object])


class Registry(Generic[T]):
    """A validating mapping from policy names to callables.

    ``register`` rejects duplicate names and non-callables (``ValueError`` /
    ``TypeError``); ``get`` raises ``UnknownPolicyError`` naming the known policies.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, fn: T) -> T:
        """Register ``fn`` under ``name`` and return it (usable as a plain call)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} policy name must be a non-empty string, got {name!r}")
        if not callable(fn):
            raise TypeError(f"{self.kind} policy {name!r} must be callable, got {type(fn).__name__}")
        if name in self._items:
            raise ValueError(f"{self.kind} policy {name!r} is already registered")
        self._items[name] = fn
        return fn

    def get(self, name: str) -> T:
        """The policy registered as ``name``; ``UnknownPolicyError`` if none is."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            known = ", ".join(self.names()) or "none"
            raise UnknownPolicyError(f"unknown {self.kind} policy {name!r} (known: {known})") from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


DISPATCH: Registry[Callable[..., object]] = Registry("dispatch")
PAIRING: Registry[Callable[..., object]] = Registry("pairing")
MIGRATE_OUT: Registry[Callable[..., object]] = Registry("migrate_out")
SCALING: Registry[Callable[..., object]] = Registry("scaling")


def load_builtin_policies() -> None:
    """Import the modules whose import registers the built-in policies."""
    import policies.dispatch  # noqa: F401
    import policies.pairing  # noqa: F401
    import policies.scaling  # noqa: F401
    import policies.selection  # noqa: F401


def check_policy_names(*, dispatch: str, pairing: str, migrate_out: str, scaling: str) -> None:
    """Raise ``UnknownPolicyError`` if any name is not registered."""
    load_builtin_policies()
    DISPATCH.get(dispatch)
    PAIRING.get(pairing)
    MIGRATE_OUT.get(migrate_out)
    SCALING.get(scaling)
