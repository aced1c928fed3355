"""Pie's HTTP routes: the expansion state, and the admin endpoint that changes the device KV budget live.

The admin contract is the operator's (operator/pie_operator/scrape.py, ``set_gpu_budget``):
``POST /v1/pie/admin/gpu-memory-budget`` with ``Authorization: Bearer <token>`` and ``{"bytes": N}``, where N is
the device KV budget in bytes (what ``--gpu-memory-budget 8Gi`` means, and what ``pie_recommended_gpu_memory_bytes``
recommends). Answers: 200 ``{"applied": true, "gpu_memory_budget_bytes": N, ...}`` (applied live, between two
engine steps); 409 (not possible live) whose ``error.code`` says why: ``"busy"`` -- an unfinished request needs more
KV than the new budget holds, retry once it finished -- or ``"needs_restart"`` -- the device could not allocate it,
only a restart applies it (both keep the 409 status older operators know); 400 bad input (the body is the
``GpuBudgetRequest`` model: ``bytes`` a JSON integer in [1, 2^63 - 1]; checked after the token, except a body that
is not JSON at all); 401 missing or wrong token; 403 when the engine was started without an admin token (admin
disabled). The operator retries ``busy`` later, treats 401/403/404 like ``needs_restart`` (it replaces the pod) and
retries anything else later.

With ``serve --admin-port`` the admin endpoint answers only on that port (`AdminPortGuard`): the public port, the
one a Service or LoadBalancer exposes, answers 404 for it, and the admin port serves nothing else.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.types import ASGIApp, Receive, Scope, Send

from pie_engine.core.engine import LLMEngine
from pie_engine.pie.runtime import BudgetBusyError, BudgetError, NeedsRestartError
from pie_engine.server.async_engine import AsyncEngine, EngineUnavailableError
from pie_engine.server.openapi import Responses, error_responses
from pie_engine.server.protocol import INT64_MAX
from pie_engine.server.serving import ApiError

ADMIN_PATH = "/v1/pie/admin/gpu-memory-budget"
ADMIN_PREFIX = "/v1/pie/admin/"
# Documents the bearer scheme in the OpenAPI schema; the check itself is _authorize (403 when admin is disabled,
# and a constant-time comparison), so missing credentials are not rejected here.
_bearer = HTTPBearer(auto_error=False, description="the admin token (--admin-token-file or PIE_ADMIN_TOKEN)")


class GpuBudgetRequest(BaseModel):
    """Body of the admin endpoint: the new device KV budget."""

    model_config = ConfigDict(extra="ignore")

    # Strict: `true` or 1.5e6 bytes is a client bug, not a budget. At most int64, as every byte count on the way
    # down is one.
    bytes: StrictInt = Field(gt=0, le=INT64_MAX, description="device KV budget in bytes")


def _authorize(request: Request, token: str | None) -> None:
    if token is None:
        raise ApiError(403, "admin endpoints are disabled: start the engine with --admin-token-file (or "
                            "PIE_ADMIN_TOKEN) to enable them", "permission_error", code="admin_disabled")
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    # NOTE: constant-time comparison, so the token cannot be guessed byte by byte from response times.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "missing or wrong admin token (Authorization: Bearer <token>)", "authentication_error",
                       code="invalid_token")


def add_pie_routes(app: FastAPI, engine: LLMEngine, async_engine: AsyncEngine, admin_token: str | None) -> None:
    """Register GET /v1/pie/expansion and the admin endpoint on ``app``."""

    def authorized(request: Request, _: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        # A dependency runs before the body is validated: a caller without the token learns nothing from a 400.
        _authorize(request, admin_token)

    @app.get("/v1/pie/expansion", responses={200: {"description": "the expansion state (plain JSON values)"}})
    async def expansion_state() -> JSONResponse:
        # Read off the engine thread: every value is a plain number replaced atomically (swap_metrics.py).
        return JSONResponse(engine.kv_runtime.state())

    ok: Responses = {200: {"description": '{"applied": true, "gpu_memory_budget_bytes": N, ...}'}}

    @app.post(ADMIN_PATH, dependencies=[Depends(authorized)],
              responses={**ok, **error_responses(400, 401, 403, 409, 503)})
    async def set_gpu_memory_budget(body: GpuBudgetRequest) -> JSONResponse:
        budget = body.bytes
        if not async_engine.accepting:
            raise ApiError(503, "shutting down", "service_unavailable")
        try:
            result = await async_engine.run_in_engine(lambda e: e.kv_runtime.set_device_kv_budget(budget))
        except BudgetError as e:
            raise ApiError(400, str(e), "invalid_request_error", param="bytes", code="invalid_value") from None
        except BudgetBusyError as e:
            raise ApiError(409, str(e), "conflict", code="busy") from None
        except NeedsRestartError as e:
            raise ApiError(409, str(e), "conflict", code="needs_restart") from None
        except EngineUnavailableError as e:
            raise ApiError(503, str(e), "service_unavailable") from None
        return JSONResponse(result)


class AdminPortGuard:
    """ASGI middleware for a server listening on two ports: admin paths only on `admin_port`, everything else only
    on the others. Both answer a plain 404, the same as an unknown route, so neither port reveals the other."""

    def __init__(self, app: ASGIApp, admin_port: int) -> None:
        self.app, self.admin_port = app, admin_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            server: Any = scope.get("server") or (None, None)
            on_admin_port = server[1] == self.admin_port
            if on_admin_port != (scope.get("path") or "").startswith(ADMIN_PREFIX):
                # NOTE: the body of FastAPI's own 404 for an unknown route, so the answers are indistinguishable.
                await JSONResponse({"detail": "Not Found"}, status_code=404)(scope, receive, send)
                return
        await self.app(scope, receive, send)
