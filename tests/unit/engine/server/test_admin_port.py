"""`serve --admin-port`: the admin endpoint moves to its own port (one the Service does not expose and a
NetworkPolicy reserves for the operator); the public port answers 404 for it, and the admin port serves nothing else.
A real server process on 127.0.0.1."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_server import MODEL, Server
from typer.testing import CliRunner

from pie_engine.cli import app
from pie_operator.scrape import ADMIN_PATH, set_gpu_budget

TOKEN = "admin-port-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def token_file() -> Iterator[Path]:
    with tempfile.NamedTemporaryFile("w", suffix=".token", delete=False) as f:
        f.write(TOKEN + "\n")
    yield Path(f.name)
    Path(f.name).unlink()


@pytest.fixture(scope="module")
def server(tiny_model, token_file: Path) -> Iterator[tuple[Server, int]]:
    admin_port = free_port()
    srv = Server(tiny_model("llama"), "--admin-token-file", str(token_file), "--admin-port", str(admin_port))
    yield srv, admin_port
    srv.stop()


def test_admin_endpoint_is_only_on_the_admin_port(server: tuple[Server, int]) -> None:
    srv, admin_port = server
    auth = {"Authorization": f"Bearer {TOKEN}"}
    public = httpx.post(f"{srv.url}{ADMIN_PATH}", json={"bytes": 10**6}, headers=auth, timeout=30)
    assert public.status_code == 404, public.text  # as if the route did not exist: nothing to probe
    wrong = httpx.post(f"http://127.0.0.1:{admin_port}{ADMIN_PATH}", json={"bytes": 10**6},
                       headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401, wrong.text  # the token is still checked on the admin port
    answer = set_gpu_budget("127.0.0.1", admin_port, TOKEN, 1)  # what the operator calls
    assert answer.rejected and "400" in answer.detail, answer  # reached the endpoint: less than one KV block
    assert set_gpu_budget("127.0.0.1", srv.port, TOKEN, 1).needs_restart  # the public port: 404


def test_admin_port_serves_nothing_else(server: tuple[Server, int]) -> None:
    srv, admin_port = server
    for path in ("/v1/models", "/metrics", "/v1/pie/expansion"):
        assert httpx.get(f"http://127.0.0.1:{admin_port}{path}", timeout=10).status_code == 404, path
    assert httpx.post(f"http://127.0.0.1:{admin_port}/v1/completions", timeout=10,
                      json={"model": MODEL, "prompt": "hi", "max_tokens": 1}).status_code == 404
    assert httpx.get(f"{srv.url}/v1/models", timeout=10).status_code == 200  # the public port serves the API
    assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200


def test_admin_port_equal_to_the_port_fails_clearly(tiny_model) -> None:
    r = CliRunner().invoke(app, ["serve", "--model", str(tiny_model("llama")), "--port", "8000",
                                 "--admin-port", "8000"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert r.exit_code == 2 and "--admin-port must differ from --port" in r.output, r.output
