"""Reading an engine (its /health and /metrics) and setting its GPU budget live. The ONE module that talks HTTP
to engines.

The HTTP contract the operator relies on (engine side: engine/pie_engine/server/):

- ``GET /health`` -> 200 while the engine serves (anything else: not healthy).
- ``GET /metrics`` -> Prometheus text format with at least the REQUIRED names below (gauges/counters as one unlabeled
  sample each; ``pie_iteration_seconds`` a histogram with ``_sum`` and ``_count``). A name missing, a value that is
  not a finite number >= 0, or text the parser rejects makes the whole scrape stale. Read when present: the OPTIONAL
  gauges and the LATENCY_HISTOGRAMS' ``_bucket`` series (the autoscaler's TTFT / TPOT targets).
- ``POST /v1/completions`` ``{"model": <served name>, "prompt": "ping", "max_tokens": 1}`` -> 200 with at least one
  choice: the probe request of the rollout gate (`probe`), sent to pods that have not passed their gate yet.
- ``POST /v1/pie/admin/gpu-memory-budget`` on the engine's admin port (``--admin-port``, spec.engine.adminPort; the
  public port answers 404 for it) with ``Authorization: Bearer <token>`` (the token the engine read from
  ``--admin-token-file``) and the JSON body ``{"bytes": N}``:
  200 -> applied live; 409 with ``error.code`` ``"busy"`` (an unfinished request needs more KV than the budget holds;
  older engines say "retry once the request finished" in the message) -> not now: retried later, never a
  replacement (that would kill the request); any other 409 (``"needs_restart"``) -> not possible live (the operator
  replaces the pod instead); 401/403 (token mismatch, admin disabled) and 404 (an engine without the endpoint) are
  treated like ``needs_restart``; 400 (the engine refuses the value) is recorded as a rejected decision and not
  forced through a restart; anything else (timeouts, 429, 5xx, connection errors) is transient and retried later with
  backoff: only a definite answer replaces a pod.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pie_operator.latency import Buckets

GAUGES = ("pie_expansion_ratio", "pie_kv_layers_on_host", "pie_device_kv_capacity_bytes", "pie_host_kv_capacity_bytes",
          "pie_host_kv_used_bytes", "pie_recommended_host_memory_bytes", "pie_recommended_gpu_memory_bytes",
          "pie_gpu_memory_total_bytes", "pie_gpu_memory_used_bytes",
          "pie_num_requests_running", "pie_num_requests_waiting", "pie_kv_cache_usage_perc")
COUNTERS = ("pie_swap_in_bytes_total", "pie_swap_out_bytes_total", "pie_swap_stall_seconds_total")
HISTOGRAM = "pie_iteration_seconds"
REQUIRED = (*GAUGES, *COUNTERS, f"{HISTOGRAM}_sum", f"{HISTOGRAM}_count")
# Read when present: older engines do not export them. Without the overhead a fractional GPU budget stays
# unresolved; without the headroom the autoscaler judges exhaustion from what it can see (load.py).
OPTIONAL = ("pie_gpu_memory_overhead_bytes", "pie_expansion_headroom_layers")
# Histograms read bucket by bucket when present (the autoscaler's TTFT / TPOT targets: latency.py); one that does not
# parse as a histogram is left out, never a reason to call the whole scrape stale.
TTFT_HISTOGRAM, TPOT_HISTOGRAM = "pie_time_to_first_token_seconds", "pie_inter_token_latency_seconds"
LATENCY_HISTOGRAMS = (TTFT_HISTOGRAM, TPOT_HISTOGRAM)
MAX_BODY = 4 * 2**20  # an engine's /metrics is a few KiB; anything this large is not an engine
ADMIN_PATH = "/v1/pie/admin/gpu-memory-budget"
PROBE_OK = "ok"
PROBE_TIMEOUT = 10.0  # a first request may warm caches up: longer than a scrape, and only until the gate passed


@dataclass(frozen=True)
class EngineMetrics:
    """The required samples of one scrape, by name (counters with their ``_total`` suffix, the histogram as
    ``pie_iteration_seconds_sum`` / ``_count``), and the LATENCY_HISTOGRAMS the engine exported, by family name."""

    values: dict[str, float]
    buckets: dict[str, Buckets] = field(default_factory=dict)

    def __getitem__(self, name: str) -> float:
        return self.values[name]

    def bytes(self, name: str) -> int:
        return int(self.values[name])

    def optional_bytes(self, name: str) -> int | None:
        """An OPTIONAL gauge in bytes; None when the engine does not export it."""
        return int(self.values[name]) if name in self.values else None

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
    probe: str = ""  # the probe completion (see `probe`): "" none sent, PROBE_OK, else why it failed

    @property
    def ok(self) -> bool:
        return self.metrics is not None


class MetricsError(ValueError):
    pass


def parse_metrics(text: str) -> EngineMetrics:
    """Parse Prometheus text; raises MetricsError (garbage, missing names, bad values)."""
    found: dict[str, float] = {}
    histograms: dict[str, list[tuple[float, float]]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if (s.name in REQUIRED or s.name in OPTIONAL) and not s.labels:
                    found[s.name] = float(s.value)
                elif family.name in LATENCY_HISTOGRAMS and s.name == f"{family.name}_bucket" and set(s.labels) == {
                        "le"}:
                    histograms.setdefault(family.name, []).append((float(s.labels["le"]), float(s.value)))
    except Exception as e:  # the parser raises ValueError, IndexError, ... on garbage: all mean the same here
        raise MetricsError(f"garbage metrics ({type(e).__name__})") from e
    missing = [n for n in REQUIRED if n not in found]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise MetricsError(f"missing metrics: {', '.join(missing[:3])}{more}")
    bad = [n for n, v in found.items() if not math.isfinite(v) or v < 0]
    if bad:
        raise MetricsError(f"invalid values: {', '.join(sorted(bad)[:3])}")
    return EngineMetrics(found, {name: b for name, raw in histograms.items() if (b := _histogram(raw)) is not None})


def _histogram(raw: list[tuple[float, float]]) -> Buckets | None:
    """Cumulative buckets, ascending, ending at +Inf, counts finite, >= 0 and never decreasing; else None."""
    b = tuple(sorted(raw))
    counts = [c for _, c in b]
    ok = (b and b[-1][0] == math.inf and len({le for le, _ in b}) == len(b)
          and all(math.isfinite(c) and c >= 0 for c in counts) and counts == sorted(counts))
    return b if ok else None


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


async def scrape(client: httpx.AsyncClient, ip: str, port: int, timeout: float, probe_model: str = "") -> Observation:
    """/health then /metrics of one engine within `timeout` seconds in all, then -- with `probe_model`, and only when
    the metrics are fresh -- a probe request (`probe`); never raises (every failure is an Observation with an
    error)."""
    now = time.time()
    try:
        text = await asyncio.wait_for(_fetch(client, base_url(ip, port), timeout), timeout)
        metrics = parse_metrics(text)
        return Observation(now, metrics=metrics, probe=await probe(client, ip, port, probe_model) if probe_model
                           else "")
    except MetricsError as e:
        return Observation(now, error=str(e))
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return Observation(now, error="timeout")
    except httpx.HTTPError as e:
        return Observation(now, error=f"unreachable ({type(e).__name__})")


# How engines from before the machine-readable `busy` code said it (pie_engine/pie/runtime.py's message).
LEGACY_BUSY = "retry once the request finished"


@dataclass(frozen=True)
class AdminResult:
    """The engine's answer. None of the flags set: transient (retry later with backoff)."""

    applied: bool  # 200: the engine runs with the new budget now
    needs_restart: bool  # 409 needs_restart / 401 / 403 / 404: not possible live -> replace the pod
    detail: str
    rejected: bool = False  # 400: the engine refuses this value
    busy: bool = False  # 409 busy: not now (a running request needs the KV) -> retry later, never replace


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
        error = resp.json()["error"]
        message, code = str(error["message"]), str(error.get("code") or "")
    except Exception:
        message, code = resp.text[:200], ""
    if resp.status_code == 409 and (code == "busy" or LEGACY_BUSY in message):
        return AdminResult(False, False, f"{resp.status_code}: {message}", busy=True)
    if resp.status_code in (401, 403, 404, 409):
        return AdminResult(False, True, f"{resp.status_code}: {message}")
    return AdminResult(False, False, f"{resp.status_code}: {message}", rejected=resp.status_code == 400)


async def probe(client: httpx.AsyncClient, ip: str, port: int, model: str, timeout: float = PROBE_TIMEOUT) -> str:
    """One tiny completion (max_tokens 1) for `model`: PROBE_OK when the engine served it, else why not (a short,
    stable text: it ends up in a condition message). Never raises."""
    body = {"model": model, "prompt": "ping", "max_tokens": 1, "temperature": 0}
    try:
        resp = await asyncio.wait_for(client.post(f"{base_url(ip, port)}/v1/completions", json=body, timeout=timeout),
                                      timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return "timeout"
    except httpx.HTTPError as e:
        return f"unreachable ({type(e).__name__})"
    try:
        answer = resp.json()
    except ValueError:
        answer = None
    if resp.status_code != 200:
        message = answer.get("error", {}).get("message") if isinstance(answer, dict) else None
        return f"{resp.status_code}: {str(message or resp.text)[:200]}"
    if not (isinstance(answer, dict) and isinstance(answer.get("choices"), list) and answer["choices"]):
        return "the answer is not a completion"
    return PROBE_OK
