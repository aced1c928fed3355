"""The engines of bench/operator_scale.py: ONE asyncio process that plays /health and /metrics for every engine pod.

kwok runs no containers, and 1,000 real engines do not fit on a small machine, so this process lists the pods
labelled `pie.io/deployment` every `--poll` seconds and listens on each pod's loopback IP and engine port (pod IPs
are 127.0.<node+1>.x in the test cluster). Every pod answers GET /health with 200 and GET /metrics with the same
recorded output of a real `pie-engine serve` (bench/data/engine_metrics.txt: a tiny model on CPU after one
completion), and POST /v1/completions (the rollout gate's probe request) with a recorded one-token answer. Nothing
else is served (the admin endpoint answers 404, which the operator treats as "needs a
restart"; the benchmark does not change GPU budgets).

    python -m bench.metrics_replay --kubeconfig KC --port 8000 [--metrics bench/data/engine_metrics.txt]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
from pathlib import Path

import kubernetes

DEFAULT_METRICS = Path(__file__).with_name("data") / "engine_metrics.txt"
# A one-token completion as pie-engine answers the operator's gate probe (max_tokens 1), fields trimmed.
PROBE_ANSWER = (b'{"id":"cmpl-replay","object":"text_completion","model":"replay","choices":[{"index":0,"text":" a",'
                b'"finish_reason":"length"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}')
USER_AGENT = "pie-bench-replay"  # (the benchmark tells the operator's API requests from this one's by it)


def response(status: int, body: bytes) -> bytes:
    reason = {200: "OK", 404: "Not Found"}[status]
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; version=0.0.4\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Replay:
    """Listeners on (pod IP, port), opened and closed as pods come and go."""

    def __init__(self, metrics: bytes, port: int) -> None:
        self.metrics, self.port = metrics, port
        self.servers: dict[str, asyncio.Server] = {}
        self.requests = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: the operator's client reuses connections
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if length:  # a request body (the gate's probe completion): read it, keep-alive goes on after it
                    await reader.readexactly(int(length.group(1)))
                self.requests += 1
                if path == b"/health":
                    writer.write(response(200, b'{"status":"ok"}'))
                elif path == b"/metrics":
                    writer.write(response(200, self.metrics))
                elif path == b"/v1/completions":  # the rollout gate's probe request: a recorded one-token answer
                    writer.write(response(200, PROBE_ANSWER))
                else:
                    writer.write(response(404, b'{"error":{"message":"not served by the replay"}}'))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def sync(self, ips: set[str]) -> None:
        for ip in set(self.servers) - ips:
            self.servers.pop(ip).close()
        for ip in ips - set(self.servers):
            with contextlib.suppress(OSError):  # (an address still held by a closing listener: next round)
                self.servers[ip] = await asyncio.start_server(self.serve, ip, self.port, reuse_address=True)


def pod_ips(api: kubernetes.client.ApiClient) -> set[str]:
    resp = api.call_api("/api/v1/pods", "GET", query_params=[("labelSelector", "pie.io/deployment")],
                        header_params={"Accept": "application/json"}, auth_settings=["BearerToken"],
                        _preload_content=False, _return_http_data_only=True)
    items = json.loads(resp.data).get("items", [])
    return {ip for p in items
            if (ip := p.get("status", {}).get("podIP")) and not p["metadata"].get("deletionTimestamp")}


async def main(kubeconfig: str, port: int, metrics: Path, poll: float) -> None:
    api = kubernetes.config.new_client_from_config(kubeconfig)
    api.user_agent = USER_AGENT
    replay = Replay(metrics.read_bytes(), port)
    while True:
        try:
            await replay.sync(await asyncio.to_thread(pod_ips, api))
        except Exception as e:  # the apiserver may blink: the next round retries
            print(f"replay: {e}", flush=True)
        await asyncio.sleep(poll)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--metrics", type=Path, default=DEFAULT_METRICS)
    ap.add_argument("--poll", type=float, default=2.0)
    a = ap.parse_args()
    asyncio.run(main(a.kubeconfig, a.port, a.metrics, a.poll))
