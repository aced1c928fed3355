"""The OpenAI-compatible HTTP server: routes, OpenAI-style errors, startup and graceful shutdown."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from pie_engine.core.engine import LLMEngine
from pie_engine.server.async_engine import AsyncEngine
from pie_engine.server.metrics import ServerMetrics
from pie_engine.server.pie_routes import add_pie_routes
from pie_engine.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from pie_engine.server.serving import ApiError
from pie_engine.server.serving_chat import ChatServing
from pie_engine.server.serving_completions import CompletionServing

log = logging.getLogger(__name__)

_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


def _error(status: int, message: str, type: str | None = None, param: str | None = None,
           code: str | None = None) -> JSONResponse:
    err = ApiError(status, message, type or _STATUS_TYPES.get(status, "server_error"), param, code)
    return JSONResponse(err.body(), status_code=status)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    """Pydantic errors -> one readable 400 (FastAPI's default is a 422 with a list)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return _error(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                      code="invalid_json")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    msg = "field required" if first.get("type") == "missing" else first.get("msg", "invalid value")
    # A union field (e.g. prompt: str | list[int] | ...) fails once per accepted form, with the form in the loc.
    same_field = [e for e in errors if tuple(e.get("loc", ()))[:2] == tuple(first.get("loc", ()))[:2]]
    if len(same_field) > 1 and loc:
        loc = loc[:1]
        msg = f"invalid value: none of the {len(same_field)} accepted forms matched (first: {msg})"
    param = ".".join(loc) or None
    others = len(errors) - max(len(same_field), 1)
    extra = f" (and {others} more errors)" if others > 0 else ""
    return _error(400, f"{param}: {msg}{extra}" if param else f"{msg}{extra}", param=param, code="invalid_value")


def create_app(engine: LLMEngine, *, max_waiting_requests: int | None = None, admin_token: str | None = None,
               drain_timeout_s: float = 30.0) -> FastAPI:
    """Build the server around an already loaded engine. The engine thread starts with the app's lifespan."""
    config = engine.config
    model_name = config.model_name
    async_engine = AsyncEngine(engine, max_waiting_requests or config.max_waiting_requests)
    metrics = ServerMetrics(lambda: async_engine.stats, model_name, extra_collectors=engine.metrics_collectors)
    async_engine.step_hooks.append(metrics.observe_step)
    async_engine.abort_hooks.append(metrics.observe_abort)
    completions = CompletionServing(async_engine, model_name)
    chat = ChatServing(async_engine, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        log.info("serving %s (max_model_len=%d, %d KV blocks of %d tokens)", model_name, engine.max_model_len,
                 engine.block_manager.num_blocks, config.block_size)
        yield
        # uvicorn has stopped accepting and waited for open requests; settle whatever is still running.
        await async_engine.shutdown(drain_timeout_s)

    app = FastAPI(title="Pie engine", lifespan=lifespan)
    app.state.engine = engine
    app.state.async_engine = async_engine
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    @app.post("/v1/completions")
    async def create_completion(req: CompletionRequest, raw: Request) -> Response:
        return await completions.create(req, raw)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(req: ChatCompletionRequest, raw: Request) -> Response:
        return await chat.create(req, raw)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, max_model_len=engine.max_model_len)])

    @app.get("/health")
    async def health() -> Response:
        if async_engine.dead is not None:
            return _error(503, f"the engine failed: {async_engine.dead}")
        if not async_engine.accepting:
            return _error(503, "shutting down")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    add_pie_routes(app, engine, async_engine, admin_token)  # GET /v1/pie/expansion, the admin budget endpoint
    return app
