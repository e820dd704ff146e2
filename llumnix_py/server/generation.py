"""One request in flight: token events to text deltas, stop strings, abort, metrics; and response shapes.

``Generation`` is the single place where a request ends, whichever way it ends::

    finished in the engine (stop token, length)   -> finish_reason "stop"/"length", no abort needed
    a stop string appeared in the text             -> truncate, finish_reason "stop", abort in the cluster
    the consumer went away (disconnect, error)     -> close(): abort in the cluster

so every request the server submitted is either finished or aborted, and its KV
blocks are freed on whichever instance holds it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from pydantic import BaseModel

from llumnix_py.engines.types import FinishReason
from llumnix_py.errors import UnknownRequestError
from llumnix_py.frontend.cluster import Cluster
from llumnix_py.frontend.handles import RequestFailedError, RequestHandle
from llumnix_py.server import protocol as P
from llumnix_py.server.metrics import Metrics

log = logging.getLogger(__name__)

_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort"}


@dataclass
class Delta:
    """New text of one request (may be ""), the token ids behind it, and the finish reason on the last."""

    text: str
    token_ids: list[int]
    finish_reason: Optional[str]


class Generation:
    """Turns a request's ``TokenEvent``s into text deltas; owns its abort and its metrics.

    Stop strings are matched on the detokenized text. Text that could be the start
    of a stop string is held back until it is ruled out, so a stop string never
    reaches the client even when it spans several tokens.
    """

    def __init__(self, cluster: Cluster, metrics: Metrics, handle: RequestHandle, prompt_len: int,
                 stops: list[str]) -> None:
        self.cluster, self.metrics, self.handle = cluster, metrics, handle
        self.prompt_len = prompt_len
        self.stops = stops
        self.decoder = cluster.detokenizer()
        self.num_generated = 0
        self.finish_reason: Optional[str] = None
        self._held = ""
        self._closed = False

    @property
    def request_id(self) -> str:
        return self.handle.request_id

    def usage(self) -> P.Usage:
        return P.Usage.of(self.prompt_len, self.num_generated)

    async def deltas(self) -> AsyncIterator[Delta]:
        async for ev in self.handle:
            if ev.error is not None:  # its instance died and no other could continue it
                self._end("error", abort=False)
                raise RequestFailedError(ev.error)
            ids = list(ev.token_ids)
            self.num_generated += len(ids)
            done = ev.finish_reason is not None
            text = self.decoder.push(ids) + (self.decoder.flush() if done else "")
            text, hit = self._cut_at_stop(text, done)
            if hit or done:
                reason = "stop" if hit else _FINISH.get(ev.finish_reason, "stop")
                self._end(reason, abort=not done)
                yield Delta(text, ids, reason)
                return
            yield Delta(text, ids, None)

    def _cut_at_stop(self, piece: str, final: bool) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        buf = self._held + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[:min(hits)], True
        keep = 0
        if not final:  # longest suffix of buf that may start a stop string
            for k in range(min(len(buf), max(len(s) for s in self.stops) - 1), 0, -1):
                if any(s.startswith(buf[-k:]) for s in self.stops):
                    keep = k
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def _end(self, reason: str, abort: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self.finish_reason = reason
        if abort:
            self._abort()
        h = self.handle
        end = h.finished_at or time.monotonic()
        first = h.first_token_at
        ttft = None if first is None else first - h.submitted_at
        tpot = (end - first) / (self.num_generated - 1) if first is not None and self.num_generated > 1 else None
        status = {"abort": "aborted", "error": "error"}.get(reason, "finished")
        self.metrics.record_request(status, self.prompt_len, self.num_generated, ttft, tpot, end - h.submitted_at)

    def close(self, status: str = "aborted") -> None:
        """The consumer is gone (client disconnect, error): abort if still running. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._abort()
        self.metrics.record_request(status, self.prompt_len, self.num_generated)

    def _abort(self) -> None:
        try:
            self.cluster.abort(self.request_id)
        except UnknownRequestError:
            pass  # it finished meanwhile
        except Exception:
            log.exception("aborting %s failed", self.request_id)


# ----- response shapes -------------------------------------------------------------------------


class CompletionFormat:
    """How one endpoint shapes chunks and responses."""

    prefix = "cmpl"

    def __init__(self, request_id: str, model: str, req: P.GenerationRequest) -> None:
        self.id, self.model = request_id, model
        self.created = int(time.time())
        self.return_ids = req.return_token_ids
        self.include_usage = req.include_usage_in_stream

    def _dump(self, obj: BaseModel) -> dict:
        d = obj.model_dump(exclude_none=True)
        for c in d.get("choices", []):
            c.setdefault("logprobs", None)
            c.setdefault("finish_reason", None)
        return d

    def _ids(self, ids: list[int]) -> Optional[list[int]]:
        return list(ids) if self.return_ids else None

    def first_chunk(self) -> Optional[dict]:
        return None

    def chunk(self, d: Delta) -> dict:
        return self._dump(P.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[
            P.CompletionChoice(text=d.text, finish_reason=d.finish_reason, token_ids=self._ids(d.token_ids))]))

    def usage_chunk(self, usage: P.Usage) -> dict:
        return self._dump(P.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[],
                                               usage=usage))

    def response(self, text: str, ids: list[int], reason: Optional[str], usage: P.Usage) -> dict:
        return self._dump(P.CompletionResponse(id=self.id, created=self.created, model=self.model, usage=usage,
                                               choices=[P.CompletionChoice(text=text, finish_reason=reason,
                                                                           token_ids=self._ids(ids))]))


class ChatFormat(CompletionFormat):
    prefix = "chatcmpl"

    def _chunk(self, delta: P.ChatDelta, reason: Optional[str] = None, ids: Optional[list[int]] = None) -> dict:
        return self._dump(P.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[
            P.ChatChunkChoice(delta=delta, finish_reason=reason, token_ids=ids)]))

    def first_chunk(self) -> Optional[dict]:
        return self._chunk(P.ChatDelta(role="assistant", content=""))

    def chunk(self, d: Delta) -> dict:
        return self._chunk(P.ChatDelta(content=d.text or None), d.finish_reason, self._ids(d.token_ids))

    def usage_chunk(self, usage: P.Usage) -> dict:
        return self._dump(P.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                                usage=usage))

    def response(self, text: str, ids: list[int], reason: Optional[str], usage: P.Usage) -> dict:
        return self._dump(P.ChatCompletionResponse(id=self.id, created=self.created, model=self.model, usage=usage,
                                                   choices=[P.ChatChoice(message=P.AssistantMessage(content=text),
                                                                         finish_reason=reason,
                                                                         token_ids=self._ids(ids))]))
