"""OpenAI-style error answers: one JSON shape ``{"error": {"message", "type", "param", "code"}}`` for every 4xx/5xx
(validation, routing, engine failures)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pie_engine.server.async_engine import EngineUnavailableError, QueueFullError
from pie_engine.server.serving import ApiError

log = logging.getLogger(__name__)

STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 409: "conflict", 429: "rate_limit_error",
                503: "service_unavailable"}
# Names pydantic gives union members in an error's loc (e.g. "str", "list[int]", "function-after[...]"): never
# field names, which are lowercase identifiers.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "tuple"}


class ErrorJSONResponse(JSONResponse):
    """A JSONResponse that is always encodable: ASCII-escaped, so a message quoting client input that holds a lone
    surrogate is still a valid body instead of a UnicodeEncodeError (a 500 without the error shape)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, type: str | None = None, param: str | None = None,
                   code: str | None = None, headers: Mapping[str, str] | None = None) -> JSONResponse:
    err = ApiError(status, message, type or STATUS_TYPES.get(status, "server_error"), param, code)
    return ErrorJSONResponse(err.body(), status_code=status, headers=headers)


def _is_tag(item: object) -> bool:
    return isinstance(item, str) and (not item.isidentifier() or item in _TYPE_TAGS or item[:1].isupper())


def _param(loc: Sequence[object]) -> str | None:
    return ".".join(str(x) for x in loc if x != "body" and not _is_tag(x)) or None


def _json_kind(value: object) -> str:
    """How ``value`` was spelled in the request's JSON, for "expected X, got Y" messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        return f"a decimal number ({value!r})" if math.isfinite(value) else \
            str(value).replace("inf", "Infinity").replace("nan", "NaN")
    kinds = {int: "an integer", str: "a string", list: "an array", dict: "an object", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _message(err: dict[str, Any]) -> str:
    if err.get("type") == "missing":
        return "field required"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if str(err.get("type", "")).endswith("_type") and "input" in err:
        msg += f", got {_json_kind(err['input'])}"  # "a valid integer" alone hides that true or 2.0 was sent
    return msg


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """Pydantic errors -> one readable 400 naming the field (FastAPI's default is a 422 with a list)."""
    errors: list[dict[str, Any]] = [dict(e) for e in exc.errors()]
    if not errors:
        return error_response(400, "invalid request", code="invalid_value")
    first = errors[0]
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return error_response(400, "the request body is missing (expected a JSON object)", code="invalid_json")
    if first.get("type") == "json_invalid":
        detail = str((first.get("ctx") or {}).get("error", ""))
        return error_response(400, f"the request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    loc = tuple(first.get("loc", ()))
    tag = next((i for i, x in enumerate(loc) if _is_tag(x)), None)
    param, msg, related = _param(loc), _message(first), [first]
    if tag is not None:
        # A union field (prompt: str | list[int] | ...) fails once per accepted form. The form that got past the type
        # check (e.g. a list that is too long, a string that is not valid Unicode) says what is wrong; if none did,
        # say that no form matched.
        related = [e for e in errors if tuple(e.get("loc", ()))[:tag] == loc[:tag]
                   and len(e.get("loc", ())) > tag and _is_tag(e["loc"][tag])]
        specific = [e for e in related if not str(e.get("type", "")).endswith("_type")]
        if specific:
            param, msg = _param(specific[0].get("loc", ())), _message(specific[0])
        elif len(forms := {e["loc"][tag] for e in related}) > 1:
            param = _param(loc[:tag])
            msg = f"invalid value: none of the {len(forms)} accepted forms matched (first: {msg})"
    others = len(errors) - len(related)
    extra = f" (and {others} more errors)" if others > 0 else ""
    return error_response(400, f"{param}: {msg}{extra}" if param else f"{msg}{extra}", param=param,
                          code="invalid_value")


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error with the OpenAI error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return ErrorJSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message, code = str(exc.detail), None
        if exc.status_code == 400 and message == "There was an error parsing the body":
            # FastAPI's answer to a body json.loads rejects without a JSONDecodeError: not UTF-8, or an integer of
            # more than 4300 digits.
            message, code = "the request body could not be parsed: it is not UTF-8 JSON (or a number is too long)", \
                "invalid_json"
        # NOTE: keep the headers: a 405 must say which methods are allowed (Allow).
        return error_response(exc.status_code, message, code=code, headers=exc.headers)

    @app.exception_handler(QueueFullError)
    async def _queue_full(_: Request, exc: QueueFullError) -> JSONResponse:
        return error_response(429, str(exc), code="rate_limit_exceeded")

    @app.exception_handler(EngineUnavailableError)
    async def _unavailable(_: Request, exc: EngineUnavailableError) -> JSONResponse:
        # Raised while a non-streaming request waits for its outputs (the engine died, or the server is stopping).
        return error_response(503, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
