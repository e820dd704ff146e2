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

from llumnix_py.engines.types import SamplingParams
from llumnix_py.errors import InvalidRequestError
from llumnix_py.frontend.cluster import Cluster
from llumnix_py.frontend.handles import NoInstanceError, RequestFailedError
from llumnix_py.server import protocol as P
from llumnix_py.server.errors import APIError, read_json_body, short, validation_error
from llumnix_py.server.generation import CompletionFormat, Generation
from llumnix_py.server.metrics import Metrics

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

    Raises:
        ValueError: ``max_body_bytes`` is not positive or ``api_key`` is empty.
    """

    def __init__(self, cluster: Cluster, api_key: Optional[str], max_body_bytes: int) -> None:
        if max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        if api_key is not None and not api_key:
            raise ValueError("api_key must be non-empty (None disables authentication)")
        self.cluster = cluster
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = Metrics()
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

        Args:
            request: the HTTP request (watched for a disconnect when not streaming).
            req: the parsed request (sampling options, ``stream``, stop strings, ...).
            prompt_ids: the prompt's token ids.
            max_tokens: tokens to generate (``None``: ``DEFAULT_MAX_TOKENS``).
            fmt_cls: the response format (completion or chat).

        Returns:
            An SSE stream when ``req.stream``, else the whole JSON response.

        Raises:
            APIError: 400 beyond the length limit or for invalid sampling, 503 when no
                instance can take it or its instance failed, 500 on an internal error.
        """
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        limit = self.max_len
        what = "the model's context length" if limit == self.cluster.max_model_len else "one instance's KV cache"
        if len(prompt_ids) + max_tokens > limit:
            raise APIError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                                f"{what} ({limit} tokens)", param="max_tokens", code="context_length_exceeded")
        try:
            temperature = 1.0 if req.temperature is None else float(req.temperature)
            sampling = SamplingParams(max_tokens=max_tokens,
                                      temperature=temperature if temperature >= GREEDY_BELOW else 0.0,
                                      top_p=1.0 if req.top_p is None else float(req.top_p),
                                      seed=req.seed, ignore_eos=req.ignore_eos)
            rid = f"{fmt_cls.prefix}-{uuid.uuid4().hex}"
            handle = await self.cluster.submit_async(prompt_ids, sampling, priority=req.priority, request_id=rid)
        except InvalidRequestError as exc:
            raise APIError(400, str(exc)) from None
        except NoInstanceError as exc:
            raise APIError(503, str(exc), type="server_error", code="no_instance") from None
        gen = Generation(self.cluster, self.metrics, handle, len(prompt_ids), req.stop_sequences)
        fmt = fmt_cls(rid, self.cluster.model_name, req)
        if req.stream:
            return _EventStream(self._stream(gen, fmt), on_close=gen.close)
        return await self._complete(request, gen, fmt)

    async def _stream(self, gen: Generation, fmt: CompletionFormat) -> AsyncIterator[str]:
        try:
            first = fmt.first_chunk()
            if first is not None:
                yield _sse(first)
            async for d in gen.deltas():
                if d.text or d.finish_reason or (fmt.return_ids and d.token_ids):
                    yield _sse(fmt.chunk(d))
            if fmt.include_usage:
                yield _sse(fmt.usage_chunk(gen.usage()))
            yield _sse("[DONE]")
        except RequestFailedError as exc:  # its instance died and no other could continue it
            yield _sse({"error": {"message": str(exc), "type": "server_error", "param": None,
                                  "code": "instance_failed"}})
            yield _sse("[DONE]")
        except Exception as exc:  # headers are sent: report in-band, then end the stream
            log.exception("stream %s failed", gen.request_id)
            gen.close("error")
            yield _sse({"error": {"message": f"internal error: {short(exc)}", "type": "server_error",
                                  "param": None, "code": None}})
            yield _sse("[DONE]")
        finally:
            gen.close()

    async def _complete(self, request: Request, gen: Generation, fmt: CompletionFormat) -> Response:
        async def collect() -> tuple[str, list[int]]:
            texts, ids = [], []
            async for d in gen.deltas():
                texts.append(d.text)
                ids.extend(d.token_ids)
            return "".join(texts), ids

        work = asyncio.ensure_future(collect())
        watch = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:  # the client left: nobody will read the answer
                gen.close()
                return JSONResponse({"error": {"message": "client disconnected", "type": "invalid_request_error",
                                               "param": None, "code": "client_disconnected"}}, status_code=400)
            try:
                text, ids = work.result()
            except RequestFailedError as exc:
                raise APIError(503, str(exc), type="server_error", code="instance_failed") from None
            except Exception:
                log.exception("request %s failed", gen.request_id)
                gen.close("error")
                raise APIError(500, "internal error", type="server_error") from None
        finally:
            for task in (work, watch):
                if not task.done():
                    task.cancel()
            gen.close()
        return JSONResponse(fmt.response(text, ids, gen.finish_reason, gen.usage()))


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
