"""The OpenAI-compatible HTTP frontend (FastAPI) over a ``Cluster``.

    app = create_app(cluster, api_key="secret")
    serve(app, host="0.0.0.0", port=8000)            # blocking, uvicorn
    with ServerThread(app) as srv: ... srv.url ...   # background thread, free port (tests, demos)

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE streaming or
not), ``GET /v1/models``, ``GET /v1/cluster/state`` (operators), ``GET /health``,
``GET /metrics`` (Prometheus). ``/v1/cluster/state`` answers from the last-known view
(``"stale": true``) while the scheduler is down; ``/health`` then says ``degraded``.
With ``api_key`` set, every ``/v1/*`` endpoint needs ``Authorization: Bearer <key>``.

The path of one request::

    HTTP body --read_json (size cap)--> protocol model (strict) --prompt ids, limits-->
    cluster.submit --TokenEvents (any instance, in order)--> Generation
    (IncrementalDecoder, stop strings) --> SSE chunks or one JSON response

Every way a request ends (finished, stop string, client gone, error) goes through
``Generation``, which aborts the request in the cluster unless it finished there,
so no KV block outlives its client. Bad input is a 400 with an OpenAI-style error
object and never reaches the cluster.

Modules: this one builds the app (routes) and runs it (``serve``, ``ServerThread``);
``llumnix_py.server.frontend`` takes one request from checked body to response;
``llumnix_py.server.errors`` has ``APIError``, the body checks and the error handlers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from typing import Any, Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from llumnix_py.engines.types import Objective
from llumnix_py.frontend.cluster import Cluster
from llumnix_py.server import protocol as P
from llumnix_py.server.errors import APIError, install_error_handlers, short
from llumnix_py.server.frontend import Frontend
from llumnix_py.server.generation import ChatFormat, CompletionFormat
from llumnix_py.server.metrics import CONTENT_TYPE
from llumnix_py.slo import SLO

log = logging.getLogger(__name__)


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


def create_app(cluster: Cluster, *, api_key: Optional[str] = None, max_body_bytes: int = 1 << 20,
               default_objective: Optional[Objective] = None, slo: Optional[SLO] = None) -> FastAPI:
    """The OpenAI-compatible app over ``cluster``.

    Args:
        cluster: a started ``Cluster`` (the app does not stop it).
        api_key: when set, ``/v1/*`` endpoints require ``Authorization: Bearer <api_key>``.
        max_body_bytes: larger request bodies are refused with a 400.
        default_objective: the objective of requests that name none (the model's default).
        slo: server-wide TTFT/TPOT objectives; finished requests are judged against them
            and ``/metrics`` reports the attainment (``llumnix_slo_*``).

    Returns:
        The FastAPI app; its ``state.metrics`` is the app's ``Metrics``.
    """
    fe = Frontend(cluster, api_key, max_body_bytes, default_objective, slo)
    app = FastAPI(title="llumnix-py", description="OpenAI-compatible API over a llumnix-py cluster")
    app.state.frontend = fe
    app.state.metrics = fe.metrics

    install_error_handlers(app)

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
            raise APIError(503, f"cluster state unavailable: {short(exc)}", type="server_error") from None
        return JSONResponse(_json_safe(state))

    @app.get("/health")
    async def health() -> Response:
        # ok; degraded (200, with reasons) while the scheduler is down or instances are missing;
        # unavailable (503) with no live instance.
        h = await asyncio.to_thread(cluster.health)
        return JSONResponse(h.to_dict(), status_code=h.http_status)

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            state = await asyncio.to_thread(cluster.state)
        except Exception:
            log.warning("cluster state unavailable for /metrics", exc_info=True)
            state = None
        try:
            health = (await asyncio.to_thread(cluster.health)).to_dict()
        except Exception:
            log.warning("cluster health unavailable for /metrics", exc_info=True)
            health = None
        return Response(fe.metrics.scrape(state, health), media_type=CONTENT_TYPE)

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
        """The server's base URL (with the port it got, once started)."""
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
        """Ask uvicorn to exit and wait up to ``timeout`` seconds for its thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = self._thread = None

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
