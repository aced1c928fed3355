"""Docs that are generated from a source of truth must not drift from it."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_crd_reference_is_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("gen", REPO / "docs" / "gen_crd_reference.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (REPO / "docs" / "crd-reference.md").read_text() == gen.render(), (
        "docs/crd-reference.md is stale: run `python docs/gen_crd_reference.py`")


def test_metrics_reference_names_every_contract_metric() -> None:
    from pie_engine.pie.metrics import SwapMetrics  # noqa: F401  (the contract lives in the engine)

    readme = (REPO / "README.md").read_text()
    for name in ("pie_expansion_ratio", "pie_kv_layers_on_host", "pie_device_kv_capacity_bytes",
                 "pie_host_kv_capacity_bytes", "pie_host_kv_used_bytes", "pie_swap_in_bytes_total",
                 "pie_swap_out_bytes_total", "pie_swap_stall_seconds_total", "pie_iteration_seconds",
                 "pie_recommended_host_memory_bytes", "pie_recommended_gpu_memory_bytes",
                 "pie_gpu_memory_total_bytes", "pie_gpu_memory_used_bytes"):
        assert f"`{name}`" in readme, f"README metrics reference misses {name}"
