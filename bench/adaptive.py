"""The adaptive expansion controller on the swap_sweep workload and budget: which m it settles on (vs the best
static m of the sweep), its throughput vs no-swap, and its iteration-latency overhead, all measured in this run.

Goals (docs/pie.md): settled ratio within 10% of the best static ratio (the smallest m within 5% of the best static
throughput: see ``reference``); throughput >= 1.5x no-swap at <= 5% iteration-latency overhead. Reported as
measured, whatever it is. Reads bench/results/swap_sweep.json for the sweep's best static m (run swap_sweep.py
first; run_all.py does); without it that comparison is null.

    PYTHONPATH=engine:. python bench/adaptive.py [--quick]
"""

from __future__ import annotations

import json
from collections import Counter

from bench.common import RESULTS
from bench.pie_common import (
    PIE_MODEL_KW,
    best_of,
    cli,
    fit_baseline,
    pie_workload,
    save_figure,
    setup_threads,
    summary,
)
from bench.pie_common import workload_kv_bytes as kv_bytes
from bench.swap_sweep import QUICK, WORKLOAD, ratio_for, static_picks

# A latency budget above this CPU's floor: on two vCPUs swapping at any m costs ~3-5% (hooks on the compute thread,
# copy threads sharing the cores: swap_sweep), right at the default epsilon of 5%, where the controller's readings
# straddle it. 10% shows where it settles when the budget clears that floor.
RELAXED = {"expansion_epsilon": 0.10, "expansion_grow_overhead": 0.06}


def sweep_best(quick: bool) -> dict | None:
    path = RESULTS / ("swap_sweep_quick.json" if quick else "swap_sweep.json")
    if not path.is_file():
        return None
    picks = static_picks(json.loads(path.read_text())["sweep"])
    keys = ("layers_on_host", "expansion_ratio", "tok_s", "throughput_vs_no_swap", "latency_overhead")
    return {name: None if (row := picks[key]) is None else {k: row[k] for k in keys} for name, key in (
        ("plateau", "best_static_plateau"), ("by_throughput", "best_static"),
        ("transparent_by_throughput", "best_transparent_static"))}


def reference(best: dict | None) -> dict | None:
    """The static row the controller is judged against: the smallest m within 5% of the best static throughput.
    Throughput is flat once every request fits (m = 4..7 here), so the fastest of those is run-to-run noise (+-3%),
    and so is whether a given m reads 4.9% or 5.1% overhead; the start of the plateau is stable. The fastest m and
    the fastest within 5% overhead are reported next to it."""
    return None if best is None else best["plateau"]


def trajectory(ms: list[int]) -> list[list[int]]:
    """[[iteration, m], ...] at every change of m."""
    return [[i, m] for i, m in enumerate(ms) if i == 0 or ms[i - 1] != m]


def run(quick: bool = False, repeats: int = 2) -> dict:
    threads = setup_threads()
    w = QUICK if quick else WORKLOAD
    reqs = pie_workload(w["n"], w["input_len"], w["output_len"], seed=1)
    n = PIE_MODEL_KW["layers"]
    budget = kv_bytes(reqs) // 2
    best = sweep_best(quick)
    configs = {"ideal": (None, "off"), "off": (budget, "off"), "adaptive": (budget, "adaptive"),
               "adaptive_relaxed": (budget, "adaptive", RELAXED)}
    if (ref := reference(best)) is not None:
        configs["best_static"] = (budget, ratio_for(ref["layers_on_host"], n))
    runs = best_of(configs, reqs, repeats)
    base = fit_baseline(runs["ideal"])
    off = runs["off"]
    result = {"model": PIE_MODEL_KW, "torch_threads": threads, "workload": w, "device_kv_budget_bytes": budget,
              "repeats": repeats, "no_swap": summary(off, base), "ideal_unlimited": summary(runs["ideal"], base),
              "adaptive": adaptive_summary(runs["adaptive"], off, base, n),
              "adaptive_relaxed": {"config": RELAXED, **adaptive_summary(runs["adaptive_relaxed"], off, base, n)},
              "sweep_best_static": best,
              "greedy_outputs_identical": all(r.outputs == runs["ideal"].outputs for r in runs.values())}
    if "best_static" in runs:
        bs = runs["best_static"]
        result["best_static_this_run"] = {**summary(bs, base), "throughput_vs_no_swap": round(bs.tok_s / off.tok_s, 3)}
    for variant in ("adaptive", "adaptive_relaxed"):
        a = result[variant]
        for name, row in (best or {}).items():
            if row is not None:
                a[f"settled_ratio_vs_best_static_{name}"] = round(a["settled_expansion_ratio"] / row["expansion_ratio"],
                                                                  3)
        a["goals"] = {
            "ratio_within_10pct_of_best_static": None if ref is None else
            abs(a["settled_expansion_ratio"] / ref["expansion_ratio"] - 1) <= 0.10,
            "throughput_ge_1.5x_no_swap": a["throughput_vs_no_swap"] >= 1.5,
            "latency_overhead_le_5pct": a["latency_overhead"] is not None and a["latency_overhead"] <= 0.05}
    plot(result, runs, best, quick)
    return result


def adaptive_summary(ad, off, base, n: int) -> dict:
    ms = [i.layers_on_host for i in ad.iterations]
    settled = Counter(ms[len(ms) // 2:]).most_common(1)[0][0]  # the m held most over the second half
    return {**summary(ad, base), "throughput_vs_no_swap": round(ad.tok_s / off.tok_s, 3),
            "settled_layers_on_host": settled, "settled_expansion_ratio": round(n / (n - settled), 3),
            "trajectory": trajectory(ms), "decisions": ad.decisions, "controller": {k: ad.state.get(k) for k in (
                "last_decision", "overhead", "stall_fraction", "num_grows", "num_shrinks", "ceiling",
                "transparent_limit", "recommended_gpu_memory_bytes", "recommended_host_memory_bytes")}}


def plot(result: dict, runs: dict, best: dict | None, quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    for variant in ("adaptive", "adaptive_relaxed"):
        ms = [i.layers_on_host for i in runs[variant].iterations]
        eps = result[variant].get("config", {}).get("expansion_epsilon", 0.05)
        a.step(range(len(ms)), ms, where="post", label=f"{variant} (epsilon {eps})")
    if (ref := reference(best)) is not None:
        a.axhline(ref["layers_on_host"], linestyle="--", color="gray", label="best static m (sweep plateau)")
    a.set_xlabel("iteration")
    a.set_ylabel("layers on host (m)")
    a.legend(fontsize=8)
    a.set_title("controller trajectory", fontsize=10)
    labels = [k for k in ("off", "best_static", "adaptive", "adaptive_relaxed", "ideal") if k in runs]
    vals = [runs[k].tok_s for k in labels]
    names = {"off": "no-swap", "best_static": "best\nstatic", "adaptive_relaxed": "adaptive\nrelaxed"}
    bars = b.bar([names.get(k, k) for k in labels], vals)
    b.bar_label(bars, fmt="%.0f", fontsize=8)
    b.set_ylabel("output tokens / s")
    b.set_title("critical-path throughput, same budget (ideal: unlimited)", fontsize=9)
    save_figure(fig, "adaptive", quick)


def main() -> None:
    cli("adaptive", __doc__, run)


if __name__ == "__main__":
    main()
