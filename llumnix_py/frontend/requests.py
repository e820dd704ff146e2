"""The frontend's active requests: one table behind one lock, shared by the cluster and its supervisor.

Tokens arrive on the token receiver's thread (``on_outputs``), requests are placed
on the submitting thread, and the supervisor resumes or fails them on its own
thread; every change to a handle's delivery state (its tokens, owner, end) goes
through this table, so no other object touches a handle under someone else's lock.

A request leaves the table when it finishes, fails or is aborted; events for
consumers on one event loop are handed over in one call per token batch.
"""

from __future__ import annotations

import threading
import time
from typing import Optional, Sequence

from llumnix_py.engines.types import FinishReason, RequestOutput
from llumnix_py.errors import InvalidRequestError
from llumnix_py.frontend.handles import Batches, RequestHandle, TokenEvent, flush


class RequestTable:
    """Active requests by id; all methods are thread-safe.

    Attributes:
        duplicates_dropped: tokens that arrived twice (a migration or a resume re-sent them).
        failed: requests ended with an error (counted before their last event is delivered).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: dict[str, RequestHandle] = {}
        self.duplicates_dropped = 0
        self.failed = 0

    def __len__(self) -> int:
        return len(self._handles)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._handles)

    # ----- the submitting thread -----------------------------------------------------------
    def add(self, handle: RequestHandle) -> None:
        """Raises ``InvalidRequestError`` if the request id is in use."""
        with self._lock:
            if handle.request_id in self._handles:
                raise InvalidRequestError(f"request id {handle.request_id} is in use")
            self._handles[handle.request_id] = handle

    def remove(self, request_id: str) -> Optional[RequestHandle]:
        """Take a request out of the table (None if it is not active)."""
        with self._lock:
            return self._handles.pop(request_id, None)

    def placed(self, handle: RequestHandle) -> None:
        """An instance accepted the request: from now on the supervisor looks after it."""
        with self._lock:
            handle.placed = True

    def redirect(self, handle: RequestHandle, instance_id: str) -> None:
        """The request is sent to ``instance_id`` instead of its first choice (which died)."""
        with self._lock:
            handle.instance_id = handle.stream.owner = instance_id
            handle.instances_seen = [instance_id]

    def end(self, handle: RequestHandle, reason: FinishReason, error: Optional[str] = None) -> bool:
        """End a request that has not finished: remove it and deliver its last event.

        With ``error``, the request failed (``finished_at`` is set now). Returns whether
        it ended here (False: it had finished already)."""
        with self._lock:
            if handle.finished:
                return False
            handle.finish_reason = reason
            if error is not None:
                handle.error = error
                handle.finished_at = time.monotonic()
                self.failed += 1
            self._handles.pop(handle.request_id, None)
            ev = TokenEvent(handle.request_id, (), handle.stream.next_index, handle.stream.owner, reason,
                            error=error)
        handle.deliver(ev)
        return True

    # ----- the token receiver --------------------------------------------------------------
    def on_outputs(self, instance_id: str, outputs: Sequence[RequestOutput], sender_dead: bool = False) -> None:
        """Token batches from ``instance_id``: reorder per request, drop duplicates, deliver.

        Late tokens of a dead instance (``sender_dead``) are welcome but make it no owner."""
        now = time.monotonic()
        batches: Batches = {}
        for out in outputs:
            with self._lock:
                handle = self._handles.get(out.request_id)
                if handle is None:
                    continue
                before = handle.stream.duplicates
                owner = handle.stream.owner
                ready, done = handle.stream.push(instance_id, out)
                if sender_dead:
                    handle.stream.owner = owner
                self.duplicates_dropped += handle.stream.duplicates - before
                if instance_id != handle.instances_seen[-1]:
                    handle.instances_seen.append(instance_id)
                if not ready and not done:
                    continue
                index = handle.stream.next_index - len(ready)
                handle.token_ids.extend(ready)
                if ready and handle.first_token_at is None:
                    handle.first_token_at = now
                reason = handle.stream.finish_reason if done else None
                if done:
                    handle.finish_reason = reason
                    handle.finished_at = now
                    self._handles.pop(out.request_id, None)
                lps = handle.stream.ready_logprobs
                plps = handle.stream.prompt_logprobs if index == 0 else None
            handle.deliver(TokenEvent(out.request_id, tuple(ready), index, instance_id, reason, logprobs=lps,
                                      prompt_logprobs=plps), batches)
        flush(batches)

    # ----- the supervisor ------------------------------------------------------------------
    def in_flight(self) -> list[RequestHandle]:
        """Requests placed on an instance and not finished."""
        with self._lock:
            return [h for h in self._handles.values() if h.placed and not h.finished]

    def set_owner(self, handle: RequestHandle, instance_id: str) -> None:
        """``instance_id`` holds the request (found by asking the instances)."""
        with self._lock:
            handle.stream.owner = instance_id

    def resume_point(self, handle: RequestHandle) -> Optional[tuple[tuple[int, ...], str]]:
        """The tokens delivered so far and the request's owner; None if it finished meanwhile."""
        with self._lock:
            if handle.finished:
                return None
            return tuple(handle.token_ids), handle.stream.owner

    def resumed(self, handle: RequestHandle, dead_owner: str, instance_id: str) -> None:
        """The request now continues on ``instance_id`` (unless tokens from elsewhere came first)."""
        with self._lock:
            if handle.stream.owner == dead_owner:
                handle.stream.owner = instance_id
            handle.resumes += 1
