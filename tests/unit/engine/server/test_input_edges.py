"""Unicode edge cases and numeric extremes, sent as raw bytes (NaN, lone surrogates and invalid UTF-8 are not what
a JSON library writes) to the app in-process: each bad value is a 400 in the OpenAI error shape naming the field,
never a 500 and never a hang, and the engine thread still serves requests afterwards. A Hypothesis test then puts
arbitrary JSON values into every request field."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pie_engine.server.pie_routes import ADMIN_PATH

MODEL, TOKEN = "tiny", "edge-token"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
BASE = {COMPLETIONS: {"model": MODEL, "prompt": "hi", "max_tokens": 2},
        CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Raw(str):
    """A JSON token written as is (NaN, Infinity, a 400-digit integer)."""


NAN, INF, NINF = Raw("NaN"), Raw("Infinity"), Raw("-Infinity")
# Past the range or of the wrong JSON type for any integer field.
NOT_INTS = [2**64, 10**400, 1e308, NAN, INF, NINF, 1.5, 2.0, True, False, "5", None, [1], {}]
NOT_FLOATS = [NAN, INF, NINF, 1e308, -1e308, True, "0.5", [0.5], {}]
BAD: list[tuple[str, str, Any]] = [
    *[(COMPLETIONS, "seed", v) for v in [2**63, -(2**63) - 1, *NOT_INTS[:-3], [1], {}]],
    *[(COMPLETIONS, "max_tokens", v) for v in [0, -1, 32, 2**63, *NOT_INTS[:-3]]],
    *[(CHAT, "max_completion_tokens", v) for v in [0, 32, 2**63, *NOT_INTS[:-3]]],
    *[(COMPLETIONS, "n", v) for v in [0, -1, 17, 2**63, *NOT_INTS]],
    *[(COMPLETIONS, "logprobs", v) for v in [-1, 21, 2**63, *NOT_INTS[:-3]]],
    *[(CHAT, "top_logprobs", v) for v in [-1, 21, 2**63, *NOT_INTS[:-3]]],
    *[(COMPLETIONS, "top_k", v) for v in [-2, 2**31, 2**63, *NOT_INTS[:-3]]],
    *[(COMPLETIONS, "temperature", v) for v in [-0.01, 2.01, *NOT_FLOATS]],
    *[(COMPLETIONS, "top_p", v) for v in [0, -0.5, 1.01, *NOT_FLOATS]],
    *[(COMPLETIONS, f, v) for f in ("presence_penalty", "frequency_penalty") for v in [0.5, -2, *NOT_FLOATS]],
    *[(CHAT, "repetition_penalty", v) for v in [1.5, 0, *NOT_FLOATS]],
    *[(COMPLETIONS, "logit_bias", v) for v in [{"5": 10}, {"5": NAN}, [], "x", True]],
    *[(COMPLETIONS, "stop", v) for v in [["x"] * 17, 5, [5], True, "\ud800", ["ok", "\udfff"], {}]],
    *[(COMPLETIONS, "stop_token_ids", v) for v in [[-1], [2**31], [2**64], [1.5], [True], [NAN], [0] * 257, "x"]],
    *[(c, "stream", v) for c in (COMPLETIONS, CHAT) for v in ["true", 1, None, NAN]],
    (COMPLETIONS, "stream_options", {"include_usage": "yes"}),
    *[(COMPLETIONS, "prompt", v) for v in ["", [], [[]], [""], ["\udc00"], "\ud800", "a\udbffb", [-1], [512],
                                          [2**63], [1.5], [True], [NAN], 5, None, {}]],
    *[(c, "model", v) for c in (COMPLETIONS, CHAT) for v in ["\ud800", 5, None, ["tiny"]]],
    (COMPLETIONS, "user", "\ud800"),
    *[(CHAT, "messages", v) for v in [[], [{"role": "user", "content": "\ud800"}], [{"role": "wizard"}],
                                      [{"role": "user", "content": [{"type": "text", "text": "\udc80"}]}],
                                      [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                                      [{"role": "user", "content": 5}], "hi", [None]]],
]


def dumps(value: Any) -> str:
    """JSON with Raw tokens and surrogates written as they are (json.dumps would refuse NaN in strict mode)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # json.dumps would too, but int -> str has a digit limit only for parsing
    return json.dumps(value)


@pytest.fixture(scope="module")
def client(tiny_model) -> Iterator[TestClient]:
    from pie_engine.config import EngineConfig
    from pie_engine.factory import create_engine
    from pie_engine.server.app import create_app

    model: Path = tiny_model("llama")
    engine = create_engine(EngineConfig(model=str(model), served_model_name=MODEL, device="cpu", dtype="float32",
                                        max_model_len=32, gpu_memory_budget=str(4 << 20)))
    with TestClient(create_app(engine, admin_token=TOKEN), raise_server_exceptions=False) as c:
        yield c


def post(client: TestClient, path: str, body: bytes | str, headers: dict[str, str] | None = None) -> Any:
    content = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    start = time.monotonic()
    r = client.post(path, content=content, headers={"content-type": "application/json", **(headers or {})})
    assert time.monotonic() - start < 60, "no hang"
    return r


def assert_error(r: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"], err
    if param is not None:
        assert (err["param"] or "").split(".")[0] == param and param in err["message"], err
    return err


def assert_healthy(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    r = post(client, COMPLETIONS, json.dumps({**BASE[COMPLETIONS], "max_tokens": 3, "ignore_eos": True}))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


@pytest.mark.parametrize(("path", "field", "value"), BAD, ids=lambda x: repr(x)[:40])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_bad_value_is_400_naming_the_field(client: TestClient, path: str, field: str, value: Any,
                                          stream: bool) -> None:
    body = {**BASE[path], "stream": stream, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    err = assert_error(post(client, path, dumps(body)), 400, field)
    assert err["code"] == "invalid_value" or err["type"] == "invalid_request_error"


@pytest.mark.parametrize(("path", "field", "value"), [
    (COMPLETIONS, "seed", v) for v in [-1, 0, 2**63 - 1, -(2**63)]] + [
    (COMPLETIONS, "top_k", v) for v in [-1, 0, 2**31 - 1]] + [
    (COMPLETIONS, "temperature", v) for v in [0, 2, 1e-300]] + [
    (COMPLETIONS, "prompt", v) for v in ["a\u0000b", "\u0000", [0, 511], "\U0010ffff\ufffe\u202e", ["x", "y"]]] + [
    (COMPLETIONS, "stop", v) for v in ["\u0000", [""], ["a"] * 16]] + [
    (COMPLETIONS, "stop_token_ids", [2**31 - 1] * 256), (COMPLETIONS, "logit_bias", {}),
    (CHAT, "messages", [{"role": "user", "content": "\u0000\u0001"}]),
    (CHAT, "top_logprobs", 20), (CHAT, "repetition_penalty", 1), (CHAT, "max_tokens", 31)])
def test_edge_values_in_range_are_served(client: TestClient, path: str, field: str, value: Any) -> None:
    body = {**BASE[path], field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    r = post(client, path, dumps(body))
    if field == "max_tokens" or path == CHAT and field == "messages":  # the prompt itself takes some context
        assert r.status_code in (200, 400), r.text
        if r.status_code == 400:
            assert "maximum context length" in r.json()["error"]["message"]
    else:
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("body", [
    b'{"model": "tiny", "prompt": "\xff"}', b"\xff\xfe\x00", b'{"model": "tiny", "prompt": "\xc0\xaf"}',
    b'{"model": "tiny", "prompt": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8: not UTF-8
    b'{"model": "tiny", "prompt": ', b"", b"null", b"[1, 2]", b'"x"', b"[" * 100_000 + b"]" * 100_000,
    b'{"model": "tiny", "prompt": "hi", "seed": ' + b"9" * 5000 + b"}"])
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT, ADMIN_PATH])
def test_malformed_body_is_400(client: TestClient, body: bytes, path: str) -> None:
    assert_error(post(client, path, body, AUTH), 400)


def test_huge_strings(client: TestClient) -> None:
    err = assert_error(post(client, COMPLETIONS, dumps({**BASE[COMPLETIONS], "prompt": "ab " * 300_000})), 400)
    assert err["param"] == "prompt" and "maximum context length" in err["message"]
    err = assert_error(post(client, COMPLETIONS, dumps({**BASE[COMPLETIONS], "model": "m" * 1_000_000})), 404)
    assert len(err["message"]) < 300  # not echoed back in full
    err = assert_error(post(client, COMPLETIONS, dumps({**BASE[COMPLETIONS], "stop": ["x"] * 100_000})), 400,
                       "stop")
    assert_healthy(client)


@pytest.mark.parametrize(("value", "status"), [
    (0, 400), (-1, 400), (1, 400), (2**63, 400), (10**400, 400), (1e308, 400), (NAN, 400), (INF, 400),
    (1.5e6, 400), (True, 400), ("8Gi", 400), (None, 400), ([1], 400), ({}, 400),
    (2**62, 409), (2**63 - 1, 409)],  # valid, but no device can allocate it: not possible live
    ids=lambda x: repr(x)[:40])
def test_admin_budget_edges(client: TestClient, value: Any, status: int) -> None:
    before = client.get("/v1/pie/expansion").json()["device_kv_budget_bytes"]
    err = assert_error(post(client, ADMIN_PATH, dumps({"bytes": value}), AUTH), status)
    if status == 400:
        assert err["param"] == "bytes", err
    assert_error(post(client, ADMIN_PATH, dumps({"bytes": value})), 401)  # no token: refused before the body
    assert client.get("/v1/pie/expansion").json()["device_kv_budget_bytes"] == before


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**30, NAN, INF, NINF, "\ud800", "\x00"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8)
FIELDS = sorted({f for _, f, _ in BAD} | {"ignore_eos", "echo", "add_generation_prompt", "logprobs"})


@settings(max_examples=150, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from([COMPLETIONS, CHAT]), fields=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=3),
       stream=st.booleans())
def test_any_json_in_any_field_is_never_a_server_error(client: TestClient, path: str, fields: dict[str, Any],
                                                       stream: bool) -> None:
    r = post(client, path, dumps({**BASE[path], "stream": stream, **fields}))
    assert r.status_code in (200, 400, 404), r.text
    if r.status_code != 200:
        assert_error(r, r.status_code)
    assert client.get("/health").status_code == 200, f"engine died after {fields!r}"


def test_openapi_documents_the_answers(client: TestClient) -> None:
    """What the fuzz tests rely on: the admin body model and bearer scheme, 400 (not 422) errors, SSE answers, and
    this server's limits."""
    spec = client.get("/openapi.json").json()
    admin = spec["paths"][ADMIN_PATH]["post"]
    assert admin["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/GpuBudgetRequest"}
    assert admin["security"] == [{"HTTPBearer": []}] and set(admin["responses"]) == {
        "200", "400", "401", "403", "409", "503"}
    assert spec["components"]["schemas"]["GpuBudgetRequest"]["properties"]["bytes"]["type"] == "integer"
    assert all("422" not in op["responses"] for ops in spec["paths"].values() for op in ops.values())
    for path in (COMPLETIONS, CHAT):
        ok = spec["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(ok) == {"application/json", "text/event-stream"}
    request = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert request["model"]["enum"] == [MODEL]
    assert {s.get("maximum") for s in request["max_tokens"]["anyOf"]} == {31, None}
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


def test_wrong_method_is_405_with_allow(client: TestClient) -> None:
    r = client.put(COMPLETIONS, content=b"{}")
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"
