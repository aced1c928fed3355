"""Helpers of bench/served_expansion.py: the server as a separate process (bench/serve_config.py) and a
closed-loop streaming client that times what a user sees.

Clocks: every ``wall_*`` figure is wall-clock time (``time.perf_counter`` in this client process, from stream
event arrival); every ``cpu_*`` figure is CPU time of the server process, all its threads (/proc/<pid>/stat
utime + stime), counted over the measured load only (after the warm-up request).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT, Request, percentiles

# The controller fields a run reports from the final GET /v1/pie/expansion (the full state is large).
STATE_KEYS = ("mode", "layers_on_host", "target_layers_on_host", "expansion_ratio", "target_expansion_ratio",
              "num_device_blocks", "blocks_per_layer", "num_grows", "num_shrinks", "last_decision", "overhead",
              "overheads", "stall_fraction", "ceiling", "swap_stall_seconds_total", "swap_in_bytes_total",
              "swap_out_bytes_total", "device_kv_budget_bytes", "recent_changes")
POLL_S = 0.5


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, every thread) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


@contextmanager
def server(config: dict[str, Any], log_level: str = "warning") -> Iterator[tuple[subprocess.Popen, str]]:
    """A fresh server for ``config`` (EngineConfig fields) on a free port; stopped with SIGTERM on exit.
    Fresh per run: the budget and expansion mode are startup settings, and the controller must start cold."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'engine'}:{ROOT}"}
    proc = subprocess.Popen([sys.executable, "-m", "bench.serve_config", f.name, "127.0.0.1", str(port), log_level],
                            env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # the medium model loads in seconds; a busy machine can take minutes
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} (config {config})")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield proc, url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        Path(f.name).unlink(missing_ok=True)


async def stream_completion(client: httpx.AsyncClient, url: str, req: Request) -> tuple[float, list[float], int]:
    """One streaming completion with a fixed output length (``ignore_eos``: the random model's EOS cannot end it
    early): (time sent, time of each stream event carrying text, completion tokens). Shared with online_serving."""
    body = {"model": "bench", "prompt": req.prompt_token_ids, "max_tokens": req.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    times: list[float] = []
    tokens = 0
    sent = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices"):
                times.append(time.perf_counter())
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return sent, times, tokens


def timing_record(sent: float, times: list[float], tokens: int) -> dict:
    """TTFT, e2e, TPOT and ITL of one request. An event can carry several tokens (or none: a partial character),
    so TPOT uses the token count and ITL is the gap between events, what a user's screen shows."""
    ttft, e2e = times[0] - sent, times[-1] - sent
    return {"ttft": ttft, "e2e": e2e, "tpot": (e2e - ttft) / max(tokens - 1, 1), "tokens": tokens,
            "itl": [b - a for a, b in zip(times, times[1:], strict=False)]}


async def _one(client: httpx.AsyncClient, url: str, req: Request) -> dict:
    sent, times, tokens = await stream_completion(client, url, req)
    return {**timing_record(sent, times, tokens), "events": len(times)}


async def _poll(client: httpx.AsyncClient, url: str, t0: float, stop: asyncio.Event) -> list[list]:
    """[[wall s since the load started, layers_on_host, target_layers_on_host], ...] every POLL_S."""
    trace: list[list] = []
    while not stop.is_set():
        s = (await client.get(f"{url}/v1/pie/expansion")).json()
        trace.append([round(time.perf_counter() - t0, 3), s.get("layers_on_host"), s.get("target_layers_on_host")])
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), POLL_S)
    return trace


async def _closed_loop(url: str, pid: int, reqs: list[Request], concurrency: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        await _one(client, url, Request(reqs[0].prompt_token_ids, 4))  # warm-up: first-call costs off the clock
        load_before = os.getloadavg()
        pending = iter(reqs)  # shared by the workers, in the same order every run (one event loop: no race)

        async def worker() -> list[dict]:
            return [await _one(client, url, r) for r in pending]

        stop = asyncio.Event()
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        poller = asyncio.create_task(_poll(client, url, t0, stop))
        recs = [r for rs in await asyncio.gather(*(worker() for _ in range(concurrency))) for r in rs]
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
        stop.set()
        trace = await poller
        state = (await client.get(f"{url}/v1/pie/expansion")).json()
    return {"recs": recs, "wall": wall, "cpu": cpu, "trace": trace, "state": state,
            "load_before": load_before, "load_after": os.getloadavg()}


def _round(d: dict[str, float], nd: int = 4) -> dict[str, float]:
    return {k: round(v, nd) for k, v in d.items()}


def measure(config: dict[str, Any], reqs: list[Request], concurrency: int) -> dict:
    """Serve ``reqs`` from ``concurrency`` closed-loop clients on a fresh server for ``config``; one run record."""
    with server(config) as (proc, url):
        out = asyncio.run(_closed_loop(url, proc.pid, reqs, concurrency))
    recs, wall = out["recs"], out["wall"]
    tokens = sum(r["tokens"] for r in recs)
    return {"wall_output_tok_s": round(tokens / wall, 2), "wall_s": round(wall, 3), "output_tokens": tokens,
            "stream_events": sum(r["events"] for r in recs),
            "wall_e2e_s": _round(percentiles([r["e2e"] for r in recs])),
            "wall_ttft_s": _round(percentiles([r["ttft"] for r in recs])),
            "wall_itl_s": _round(percentiles([x for r in recs for x in r["itl"]])),
            "wall_tpot_s": _round(percentiles([r["tpot"] for r in recs])),
            "cpu_server_s": round(out["cpu"], 3), "cpu_server_s_per_output_token": round(out["cpu"] / tokens, 6),
            "loadavg_before": [round(x, 2) for x in out["load_before"]],
            "loadavg_after": [round(x, 2) for x in out["load_after"]],
            # The server's own figures: its engine clock is wall time (the serve default).
            "server_expansion_state": {k: out["state"].get(k) for k in STATE_KEYS},
            "wall_layers_on_host_trace": out["trace"]}


def medians(runs: list[dict]) -> dict:
    """Per numeric field (nested one level, e.g. wall_ttft_s.p99): the median over ``runs``."""
    out: dict = {}
    for key, v in runs[0].items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[key] = round(statistics.median(r[key] for r in runs), 6)
        elif isinstance(v, dict) and key.startswith(("wall_", "cpu_")):
            out[key] = {q: round(statistics.median(r[key][q] for r in runs), 6) for q in v}
    return out
