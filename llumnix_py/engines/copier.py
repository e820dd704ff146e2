"""Where swap copies run: beside the engine's steps, on a copy thread or a virtual clock.

FastSwitch's second fix (Shen, Li and Gao, arXiv:2411.18424, Section 4.2, the
"multithreading swap manager"): swap copies run asynchronously so the GPU does not
idle while they move. A ``Copier`` takes copies in order (one FIFO link: a later
copy starts after an earlier one, so a swap-in never reads host blocks an earlier
swap-out has yet to fill) and hands back a ``CopyTicket`` the engine polls (``done``)
or waits on (``wait``).

* ``ThreadCopier``: one worker thread (the built-in engine; beside a CUDA cache the
  executor's copy is a DMA, and the thread stands for a copy stream). Its thread
  starts in ``start()`` and stops in ``close()``.
* ``VirtualCopier``: the simulator's; a copy takes its cost-model time on a virtual
  clock that the engine advances by each step's duration, so copies overlap steps
  exactly as long as the model says.
"""

from __future__ import annotations

import abc
import queue
import threading
import time
from typing import Callable, Optional

CopyFn = Callable[[], float]  # runs a copy; returns its duration in seconds


class CopyTicket(abc.ABC):
    """One submitted copy."""

    @abc.abstractmethod
    def done(self) -> bool:
        """The copy has landed."""

    @abc.abstractmethod
    def wait(self) -> float:
        """Block until the copy has landed; the seconds waited (0 if it had)."""

    @property
    @abc.abstractmethod
    def seconds(self) -> float:
        """How long the copy itself took (valid once ``done``)."""


class Copier(abc.ABC):
    @abc.abstractmethod
    def submit(self, fn: CopyFn) -> CopyTicket:
        """Queue a copy after every copy submitted before it."""

    def advance(self, seconds: float) -> None:
        """The engine spent ``seconds`` on a step (only a virtual clock cares)."""

    def close(self) -> None:
        """Stop accepting copies; release any thread."""


# ----- the copy thread ---------------------------------------------------------------------
class _ThreadTicket(CopyTicket):
    def __init__(self, fn: CopyFn) -> None:
        self.fn = fn
        self._event = threading.Event()
        self._seconds = 0.0
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self._seconds = self.fn()
        except BaseException as e:  # handed to the waiter: a failed copy must not pass silently
            self.error = e
        finally:
            self._event.set()

    def done(self) -> bool:
        if self._event.is_set():
            self._raise()
            return True
        return False

    def wait(self) -> float:
        if self._event.is_set():
            self._raise()
            return 0.0
        t0 = time.perf_counter()
        self._event.wait()
        self._raise()
        return time.perf_counter() - t0

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError("a swap copy failed") from self.error

    @property
    def seconds(self) -> float:
        return self._seconds


class ThreadCopier(Copier):
    """Runs copies in order on one worker thread (started by ``start``)."""

    def __init__(self) -> None:
        self._queue: "queue.SimpleQueue[Optional[_ThreadTicket]]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llumnix-swap-copier", daemon=True)
            self._thread.start()

    def submit(self, fn: CopyFn) -> CopyTicket:
        if self._thread is None:
            raise RuntimeError("ThreadCopier.submit before start()")
        ticket = _ThreadTicket(fn)
        self._queue.put(ticket)
        return ticket

    def _loop(self) -> None:
        while True:
            ticket = self._queue.get()
            if ticket is None:
                return
            ticket.run()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


# ----- the virtual clock -------------------------------------------------------------------
class _VirtualTicket(CopyTicket):
    def __init__(self, copier: "VirtualCopier", finish: float, seconds: float) -> None:
        self._copier = copier
        self.finish = finish
        self._seconds = seconds

    def done(self) -> bool:
        return self._copier.now >= self.finish

    def wait(self) -> float:
        waited = max(0.0, self.finish - self._copier.now)
        self._copier.now += waited
        return waited

    @property
    def seconds(self) -> float:
        return self._seconds


class VirtualCopier(Copier):
    """Copies take their modelled time on one link, FIFO, on a clock the engine advances."""

    def __init__(self) -> None:
        self.now = 0.0
        self._link_free_at = 0.0

    def submit(self, fn: CopyFn) -> CopyTicket:
        seconds = fn()  # the cost model's time; no data moves
        start = max(self.now, self._link_free_at)
        self._link_free_at = start + seconds
        return _VirtualTicket(self, self._link_free_at, seconds)

    def advance(self, seconds: float) -> None:
        self.now += seconds
