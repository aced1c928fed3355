"""Combine partial served_expansion runs into one result: each (model, workload) entry whole from the LAST named run
that has it -- its configurations, its ratios and the ideal they were computed against, all from that one
interleaved run -- so a partial rerun (``served_expansion.py --out NAME``) can replace rows of the committed table
without mixing runs within a row. Goals are recomputed per model from the merged rows; ``sources`` says which run
each row came from and how many rounds it had.

    PYTHONPATH=engine:. python -m bench.served_merge served_expansion served_expansion_tiny_run7 ... \
        --out served_expansion
"""

from __future__ import annotations

import argparse
import json

from bench.common import RESULTS, save
from bench.served_expansion import goals, plot


def merge(names: list[str]) -> dict:
    runs = [(n, json.loads((RESULTS / f"{n}.json").read_text())) for n in names]
    first = runs[0][1]
    out: dict = {k: v for k, v in first.items() if k not in ("models", "goals", "rounds", "wall_benchmark_s")}
    out["rounds"] = "per row: see sources"
    out["models"], out["sources"] = {}, {}
    for name, result in runs:
        for m, entry in result["models"].items():
            target = out["models"].setdefault(m, {k: v for k, v in entry.items() if k not in ("workloads", "goals")})
            for wl, w in entry["workloads"].items():
                target.setdefault("workloads", {})[wl] = {**w, "ideal": entry["ideal"], "rounds": result["rounds"]}
                out["sources"][f"{m}/{wl}"] = {"run": name, "rounds": result["rounds"]}
    for entry in out["models"].values():
        entry["goals"] = goals(entry["workloads"])
    out["goals"] = {m: e["goals"] for m, e in out["models"].items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="+", help="result names in bench/results, earliest first")
    ap.add_argument("--out", required=True, help="result name to write (JSON + PNG)")
    args = ap.parse_args()
    for n in args.names:
        if not (RESULTS / f"{n}.json").is_file():
            ap.error(f"no bench/results/{n}.json")
    result = merge(args.names)
    save(args.out, result)
    plot(result, False, args.out)
    print(json.dumps({"goals": result["goals"], "sources": result["sources"]}, indent=2))


if __name__ == "__main__":
    main()
