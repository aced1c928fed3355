"""Run every benchmark (offline throughput, online serving, Pie: swap sweep, adaptive, link model) and write
bench/results/summary.json. The Pie benchmarks run last: they pin torch to one compute thread (bench/pie_common.py).

    PYTHONPATH=engine python bench/run_all.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import adaptive, link_model, offline_throughput, online_serving, swap_sweep  # noqa: E402
from bench.common import save  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes")
    args = ap.parse_args()
    offline = offline_throughput.run(quick=args.quick)
    online = online_serving.run(quick=args.quick)
    suffix = "_quick" if args.quick else ""
    sweep = swap_sweep.run(quick=args.quick)
    save("swap_sweep" + suffix, sweep)
    ad = adaptive.run(quick=args.quick)  # reads the sweep just saved
    save("adaptive" + suffix, ad)
    links = link_model.run(quick=args.quick)
    save("link_model" + suffix, links)
    summary = {
        "offline_speedup_vs_hf": {k: v["speedup_vs_hf"] for k, v in offline["scenarios"].items()},
        "online_throughput_ratio_vs_hf": online["throughput_ratio"],
        "online_p50_ratios_hf_over_engine": online["ratios_hf_over_engine"],
        "pie_swap_sweep_best_static": sweep["best_static"],
        "pie_ideal_vs_no_swap": sweep["ideal_vs_no_swap"],
        "pie_adaptive": {k: {f: ad[k][f] for f in ("settled_expansion_ratio", "throughput_vs_no_swap",
                                                   "latency_overhead")} for k in ("adaptive", "adaptive_relaxed")},
        "pie_link_max_m_stall_below_5pct": {k: v["max_m_stall_below_5pct"] for k, v in links["systems"].items()},
    }
    path = save("summary", summary)
    print(json.dumps(summary, indent=2))
    print(f"results in {path.parent}")


if __name__ == "__main__":
    main()
