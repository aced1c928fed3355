"""Reading an engine (its /health and /metrics) and setting its GPU budget live. The ONE module that talks HTTP
to engines.

The HTTP contract the operator relies on (engine side: engine/pie_engine/server/):

- ``GET /health`` -> 200 while the engine serves (anything else: not healthy).
- ``GET /metrics`` -> Prometheus text format with at least the REQUIRED names below (gauges/counters as one unlabeled
  sample each; ``pie_iteration_seconds`` a histogram with ``_sum`` and ``_count``). A name missing, a value that is
  not a finite number >= 0, or text the parser rejects makes the whole scrape stale.
- ``POST /v1/pie/admin/gpu-memory-budget`` on the engine's admin port (``--admin-port``, spec.engine.adminPort; the
  public port answers 404 for it) with ``Authorization: Bearer <token>`` (the token the engine read from
  ``--admin-token-file``) and the JSON body ``{"bytes": N}``:
  200 -> applied live; 409 ``{"error": {"message": "...needs a restart..."}}`` -> not possible live (the operator
  replaces the pod instead); 401/403 (token mismatch, admin disabled) and 404 (an engine without the endpoint) are
  treated like 409; 400 (the engine refuses the value) is recorded as a rejected decision and not forced through a
  restart; anything else (timeouts, 5xx, connection errors) is transient and retried on a later pass.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

GAUGES = ("pie_expansion_ratio", "pie_kv_layers_on_host", "pie_device_kv_capacity_bytes", "pie_host_kv_capacity_bytes",
          "pie_host_kv_used_bytes", "pie_recommended_host_memory_bytes", "pie_recommended_gpu_memory_bytes",
          "pie_gpu_memory_total_bytes", "pie_gpu_memory_used_bytes",
          "pie_num_requests_running", "pie_num_requests_waiting", "pie_kv_cache_usage_perc")
COUNTERS = ("pie_swap_in_bytes_total", "pie_swap_out_bytes_total", "pie_swap_stall_seconds_total")
HISTOGRAM = "pie_iteration_seconds"
REQUIRED = (*GAUGES, *COUNTERS, f"{HISTOGRAM}_sum", f"{HISTOGRAM}_count")
MAX_BODY = 4 * 2**20  # an engine's /metrics is a few KiB; anything this large is not an engine
ADMIN_PATH = "/v1/pie/admin/gpu-memory-budget"


@dataclass(frozen=True)
class EngineMetrics:
    """The required samples of one scrape, by name (counters with their ``_total`` suffix, the histogram as
    ``pie_iteration_seconds_sum`` / ``_count``)."""

    values: dict[str, float]

    def __getitem__(self, name: str) -> float:
        return self.values[name]

    def bytes(self, name: str) -> int:
        return int(self.values[name])

    @property
    def stall_fraction(self) -> float:
        """Seconds compute waited for KV swap-ins per second of iteration time, since the engine started."""
        busy = self.values[f"{HISTOGRAM}_sum"]
        return self.values["pie_swap_stall_seconds_total"] / busy if busy > 0 else 0.0


@dataclass(frozen=True)
class Observation:
    """The result of one scrape of one pod: `metrics` when fresh, else `error` (a short, stable category: it ends
    up in a condition message, which should not change on every scrape)."""

    at: float
    metrics: EngineMetrics | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.metrics is not None


class MetricsError(ValueError):
    pass


def parse_metrics(text: str) -> EngineMetrics:
    """Parse Prometheus text; raises MetricsError (garbage, missing names, bad values)."""
    found: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in REQUIRED and not s.labels:
                    found[s.name] = float(s.value)
    except Exception as e:  # the parser raises ValueError, IndexError, ... on garbage: all mean the same here
        raise MetricsError(f"garbage metrics ({type(e).__name__})") from e
    missing = [n for n in REQUIRED if n not in found]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise MetricsError(f"missing metrics: {', '.join(missing[:3])}{more}")
    bad = [n for n, v in found.items() if not math.isfinite(v) or v < 0]
    if bad:
        raise MetricsError(f"invalid values: {', '.join(sorted(bad)[:3])}")
    return EngineMetrics(found)


def base_url(ip: str, port: int) -> str:
    return f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"


async def _fetch(client: httpx.AsyncClient, url: str, timeout: float) -> str:
    health = await client.get(f"{url}/health", timeout=timeout)
    if health.status_code != 200:
        raise MetricsError(f"/health answered {health.status_code}")
    async with client.stream("GET", f"{url}/metrics", timeout=timeout) as resp:
        if resp.status_code != 200:
            raise MetricsError(f"/metrics answered {resp.status_code}")
        body = b""
        async for chunk in resp.aiter_bytes():
            body += chunk
            if len(body) > MAX_BODY:
                raise MetricsError("garbage metrics (too large)")
    return body.decode("utf-8", errors="replace")


async def scrape(client: httpx.AsyncClient, ip: str, port: int, timeout: float) -> Observation:
    """/health then /metrics of one engine within `timeout` seconds in all; never raises (every failure is an
    Observation with an error)."""
    now = time.time()
    try:
        text = await asyncio.wait_for(_fetch(client, base_url(ip, port), timeout), timeout)
        return Observation(now, metrics=parse_metrics(text))
    except MetricsError as e:
        return Observation(now, error=str(e))
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return Observation(now, error="timeout")
    except httpx.HTTPError as e:
        return Observation(now, error=f"unreachable ({type(e).__name__})")


@dataclass(frozen=True)
class AdminResult:
    applied: bool  # 200: the engine runs with the new budget now
    needs_restart: bool  # 409/401/403/404: not possible live -> replace the pod
    detail: str
    rejected: bool = False  # 400: the engine refuses this value


def set_gpu_budget(ip: str, port: int, token: str, budget_bytes: int, timeout: float = 5.0) -> AdminResult:
    """POST the new budget to one engine (synchronous: called from the reconcile thread)."""
    try:
        resp = httpx.post(f"{base_url(ip, port)}{ADMIN_PATH}", json={"bytes": budget_bytes}, timeout=timeout,
                          headers={"Authorization": f"Bearer {token}"}, trust_env=False)
    except httpx.HTTPError as e:
        return AdminResult(False, False, f"unreachable ({type(e).__name__})")
    if resp.status_code == 200:
        return AdminResult(True, False, "applied live")
    try:
        message = str(resp.json()["error"]["message"])
    except Exception:
        message = resp.text[:200]
    if resp.status_code in (401, 403, 404, 409):
        return AdminResult(False, True, f"{resp.status_code}: {message}")
    return AdminResult(False, False, f"{resp.status_code}: {message}", rejected=resp.status_code == 400)
