"""Where transparency breaks, per link class: swap stall and iteration-latency overhead vs m, with every KV copy
throttled (copy_engine.LinkModel) to a link scaled to this CPU's compute speed.

Scaling (docs/pie.md, "Benchmarks"). What decides transparency is the ratio copy time / compute time. For each
system we estimate the GPU's time for every iteration of the reference run (m = 0) with a roofline on the SAME
model and batches, in bf16: ``max((weight bytes + KV bytes read) / HBM bandwidth, FLOPs / peak)``. The modeled
link is then slowed by the factor this CPU is slower than that GPU on the same iterations, and by 2 because the
bench's KV is fp32 (the GPU's would be bf16):

    bandwidth_on_cpu = link_bandwidth * (sum of GPU iteration times / sum of CPU iteration times) * (4 / 2)

so a copy takes the same share of an iteration here as it would there. Link latency is not modeled (0): a few
microseconds on the GPU, negligible against millisecond-scale CPU layers once scaled. The workload fits the
device budget at m = 0, so every m runs the identical schedule and the overhead is a direct comparison with m = 0.

    PYTHONPATH=engine:. python bench/link_model.py [--quick]
"""

from __future__ import annotations

import sys

from bench.pie_common import (
    PIE_MODEL_KW,
    RunResult,
    best_of,
    cli,
    pie_workload,
    run_offline,
    save_figure,
    setup_threads,
    workload_kv_bytes,
)
from bench.swap_sweep import ratio_for

# name: (link bytes/s per direction, HBM bytes/s, dense bf16 FLOP/s). None: unthrottled CPU memcpy.
SYSTEMS: dict[str, tuple[float, float, float] | None] = {
    "cpu memcpy (unthrottled)": None,
    "GH200 NVLink-C2C (450 GB/s)": (450e9, 4.0e12, 989e12),
    "H100 PCIe Gen5 x16 (64 GB/s)": (64e9, 2.0e12, 756e12),
}
WORKLOAD = {"n": 8, "input_len": (16, 64), "output_len": (96, 128)}
QUICK = {"n": 4, "input_len": (16, 32), "output_len": (32, 48)}
NUM_STAGING = 2


def model_facts() -> dict[str, float]:
    """Parameter count read per token and bf16 KV bytes per token (all layers) of the bench model."""
    kw = PIE_MODEL_KW
    h, layers, head_dim = kw["hidden"], kw["layers"], kw["hidden"] // kw["heads"]
    kv = kw["kv_heads"] * head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * kw["intermediate"]
    return {"params": per_layer * layers + kw["vocab"] * h, "kv_bytes_per_token": layers * 2 * kv * 2,
            "attn_flops_per_context_token": 4 * layers * h}


def gpu_seconds(ref: RunResult, hbm: float, peak: float) -> float:
    """Roofline time of the reference run's iterations on the GPU (bf16)."""
    f = model_facts()
    total = 0.0
    for it in ref.iterations:
        nbytes = 2 * f["params"] + f["kv_bytes_per_token"] * it.context_tokens
        flops = 2 * f["params"] * it.tokens + f["attn_flops_per_context_token"] * it.context_tokens
        total += max(nbytes / hbm, flops / peak)
    return total


def run(quick: bool = False) -> dict:
    threads = setup_threads()
    w = QUICK if quick else WORKLOAD
    reqs = pie_workload(w["n"], w["input_len"], w["output_len"], seed=2)
    n = PIE_MODEL_KW["layers"]
    budget = workload_kv_bytes(reqs)  # everything fits at m = 0: identical schedule for every m
    ref = best_of({"m=0": (budget, "off")}, reqs, 2)["m=0"]
    cpu_total = sum(i.cost for i in ref.iterations)
    used_prefix = sum(i.context_tokens for i in ref.iterations) / len(ref.iterations) * 1024  # fp32 bytes/layer
    layer_compute = cpu_total / len(ref.iterations) / n
    result = {"model": PIE_MODEL_KW, "torch_threads": threads, "workload": w, "device_kv_budget_bytes": budget,
              "num_staging": NUM_STAGING, "reference_m0": {"tok_s": round(ref.tok_s, 1),
                                                           "iteration_ms": ref.iteration_ms()}, "systems": {}}
    series, stalls = {}, {}
    for name, spec in SYSTEMS.items():
        cfg: dict = {}
        entry: dict = {}
        if spec is not None:
            link, hbm, peak = spec
            scale = gpu_seconds(ref, hbm, peak) / cpu_total
            cfg["swap_link_bytes_per_s"] = link * scale * 2
            # rho: one layer's copy (its used KV prefix) over one layer's compute, the same on both machines.
            rho = used_prefix / cfg["swap_link_bytes_per_s"] / layer_compute
            entry = {"link_bytes_per_s": link, "hbm_bytes_per_s": hbm, "peak_flops": peak,
                     "cpu_over_gpu_time": round(1 / scale, 1),
                     "scaled_link_bytes_per_s": round(cfg["swap_link_bytes_per_s"]),
                     "copy_over_compute_per_layer": round(rho, 3),
                     # Copies of one direction are serialized: hidden while (m + k) copies fit in n layers' compute.
                     # m = n - 1 leaves one slot (k = 1): each swap-in waits for the previous layer, nothing hides.
                     "predicted_max_transparent_m": max(0, min(n - 2, int(n / rho) - NUM_STAGING))}
        rows = []
        for m in range(1, n):
            # No shadow replay: it would give in-flight copies extra time, and this bench is about stalls.
            r = run_offline(f"{name} m={m}", reqs, budget, ratio_for(m, n), replay=False,
                            swap_staging_slots=NUM_STAGING, **cfg)
            assert r.outputs == ref.outputs and len(r.iterations) == len(ref.iterations)
            rows.append({"layers_on_host": m, "expansion_ratio": round(n / (n - m), 3),
                         "latency_overhead": round(r.critical_s / ref.critical_s - 1, 4),
                         "stall_fraction": round(r.stall_fraction, 4), "iteration_ms": r.iteration_ms(),
                         "wall_latency_overhead": round(r.elapsed_s / ref.elapsed_s - 1, 4)})
            print(f"{name} m={m}: overhead {rows[-1]['latency_overhead']}", file=sys.stderr)
        entry["sweep"] = rows
        # Link-caused: the stall (compute waiting for a copy); the overhead also holds this CPU's contention floor.
        entry["max_m_stall_below_5pct"] = largest_prefix(rows, lambda r: r["stall_fraction"] <= 0.05)
        entry["max_m_overhead_below_5pct"] = largest_prefix(rows, lambda r: r["latency_overhead"] <= 0.05)
        result["systems"][name] = entry
        series[name] = [0.0] + [r["latency_overhead"] for r in rows]
        stalls[name] = [0.0] + [r["stall_fraction"] for r in rows]
    plot(n, series, stalls, quick)
    return result


def largest_prefix(rows: list[dict], ok) -> int:
    """Largest m such that every m' in 1..m satisfies ``ok`` (0 if m = 1 does not)."""
    best = 0
    for r in rows:
        if not ok(r):
            break
        best = r["layers_on_host"]
    return best


def plot(n: int, overheads: dict[str, list[float]], stalls: dict[str, list[float]], quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name in overheads:
        a.plot(range(n), stalls[name], marker="o", label=name)
        b.plot(range(n), overheads[name], marker="o", label=name)
    a.axhline(0.05, linestyle="--", color="gray", linewidth=1)
    b.axhline(0.05, linestyle="--", color="gray", linewidth=1)
    a.set_title("swap stall / iteration (link-caused)", fontsize=10)
    b.set_title("iteration-latency overhead vs m = 0 (incl. CPU contention)", fontsize=10)
    for ax in (a, b):
        ax.set_xlabel(f"layers on host (m), n = {n}, k = {NUM_STAGING}")
        ax.legend(fontsize=7)
    save_figure(fig, "link_model", quick)


def main() -> None:
    cli("link_model", __doc__, run)


if __name__ == "__main__":
    main()
