"""What a frontend hands back for each submitted request: the handle, its token events, its errors.

A ``RequestHandle`` is returned by ``Cluster.submit`` (or ``submit_async``). The
``Cluster`` feeds it ``TokenEvent``s as tokens become deliverable, in order and
without duplicates, whichever instance sent them; the caller reads them by async
iteration (requests submitted from an event loop), by ``events()`` (synchronous
code), or waits for all of them with ``result()``.

All names here are also importable from ``llumnix_py.cluster``.
"""

from __future__ import annotations

import asyncio
import queue
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Optional

from llumnix_py.engines.types import FinishReason, Request
from llumnix_py.errors import LlumnixError
from llumnix_py.tokens import OrderedStream

if TYPE_CHECKING:
    from llumnix_py.cluster import Cluster


class NoInstanceError(LlumnixError):
    """No instance can take a request (none running, or all terminating)."""


class RequestFailedError(LlumnixError):
    """A request ended with an error (its instance died and no other could continue it)."""


@dataclass(frozen=True)
class TokenEvent:
    """Tokens of one request that became deliverable, in order."""

    request_id: str
    token_ids: tuple[int, ...]
    index: int  # output position of token_ids[0]
    instance_id: str  # the instance that sent them
    finish_reason: Optional[FinishReason] = None
    error: Optional[str] = None  # set (with finish_reason ABORT) when the request failed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestHandle:
    """One submitted request: iterate its ``TokenEvent``s (async) or wait for ``result``."""

    def __init__(self, cluster: "Cluster", request_id: str, instance_id: str,
                 request: Optional[Request] = None) -> None:
        self.cluster = cluster
        self.request = request  # kept to resume it elsewhere if its instance dies
        self.request_id = request_id
        self.instance_id = instance_id  # where it was dispatched
        self.stream = OrderedStream(owner=instance_id)
        self.submitted_at = time.monotonic()
        self.first_token_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self.instances_seen: list[str] = [instance_id]
        self._q: "queue.SimpleQueue[TokenEvent]" = queue.SimpleQueue()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._aq: Optional[asyncio.Queue] = None
        self.token_ids: list[int] = []
        self.finish_reason: Optional[FinishReason] = None
        self.error: Optional[str] = None
        self.resumes = 0  # times it was resumed by recomputation after its instance died
        self.placed = False  # an instance accepted it (before that, submit handles faults itself)

    def _bind_loop(self, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._loop = None
                return
        self._loop = loop
        self._aq = asyncio.Queue()  # binds to the loop at first use, so it may be made in any thread

    def _deliver(self, ev: TokenEvent) -> None:
        if self._loop is not None and self._aq is not None:
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, ev)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        else:
            self._q.put(ev)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[TokenEvent]:
        if self._aq is None:
            raise RuntimeError("submit() the request from a running event loop to iterate it asynchronously")
        while True:
            ev = await self._aq.get()
            yield ev
            if ev.finished:
                return

    def events(self, timeout: Optional[float] = None):
        """Synchronous iteration (for requests submitted outside an event loop)."""
        while True:
            ev = self._q.get(timeout=timeout)
            yield ev
            if ev.finished:
                return

    def result(self, timeout: Optional[float] = 60.0) -> list[int]:
        """Block until the request finishes; returns all its tokens.

        Raises ``RequestFailedError`` if it ended with an error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                self._q.get(timeout=left)
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s") from None
        if self.error is not None:
            raise RequestFailedError(f"request {self.request_id} failed: {self.error}")
        return list(self.token_ids)


def _put_all(items: list[tuple[asyncio.Queue, TokenEvent]]) -> None:
    """Hand a batch of events to their consumers' queues (run on the consumers' event loop)."""
    for q, ev in items:
        q.put_nowait(ev)
