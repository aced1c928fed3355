"""swap_metrics: the exact prometheus names the operator reads, live values, and the JSON state."""

from __future__ import annotations

import json

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pie_engine.kv.device_cache import DeviceKVCache
from pie_engine.pie.controller import ExpansionController
from pie_engine.pie.controller_config import IterationSample
from pie_engine.pie.metrics import expansion_state, register_swap_metrics
from pie_engine.pie.swap_cache import LayerSwapKVCache
from tests.unit.engine.pie.kv_swap_driver import ToyDriver

NAMES = {
    "pie_expansion_ratio", "pie_kv_layers_on_host", "pie_device_kv_capacity_bytes", "pie_host_kv_capacity_bytes",
    "pie_host_kv_used_bytes", "pie_swap_in_bytes_total", "pie_swap_out_bytes_total", "pie_swap_stall_seconds_total",
    "pie_recommended_host_memory_bytes", "pie_recommended_gpu_memory_bytes", "pie_gpu_memory_total_bytes",
    "pie_gpu_memory_used_bytes", "pie_iteration_seconds_count", "pie_iteration_seconds_sum",
    "pie_expansion_headroom_layers",
}


def scrape(registry: CollectorRegistry) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in fam.samples:
            if not sample.name.endswith("_bucket"):
                out[sample.name] = sample.value
    return out


@pytest.fixture
def cache():
    c = LayerSwapKVCache(6, 12, 4, 2, 4, torch.float32, torch.device("cpu"), layers_on_host=3)
    yield c
    c.close()


def test_metric_names_and_live_values(cache: LayerSwapKVCache) -> None:
    ctrl = ExpansionController(cache.geometry, "static", 2.0)
    registry = CollectorRegistry()
    metrics = register_swap_metrics(registry, cache, ctrl, swap=cache)
    driver = ToyDriver(cache, seed=0)
    for _ in range(5):
        driver.step()
        metrics.observe_iteration(0.01)
        used = driver.bm.max_used_block_id + 1
        ctrl.update(IterationSample(0.01, cache.last_step_stall_seconds, 8, blocks_in_use=used))
    values = scrape(registry)
    assert set(values) >= NAMES
    st = cache.stats()
    assert values["pie_expansion_ratio"] == 2.0 and values["pie_kv_layers_on_host"] == 3
    assert values["pie_swap_in_bytes_total"] == st.swap_in_bytes_total > 0
    assert values["pie_swap_out_bytes_total"] == st.swap_out_bytes_total > 0
    assert values["pie_host_kv_capacity_bytes"] == st.host_kv_capacity_bytes > 0
    assert values["pie_device_kv_capacity_bytes"] == 3 * 24 * cache.block_bytes
    assert values["pie_recommended_host_memory_bytes"] == ctrl.recommended_host_memory_bytes > 0
    assert values["pie_gpu_memory_total_bytes"] == 0  # no GPU here
    assert values["pie_iteration_seconds_count"] == 5
    assert values["pie_expansion_headroom_layers"] == 0  # static: nothing to expand
    driver.step()  # values are read at scrape time
    assert scrape(registry)["pie_swap_in_bytes_total"] > values["pie_swap_in_bytes_total"]


def test_expansion_state_json(cache: LayerSwapKVCache) -> None:
    ctrl = ExpansionController(cache.geometry)
    state = json.loads(json.dumps(expansion_state(cache, ctrl, swap=cache)))
    assert state["headroom_layers"] == ctrl.headroom_layers > 0  # adaptive, nothing measured: room to grow
    assert state["mode"] == "adaptive" and state["layers_on_host"] == 3 and state["target_layers_on_host"] == 0
    assert state["host_memory_limit"] is None and state["num_layers"] == 6
    off = expansion_state(DeviceKVCache(4, 10, 4, 2, 4, torch.float32, torch.device("cpu")))
    assert off["mode"] == "off" and off["expansion_ratio"] == 1.0 and off["host_kv_capacity_bytes"] == 0
    assert off["device_kv_capacity_bytes"] == 4 * 10 * 2 * 4 * 2 * 4 * 4


def test_off_engine_still_exports_every_name() -> None:
    registry = CollectorRegistry()
    register_swap_metrics(registry, DeviceKVCache(2, 4, 4, 1, 4, torch.float32, torch.device("cpu")))
    assert set(scrape(registry)) >= NAMES
