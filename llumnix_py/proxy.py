"""Interfaces served through their method table: one generic proxy per runtime, no forwarder per method.

An interface is an ABC; its abstract methods are its *method table*
(``method_table``). Both ends of a call read that table:

```
 caller ── proxy.load() ──► proxy._invoke("load", args, kwargs) ──► (Ray, or a direct call)
        ──► Endpoint.call("load", args, kwargs) ──► target.load()      (only names in the table)
```

- a proxy class decorated with ``forwards(interface)`` gets every method of the
  table that it does not define itself as a forwarder to
  ``self._invoke(method, args, kwargs)``; how to reach the target (a direct call,
  a Ray actor) is that one method;
- ``Endpoint`` (the server side, e.g. inside a Ray actor) runs a name of the
  table on its target and refuses anything else.

Adding a method to an interface is therefore one edit: every proxy and endpoint
picks it up. A method marked ``oneway`` needs no reply, so a remote proxy may send
it without waiting.
"""

from __future__ import annotations

import abc
import functools
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

from llumnix_py.errors import LlumnixError

T = TypeVar("T", bound=type)


class UnknownMethodError(LlumnixError, AttributeError):
    """A call named a method that is not in the served interface's table."""


def method_table(interface: type) -> frozenset[str]:
    """The names an interface serves: its abstract methods."""
    table = frozenset(getattr(interface, "__abstractmethods__", ()))
    if not table:
        raise TypeError(f"{interface.__name__} declares no abstract methods")
    return table


def oneway(method: Callable) -> Callable:
    """Mark an interface method whose caller needs no reply (put it under ``abc.abstractmethod``)."""
    method.oneway = True  # type: ignore[attr-defined]
    return method


def is_oneway(interface: type, method: str) -> bool:
    return bool(getattr(getattr(interface, method, None), "oneway", False))


def forwards(interface: type) -> Callable[[T], T]:
    """Class decorator: every method of ``interface``'s table that the class leaves
    abstract becomes ``self._invoke(method, args, kwargs)``. Methods the class
    defines itself (a different local behaviour, e.g. ``stop``) are kept."""
    table = method_table(interface)

    def decorate(cls: T) -> T:
        if not callable(getattr(cls, "_invoke", None)):
            raise TypeError(f"{cls.__name__} forwards {interface.__name__} but defines no _invoke")
        for name in sorted(table):
            if getattr(getattr(cls, name), "__isabstractmethod__", False):
                setattr(cls, name, _forwarder(cls, name, getattr(interface, name)))
        abc.update_abstractmethods(cls)
        return cls

    return decorate


def _forwarder(cls: type, name: str, declared: Callable) -> Callable:
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._invoke(name, args, kwargs)

    # The declaration's name, docstring and signature (``inspect.signature`` follows
    # ``__wrapped__``); not its ``__dict__``, which marks it abstract.
    functools.update_wrapper(forward, declared, updated=())
    forward.__qualname__ = f"{cls.__qualname__}.{name}"  # tracebacks name the proxy
    return forward


class Endpoint:
    """Serves ``interface`` on ``target``: ``call`` runs a method of the table, nothing else.

    Args:
        interface: the ABC whose method table is served.
        target: the object that implements those methods.
    """

    def __init__(self, interface: type, target: Any) -> None:
        self.interface = interface
        self.methods = method_table(interface)
        self.target = target

    def call(self, method: str, args: Sequence[Any] = (), kwargs: Optional[Mapping[str, Any]] = None) -> Any:
        if method not in self.methods:
            raise UnknownMethodError(f"{method!r} is not a method of {self.interface.__name__}")
        return getattr(self.target, method)(*args, **(kwargs or {}))
