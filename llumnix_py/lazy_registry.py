"""A validating name -> object registry whose built-ins are import paths, resolved on first use.

Policies, engines and migration transports are chosen by name. Their registries
name each built-in by an import path (``"package.module:attribute"``) and import
it only when ``get`` first asks for it, so importing a registry (or validating a
name in a config) never loads every backend: checking ``transport="zmq"`` does
not import zmq. Plugins ``register`` objects directly.
"""

from __future__ import annotations

import importlib
import threading
from typing import Callable, Generic, Iterator, Mapping, Optional, TypeVar

from llumnix_py.errors import UnknownNameError

T = TypeVar("T")


def import_path(path: str) -> object:
    """The object that ``"package.module:attribute"`` names (imports the module)."""
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"import path must look like 'package.module:attribute', got {path!r}")
    return getattr(importlib.import_module(module), attr)


class LazyRegistry(Generic[T]):
    """Names to objects, built-ins as import paths resolved on first ``get``.

    Args:
        kind: what the names are, for messages (``"dispatch policy"``, ``"transport"``).
        error: the ``UnknownNameError`` subclass that an unknown name raises.
        builtins: name -> ``"package.module:attribute"``.
        check: validates an object before it is registered or after a built-in is
            resolved; raises ``TypeError``/``ValueError``. Default: none.

    ``register`` rejects empty names and names taken by another object (re-registering
    the same object is harmless); ``get`` and ``check_name`` raise ``error`` naming the
    known names.
    """

    def __init__(self, kind: str, error: type[UnknownNameError] = UnknownNameError,
                 builtins: Optional[Mapping[str, str]] = None,
                 check: Optional[Callable[[str, object], None]] = None) -> None:
        self.kind = kind
        self.error = error
        self._paths: dict[str, str] = dict(builtins or {})
        self._items: dict[str, T] = {}
        self._check = check
        self._lock = threading.Lock()

    def register(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name`` and return it.

        Raises:
            ValueError: ``name`` is empty or already names another object.
            TypeError/ValueError: ``check`` rejects ``obj``.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if self._check is not None:
            self._check(name, obj)
        if name in self:
            if self.get(name) == obj:
                return obj
            raise ValueError(f"{self.kind} {name!r} is already registered")
        with self._lock:
            self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        """The object registered as ``name``, importing a built-in on first use."""
        self.check_name(name)
        with self._lock:
            if name in self._items:
                return self._items[name]
            path = self._paths[name]
        obj = import_path(path)  # outside the lock: the imported module may use this registry
        if self._check is not None:
            self._check(name, obj)
        with self._lock:
            return self._items.setdefault(name, obj)  # type: ignore[arg-type]

    def check_name(self, name: object) -> None:
        """Raise ``error`` (listing the known names) unless ``name`` is registered; imports nothing."""
        if name not in self:
            known = ", ".join(self.names()) or "none"
            raise self.error(f"unknown {self.kind} {name!r} (known: {known})")

    def names(self) -> list[str]:
        """Registered names (built-ins included), sorted."""
        with self._lock:
            return sorted(set(self._items) | set(self._paths))

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        with self._lock:
            return name in self._items or name in self._paths

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


def check_callable(name: str, obj: object) -> None:
    """A ``check`` for registries of functions."""
    if not callable(obj):
        raise TypeError(f"{name!r} must be callable, got {type(obj).__name__}")
