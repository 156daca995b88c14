"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

Handlers raise ``APIError`` (or a subclass); the app's exception handlers turn it, FastAPI's
validation errors (422 -> 400), backend ValueErrors (400) and ``Overloaded`` (429 with
Retry-After) into that JSON.
"""

from __future__ import annotations

import math
import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ares_jax.frontend.backend import BackendClosed, Overloaded


class APIError(Exception):
    """An error answered with OpenAI's error JSON."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class InvalidRequest(APIError):
    """400: a bad or unsupported parameter."""


class ModelNotFound(APIError):
    status = 404

    def __init__(self, model: str, served: str) -> None:
        super().__init__(f"The model {model!r} does not exist; this server serves {served!r}",
                         "model", "model_not_found")


class DeadlineExceeded(APIError):
    """504: the request's ``timeout`` passed; the server freed it everywhere."""

    status = 504
    type = "timeout_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, "timeout", "deadline_exceeded")


class ServiceUnavailable(APIError):
    status = 503
    type = "server_error"


def error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def from_backend_value_error(exc: ValueError, prompt_field: str) -> InvalidRequest:
    """The backend names the problem in words; recover the field it is about."""
    msg = str(exc)
    match = re.search(r"SamplingParams\.(\w+)", msg)
    if match:
        return InvalidRequest(msg.replace("SamplingParams.", ""), match.group(1))
    if "max_model_len" in msg or "KV pages" in msg:
        return InvalidRequest(msg, prompt_field, "context_length_exceeded")
    if "prompt" in msg or "vocabulary" in msg:
        return InvalidRequest(msg, prompt_field)
    return InvalidRequest(msg)


def overloaded_response(exc: Overloaded) -> JSONResponse:
    err = APIError(str(exc), None, "rate_limit_exceeded")
    err.status, err.type = 429, "rate_limit_error"
    retry = max(1, math.ceil(exc.retry_after_s))
    return error_response(err, {"Retry-After": str(retry)})


def install_handlers(app) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: "
                           f"{e.get('msg')}" for e in errors[:5])
        return error_response(InvalidRequest(f"invalid request: {detail}", param))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's own refusals (a body that is not UTF-8 JSON, an unknown path, a wrong
        # method) in the same error JSON as everything else.
        err = APIError(str(exc.detail), None, None)
        err.status = exc.status_code
        if exc.status_code >= 500:
            err.type = "server_error"
        return error_response(err, dict(exc.headers or {}))

    @app.exception_handler(Overloaded)
    async def _overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        return overloaded_response(exc)

    @app.exception_handler(BackendClosed)
    async def _closed(_: Request, exc: BackendClosed) -> JSONResponse:
        return error_response(ServiceUnavailable(str(exc), None, "service_unavailable"))
