"""The real server: `python -m pie_engine serve` in a subprocess on 127.0.0.1, driven with httpx and the `openai`
client. One server is shared by the module; a second, tiny-capacity one covers 429 and SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[4]
MODEL = "tiny"


class Server:
    def __init__(self, model: Path, *flags: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'engine'}:{ROOT}"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pie_engine", "serve", "--model", str(model), "--host", "127.0.0.1", "--port",
             str(self.port), "--served-model-name", MODEL, "--device", "cpu", "--dtype", "float32", *flags],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"server did not become healthy:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}

    def wait_idle(self, timeout: float = 20) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["pie_kv_cache_usage_perc"] == 0 and m["pie_num_requests_running"] == 0 or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        os.unlink(self.log.name)


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def server(model: Path) -> Iterator[Server]:
    srv = Server(model, "--block-size", "16")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(model: Path):
    from pie_engine.config import EngineConfig
    from pie_engine.factory import create_engine

    return create_engine(EngineConfig(model=str(model), device="cpu", dtype="float32"))


def greedy(offline, prompt: str | list[int], max_tokens: int) -> str:
    from pie_engine.core.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return offline.generate([prompt], params)[0].text


def test_models_and_health(server: Server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_completion_matches_offline_engine(client: openai.OpenAI, offline) -> None:
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=24, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == greedy(offline, "Hello world", 24)
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(offline.tokenizer.encode("Hello world"))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 24, n_prompt + 24)
    # Token-id prompts, several prompts at once, n > 1.
    ids = offline.tokenizer.encode("The quick brown fox")
    r = client.completions.create(model=MODEL, prompt=[ids, offline.tokenizer.encode("Hello world")], max_tokens=8,
                                  temperature=0, n=2,
                                  extra_body={"ignore_eos": True})
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert texts == [greedy(offline, ids, 8)] * 2 + [greedy(offline, "Hello world", 8)] * 2


def test_chat_matches_offline_engine(client: openai.OpenAI, offline) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True})
    prompt = offline.tokenizer.encode(offline.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == greedy(offline, prompt, 16)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 16


def test_streaming_completion_and_chat(client: openai.OpenAI, offline) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt="Hello world", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy(offline, "Hello world", 20)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=12, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    prompt = offline.tokenizer.encode(offline.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]),
                                      add_special_tokens=False)
    assert text == greedy(offline, prompt, 12) and chunks[-1].choices[0].finish_reason == "length"


def test_raw_sse_format_and_logprobs(server: Server) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 5, "temperature": 0, "stream": True, "logprobs": 2,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    lp = [e["choices"][0]["logprobs"] for e in events]
    assert sum(len(x["tokens"]) for x in lp) == 5
    assert all(v <= 0 for x in lp for v in x["token_logprobs"])
    assert all(1 <= len(d) <= 3 for x in lp for d in x["top_logprobs"])
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
        "logprobs": True, "top_logprobs": 3})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"]
    assert all(len(c["top_logprobs"]) == 3 and c["top_logprobs"][0]["logprob"] >= c["logprob"] for c in content)


def test_metrics_names(server: Server, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ["pie_num_requests_running", "pie_num_requests_waiting", "pie_kv_cache_usage_perc",
                 "pie_prompt_tokens_total", "pie_generation_tokens_total", "pie_time_to_first_token_seconds_bucket",
                 "pie_inter_token_latency_seconds_bucket", "pie_e2e_request_latency_seconds_count",
                 "pie_num_preemptions_total", 'pie_request_success_total{finished_reason="length"}']:
        assert name in text, name
    m = server.metrics()
    assert m["pie_generation_tokens_total"] >= 3 and m["pie_e2e_request_latency_seconds_count"] >= 1


BAD = [
    ("/v1/completions", b'{"model": "tiny", "prompt": ', 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": 123}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_k": -7}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": [5] * 3000, "max_tokens": 10}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("/v1/nothing-here", {}, 404, None),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_bad_input_gets_openai_error(server: Server, path: str, body, status: int, param: str | None) -> None:
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
        {"json": body}
    r = httpx.post(f"{server.url}{path}", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    if param is not None:
        assert (err["param"] or "").startswith(param), err


def test_openai_client_raises_on_bad_input(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=100000)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")


def test_client_disconnect_frees_kv_blocks(server: Server) -> None:
    aborted = server.metrics()['pie_request_success_total{finished_reason="abort"}']
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 1800, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert server.metrics()["pie_kv_cache_usage_perc"] > 0
    # Non-streaming: the client gives up after a short timeout.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=1.0)
    m = server.wait_idle()
    assert m["pie_kv_cache_usage_perc"] == 0 and m["pie_num_requests_running"] == 0
    assert m['pie_request_success_total{finished_reason="abort"}'] == aborted + 2


@pytest.fixture(scope="module")
def small_server(model: Path) -> Iterator[Server]:
    srv = Server(model, "--max-num-seqs", "1", "--max-waiting-requests", "1")
    yield srv
    srv.stop()


def test_429_when_waiting_queue_is_full(small_server: Server) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 1800, "ignore_eos": True, "stream": True}
    url = f"{small_server.url}/v1/completions"
    with httpx.Client(timeout=30) as c1, httpx.Client(timeout=30) as c2, c1.stream("POST", url, json=body) as a:
        lines_a = a.iter_lines()  # NOTE: keep the iterator: dropping it closes the stream (= disconnect)
        next(lines_a)  # A runs (max_num_seqs=1)
        with c2.stream("POST", url, json=body) as b:
            assert b.status_code == 200  # B waits
            r = httpx.post(url, json=body, timeout=30)  # C: the waiting queue (1) is full
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
    m = small_server.wait_idle()
    assert m["pie_kv_cache_usage_perc"] == 0 and m["pie_num_requests_waiting"] == 0


def test_sigterm_finishes_in_flight_request_and_exits_cleanly(small_server: Server) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{small_server.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        small_server.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in rest[:-1]]
    assert finish[-1] == "length"  # the in-flight request ran to completion
    assert small_server.proc.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{small_server.url}/health", timeout=2)
