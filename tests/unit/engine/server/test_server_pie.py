"""The Pie server surface on a real `python -m pie_engine serve` subprocess with swapping on: the pie_* metrics
(checked with the operator's own parser), GET /v1/pie/expansion, and the admin endpoint (auth, bad input, live
apply, 409), driven partly with the operator's own client (pie_operator.scrape), so both sides of the contract
are the real code. Requests in flight during a live shrink finish with the same output as without it."""

from __future__ import annotations

import concurrent.futures
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_server import MODEL, Server

from pie_operator.scrape import ADMIN_PATH, parse_metrics, set_gpu_budget

LAYERS, BS, C0 = 6, 4, 30
TOKEN = "s3cret-admin-token"
PROMPTS = [[(7 * i + 3 * j) % 500 + 3 for j in range(n)] for i, n in enumerate([5, 20, 33, 12, 27, 40])]


def block_bytes(model: Path) -> int:
    """Bytes of one KV block of all layers (what one block per layer of budget costs)."""
    import torch

    from pie_engine.kv.cache import kv_block_bytes
    from pie_engine.models.model_config import ModelConfig

    cfg = ModelConfig.from_pretrained(str(model))
    return kv_block_bytes(BS, cfg.num_key_value_heads, cfg.head_dim, torch.float32) * LAYERS


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model("llama", layers=LAYERS)


@pytest.fixture(scope="module")
def bb(model: Path) -> int:
    return block_bytes(model)


@pytest.fixture(scope="module")
def host_limit(bb: int) -> int:
    # m = 3 (ratio 2): 5 host-backed layers (m + k) of C = 60 blocks. Exactly that: a bigger budget must lower m.
    return 5 * 60 * bb // LAYERS


@pytest.fixture(scope="module")
def server(model: Path, bb: int, host_limit: int) -> Iterator[Server]:
    with tempfile.NamedTemporaryFile("w", suffix=".token", delete=False) as f:
        f.write(TOKEN + "\n")
    srv = Server(model, "--block-size", str(BS), "--expansion", "2.0", "--gpu-memory-budget", str(C0 * bb),
                 "--host-memory-limit", str(host_limit), "--admin-token-file", f.name)
    yield srv
    srv.stop()
    Path(f.name).unlink()


def admin(server: Server, body: object, token: str | None = TOKEN) -> httpx.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    return httpx.post(f"{server.url}{ADMIN_PATH}", headers=headers, timeout=30, **kw)


def state(server: Server) -> dict:
    r = httpx.get(f"{server.url}/v1/pie/expansion", timeout=10)
    assert r.status_code == 200
    return r.json()


def complete(server: Server, prompt: list[int], max_tokens: int) -> str:
    r = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"
    return r.json()["choices"][0]["text"]


def run_all(server: Server, max_tokens: int = 100, during=None) -> list[str]:
    """All PROMPTS concurrently; ``during()`` runs while they are in flight. Returns the texts in prompt order."""
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(complete, server, p, max_tokens) for p in PROMPTS]
        if during is not None:
            during()
        return [f.result() for f in futures]


def wait_for(cond, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_pie_metrics_before_and_after_load(server: Server, bb: int, host_limit: int) -> None:
    m = parse_metrics(httpx.get(f"{server.url}/metrics").text)  # the operator's parser: every name, sane values
    assert m["pie_expansion_ratio"] == 2.0 and m["pie_kv_layers_on_host"] == 3
    assert m["pie_device_kv_capacity_bytes"] == C0 * bb  # the whole budget, laid out as 3 slots of 60 blocks
    assert m["pie_gpu_memory_total_bytes"] == 0 and m["pie_gpu_memory_used_bytes"] == 0  # CPU: no GPU
    assert m.optional_bytes("pie_gpu_memory_overhead_bytes") == 0  # exported (0: no GPU, no fraction to resolve)
    # Host KV in use while the requests run; back to 0 once they finished (not the last step's figure).
    run_all(server, during=lambda: wait_for(lambda: server.metrics()["pie_host_kv_used_bytes"] > 0))
    after = parse_metrics(httpx.get(f"{server.url}/metrics").text)
    assert after["pie_host_kv_used_bytes"] == 0 and after["pie_num_requests_running"] == 0
    assert after["pie_swap_in_bytes_total"] > 0 and after["pie_swap_out_bytes_total"] > 0
    assert after["pie_swap_stall_seconds_total"] >= 0 and after["pie_iteration_seconds_count"] > 0
    assert after["pie_iteration_seconds_sum"] > 0
    # Host KV never exceeds --host-memory-limit; what is used fits what is allocated.
    assert 0 < after["pie_host_kv_capacity_bytes"] <= host_limit
    # The recommendations saw the peak demand: host KV for 5 host-backed layers, a device budget for 3 slots.
    assert 0 < after["pie_recommended_host_memory_bytes"] <= 1.1 * host_limit + 1
    assert after["pie_recommended_gpu_memory_bytes"] > 0


def test_expansion_endpoint(server: Server, bb: int, host_limit: int) -> None:
    s = state(server)
    assert s["mode"] == "static" and s["ratio"] == 2.0 and s["layers_on_host"] == 3 and s["num_layers"] == LAYERS
    assert s["expansion_ratio"] == 2.0 and s["num_blocks"] == s["num_device_blocks"] == 2 * C0
    assert s["device_kv_budget_bytes"] == C0 * bb and s["host_memory_limit"] == host_limit
    for key in ("overhead", "stall_fraction", "last_decision", "recommended_gpu_memory_bytes", "swap_in_bytes_total"):
        assert key in s, key
    json.dumps(s)  # plain JSON values only


@pytest.mark.parametrize(("token", "body", "status"), [
    (None, {"bytes": 10**6}, 401),
    ("wrong", {"bytes": 10**6}, 401),
    (TOKEN[:-1], {"bytes": 10**6}, 401),
    (TOKEN, b'{"bytes": ', 400),
    (TOKEN, {}, 400),
    (TOKEN, {"bytes": -5}, 400),
    (TOKEN, {"bytes": "8Gi"}, 400),
    (TOKEN, {"bytes": True}, 400),
    (TOKEN, {"bytes": 1.5e6}, 400),
    (TOKEN, [1, 2], 400),
    (TOKEN, {"bytes": 1}, 400),  # less than one block per layer
])
def test_admin_rejects(server: Server, token: str | None, body: object, status: int) -> None:
    before = state(server)["device_kv_budget_bytes"]
    r = admin(server, body, token)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert state(server)["device_kv_budget_bytes"] == before  # nothing changed


def test_admin_wrong_scheme(server: Server) -> None:
    r = httpx.post(f"{server.url}{ADMIN_PATH}", json={"bytes": 10**6}, headers={"Authorization": f"Basic {TOKEN}"})
    assert r.status_code == 401


def test_live_apply_changes_capacity(server: Server, bb: int, host_limit: int) -> None:
    res = set_gpu_budget("127.0.0.1", server.port, TOKEN, 40 * bb)  # the operator's own call
    assert res.applied and not res.needs_restart, res.detail
    s = state(server)
    # 40 blocks per layer of budget; m = 3 would need 5 * 80 blocks of host KV, over the limit: m drops to 2.
    assert s["device_kv_budget_bytes"] == 40 * bb and s["layers_on_host"] == 2 and s["num_device_blocks"] == 60
    m = server.metrics()
    assert m["pie_device_kv_capacity_bytes"] == 40 * bb and m["pie_num_device_kv_blocks"] == 60
    assert m["pie_kv_layers_on_host"] == 2 and m["pie_expansion_ratio"] == 1.5
    run_all(server, max_tokens=20)
    assert server.metrics()["pie_host_kv_capacity_bytes"] <= host_limit
    r = admin(server, {"bytes": C0 * bb})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["applied"] is True and body["gpu_memory_budget_bytes"] == C0 * bb and body["layers_on_host"] == 3
    assert server.metrics()["pie_device_kv_capacity_bytes"] == C0 * bb


def test_shrink_with_requests_in_flight_keeps_outputs(server: Server, bb: int) -> None:
    reference = run_all(server)
    applied: list[dict] = []

    def shrink() -> None:
        # Wait until the batch holds most of the 60 blocks (ids are handed out lowest first, so > 70% in use
        # means ids >= 40 are held), then shrink to C = 40: their owners are preempted and recompute later.
        wait_for(lambda: server.metrics()["pie_kv_cache_usage_perc"] > 0.7)
        r = admin(server, {"bytes": 20 * bb})
        assert r.status_code == 200, r.text
        applied.append(r.json())

    assert run_all(server, during=shrink) == reference
    assert applied[0]["preempted"] > 0 and applied[0]["num_device_blocks"] == 40
    assert admin(server, {"bytes": C0 * bb}).status_code == 200


def test_budget_too_small_for_a_request_in_flight_is_409_busy(server: Server, bb: int) -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # 10 + 220 tokens = 58 blocks: fits C = 60, not the C = 40 that 20 blocks of budget give at m = 3.
        long = pool.submit(complete, server, PROMPTS[0] * 2, 220)
        wait_for(lambda: server.metrics()["pie_num_requests_running"] >= 1)
        res = set_gpu_budget("127.0.0.1", server.port, TOKEN, 20 * bb)
        r = admin(server, {"bytes": 20 * bb})
        assert not long.done(), "the long request finished before the check: the test proves nothing"
        long.result()
    # Busy, not "needs a restart": the operator retries later instead of killing the request with the pod.
    assert res.busy and not res.needs_restart and not res.applied and "409" in res.detail, res.detail
    assert r.status_code == 409 and r.json()["error"]["code"] == "busy"
    assert state(server)["device_kv_budget_bytes"] == C0 * bb


def test_admin_disabled_without_token(model: Path) -> None:
    from fastapi.testclient import TestClient

    from pie_engine.config import EngineConfig
    from pie_engine.factory import create_engine
    from pie_engine.server.app import create_app

    engine = create_engine(EngineConfig(model=str(model), device="cpu", dtype="float32", num_device_blocks=8))
    with TestClient(create_app(engine)) as client:
        r = client.post(ADMIN_PATH, json={"bytes": 10**6}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 403 and "--admin-token-file" in r.json()["error"]["message"]
        s = client.get("/v1/pie/expansion").json()
        assert s["mode"] == "off" and s["expansion_ratio"] == 1.0 and s["num_device_blocks"] == 8


def test_operator_client_reads_400_and_401(server: Server) -> None:
    small = set_gpu_budget("127.0.0.1", server.port, TOKEN, 1)  # less than one block per layer
    assert small.rejected and not small.applied and not small.needs_restart, small
    wrong = set_gpu_budget("127.0.0.1", server.port, "not-the-token", 10**6)
    assert wrong.needs_restart and "401" in wrong.detail, wrong
