"""OpenAI-shaped errors: every failure answers `{"error": {"message", "type", "param", "code"}}`.

FastAPI's own failures are mapped here too: a body that does not validate (malformed JSON, a wrong type, an
unknown or missing field) is a 400 naming the field, where FastAPI would answer 422 in its own shape;
unknown routes and methods keep their 404/405 in OpenAI's shape; an unexpected exception is a 500 that
says nothing about internals (its traceback goes to the log).
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger("fastsolar.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_unavailable"}


class APIError(Exception):
    """An error answered as `status` with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, _TYPES.get(self.status, "invalid_request_error"), self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _path(loc: tuple) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(err: dict[str, Any]) -> str:
    path = _path(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
    if kind == "extra_forbidden":
        return f"unsupported parameter '{path}': this server does not implement it"
    if kind == "missing":
        return f"missing required parameter '{path}'" if path else "the request has no JSON body"
    if not path:
        if isinstance(err.get("input"), (bytes, str)):  # FastAPI parses JSON only when the header says so
            return "the body is not JSON: send a JSON object with 'Content-Type: application/json'"
        return f"the body must be a JSON object ({err.get('msg')})"
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    return f"invalid '{path}': {msg}"


def validation_error(exc: RequestValidationError) -> APIError:
    errors = list(exc.errors())
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    message = "; ".join(_describe(e) for e in errors[:4])
    if len(errors) > 4:
        message += f" (+{len(errors) - 4} more)"
    param = None if first.get("type") == "json_invalid" else _path(tuple(first.get("loc", ()))) or None
    return APIError(400, message, param=param)


def install(app: FastAPI) -> None:
    """Map every error FastAPI can raise onto OpenAI's shape."""

    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        logger.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_error(exc))

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return await api_error(request, APIError(exc.status_code, str(exc.detail), headers=exc.headers))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
