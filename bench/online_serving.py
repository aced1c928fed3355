"""Online serving: Poisson arrivals against the real server (`python -m pie_engine serve`, streaming completions)
vs HF transformers generate() serving the same arrivals in static batches (in arrival order, up to a batch size,
a batch starting when the previous one is done). Reports TTFT / TPOT / ITL p50/p99, JSON + PNG in bench/results/.

    PYTHONPATH=engine:. python bench/online_serving.py [--rate 4] [--n 48] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.common import (
    RESULTS,
    ROOT,
    Request,
    bar_plot,
    bench_model,
    hf_generate_batch,
    load_hf,
    percentiles,
    save,
    setup_torch,
    workload,
)
from bench.served_client import stream_completion, timing_record


def start_server(path: Path, max_num_seqs: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'engine'}:{ROOT}"}
    proc = subprocess.Popen([sys.executable, "-m", "pie_engine", "serve", "--model", str(path), "--host", "127.0.0.1",
                             "--port", str(port), "--device", "cpu", "--dtype", "float32", "--served-model-name",
                             "bench", "--max-num-seqs", str(max_num_seqs), "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not become healthy")


async def _one(client: httpx.AsyncClient, url: str, req: Request, t0: float) -> dict:
    await asyncio.sleep(max(0.0, t0 + req.arrival - time.perf_counter()))
    return timing_record(*await stream_completion(client, url, req))


async def drive_server(url: str, reqs: list[Request]) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=len(reqs) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await _one(client, url, Request(reqs[0].prompt_token_ids, 4), time.perf_counter())  # warm-up
        t0 = time.perf_counter()
        recs = await asyncio.gather(*(_one(client, url, r, t0) for r in reqs))
    return list(recs), time.perf_counter() - t0


def drive_hf(model, reqs: list[Request], batch_size: int) -> tuple[list[dict], float]:
    """Serve the arrivals with HF static batches: when idle, take up to ``batch_size`` arrived requests."""
    recs: list[dict] = [{} for _ in reqs]
    t0 = time.perf_counter()
    i = 0
    while i < len(reqs):
        now = time.perf_counter() - t0
        if reqs[i].arrival > now:
            time.sleep(reqs[i].arrival - now)
            now = reqs[i].arrival
        j = i
        while j < len(reqs) and j - i < batch_size and reqs[j].arrival <= now:
            j += 1
        steps: list[float] = []
        hf_generate_batch(model, reqs[i:j], on_step=lambda steps=steps: steps.append(time.perf_counter()))
        for k in range(i, j):
            n = reqs[k].max_tokens
            recs[k] = timing_record(t0 + reqs[k].arrival, steps[:n], n)  # its tokens are the batch's first n steps
        i = j
    return recs, time.perf_counter() - t0


def summarize(recs: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in recs)
    return {"ttft_s": percentiles([r["ttft"] for r in recs]), "tpot_s": percentiles([r["tpot"] for r in recs]),
            "itl_s": percentiles([x for r in recs for x in r["itl"]]), "e2e_s": percentiles([r["e2e"] for r in recs]),
            "output_tok_s": round(tokens / wall, 1), "wall_s": round(wall, 2), "output_tokens": tokens}


def run(n: int = 48, rate: float = 4.0, quick: bool = False, hf_batch: int = 8) -> dict:
    setup_torch()
    if quick:
        n = max(8, n // 4)
    path = bench_model()
    reqs = workload(n, (16, 256), (16, 128) if not quick else (8, 32), seed=2, rate=rate)
    proc, url = start_server(path, max_num_seqs=64)
    try:
        engine_recs, engine_wall = asyncio.run(drive_server(url, reqs))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    hf = load_hf(path)
    hf_generate_batch(hf, [Request([5, 6, 7], 2)])  # warm-up
    hf_recs, hf_wall = drive_hf(hf, reqs, hf_batch)
    result = {"model": path.name, "requests": n, "rate_req_s": rate, "hf_static_batch_size": hf_batch,
              "pie_engine": summarize(engine_recs, engine_wall), "hf_generate": summarize(hf_recs, hf_wall)}
    e, h = result["pie_engine"], result["hf_generate"]
    result["ratios_hf_over_engine"] = {k: round(h[k]["p50"] / e[k]["p50"], 2) for k in ("ttft_s", "tpot_s", "e2e_s")}
    result["throughput_ratio"] = round(e["output_tok_s"] / h["output_tok_s"], 2)
    groups = ["TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "ITL p50", "ITL p99"]
    vals = lambda s: [s["ttft_s"]["p50"], s["ttft_s"]["p99"], s["tpot_s"]["p50"], s["tpot_s"]["p99"],
                      s["itl_s"]["p50"], s["itl_s"]["p99"]]
    out_name = "online_serving" + ("_quick" if quick else "")  # a smoke run never overwrites real results
    bar_plot(RESULTS / f"{out_name}.png", f"Online serving latency, {n} requests at {rate} req/s (CPU)", groups,
             {"pie_engine": vals(e), "HF generate (static)": vals(h)}, "seconds (log scale)", log=True)
    save(out_name, result)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=48, help="number of requests")
    ap.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, requests/s")
    ap.add_argument("--hf-batch", type=int, default=8, help="HF static batch size")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter requests (smoke test)")
    args = ap.parse_args()
    print(json.dumps(run(args.n, args.rate, args.quick, args.hf_batch), indent=2))


if __name__ == "__main__":
    main()
