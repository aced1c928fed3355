"""What both OpenAI endpoints share: API errors, starting requests, SSE responses, disconnect handling."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pie_engine.core.sampling_params import SamplingParams
from pie_engine.server.async_engine import AsyncEngine, EngineUnavailableError, QueueFullError, RequestGroup
from pie_engine.server.protocol import ErrorInfo, ErrorResponse

T = TypeVar("T")


class ApiError(Exception):
    """An error answered with an OpenAI error body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


class BaseServing:
    """Base of the completions and chat handlers."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.llm = engine.engine
        self.tokenizer = engine.engine.tokenizer
        self.model_name = model_name

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            shown = model if len(model) <= 100 else f"{model[:100]}..."  # a megabyte model name is not echoed back
            raise ApiError(404, f"the model {shown!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def check_max_tokens(self, value: int, field: str) -> None:
        """A completion length that no prompt leaves room for is the length field's error, not the prompt's."""
        if value >= self.llm.max_model_len:
            raise ApiError(400, f"{field} ({value}) must be less than this model's maximum context length "
                                f"({self.llm.max_model_len} tokens, prompt included)", param=field)

    def make_params(self, build: Callable[[], SamplingParams]) -> SamplingParams:
        try:
            return build()
        except ValueError as e:
            raise ApiError(400, str(e)) from e

    def start(self, request_id: str, prompts: list[list[int]], params: SamplingParams, n: int) -> RequestGroup:
        """Queue ``n`` requests per prompt; request ``f"{request_id}-{choice index}"`` (index = prompt * n + j)."""
        reqs = [(f"{request_id}-{i * n + j}", ids, params) for i, ids in enumerate(prompts) for j in range(n)]
        try:
            return self.engine.add_requests(reqs)
        except ValueError as e:
            raise ApiError(400, str(e), param="prompt") from e
        except QueueFullError as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded") from e
        except EngineUnavailableError as e:
            raise ApiError(503, str(e), type="service_unavailable") from e

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def choice_index(request_id: str) -> int:
    return int(request_id.rsplit("-", 1)[1])


async def until_disconnected(raw: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client goes away (a non-streaming handler is not cancelled by
    Starlette on disconnect, so without this an abandoned request would keep its KV blocks)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await raw.is_disconnected():
                task.cancel()
                raise ApiError(499, "client disconnected", type="client_closed_request")
    finally:
        if not task.done():
            task.cancel()


def sse(payload: Any) -> str:
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


class SSEResponse(StreamingResponse):
    """``text/event-stream`` response that always closes its RequestGroup (aborting unfinished requests), however
    the stream ends: completion, client disconnect, cancellation, or server shutdown."""

    def __init__(self, events: AsyncIterator[str], group: RequestGroup) -> None:
        super().__init__(_with_errors(events), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._group = group

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._group.close()


async def _with_errors(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """After the 200 header is out, errors can only be reported in-band, as an error event before [DONE]."""
    try:
        async for event in events:
            yield event
    except ApiError as e:
        yield sse(e.body())
    except EngineUnavailableError as e:
        yield sse(ApiError(503, str(e), type="service_unavailable").body())
    yield "data: [DONE]\n\n"
