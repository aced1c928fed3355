"""The server's OpenAPI schema (GET /openapi.json): every answer documented, with this server's own limits.

Clients and the fuzz tests (tests/unit/engine/server/test_fuzz.py) read it, so it states what the server really
does: errors are 400s with the error shape (not FastAPI's 422), generation endpoints answer JSON or server-sent
events, and the request schemas carry the limits only known once the model is loaded (the served model name, the
vocabulary size, the context length).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from pie_engine.server.protocol import ChatCompletionChunk, CompletionResponse, ErrorResponse

_DESCRIPTIONS = {400: "invalid request (the message names the field)", 401: "missing or wrong admin token",
                 403: "admin endpoints are disabled", 404: "unknown model", 409: "needs a restart",
                 429: "too many waiting requests", 503: "shutting down, or the engine failed"}
Responses = dict[int | str, dict[str, Any]]


def error_responses(*statuses: int) -> Responses:
    """``responses`` entries for the given error statuses (all with the error shape)."""
    return {s: {"model": ErrorResponse, "description": _DESCRIPTIONS.get(s, "error")} for s in statuses}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def generation_responses(model: type[BaseModel], chunk: type[BaseModel]) -> Responses:
    """Answers of a generation endpoint: JSON ``model``, or with ``stream: true`` server-sent events whose data is
    a ``chunk``, an in-band error, or the final ``[DONE]``."""
    data = {"if": {"const": "[DONE]"}, "else": {
        "type": "string", "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_ref(chunk), _ref(ErrorResponse)]}}}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    ok = {"model": model, "description": "the completion (JSON), or with stream: true a text/event-stream of "
                                         "`data: <chunk>` events ending with `data: [DONE]`",
          "content": {"text/event-stream": {"schema": event}}}
    return {200: ok, **error_responses(400, 404, 429, 503)}


def _add_models(schema: dict[str, Any], *models: type[BaseModel]) -> None:
    """Put models that only SSE events reference (no route returns them) into the components."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        body = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        for name, definition in body.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components.setdefault(model.__name__, body)


def _set_integer_maximum(node: Any, maximum: int) -> None:
    """Lower ``maximum`` of every integer schema under ``node`` (e.g. the token ids inside a prompt union)."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["maximum"] = min(node.get("maximum", maximum), maximum)
        for value in node.values():
            _set_integer_maximum(value, maximum)
    elif isinstance(node, list):
        for value in node:
            _set_integer_maximum(value, maximum)


def _document_limits(schema: dict[str, Any], model_name: str, vocab_size: int, max_model_len: int) -> None:
    models = schema.get("components", {}).get("schemas", {})
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = models.get(name, {}).get("properties", {})
        if "model" in props:
            props["model"]["enum"] = [model_name]  # anything else is a 404
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:  # at least one token of prompt must fit too
                _set_integer_maximum(props[field], max_model_len - 1)
        if "prompt" in props:
            _set_integer_maximum(props["prompt"], vocab_size - 1)


def customize_openapi(app: FastAPI, model_name: str, vocab_size: int, max_model_len: int) -> None:
    """Build the schema once, without FastAPI's 422 answers (this server answers 400) and with the limits."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            _add_models(schema, CompletionResponse, ChatCompletionChunk, ErrorResponse)
            _document_limits(schema, model_name, vocab_size, max_model_len)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
