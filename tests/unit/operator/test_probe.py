"""The rollout gate's probe request (scrape.probe): one tiny completion sent to an engine that has not passed its
gate yet, against small real HTTP servers on 127.0.0.1. (The e2e tests probe real `pie-engine serve` processes.)"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from pie_operator import scrape as S
from pie_operator.observe import Observations, PodTarget, ScrapeSettings, scrape_once
from tests.unit.operator.test_scrape import Route, Server, engine_text, healthy

COMPLETION = json.dumps({"id": "c", "object": "text_completion", "model": "tiny",
                         "choices": [{"index": 0, "text": " pong", "finish_reason": "length"}]}).encode()


def run(port: int, model: str) -> S.Observation:
    async def go() -> S.Observation:
        async with httpx.AsyncClient(trust_env=False) as client:
            return await S.scrape(client, "127.0.0.1", port, 2.0, model)
    return asyncio.run(go())


@pytest.mark.parametrize(("answer", "expected"), [
    ((200, COMPLETION), S.PROBE_OK),
    ((503, b'{"error": {"message": "the engine is shutting down"}}'), "503: the engine is shutting down"),
    ((404, b'{"error": {"message": "the model \'tiny\' does not exist"}}'), "404: the model 'tiny' does not exist"),
    ((200, b'{"status": "ok"}'), "the answer is not a completion"),
    ((200, b'{"choices": []}'), "the answer is not a completion"),
    ((500, b"<html>oops</html>"), "500: <html>oops</html>"),
])
def test_probe_result(answer: tuple[int, bytes], expected: str) -> None:
    routes: dict[tuple[str, str], Route] = {**healthy(engine_text()), ("POST", "/v1/completions"): lambda _: answer}
    with Server(routes) as srv:
        obs = run(srv.port, "tiny")
    assert obs.ok and obs.probe == expected
    (sent,) = [r for r in srv.requests if r["path"] == "/v1/completions"]
    body = json.loads(sent["body"])
    assert (body["model"], body["max_tokens"]) == ("tiny", 1)


def test_no_probe_unless_asked_or_when_the_metrics_are_stale() -> None:
    routes: dict[tuple[str, str], Route] = {**healthy(engine_text()),
                                            ("POST", "/v1/completions"): lambda _: (200, COMPLETION)}
    with Server(routes) as srv:
        assert run(srv.port, "").probe == ""  # passed its gate already: no request is added to its load
    assert not [r for r in srv.requests if r["path"] == "/v1/completions"]
    routes[("GET", "/metrics")] = lambda _: (200, b"<html>garbage</html>")
    with Server(routes) as srv:
        obs = run(srv.port, "tiny")
    assert not obs.ok and obs.probe == ""
    assert not [r for r in srv.requests if r["path"] == "/v1/completions"]


def test_unreachable_probe() -> None:
    async def go() -> str:
        async with httpx.AsyncClient(trust_env=False) as client:
            return await S.probe(client, "127.0.0.1", 9, "tiny", timeout=1.0)
    assert asyncio.run(go()).startswith("unreachable")


def test_scrape_loop_probes_the_pods_it_is_told_to() -> None:
    routes: dict[tuple[str, str], Route] = {**healthy(engine_text()),
                                            ("POST", "/v1/completions"): lambda _: (200, COMPLETION)}
    store, key = Observations(), ("ns", "tiny")
    with Server(routes) as srv:
        store.set_targets(key, srv.port, [PodTarget("new", "u1", "127.0.0.1", probe="tiny"),
                                          PodTarget("old", "u2", "127.0.0.1")])

        async def go() -> None:
            async with httpx.AsyncClient(trust_env=False) as client:
                await scrape_once(store, client, ScrapeSettings(), asyncio.Semaphore(4))
        asyncio.run(go())
    view = store.view(key, now=1e12, window_seconds=1e12)
    assert (view["new"].last and view["new"].last.probe, view["old"].last and view["old"].last.probe) == (
        S.PROBE_OK, "")
    assert len([r for r in srv.requests if r["path"] == "/v1/completions"]) == 1
