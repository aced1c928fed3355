"""Throughput and per-iteration latency vs static expansion (m = 0 .. n-1 layers' KV on host).

The device KV budget holds about half of the workload's KV (every request running at once). Baselines in the SAME
run: expansion off at the same budget (no-swap: fewer sequences fit, so smaller batches and preemption), and
expansion off with an unlimited budget (the ideal: everything fits, nothing is copied). Latency overhead is measured
against the same forward passes replayed without swapping (pie_replay.py); the no-swap runs measured the same way
give the method's floor. Outputs must be identical everywhere.

    PYTHONPATH=engine:. python bench/swap_sweep.py [--quick]
"""

from __future__ import annotations

from bench.common import RESULTS
from bench.pie_common import (
    PIE_MODEL_KW,
    best_of,
    cli,
    fit_baseline,
    line_plot,
    pie_workload,
    setup_threads,
    summary,
    workload_kv_bytes,
)

# A few long-context requests (chat/RAG-like: prompts of 128-160 tokens, answers of 160-192), all at once. Their
# KV is large from the first step, so with half of it only about half of them run at a time (no-swap preempts and
# recomputes the rest), and on this CPU a step's cost is dominated by per-step work at these batch sizes: KV
# capacity really limits throughput (the Pie regime). The earlier workload (8 requests, 16-64 prompt tokens,
# 256-320 output tokens) needed its full KV only near the end, so no-swap ran most of it at full batch anyway:
# unlimited KV bought only 1.34-1.43x there (docs/pie.md, "Benchmarks").
WORKLOAD = {"n": 6, "input_len": (128, 160), "output_len": (160, 192)}
QUICK = {"n": 4, "input_len": (48, 64), "output_len": (64, 80)}


PLATEAU = 0.95  # within 5% of the best static throughput: the same, on this machine


def static_picks(rows: list[dict]) -> dict[str, dict | None]:
    """The sweep rows that count as the best static m, by name (the adaptive bench judges against the plateau):
    - ``best_static``: the fastest;
    - ``best_static_plateau``: the smallest m within PLATEAU of the fastest. Throughput is flat once every request
      fits (m = 4..7 here), so which of those is fastest is run-to-run noise (+-3%); more host memory buys nothing;
    - ``best_transparent_static``: the fastest whose replayed overhead is within the default epsilon (5%), or None.
    """
    fastest = max(rows, key=lambda r: r["tok_s"])
    ok = [r for r in rows if r["latency_overhead"] is not None and r["latency_overhead"] <= 0.05]
    return {"best_static": fastest,
            "best_static_plateau": next(r for r in rows if r["tok_s"] >= PLATEAU * fastest["tok_s"]),
            "best_transparent_static": max(ok, key=lambda r: r["tok_s"]) if ok else None}


def ratio_for(m: int, n: int) -> str:
    return repr(n / (n - m))


def run(quick: bool = False, repeats: int = 2) -> dict:
    threads = setup_threads()
    w = QUICK if quick else WORKLOAD
    reqs = pie_workload(w["n"], w["input_len"], w["output_len"], seed=1)
    n = PIE_MODEL_KW["layers"]
    total = workload_kv_bytes(reqs)
    budget = total // 2
    configs = {"ideal": (None, "off"), "off": (budget, "off"),
               **{f"m={m}": (budget, ratio_for(m, n)) for m in range(n)}}
    runs = best_of(configs, reqs, repeats)
    ideal, off = runs["ideal"], runs["off"]
    base = fit_baseline(ideal)
    result = {"model": PIE_MODEL_KW, "torch_threads": threads, "workload": w, "workload_kv_bytes": total,
              "device_kv_budget_bytes": budget, "repeats": repeats, "ideal_unlimited": summary(ideal, base),
              "no_swap": summary(off, base), "sweep": []}
    all_equal = all(r.outputs == ideal.outputs for r in runs.values())
    for m in range(n):
        r = runs[f"m={m}"]
        row = {"layers_on_host": m, "expansion_ratio": round(n / (n - m), 3), **summary(r, base),
               "throughput_vs_no_swap": round(r.tok_s / off.tok_s, 3)}
        result["sweep"].append(row)
    keys = ("layers_on_host", "expansion_ratio", "throughput_vs_no_swap", "latency_overhead")
    for name, row in static_picks(result["sweep"]).items():
        result[name] = None if row is None else {k: row[k] for k in keys}
    result["ideal_vs_no_swap"] = round(ideal.tok_s / off.tok_s, 3)  # the most any expansion could buy here
    result["greedy_outputs_identical"] = all_equal
    ms = [r["layers_on_host"] for r in result["sweep"]]
    line_plot(RESULTS / f"swap_sweep{'_quick' if quick else ''}.png",
              f"Static expansion, KV budget = 1/2 of workload KV ({n}-layer model, CPU, {threads} compute thread)",
              ms, {"throughput / no-swap": [r["throughput_vs_no_swap"] for r in result["sweep"]]},
              "layers on host (m)", "throughput vs no-swap (same budget)",
              hline={"ideal (unlimited budget)": result["ideal_vs_no_swap"], "no-swap": 1.0},
              ax2={"latency overhead vs no-swap replay": [r["latency_overhead"] or 0.0 for r in result["sweep"]]},
              ylabel2="iteration latency overhead")
    return result


def main() -> None:
    cli("swap_sweep", __doc__, run)


if __name__ == "__main__":
    main()
