"""What a frontend hands back for each submitted request: the handle, its token events, its errors.

A ``RequestHandle`` is returned by ``Cluster.submit`` (or ``submit_async``). The
frontend's ``RequestTable`` feeds it ``TokenEvent``s as tokens become deliverable,
in order and without duplicates (its ``OrderedStream``), whichever instance sent
them; the caller reads them by async iteration (requests submitted from an event
loop), by ``events()`` (synchronous code), or waits for all of them with ``result()``.
"""

from __future__ import annotations

import asyncio
import queue
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from llumnix_py.engines.types import FinishReason, Request, RequestOutput, TokenLogprob
from llumnix_py.errors import LlumnixError

# Events for consumers on one event loop, handed over in one call per token batch.
Batches = dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, "TokenEvent"]]]


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
    logprobs: Optional[tuple[TokenLogprob, ...]] = None  # one per token, when the request asked for them
    prompt_logprobs: Optional[tuple[Optional[TokenLogprob], ...]] = None  # on the event with index 0, if asked

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class OrderedStream:
    """Reassembles one request's tokens in output order, whatever instance sent them.

    ``push`` returns the tokens that became deliverable (in order) and whether the
    request is now finished; duplicates (an index already delivered or buffered) are dropped.
    A token's log probability (if any) travels with it, so it is the one computed where the
    token was sampled; ``ready_logprobs`` holds those of the tokens the last ``push`` returned
    (None when they came without), ``prompt_logprobs`` the first copy received.
    """

    next_index: int = 0
    pending: dict[int, tuple[int, Optional[TokenLogprob]]] = field(default_factory=dict)
    ready_logprobs: Optional[tuple[TokenLogprob, ...]] = None
    prompt_logprobs: Optional[tuple[Optional[TokenLogprob], ...]] = None
    finish_at: Optional[int] = None  # index of the last token
    finish_reason: Optional[FinishReason] = None
    owner: str = ""
    duplicates: int = 0

    def push(self, instance_id: str, out: RequestOutput) -> tuple[list[int], bool]:
        self.owner = instance_id
        if out.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = out.prompt_logprobs
        lps = out.logprobs
        for k, tok in enumerate(out.new_token_ids):
            i = out.index + k
            if i < self.next_index or i in self.pending:
                self.duplicates += 1
                continue
            self.pending[i] = (tok, None if lps is None else lps[k])
        if out.finish_reason is not None and self.finish_at is None:
            self.finish_at = out.index + len(out.new_token_ids) - 1
            self.finish_reason = out.finish_reason
        ready, ready_lps = [], []
        while self.next_index in self.pending:
            tok, lp = self.pending.pop(self.next_index)
            ready.append(tok)
            ready_lps.append(lp)
            self.next_index += 1
        self.ready_logprobs = tuple(ready_lps) if ready_lps and None not in ready_lps else None
        done = self.finish_at is not None and self.next_index > self.finish_at
        return ready, done


class RequestHandle:
    """One submitted request: iterate its ``TokenEvent``s (async) or wait for ``result``."""

    def __init__(self, request_id: str, instance_id: str, request: Optional[Request] = None) -> None:
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

    def bind_loop(self, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        """Iterate this handle's events on ``loop`` (default: the running loop, if any)."""
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._loop = None
                return
        self._loop = loop
        self._aq = asyncio.Queue()  # binds to the loop at first use, so it may be made in any thread

    def deliver(self, ev: TokenEvent, batches: Optional[Batches] = None) -> None:
        """Hand ``ev`` to the consumer (any thread); with ``batches``, events for an event loop are
        collected there for one ``flush`` per token batch instead of one wake-up each."""
        if self._loop is not None and self._aq is not None and batches is not None:
            batches.setdefault(self._loop, []).append((self._aq, ev))
        elif self._loop is not None and self._aq is not None:
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


def flush(batches: Batches) -> None:
    """Hand events collected by ``deliver(ev, batches)`` to their loops, one call per loop."""
    for loop, items in batches.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def _put_all(items: list[tuple[asyncio.Queue, TokenEvent]]) -> None:
    """Hand a batch of events to their consumers' queues (run on the consumers' event loop)."""
    for q, ev in items:
        q.put_nowait(ev)
