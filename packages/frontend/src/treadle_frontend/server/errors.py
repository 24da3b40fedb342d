"""Error envelopes: every failure becomes a 4xx/5xx with the body the client SDK expects.

OpenAI routes answer `{"error": {"message", "type", "param", "code"}}`; the Anthropic routes (/v1/messages…)
answer `{"type": "error", "error": {"type", "message"}}`. Invalid input of any kind (bad JSON, a pydantic
validation failure, a ValueError from SamplingParams or the input processor) is a 400, never FastAPI's 422 and
never a 5xx: the openai SDK retries 5xx, which would multiply the load of a bad request.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from treadle_frontend.engine_client import EngineDeadError

logger = logging.getLogger(__name__)

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    503: "server_error",
    500: "server_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    503: "overloaded_error",
    500: "api_error",
}


class APIError(Exception):
    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def is_anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_body(
    path: str, status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    if is_anthropic_path(path):
        return {
            "type": "error",
            "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message},
        }
    return {
        "error": {
            "message": message,
            "type": _OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    request: Request, status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, status, message, param, code), status_code=status)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def _where(loc: Any) -> list[str]:
    """A pydantic error location as field names: without "body" and without the union-member tags pydantic
    inserts ("stop.str", "prompt.list[int]" are the field "stop", "prompt")."""
    parts = [str(p) for p in loc if p != "body"]
    return [
        p for p in parts if p.lower() not in _TYPE_TAGS and "[" not in p and not p.startswith("function-")
    ]


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = _where(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return (
            f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}",
            None,
        )
    field = ".".join(loc) or None
    msgs = []
    for e in errors[:5]:
        where = ".".join(_where(e.get("loc", ()))) or "body"
        msgs.append(f"{where}: {e.get('msg')}")
    return "invalid request: " + "; ".join(msgs), field


def install_error_handlers(app: Any) -> None:
    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = _validation_message(exc)
        return error_response(request, 400, message, param=field)

    @app.exception_handler(APIError)
    async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(ValueError)
    async def _on_value_error(request: Request, exc: ValueError) -> JSONResponse:
        code = "context_length_exceeded" if "maximum context length" in str(exc) else None
        return error_response(request, 400, str(exc), code=code)

    @app.exception_handler(EngineDeadError)
    async def _on_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(request, 503, str(exc), code="engine_dead")

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail) if exc.detail else "error"
        if exc.status_code == 404:
            message = f"route {request.method} {request.url.path} not found"
        return error_response(request, exc.status_code, message)

    @app.exception_handler(Exception)
    async def _on_other(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("Unhandled error on %s", request.url.path)
        return error_response(request, 500, f"internal error: {type(exc).__name__}: {exc}")
