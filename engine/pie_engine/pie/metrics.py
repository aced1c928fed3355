"""Pie's expansion metrics: the prometheus contract with the operator, and the same state as JSON.

Metric names are fixed (the operator reads them): gauges ``pie_expansion_ratio``, ``pie_kv_layers_on_host``,
``pie_device_kv_capacity_bytes``, ``pie_host_kv_capacity_bytes``, ``pie_host_kv_used_bytes``,
``pie_recommended_host_memory_bytes``, ``pie_recommended_gpu_memory_bytes``, ``pie_expansion_headroom_layers``,
``pie_gpu_memory_total_bytes``, ``pie_gpu_memory_used_bytes`` (pynvml; 0 without a GPU); counters
``pie_swap_in_bytes_total``, ``pie_swap_out_bytes_total``, ``pie_swap_stall_seconds_total``; histogram
``pie_iteration_seconds``. (The engine adds ``pie_gpu_memory_overhead_bytes``, a start-up constant: core/engine.py.)
Gauges and counters are read from the live objects at scrape time, so they are right even while the engine idles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pie_engine.kv.cache import KVCache
from pie_engine.pie.controller import ExpansionController
from pie_engine.pie.swap_cache import LayerSwapKVCache

ITERATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
                     5.0, 10.0)

_GAUGES = {
    "pie_expansion_ratio": ("expansion_ratio", "KV capacity multiplier from swapping: n / (n - layers on host)"),
    "pie_kv_layers_on_host": ("layers_on_host", "Layers whose KV is not on the device at any instant (m)"),
    "pie_device_kv_capacity_bytes": ("device_kv_capacity_bytes", "Device memory laid out as KV slots"),
    "pie_host_kv_capacity_bytes": ("host_kv_capacity_bytes", "Host memory allocated for KV"),
    "pie_host_kv_used_bytes": ("host_kv_used_bytes", "Host KV holding blocks in use"),
    "pie_recommended_host_memory_bytes": ("recommended_host_memory_bytes",
                                          "Host KV needed at the settled expansion for the peak KV demand"),
    "pie_recommended_gpu_memory_bytes": ("recommended_gpu_memory_bytes",
                                         "Smallest device KV budget keeping expansion transparent at peak demand"),
    "pie_expansion_headroom_layers": ("headroom_layers", "Layers m may still grow by now; 0: expansion cannot "
                                      "absorb more KV (off/static, host limit, back-off ceiling, latency)"),
    "pie_gpu_memory_total_bytes": ("gpu_memory_total_bytes", "GPU memory (pynvml), 0 without a GPU"),
    "pie_gpu_memory_used_bytes": ("gpu_memory_used_bytes", "GPU memory used by all processes, 0 without a GPU"),
}
_COUNTERS = {
    "pie_swap_in_bytes": ("swap_in_bytes_total", "KV bytes copied host -> device"),
    "pie_swap_out_bytes": ("swap_out_bytes_total", "KV bytes written back device -> host"),
    "pie_swap_stall_seconds": ("swap_stall_seconds_total", "Time compute waited for KV swap-ins"),
}

def _gpu_memory(device: torch.device | None) -> tuple[int, int]:
    if device is None or device.type != "cuda":
        return 0, 0
    from pie_engine.runner.device import device_memory_info

    return device_memory_info(device) or (0, 0)


def expansion_state(kv_cache: KVCache | None, controller: ExpansionController | None = None,
                    device: torch.device | None = None, blocks_in_use: Callable[[], int] | None = None, *,
                    swap: LayerSwapKVCache | None = None) -> dict:
    """Everything the metrics export, as JSON-able values (GET /v1/pie/expansion).

    ``swap``: the swapping cache when ``kv_cache`` is one (its figures are exported), else None: any KVCache
    without swapping has ratio 1 and no host KV. ``blocks_in_use``: the block manager's blocks in use NOW; without
    it host KV use is the last step's, which an idle engine would keep reporting after its requests finished.
    """
    state: dict = {"mode": "off", "layers_on_host": 0, "expansion_ratio": 1.0, "device_kv_capacity_bytes": 0,
                   "host_kv_capacity_bytes": 0, "host_kv_used_bytes": 0, "swap_in_bytes_total": 0,
                   "swap_out_bytes_total": 0, "swap_stall_seconds_total": 0.0, "last_step_stall_seconds": 0.0,
                   "last_step_copy_seconds": 0.0, "recommended_host_memory_bytes": 0,
                   "recommended_gpu_memory_bytes": 0, "headroom_layers": 0}
    if swap is not None:
        state["mode"] = "static"  # swapping without a controller: a fixed m
        stats = swap.stats()
        state.update(vars(stats))
        if blocks_in_use is not None:
            hosted = swap.geometry.num_host_backed(stats.layers_on_host)
            state["host_kv_used_bytes"] = min(blocks_in_use(), stats.num_blocks) * swap.block_bytes * hosted
        state["num_layers"] = swap.num_layers
        state["host_memory_limit"] = swap.host_memory_limit
    elif kv_cache is not None:
        state["num_layers"], state["num_blocks"] = kv_cache.num_layers, kv_cache.num_blocks
        state["device_kv_capacity_bytes"] = kv_cache.num_layers * kv_cache.num_blocks * kv_cache.block_bytes
    if controller is not None:
        ctrl = controller.state()
        # The cache reports what is applied; the controller adds its mode, reasoning and recommendations.
        for key in ("layers_on_host", "expansion_ratio", "blocks_per_layer"):
            ctrl[f"target_{key}"] = ctrl.pop(key)
        state.update(ctrl)
    total, used = _gpu_memory(device)
    state["gpu_memory_total_bytes"], state["gpu_memory_used_bytes"] = total, used
    return state


class SwapMetrics(Collector):
    """Collector of the Pie metrics (register it in a CollectorRegistry, or append ``collectors`` to
    ``LLMEngine.metrics_collectors``). Call ``observe_iteration(seconds)`` after every engine iteration."""

    def __init__(self, kv_cache: KVCache | None, controller: ExpansionController | None = None,
                 device: torch.device | None = None, blocks_in_use: Callable[[], int] | None = None, *,
                 swap: LayerSwapKVCache | None = None) -> None:
        self.kv_cache, self.swap, self.controller, self.device = kv_cache, swap, controller, device
        self.blocks_in_use = blocks_in_use
        self.iteration_seconds = Histogram("pie_iteration_seconds", "Engine iteration (step) time",
                                           buckets=ITERATION_BUCKETS, registry=None)

    @property
    def collectors(self) -> list[Collector]:
        return [self, self.iteration_seconds]

    def observe_iteration(self, seconds: float) -> None:
        self.iteration_seconds.observe(seconds)

    def state(self) -> dict:
        return expansion_state(self.kv_cache, self.controller, self.device, self.blocks_in_use, swap=self.swap)

    def describe(self) -> Iterator[Metric]:
        for name, (_, doc) in _GAUGES.items():
            yield GaugeMetricFamily(name, doc)
        for name, (_, doc) in _COUNTERS.items():
            yield CounterMetricFamily(name, doc)

    def collect(self) -> Iterator[Metric]:
        state = self.state()
        for name, (key, doc) in _GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=float(state[key]))
        for name, (key, doc) in _COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=float(state[key]))


def register_swap_metrics(registry: CollectorRegistry, kv_cache: KVCache | None,
                          controller: ExpansionController | None = None, device: torch.device | None = None, *,
                          swap: LayerSwapKVCache | None = None) -> SwapMetrics:
    """Register the Pie metrics into ``registry``; returns the object to feed iteration times to."""
    metrics = SwapMetrics(kv_cache, controller, device, swap=swap)
    for c in metrics.collectors:
        registry.register(c)
    return metrics
