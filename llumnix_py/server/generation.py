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
from typing import AsyncIterator, Optional, Sequence

from pydantic import BaseModel

from llumnix_py.engines.tokenizer import Tokenizer
from llumnix_py.engines.types import FinishReason, Objective, TokenLogprob
from llumnix_py.errors import UnknownRequestError
from llumnix_py.frontend.cluster import Cluster
from llumnix_py.frontend.handles import RequestFailedError, RequestHandle
from llumnix_py.server import protocol as P
from llumnix_py.server.metrics import Metrics

log = logging.getLogger(__name__)

_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort"}


@dataclass
class Delta:
    """New text of one choice (may be ""), the token ids behind it, and the finish reason on the last.

    ``logprobs`` (when asked for) has one entry per token of ``token_ids``; ``index`` is the choice's.
    """

    text: str
    token_ids: list[int]
    finish_reason: Optional[str]
    logprobs: Optional[tuple[TokenLogprob, ...]] = None
    index: int = 0


class Generation:
    """Turns a request's ``TokenEvent``s into text deltas; owns its abort and its metrics.

    Stop strings are matched on the detokenized text. Text that could be the start
    of a stop string is held back until it is ruled out, so a stop string never
    reaches the client even when it spans several tokens.

    Args:
        index: the choice's index in the response (``n`` > 1 runs one ``Generation`` per choice).
        min_tokens: stop strings are looked for only from this many tokens on (vLLM's rule).
        score_only: the request scores its prompt (``echo`` with ``max_tokens=0``): it runs for one
            token, which is dropped, so only the prompt's log probabilities come back.
        objective: the request's objective; when it finishes, whether each of its tokens arrived
            in time (as this frontend saw them arrive) goes to the goodput metrics.
    """

    def __init__(self, cluster: Cluster, metrics: Metrics, handle: RequestHandle, prompt_len: int,
                 stops: list[str], index: int = 0, min_tokens: int = 0, score_only: bool = False,
                 objective: Optional[Objective] = None) -> None:
        self.cluster, self.metrics, self.handle = cluster, metrics, handle
        self.prompt_len = prompt_len
        self.stops = stops
        self.index = index
        self.min_tokens = min_tokens
        self.score_only = score_only
        self.decoder = cluster.detokenizer()
        self.num_generated = 0
        self.finish_reason: Optional[str] = None
        self.cumulative_logprob = 0.0  # of the generated tokens (when they carry logprobs): ranks best_of
        self.prompt_logprobs: Optional[tuple[Optional[TokenLogprob], ...]] = None
        self._held = ""
        self._closed = False
        self.objective = objective
        self._token_times: list[float] = []  # when each generated token arrived (monotonic), for the objective

    @property
    def request_id(self) -> str:
        return self.handle.request_id

    async def deltas(self) -> AsyncIterator[Delta]:
        async for ev in self.handle:
            if ev.error is not None:  # its instance died and no other could continue it
                self._end("error", abort=False)
                raise RequestFailedError(ev.error)
            if ev.prompt_logprobs is not None:
                self.prompt_logprobs = ev.prompt_logprobs
            done = ev.finish_reason is not None
            if self.score_only:  # the one generated token is not part of the answer
                if done:
                    self._end("length", abort=False)
                    yield Delta("", [], "length", () if ev.logprobs is not None else None, self.index)
                    return
                continue
            ids = list(ev.token_ids)
            if ev.logprobs is not None:
                self.cumulative_logprob += sum(x.logprob for x in ev.logprobs)
            self.num_generated += len(ids)
            if self.objective is not None:
                self._token_times.extend([time.monotonic()] * len(ids))
            text = self.decoder.push(ids) + (self.decoder.flush() if done else "")
            text, hit = self._cut_at_stop(text, done, matching=self.num_generated >= self.min_tokens)
            if hit or done:
                reason = "stop" if hit else _FINISH.get(ev.finish_reason, "stop")
                self._end(reason, abort=not done)
                yield Delta(text, ids, reason, ev.logprobs, self.index)
                return
            yield Delta(text, ids, None, ev.logprobs, self.index)

    def _cut_at_stop(self, piece: str, final: bool, matching: bool = True) -> tuple[str, bool]:
        """Cut ``piece`` at the first stop string. ``matching`` is False while fewer than
        ``min_tokens`` tokens exist: the text goes out unchecked (and nothing is held back)."""
        if not self.stops or not matching:
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
        self.metrics.record_request(status, self.prompt_len, self.num_generated, ttft, tpot, end - h.submitted_at,
                                    client=h.request.client_id)
        if status == "finished" and self.objective is not None and self._token_times:
            margin = self.objective.margin_s(h.submitted_at, self._token_times)
            self.metrics.record_objective(self.objective.kind, margin, self.num_generated)

    def close(self, status: str = "aborted") -> None:
        """The consumer is gone (client disconnect, error): abort if still running. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._abort()
        self.metrics.record_request(status, self.prompt_len, self.num_generated, client=self.handle.request.client_id)

    def _abort(self) -> None:
        try:
            self.cluster.abort(self.request_id)
        except UnknownRequestError:
            pass  # it finished meanwhile
        except Exception:
            log.exception("aborting %s failed", self.request_id)


# ----- response shapes -------------------------------------------------------------------------

NEG_INF_LOGPROB = -9999.0  # what a -inf log probability reads as in JSON (vLLM's choice)


@dataclass
class Choice:
    """One finished choice of a non-streamed response."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]
    logprobs: Optional[list[TokenLogprob]]
    prompt_logprobs: Optional[tuple[Optional[TokenLogprob], ...]] = None


def _json_lp(v: float) -> float:
    return v if v > NEG_INF_LOGPROB else NEG_INF_LOGPROB


class CompletionFormat:
    """How one endpoint shapes chunks and responses.

    Args:
        request_id / model: the response's ``id`` and ``model``.
        req: the parsed request (``return_token_ids``, ``stream_options``, logprobs, echo).
        tokenizer: turns token ids into the strings of log-probability entries.
        prompt_ids / prompt_text: the prompt, echoed in front of each choice with ``echo``.
    """

    prefix = "cmpl"

    def __init__(self, request_id: str, model: str, req: P.GenerationRequest, tokenizer: Tokenizer,
                 prompt_ids: Sequence[int] = (), prompt_text: str = "") -> None:
        self.id, self.model = request_id, model
        self.created = int(time.time())
        self.return_ids = req.return_token_ids
        self.include_usage = req.include_usage_in_stream
        self.num_logprobs = req.num_logprobs()
        self.echo = bool(getattr(req, "echo", False))
        self.tokenizer = tokenizer
        self.prompt_ids, self.prompt_text = list(prompt_ids), prompt_text
        self._offsets: dict[int, int] = {}  # choice index -> text offset of its next token (streaming)
        self._started: set[int] = set()  # choices whose first chunk went out

    def _dump(self, obj: BaseModel, logprobs: Optional[list[Optional[dict]]] = None) -> dict:
        d = obj.model_dump(exclude_none=True)
        for k, c in enumerate(d.get("choices", [])):
            c["logprobs"] = logprobs[k] if logprobs else None
            c.setdefault("finish_reason", None)
        return d

    def _ids(self, ids: list[int]) -> Optional[list[int]]:
        return list(ids) if self.return_ids else None

    def _token_str(self, t: int) -> str:
        return self.tokenizer.decode([t])

    def first_chunks(self, n: int) -> list[dict]:
        return []

    def wants_chunk(self, d: Delta) -> bool:
        """Whether a delta is worth a chunk (it has text, ends the choice, or carries tokens asked for)."""
        return bool(d.text or d.finish_reason or (self.echo and d.index not in self._started)
                    or ((self.return_ids or self.num_logprobs is not None) and d.token_ids))

    def _echo_part(self, index: int, prompt_lps) -> tuple[str, list[int], Optional[list]]:
        """The prompt in front of a choice's first text, with its log probabilities (``echo``)."""
        if not self.echo or index in self._started:
            return "", [], None
        lps = list(prompt_lps) if prompt_lps is not None else None
        return self.prompt_text, list(self.prompt_ids), lps

    def _completion_logprobs(self, index: int, ids: list[int], lps: Optional[list]) -> Optional[dict]:
        """OpenAI's completions shape: tokens, token_logprobs, top_logprobs, text_offset.
        ``lps`` entries may be None (the first prompt token has no log probability)."""
        if self.num_logprobs is None or lps is None:
            return None
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = self._offsets.get(index, 0)
        for t, lp in zip(ids, lps):
            s = self._token_str(t)
            out["tokens"].append(s)
            out["text_offset"].append(offset)
            offset += len(s)
            if lp is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_json_lp(lp.logprob))
            top = {self._token_str(a): _json_lp(v) for a, v in lp.top[:self.num_logprobs]}
            top[s] = _json_lp(lp.logprob)  # the sampled token is always listed (as vLLM) and wins a string clash
            out["top_logprobs"].append(top)
        self._offsets[index] = offset
        return out

    def _choice_logprobs(self, index: int, ids: list[int], lps: Optional[list], prompt_lps) -> Optional[dict]:
        echo_text, echo_ids, echo_lps = self._echo_part(index, prompt_lps)
        if self.num_logprobs is None:
            return None
        if echo_ids and echo_lps is None:
            echo_lps = [None] * len(echo_ids)
        return self._completion_logprobs(index, echo_ids + ids, (echo_lps or []) + list(lps or []))

    def chunk(self, d: Delta, prompt_lps=None) -> dict:
        echo_text = self._echo_part(d.index, prompt_lps)[0]
        lp = self._choice_logprobs(d.index, d.token_ids, list(d.logprobs or []), prompt_lps)
        self._started.add(d.index)
        return self._dump(P.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[
            P.CompletionChoice(index=d.index, text=echo_text + d.text, finish_reason=d.finish_reason,
                               token_ids=self._ids(d.token_ids))]), [lp])

    def usage_chunk(self, usage: P.Usage) -> dict:
        return self._dump(P.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[],
                                               usage=usage))

    def response(self, choices: list[Choice], usage: P.Usage) -> dict:
        lps, out = [], []
        for c in choices:
            echo_text = self._echo_part(c.index, c.prompt_logprobs)[0]
            lps.append(self._choice_logprobs(c.index, c.token_ids, c.logprobs, c.prompt_logprobs))
            self._started.add(c.index)
            out.append(P.CompletionChoice(index=c.index, text=echo_text + c.text, finish_reason=c.finish_reason,
                                          token_ids=self._ids(c.token_ids)))
        return self._dump(P.CompletionResponse(id=self.id, created=self.created, model=self.model, usage=usage,
                                               choices=out), lps)


class ChatFormat(CompletionFormat):
    prefix = "chatcmpl"

    def _chat_logprobs(self, ids: list[int], lps: Optional[list]) -> Optional[dict]:
        """OpenAI's chat shape: content = [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
        if self.num_logprobs is None or lps is None:
            return None

        def entry(t: int, v: float) -> dict:
            s = self._token_str(t)
            return {"token": s, "logprob": _json_lp(v), "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(t, lp.logprob), "top_logprobs": [entry(a, v) for a, v in
                                                                       lp.top[:self.num_logprobs]]}
                            for t, lp in zip(ids, lps)]}

    def _chunk(self, index: int, delta: P.ChatDelta, reason: Optional[str] = None,
               ids: Optional[list[int]] = None, logprobs: Optional[dict] = None) -> dict:
        return self._dump(P.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[
            P.ChatChunkChoice(index=index, delta=delta, finish_reason=reason, token_ids=ids)]), [logprobs])

    def first_chunks(self, n: int) -> list[dict]:
        return [self._chunk(i, P.ChatDelta(role="assistant", content="")) for i in range(n)]

    def chunk(self, d: Delta, prompt_lps=None) -> dict:
        self._started.add(d.index)
        return self._chunk(d.index, P.ChatDelta(content=d.text or None), d.finish_reason, self._ids(d.token_ids),
                           self._chat_logprobs(d.token_ids, list(d.logprobs or [])))

    def usage_chunk(self, usage: P.Usage) -> dict:
        return self._dump(P.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                                usage=usage))

    def response(self, choices: list[Choice], usage: P.Usage) -> dict:
        out = [P.ChatChoice(index=c.index, message=P.AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                            token_ids=self._ids(c.token_ids)) for c in choices]
        return self._dump(P.ChatCompletionResponse(id=self.id, created=self.created, model=self.model, usage=usage,
                                                   choices=out),
                          [self._chat_logprobs(c.token_ids, c.logprobs) for c in choices])
