"""The OpenAI-compatible HTTP server: routes, OpenAI-style errors, startup and graceful shutdown."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from pie_engine.core.engine import LLMEngine
from pie_engine.server.async_engine import AsyncEngine
from pie_engine.server.errors import add_error_handlers, error_response
from pie_engine.server.metrics import ServerMetrics
from pie_engine.server.openapi import customize_openapi, error_responses, generation_responses
from pie_engine.server.pie_routes import AdminPortGuard, add_pie_routes
from pie_engine.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from pie_engine.server.serving_chat import ChatServing
from pie_engine.server.serving_completions import CompletionServing

log = logging.getLogger(__name__)


def create_app(engine: LLMEngine, *, max_waiting_requests: int | None = None, admin_token: str | None = None,
               drain_timeout_s: float = 30.0, admin_port: int | None = None) -> FastAPI:
    """Build the server around an already loaded engine. The engine thread starts with the app's lifespan.
    `admin_port`: the admin endpoint answers only on that port (the server must listen on it too)."""
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
    add_error_handlers(app)
    if admin_port is not None:
        app.add_middleware(AdminPortGuard, admin_port=admin_port)

    @app.post("/v1/completions", responses=generation_responses(CompletionResponse, CompletionResponse))
    async def create_completion(req: CompletionRequest, raw: Request) -> Response:
        return await completions.create(req, raw)

    @app.post("/v1/chat/completions", responses=generation_responses(ChatCompletionResponse, ChatCompletionChunk))
    async def create_chat_completion(req: ChatCompletionRequest, raw: Request) -> Response:
        return await chat.create(req, raw)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, max_model_len=engine.max_model_len)])

    @app.get("/health", responses={200: {"description": '{"status": "ok"}'}, **error_responses(503)})
    async def health() -> Response:
        if async_engine.dead is not None:
            return error_response(503, f"the engine failed: {async_engine.dead}")
        if not async_engine.accepting:
            return error_response(503, "shutting down")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition format"}})
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    add_pie_routes(app, engine, async_engine, admin_token)  # GET /v1/pie/expansion, the admin budget endpoint
    customize_openapi(app, model_name, engine.vocab_size, engine.max_model_len)
    return app
