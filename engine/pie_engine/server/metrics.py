"""Prometheus metrics of the serving engine (vLLM's metric names with a ``pie_`` prefix).

Everything lives in one dedicated CollectorRegistry (``ServerMetrics.registry``), so several servers can live in
one process (tests) and /metrics shows only engine metrics. Other modules add their own metrics (e.g. the Pie
``pie_expansion_ratio``) either by appending collectors to ``LLMEngine.metrics_collectors`` before the server
starts, or with ``ServerMetrics.register(collector)`` / by passing ``registry=metrics.registry`` to a metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.registry import Collector

from pie_engine.core.engine import EngineStats
from pie_engine.core.output_processor import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class ServerMetrics:
    """The engine's metrics. ``observe_step`` is called from the engine thread after every step."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str,
                 extra_collectors: list[Collector] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._stats = stats
        self.running = Gauge("pie_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("pie_num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("pie_kv_cache_usage_perc", "Fraction of device KV blocks in use (0..1)", registry=r)
        self.num_blocks = Gauge("pie_num_device_kv_blocks", "Device KV blocks per layer", registry=r)
        # Gauges read the engine's latest snapshot at scrape time, so they are right even while the engine idles.
        self.running.set_function(lambda: self._stats().num_running)
        self.waiting.set_function(lambda: self._stats().num_waiting)
        self.kv_usage.set_function(lambda: self._stats().kv_cache_usage)
        self.num_blocks.set_function(lambda: self._stats().num_blocks)
        self.prompt_tokens = Counter("pie_prompt_tokens", "Prompt tokens of started requests", registry=r)
        self.generation_tokens = Counter("pie_generation_tokens", "Generated tokens", registry=r)
        self.preemptions = Counter("pie_num_preemptions", "Sequences preempted (recompute)", registry=r)
        self.success = Counter("pie_request_success", "Finished requests", ["finished_reason"], registry=r)
        self.ttft = Histogram("pie_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("pie_inter_token_latency_seconds", "Time between consecutive output tokens",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("pie_e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS,
                             registry=r)
        info = Gauge("pie_model_info", "Served model", ["model_name"], registry=r)
        info.labels(model_name=model_name).set(1)
        for reason in ("stop", "length", "abort"):
            self.success.labels(finished_reason=reason)  # export zeros so dashboards see the series
        for c in extra_collectors or []:
            self.register(c)
        self._last = stats()
        self._last_token_time: dict[str, float] = {}

    def register(self, collector: Collector) -> None:
        """Add a collector (any prometheus_client metric or custom Collector) to this registry."""
        self.registry.register(collector)

    def observe_step(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        now = time.monotonic()
        self.prompt_tokens.inc(stats.num_prompt_tokens_total - self._last.num_prompt_tokens_total)
        self.generation_tokens.inc(stats.num_generation_tokens_total - self._last.num_generation_tokens_total)
        self.preemptions.inc(stats.num_preemptions_total - self._last.num_preemptions_total)
        self._last = stats
        for out in outputs:
            if out.delta_token_ids:
                last = self._last_token_time.get(out.request_id)
                if last is None:
                    self.ttft.observe(now - out.arrival_time)
                else:
                    self.itl.observe(now - last)
                self._last_token_time[out.request_id] = now
            if out.finished:
                self._last_token_time.pop(out.request_id, None)
                self.e2e.observe(now - out.arrival_time)
                self.success.labels(finished_reason=out.finish_reason or "stop").inc()

    def observe_abort(self, request_id: str) -> None:
        self._last_token_time.pop(request_id, None)
        self.success.labels(finished_reason="abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
