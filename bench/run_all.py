"""Run every benchmark (offline throughput, online serving) and write bench/results/summary.json.

    PYTHONPATH=engine python bench/run_all.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import offline_throughput, online_serving  # noqa: E402
from bench.common import save  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes")
    args = ap.parse_args()
    offline = offline_throughput.run(quick=args.quick)
    online = online_serving.run(quick=args.quick)
    summary = {
        "offline_speedup_vs_hf": {k: v["speedup_vs_hf"] for k, v in offline["scenarios"].items()},
        "online_throughput_ratio_vs_hf": online["throughput_ratio"],
        "online_p50_ratios_hf_over_engine": online["ratios_hf_over_engine"],
    }
    path = save("summary", summary)
    print(json.dumps(summary, indent=2))
    print(f"results in {path.parent}")


if __name__ == "__main__":
    main()
