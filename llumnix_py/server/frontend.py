"""What the server does with one request, from checked body to response.

``Frontend`` holds what the routes share (the cluster, the API key, the body cap,
the prompt + ``max_tokens`` limit, the ``Metrics``) and takes a request through::

    check_auth --> read_json (size cap, strict JSON) --> parse (protocol model,
    unsupported options, model name) --> token_ids / chat_token_ids (vocabulary,
    chat template) --> generate (length limit, SamplingParams, cluster.submit_async)
    --> a ``Generation`` streamed as SSE chunks or collected into one JSON response

Every refusal is an ``APIError`` (``llumnix_py.server.errors``). A stream always
ends with ``data: [DONE]``, an error in it is reported in-band; a non-streaming
request whose client disconnects is aborted at once. Either way ``Generation.close``
runs, so the cluster aborts the request unless it finished there.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable, Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from llumnix_py.engines.types import Objective, SamplingParams
from llumnix_py.errors import InvalidRequestError
from llumnix_py.frontend.cluster import Cluster
from llumnix_py.frontend.handles import NoInstanceError, RequestFailedError
from llumnix_py.server import protocol as P
from llumnix_py.server.errors import APIError, read_json_body, short, validation_error
from llumnix_py.server.generation import Choice, CompletionFormat, Generation
from llumnix_py.server.metrics import Metrics
from llumnix_py.slo import SLO

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16
GREEDY_BELOW = 1e-5  # temperatures this small sample greedily (logits / T would overflow)


# ----- SSE ----------------------------------------------------------------------------------------


def _sse(obj: Union[dict, str]) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class _EventStream(StreamingResponse):
    """SSE response that always closes its generator and calls ``on_close``, even when the client left."""

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (OSError, ClientDisconnect):  # the client left mid-stream
            pass
        finally:
            self._on_close()
            try:
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            except BaseException:  # noqa: BLE001 (cancelled while closing: the abort already ran)
                pass


# ----- the frontend -----------------------------------------------------------------------------


class Frontend:
    """What the routes share: the cluster, the limits, the metrics.

    Args:
        cluster: the started ``Cluster`` requests go to.
        api_key: the key ``check_auth`` requires (``None``: no authentication).
        max_body_bytes: the largest request body ``read_json`` accepts.
        default_objective: the objective of a request that names none (None: no objective).
        slo: server-wide TTFT/TPOT objectives the metrics judge finished requests by.

    Raises:
        ValueError: ``max_body_bytes`` is not positive or ``api_key`` is empty.
    """

    def __init__(self, cluster: Cluster, api_key: Optional[str], max_body_bytes: int,
                 default_objective: Optional[Objective] = None, slo: Optional[SLO] = None) -> None:
        if max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        if api_key is not None and not api_key:
            raise ValueError("api_key must be non-empty (None disables authentication)")
        self.cluster = cluster
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.default_objective = default_objective
        self.metrics = Metrics(slo)
        self.created = int(time.time())
        capacity = _kv_capacity_tokens(cluster)
        # prompt + max_tokens limit: the context length, or less when one instance's KV pool is smaller
        self.max_len = min(cluster.max_model_len, capacity) if capacity is not None else cluster.max_model_len

    def check_auth(self, request: Request) -> None:
        """Raise a 401 ``APIError`` unless ``request`` carries ``Authorization: Bearer <api_key>``."""
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode("latin-1", "replace"), self.api_key.encode("utf-8"))
        if not ok:
            raise APIError(401, "invalid or missing API key (expected 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        """The body as a JSON object, at most ``max_body_bytes`` (see ``read_json_body``)."""
        return await read_json_body(request, self.max_body_bytes)

    def parse(self, model: type[P.GenerationRequest], data: dict) -> Any:
        """``data`` validated as ``model``; a 400 for invalid fields, unsupported options or another model."""
        try:
            req = model.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        unsupported = req.unsupported()
        if unsupported is not None:
            raise APIError(400, unsupported[1], param=unsupported[0], code="not_supported")
        if req.model is not None and req.model != self.cluster.model_name:
            raise APIError(400, f"model {req.model!r} does not exist; this server serves "
                                f"{self.cluster.model_name!r}", param="model", code="model_not_found")
        return req

    def token_ids(self, prompt: Union[str, list[int]]) -> list[int]:
        """The prompt's token ids (text is tokenized); a 400 if empty or an id is outside the vocabulary."""
        tok = self.cluster.tokenizer
        if isinstance(prompt, str):
            ids = list(tok.encode(prompt))
        else:
            vocab = tok.vocab_size
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
            ids = list(prompt)
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt")
        return ids

    def chat_token_ids(self, req: P.ChatCompletionRequest) -> list[int]:
        """The token ids of the chat messages rendered with the tokenizer's chat template."""
        try:
            text = self.cluster.tokenizer.apply_chat_template(req.chat_messages())
        except ValueError as exc:
            raise APIError(400, f"messages cannot be rendered: {short(exc)}", param="messages") from None
        return self.token_ids(text)

    async def generate(self, request: Request, req: P.GenerationRequest, prompt_ids: list[int],
                       max_tokens: Optional[int], fmt_cls: type[CompletionFormat]) -> Response:
        """Submit the request to the cluster and answer it.

        ``n`` > 1 (or ``best_of``) fans out into that many requests of their own in the cluster
        (``<id>-<i>``), each placed, migrated and finished on its own, with seed ``seed + i``
        (vLLM's rule; unseeded ones draw from streams keyed by their own ids); the response joins
        them in index order, and a stream's chunks carry their choice's index.

        Args:
            request: the HTTP request (watched for a disconnect when not streaming).
            req: the parsed request (sampling options, ``stream``, stop strings, ...).
            prompt_ids: the prompt's token ids.
            max_tokens: tokens to generate (``None``: ``DEFAULT_MAX_TOKENS``; 0: score the prompt).
            fmt_cls: the response format (completion or chat).

        Returns:
            An SSE stream when ``req.stream``, else the whole JSON response.

        Raises:
            APIError: 400 beyond the length limit or for invalid sampling, 503 when no
                instance can take it or its instance failed, 500 on an internal error.
        """
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        score_only = max_tokens == 0  # echo with max_tokens=0: one token is generated and dropped
        limit = self.max_len
        what = "the model's context length" if limit == self.cluster.max_model_len else "one instance's KV cache"
        if len(prompt_ids) + max(max_tokens, 1) > limit:
            raise APIError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                                f"{what} ({limit} tokens)", param="max_tokens", code="context_length_exceeded")
        rid = f"{fmt_cls.prefix}-{uuid.uuid4().hex}"
        count = getattr(req, "num_generated", 1)
        best_of = count > req.num_choices
        vocab = self.cluster.tokenizer.vocab_size
        for name, ids in (("logit_bias", [t for t, _ in req.logit_bias_pairs()]), ("stop_token_ids", req.stop_token_ids)):
            bad = next((t for t in ids or () if t >= vocab), None)
            if bad is not None:
                raise APIError(400, f"{name}: token id {bad} is outside the vocabulary [0, {vocab})", param=name)
        try:
            samplings = [self._sampling(req, max(max_tokens, 1), i, best_of) for i in range(count)]
        except InvalidRequestError as exc:  # its message starts with the field's name
            field = str(exc).split(" ", 1)[0]
            raise APIError(400, str(exc), param=field if field in type(req).model_fields else None) from None
        objective = self._objective(req)
        gens: list[Generation] = []
        try:
            for i, sampling in enumerate(samplings):
                sub = rid if count == 1 else f"{rid}-{i}"
                handle = await self.cluster.submit_async(prompt_ids, sampling, priority=req.priority, request_id=sub,
                                                         objective=objective,
                                                         client_id=req.user or "",
                                                         conversation_id=req.conversation_id or "")
                gens.append(Generation(self.cluster, self.metrics, handle, len(prompt_ids), req.stop_sequences,
                                       index=i, min_tokens=req.min_tokens or 0, score_only=score_only,
                                       objective=objective))
        except (InvalidRequestError, NoInstanceError) as exc:
            for g in gens:
                g.close()
            if isinstance(exc, NoInstanceError):
                raise APIError(503, str(exc), type="server_error", code="no_instance") from None
            raise APIError(400, str(exc)) from None
        echo = bool(getattr(req, "echo", False))
        prompt_text = "" if not echo else (req.prompt if isinstance(req.prompt, str)
                                           else self.cluster.tokenizer.decode(prompt_ids))
        fmt = fmt_cls(rid, self.cluster.model_name, req, self.cluster.tokenizer, prompt_ids, prompt_text)

        def close_all() -> None:
            for g in gens:
                g.close()

        if req.stream:
            return _EventStream(self._stream(gens, fmt), on_close=close_all)
        return await self._complete(request, gens, fmt, req.num_choices if best_of else None)

    def _objective(self, req: P.GenerationRequest) -> Optional[Objective]:
        """The request's objective (its fields, else the server's default); a 400 when invalid."""
        given = req.objective_fields()
        if not given:
            return self.default_objective
        try:
            return Objective(**given)
        except InvalidRequestError as exc:
            raise APIError(400, str(exc), param=sorted(given)[0]) from None

    def _sampling(self, req: P.GenerationRequest, max_tokens: int, index: int, best_of: bool) -> SamplingParams:
        """The sampling parameters of choice ``index`` (``InvalidRequestError`` if invalid)."""
        temperature = 1.0 if req.temperature is None else float(req.temperature)
        seed = req.seed
        if seed is not None and index:
            seed = (seed + index + (1 << 63)) % (1 << 64) - (1 << 63)  # seed + index, wrapped to 64 bits
        logprobs = req.num_logprobs()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature if temperature >= GREEDY_BELOW else 0.0,
            top_p=1.0 if req.top_p is None else float(req.top_p),
            top_k=max(0, req.top_k or 0),
            min_p=float(req.min_p or 0.0),
            presence_penalty=float(req.presence_penalty or 0.0),
            frequency_penalty=float(req.frequency_penalty or 0.0),
            repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
            logit_bias=req.logit_bias_pairs(),
            min_tokens=req.min_tokens or 0,
            seed=seed,
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            logprobs=0 if best_of and logprobs is None else logprobs,  # best_of ranks by cumulative logprob
            prompt_logprobs=req.num_prompt_logprobs(),
        )

    async def _stream(self, gens: list[Generation], fmt: CompletionFormat) -> AsyncIterator[str]:
        events: asyncio.Queue = asyncio.Queue()

        async def pump(g: Generation) -> None:
            try:
                async for d in g.deltas():
                    await events.put((g, d, None))
            except BaseException as exc:  # noqa: BLE001 (handed to the stream, which reports it)
                await events.put((g, None, exc))
                return
            await events.put((g, None, None))

        tasks = [asyncio.ensure_future(pump(g)) for g in gens]
        try:
            for first in fmt.first_chunks(len(gens)):
                yield _sse(first)
            running = len(gens)
            while running:
                g, d, exc = await events.get()
                if exc is not None:
                    raise exc
                if d is None:
                    running -= 1
                elif fmt.wants_chunk(d):
                    yield _sse(fmt.chunk(d, g.prompt_logprobs))
            if fmt.include_usage:
                yield _sse(fmt.usage_chunk(_usage(gens)))
            yield _sse("[DONE]")
        except RequestFailedError as exc:  # its instance died and no other could continue it
            yield _sse({"error": {"message": str(exc), "type": "server_error", "param": None,
                                  "code": "instance_failed"}})
            yield _sse("[DONE]")
        except Exception as exc:  # headers are sent: report in-band, then end the stream
            log.exception("stream %s failed", fmt.id)
            for g in gens:
                g.close("error")
            yield _sse({"error": {"message": f"internal error: {short(exc)}", "type": "server_error",
                                  "param": None, "code": None}})
            yield _sse("[DONE]")
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            for g in gens:
                g.close()

    async def _complete(self, request: Request, gens: list[Generation], fmt: CompletionFormat,
                        best_n: Optional[int]) -> Response:
        """Collect every choice; with ``best_n`` (``best_of``), keep the ``best_n`` of highest cumulative
        log probability (ties: lower index), re-indexed 0.. in that order, as vLLM does."""
        async def collect(g: Generation) -> Choice:
            texts, ids, lps = [], [], []
            async for d in g.deltas():
                texts.append(d.text)
                ids.extend(d.token_ids)
                lps.extend(d.logprobs or ())
            return Choice(g.index, "".join(texts), ids, g.finish_reason,
                          lps if fmt.num_logprobs is not None else None, g.prompt_logprobs)

        work = asyncio.ensure_future(asyncio.gather(*(collect(g) for g in gens)))
        watch = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:  # the client left: nobody will read the answer
                for g in gens:
                    g.close()
                return JSONResponse({"error": {"message": "client disconnected", "type": "invalid_request_error",
                                               "param": None, "code": "client_disconnected"}}, status_code=400)
            try:
                choices = list(work.result())
            except RequestFailedError as exc:
                raise APIError(503, str(exc), type="server_error", code="instance_failed") from None
            except Exception:
                log.exception("request %s failed", fmt.id)
                for g in gens:
                    g.close("error")
                raise APIError(500, "internal error", type="server_error") from None
        finally:
            for task in (work, watch):
                if not task.done():
                    task.cancel()
            for g in gens:
                g.close()
        if best_n is not None:
            ranked = sorted(gens, key=lambda g: (-g.cumulative_logprob, g.index))[:best_n]
            choices = [choices[g.index] for g in ranked]
            for k, c in enumerate(choices):
                c.index = k
        return JSONResponse(fmt.response(choices, _usage(gens)))


def _usage(gens: list[Generation]) -> P.Usage:
    """The prompt counted once, the completions of every choice (generated ones included, for best_of)."""
    return P.Usage.of(gens[0].prompt_len, sum(g.num_generated for g in gens))


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


def _kv_capacity_tokens(cluster: Cluster) -> Optional[int]:
    """Tokens one sequence can hold in an instance's KV pool (one block spare), if the config says.

    A request longer than this can never finish on any instance (it would hold the
    whole pool and wait forever), so it is refused like one beyond the context length.
    """
    try:
        engine = cluster.config.engine.engine
        return max(1, (int(engine.num_blocks) - 1) * int(engine.block_size))
    except (AttributeError, TypeError, ValueError):
        return None
