"""The OpenAI-compatible HTTP frontend (FastAPI) over a ``Cluster``.

    app = create_app(cluster, api_key="secret")
    serve(app, host="0.0.0.0", port=8000)            # blocking, uvicorn
    with ServerThread(app) as srv: ... srv.url ...   # background thread, free port (tests, demos)

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE streaming or
not), ``GET /v1/models``, ``GET /v1/cluster/state`` (operators), ``GET /health``,
``GET /metrics`` (Prometheus). With ``api_key`` set, every ``/v1/*`` endpoint needs
``Authorization: Bearer <key>``.

The path of one request::

    HTTP body --read_json (size cap)--> protocol model (strict) --prompt ids, limits-->
    cluster.submit --TokenEvents (any instance, in order)--> Generation
    (IncrementalDecoder, stop strings) --> SSE chunks or one JSON response

Every way a request ends (finished, stop string, client gone, error) goes through
``Generation``, which aborts the request in the cluster unless it finished there,
so no KV block outlives its client. Bad input is a 400 with an OpenAI-style error
object and never reaches the cluster.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Optional, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llumnix_py.cluster import Cluster, NoInstanceError, RequestFailedError
from llumnix_py.engines.types import SamplingParams
from llumnix_py.errors import InvalidRequestError
from llumnix_py.server import protocol as P
from llumnix_py.server.generation import ChatFormat, CompletionFormat, Generation
from llumnix_py.server.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16
GREEDY_BELOW = 1e-5  # temperatures this small sample greedily (logits / T would overflow)


class APIError(Exception):
    """An error answered as ``{"error": {message, type, param, code}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        body = P.ErrorResponse(error=P.ErrorInfo(message=self.message, type=self.type, param=self.param,
                                                 code=self.code))
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body.model_dump(), status_code=self.status, headers=headers)


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


class _Frontend:
    """What the routes share: the cluster, the limits, the metrics."""

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
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode("latin-1", "replace"), self.api_key.encode("utf-8"))
        if not ok:
            raise APIError(401, "invalid or missing API key (expected 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0:
                raise APIError(400, "invalid Content-Length header")
            if length > limit:
                raise APIError(400, f"request body of {length} bytes exceeds the limit of {limit} bytes",
                               code="body_too_large")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(400, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
                chunks.append(chunk)
        except ClientDisconnect:
            raise APIError(400, "client disconnected while sending the body") from None
        body = b"".join(chunks)
        if not body.strip():
            raise APIError(400, "request body is empty; expected a JSON object")
        try:
            data = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
        except (ValueError, RecursionError) as exc:
            raise APIError(400, f"request body is not valid JSON: {_short(exc)}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object")
        return data

    def parse(self, model: type[P.GenerationRequest], data: dict) -> Any:
        try:
            req = model.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc.errors()) from None
        unsupported = req.unsupported()
        if unsupported is not None:
            raise APIError(400, unsupported[1], param=unsupported[0], code="not_supported")
        if req.model is not None and req.model != self.cluster.model_name:
            raise APIError(400, f"model {req.model!r} does not exist; this server serves "
                                f"{self.cluster.model_name!r}", param="model", code="model_not_found")
        return req

    def token_ids(self, prompt: Union[str, list[int]]) -> list[int]:
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
        try:
            text = self.cluster.tokenizer.apply_chat_template(req.chat_messages())
        except ValueError as exc:
            raise APIError(400, f"messages cannot be rendered: {_short(exc)}", param="messages") from None
        return self.token_ids(text)

    async def generate(self, request: Request, req: P.GenerationRequest, prompt_ids: list[int],
                       max_tokens: Optional[int], fmt_cls: type[CompletionFormat]) -> Response:
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
            yield _sse({"error": {"message": f"internal error: {_short(exc)}", "type": "server_error",
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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def _short(exc: BaseException, limit: int = 200) -> str:
    s = str(exc) or type(exc).__name__
    return s if len(s) <= limit else s[:limit] + "..."


def _validation_error(errors: list[dict]) -> APIError:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    where = ".".join(loc)
    return APIError(400, f"{where}: {msg}" if where else msg, param=loc[0] if loc else None)


def _json_safe(obj: Any) -> Any:
    """JSON has no infinities: a terminating instance's freeness (-inf) becomes null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ----- the app ----------------------------------------------------------------------------------


def create_app(cluster: Cluster, *, api_key: Optional[str] = None, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The OpenAI-compatible app over ``cluster``.

    Args:
        cluster: a started ``Cluster`` (the app does not stop it).
        api_key: when set, ``/v1/*`` endpoints require ``Authorization: Bearer <api_key>``.
        max_body_bytes: larger request bodies are refused with a 400.

    Returns:
        The FastAPI app; its ``state.metrics`` is the app's ``Metrics``.
    """
    fe = _Frontend(cluster, api_key, max_body_bytes)
    app = FastAPI(title="llumnix-py", description="OpenAI-compatible API over a llumnix-py cluster")
    app.state.frontend = fe
    app.state.metrics = fe.metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return _validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, "internal error", type="server_error").response()

    async def _generation(request: Request, chat: bool) -> Response:
        fe.check_auth(request)
        try:
            data = await fe.read_json(request)
            if chat:
                req = fe.parse(P.ChatCompletionRequest, data)
                ids, max_tokens = fe.chat_token_ids(req), req.requested_max_tokens()
            else:
                req = fe.parse(P.CompletionRequest, data)
                ids, max_tokens = fe.token_ids(req.prompt), req.max_tokens
            return await fe.generate(request, req, ids, max_tokens, ChatFormat if chat else CompletionFormat)
        except APIError as exc:
            if exc.status in (400, 503):
                fe.metrics.record_rejected()
            raise

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generation(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generation(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        fe.check_auth(request)
        card = P.ModelCard(id=cluster.model_name, created=fe.created, max_model_len=fe.max_len)
        return JSONResponse(P.ModelList(data=[card]).model_dump())

    @app.get("/v1/cluster/state")
    async def cluster_state(request: Request) -> Response:
        fe.check_auth(request)
        try:
            state = await asyncio.to_thread(cluster.state)
        except Exception as exc:
            raise APIError(503, f"cluster state unavailable: {_short(exc)}", type="server_error") from None
        return JSONResponse(_json_safe(state))

    @app.get("/health")
    async def health() -> Response:
        try:
            n = len(await asyncio.to_thread(cluster.instance_ids))
        except Exception:
            n = 0
        return JSONResponse({"status": "ok" if n else "unavailable", "instances": n},
                            status_code=200 if n else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            state = await asyncio.to_thread(cluster.state)
        except Exception:
            log.warning("cluster state unavailable for /metrics", exc_info=True)
            state = None
        return Response(fe.metrics.scrape(state), media_type=CONTENT_TYPE)

    return app


# ----- serving ----------------------------------------------------------------------------------


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted (blocking)."""
    uvicorn.run(app, host=host, port=port, log_level=log_level)


class ServerThread:
    """Uvicorn in a background thread (tests, demos). Port 0 picks a free port; ``url`` reports it.

        srv = ServerThread(app).start()
        httpx.get(srv.url + "/health")
        srv.stop()
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self._server: Optional[uvicorn.Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        """Start serving; returns once the socket accepts connections."""
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level=self.log_level,
                                access_log=False, timeout_graceful_shutdown=2)
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, name="llumnix-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"HTTP server did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        self.port = server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = self._thread = None

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
