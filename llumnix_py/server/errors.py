"""Errors of the OpenAI-compatible server and the request-body checks that raise them.

Every refusal is an ``APIError``, answered as an OpenAI-style error object
``{"error": {message, type, param, code}}`` with its HTTP status. Bad input never
reaches the cluster:

* ``read_json_body`` reads a body under a size cap (the declared ``Content-Length``
  and the bytes actually streamed) and parses it as strict JSON (no ``NaN`` /
  ``Infinity``, no out-of-range numbers) that must be an object;
* ``validation_error`` turns pydantic's (or FastAPI's) validation errors into a 400
  naming the first offending field;
* ``install_error_handlers`` makes an app answer ``APIError``, request validation
  errors, Starlette HTTP errors and unhandled exceptions (a logged 500) alike.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llumnix_py.server import protocol as P

log = logging.getLogger(__name__)


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


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error raised by ``app``'s routes as an OpenAI-style error object.

    Args:
        app: the FastAPI app; ``APIError`` keeps its status, request validation errors
            become 400s, Starlette HTTP errors (404, 405, ...) keep theirs, and any other
            exception is logged and answered as a 500 ``server_error``.
    """

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, "internal error", type="server_error").response()


async def read_json_body(request: Request, limit: int) -> dict:
    """The request's body as a JSON object, read under a size cap.

    Args:
        request: the incoming request (its body not yet read).
        limit: the largest body accepted, in bytes.

    Returns:
        The parsed JSON object.

    Raises:
        APIError: 400 if the body is too large (declared or streamed), empty, not
            valid JSON (``NaN``, ``Infinity`` and overflowing numbers included), not an
            object, or the client disconnected while sending it.
    """
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
        raise APIError(400, f"request body is not valid JSON: {short(exc)}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    return data


def validation_error(errors: list[dict]) -> APIError:
    """A 400 ``APIError`` for the first of pydantic's validation ``errors`` (``param`` names its field)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    where = ".".join(loc)
    return APIError(400, f"{where}: {msg}" if where else msg, param=loc[0] if loc else None)


def short(exc: BaseException, limit: int = 200) -> str:
    """``exc``'s message (or its type's name), cut to ``limit`` characters for an error response."""
    s = str(exc) or type(exc).__name__
    return s if len(s) <= limit else s[:limit] + "..."


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value
