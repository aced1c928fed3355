"""scrape.py against small real HTTP servers on 127.0.0.1: good, garbage, partial, missing and slow /metrics, and
the GPU-budget admin call. (The e2e test reads real `pie-engine serve` processes.)"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pie_operator import scrape as S
from pie_operator.observe import Observations, PodTarget, ScrapeSettings, scrape_once

Route = Callable[[BaseHTTPRequestHandler], tuple[int, bytes]]


def engine_text(drop: str = "", **override: float) -> bytes:
    """Metrics exposed the way the engine does it (prometheus_client), with every required name."""
    r = CollectorRegistry()
    for name in S.GAUGES:
        if name != drop:
            Gauge(name, "doc", registry=r).set(override.get(name, 1.0))
    for name in S.COUNTERS:
        if name != drop:
            Counter(name.removesuffix("_total"), "doc", registry=r).inc(override.get(name, 2.0))
    h = Histogram(S.HISTOGRAM, "doc", registry=r)
    for v in (0.5, 1.5, 2.0):
        h.observe(v)
    Gauge("pie_unrelated_thing", "doc", ["x"], registry=r).labels(x="y").set(7)
    return generate_latest(r)


class Server:
    """A real HTTP server on 127.0.0.1 (random port) answering from a table of routes; records admin requests."""

    def __init__(self, routes: dict[tuple[str, str], Route]) -> None:
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else b""
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                route = routes.get((method, self.path))
                status, payload = route(self) if route else (404, b"not found")
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
                self._answer("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._answer("POST")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True  # a handler still sleeping (the slow engine) must not block the teardown
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def healthy(metrics: bytes) -> dict[tuple[str, str], Route]:
    return {("GET", "/health"): lambda _: (200, b'{"status":"ok"}'), ("GET", "/metrics"): lambda _: (200, metrics)}


def run_scrape(port: int, timeout: float = 2.0) -> S.Observation:
    async def go() -> S.Observation:
        async with httpx.AsyncClient(trust_env=False) as client:
            return await S.scrape(client, "127.0.0.1", port, timeout)
    return asyncio.run(go())


def test_good_metrics_parse() -> None:
    with Server(healthy(engine_text(pie_host_kv_used_bytes=3 * 2**20, pie_swap_stall_seconds_total=0.4))) as srv:
        obs = run_scrape(srv.port)
    assert obs.ok and obs.error == ""
    m = obs.metrics
    assert m is not None and m.bytes("pie_host_kv_used_bytes") == 3 * 2**20
    assert m["pie_iteration_seconds_count"] == 3 and m["pie_iteration_seconds_sum"] == 4.0
    assert m.stall_fraction == pytest.approx(0.1)
    assert "pie_unrelated_thing" not in m.values


@pytest.mark.parametrize(("routes", "error"), [
    (healthy(b"this is not prometheus text at all\n{{{\n"), "garbage metrics"),
    (healthy(b"\x00\x01\x02"), "garbage metrics"),
    (healthy(engine_text(drop="pie_host_kv_used_bytes")), "missing metrics: pie_host_kv_used_bytes"),
    (healthy(b""), "missing metrics: pie_expansion_ratio, pie_kv_layers_on_host, pie_device_kv_capacity_bytes (+"),
    (healthy(engine_text(pie_expansion_ratio=float("nan"))), "invalid values: pie_expansion_ratio"),
    (healthy(engine_text(pie_host_kv_used_bytes=-5)), "invalid values: pie_host_kv_used_bytes"),
    ({("GET", "/health"): lambda _: (503, b"dying"), ("GET", "/metrics"): lambda _: (200, engine_text())},
     "/health answered 503"),
    ({("GET", "/health"): lambda _: (200, b"ok")}, "/metrics answered 404"),
])
def test_bad_metrics_are_stale(routes: dict[tuple[str, str], Route], error: str) -> None:
    with Server(routes) as srv:
        obs = run_scrape(srv.port)
    assert not obs.ok and obs.metrics is None
    assert obs.error.startswith(error), obs.error


def test_oversized_metrics_are_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S, "MAX_BODY", 1000)
    with Server(healthy(engine_text() + b"# padding\n" * 500)) as srv:
        assert run_scrape(srv.port).error == "garbage metrics (too large)"


def test_nothing_listening_is_unreachable() -> None:
    with Server({}) as srv:
        port = srv.port
    assert run_scrape(port).error.startswith("unreachable")


def test_slow_engine_times_out() -> None:
    # The engine answers only once the scrape is over (30 s at most), so a scrape that waited for it could not
    # pass however loaded the machine: no race between a sleep and the timeout.
    answer = threading.Event()

    def slow(_: BaseHTTPRequestHandler) -> tuple[int, bytes]:
        answer.wait(30)
        return 200, engine_text()

    with Server({("GET", "/health"): lambda _: (200, b"ok"), ("GET", "/metrics"): slow}) as srv:
        started = time.monotonic()
        obs = run_scrape(srv.port, timeout=0.3)
        elapsed = time.monotonic() - started
        answer.set()
    assert obs.error == "timeout" and elapsed < 20, elapsed  # the scrape gave up; it did not wait for the engine


def test_scrape_once_records_fresh_and_stale_pods_concurrently() -> None:
    store = Observations()
    with Server(healthy(engine_text(pie_host_kv_used_bytes=2**20))) as good, \
            Server(healthy(b"garbage garbage\n")) as bad:
        # One port per PieDeployment (as with engine.port), so the two servers are two PieDeployments here.
        store.set_targets(("ns", "a"), good.port, [PodTarget("a-1", "u1", "127.0.0.1")])
        store.set_targets(("ns", "b"), bad.port, [PodTarget("b-1", "u2", "127.0.0.1"),
                                                  PodTarget("b-2", "u3", "127.0.0.1", ready=False)])

        async def go() -> list[tuple[str, str]]:
            async with httpx.AsyncClient(trust_env=False) as client:
                return await scrape_once(store, client, ScrapeSettings(timeout=2), asyncio.Semaphore(1))
        keys = asyncio.run(go())
    assert sorted(keys) == [("ns", "a"), ("ns", "b")]
    a, b = store.view(("ns", "a"), time.time(), 60), store.view(("ns", "b"), time.time(), 60)
    assert a["a-1"].last is not None and a["a-1"].last.ok and a["a-1"].samples[0].host_kv_used == 2**20
    assert b["b-1"].last is not None and b["b-1"].last.error.startswith("garbage") and b["b-1"].samples == []
    assert "b-2" not in b  # not Ready: not scraped
    assert [r["path"] for r in bad.requests] == ["/health", "/metrics"]


def test_targets_forget_pods_that_are_gone() -> None:
    store = Observations()
    pod = PodTarget("p", "u1", "127.0.0.1")
    store.set_targets(("ns", "x"), 1, [pod])
    store.record(("ns", "x"), pod, S.Observation(at=1.0, error="timeout"))
    assert store.view(("ns", "x"), 2.0, 60)["p"].last is not None
    store.set_targets(("ns", "x"), 1, [PodTarget("p", "u2", "127.0.0.1")])  # same name, new pod
    assert store.view(("ns", "x"), 2.0, 60) == {}
    store.record(("ns", "x"), pod, S.Observation(at=3.0, error="timeout"))  # a late result for the old pod
    assert store.view(("ns", "x"), 4.0, 60) == {}


@pytest.mark.parametrize(("status", "body", "applied", "needs_restart", "rejected", "detail"), [
    (200, {"bytes": 123}, True, False, False, "applied live"),
    (409, {"error": {"message": "shrinking needs a restart"}}, False, True, False, "409: shrinking needs a restart"),
    (401, {"error": {"message": "bad token"}}, False, True, False, "401: bad token"),
    (404, {"error": {"message": "Not Found"}}, False, True, False, "404: Not Found"),  # an engine without it
    (400, {"error": {"message": "too small"}}, False, False, True, "400: too small"),
    (500, {"error": {"message": "boom"}}, False, False, False, "500: boom"),
])
def test_admin_gpu_budget(status: int, body: dict[str, Any], applied: bool, needs_restart: bool, rejected: bool,
                          detail: str) -> None:
    routes: dict[tuple[str, str], Route] = {("POST", S.ADMIN_PATH): lambda _: (status, json.dumps(body).encode())}
    with Server(routes) as srv:
        res = S.set_gpu_budget("127.0.0.1", srv.port, "s3cret", 123 * 2**20)
    assert (res.applied, res.needs_restart, res.rejected, res.detail) == (applied, needs_restart, rejected, detail)
    (req,) = srv.requests
    assert req["auth"] == "Bearer s3cret" and json.loads(req["body"]) == {"bytes": 123 * 2**20}


@pytest.mark.parametrize(("status", "body", "busy"), [
    (409, {"error": {"message": "an unfinished request needs 58", "code": "busy"}}, True),
    (409, {"error": {"message": "... it needs a restart (or a retry once the request finished)",  # older engines
                     "code": "needs_restart"}}, True),
    (409, {"error": {"message": "could not be changed live (OOM); it needs a restart", "code": "needs_restart"}},
     False),
    (429, {"error": {"message": "slow down"}}, False),
    (503, {"error": {"message": "shutting down"}}, False),
])
def test_admin_busy_and_transient_never_ask_for_a_restart(status: int, body: dict[str, Any], busy: bool) -> None:
    """Only a definite "needs a restart" replaces a pod: busy (a running request needs the KV) and 429/5xx are
    tried again later."""
    routes: dict[tuple[str, str], Route] = {("POST", S.ADMIN_PATH): lambda _: (status, json.dumps(body).encode())}
    with Server(routes) as srv:
        res = S.set_gpu_budget("127.0.0.1", srv.port, "s3cret", 2**30)
    assert (res.busy, res.needs_restart) == (busy, status == 409 and not busy) and not res.applied, res


def test_admin_unreachable_is_transient() -> None:
    with Server({}) as srv:
        port = srv.port
    res = S.set_gpu_budget("127.0.0.1", port, "t", 1)
    assert not res.applied and not res.needs_restart and res.detail.startswith("unreachable")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A proxy in the environment must not matter (the operator ignores it for pod IPs)."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    yield
