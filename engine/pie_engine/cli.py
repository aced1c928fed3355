"""``pie-engine`` / ``python -m pie_engine``: ``serve`` (the OpenAI server) and ``make-test-model``.

NOTE: the operator starts engines with exactly these ``serve`` flags; renaming one breaks deployed CRs.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import socket
import sys
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn, cast

import annotated_types
import typer
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from pie_engine.config import NOT_A_FLAG, EngineConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Pie LLM engine")


class Arch(str, Enum):
    llama = "llama"
    qwen2 = "qwen2"
    mistral = "mistral"
    opt = "opt"


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _exit_quietly(signum: int, frame: object) -> None:
    sys.exit(0)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _admin_token(path: Path | None) -> str | None:
    """The admin bearer token: --admin-token-file, else $PIE_ADMIN_TOKEN, else None (admin endpoints disabled)."""
    if path is None:
        return os.environ.get("PIE_ADMIN_TOKEN", "").strip() or None
    try:
        token = path.read_text().strip()
    except OSError as e:
        _fail(f"--admin-token-file: {e}")
    if not token:
        _fail(f"--admin-token-file {path} is empty")
    return token


# `serve` flags that are not EngineConfig fields: where and how the server runs.
_SERVER_OPTIONS = [
    ("host", str, typer.Option("0.0.0.0", help="address to bind")),
    ("port", int, typer.Option(8000, min=1, max=65535, help="port to bind")),
    ("admin_port", int | None, typer.Option(
        None, min=1, max=65535, help="serve the admin endpoints on this port only (the public --port answers 404 "
        "for them); default: on --port")),
    ("admin_token_file", Path | None, typer.Option(
        None, help="file with the bearer token for admin endpoints (default: $PIE_ADMIN_TOKEN; none: disabled)")),
    ("log_level", str, typer.Option("info", help="uvicorn / engine log level")),
]


def _config_option(name: str, field: FieldInfo) -> typer.models.OptionInfo:
    """The typer option of one EngineConfig field: its default, description and ge/le bounds."""
    ge = next((cast(float, m.ge) for m in field.metadata if isinstance(m, annotated_types.Ge)), None)
    le = next((cast(float, m.le) for m in field.metadata if isinstance(m, annotated_types.Le)), None)
    default = ... if field.is_required() else field.default
    return typer.Option(default, _flag(name), help=field.description, min=ge, max=le)


def _serve_signature() -> inspect.Signature:
    """`serve`'s parameters, in --help order: --model, the server's options, then the other EngineConfig fields."""
    params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=field.annotation,
                                default=_config_option(name, field))
              for name, field in EngineConfig.model_fields.items() if field.json_schema_extra != NOT_A_FLAG]
    server = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann, default=option)
              for name, ann, option in _SERVER_OPTIONS]
    return inspect.Signature(params[:1] + server + params[1:], return_annotation=None)


def build_config(values: dict[str, Any]) -> EngineConfig:
    """The EngineConfig of `serve`'s flag values; a validation error exits 2 with ``error: --flag: reason``."""
    try:
        return EngineConfig(**values)
    except ValidationError as e:
        reasons = []
        for err in e.errors():
            reason = str(err["ctx"]["error"]) if "error" in err.get("ctx", {}) else err["msg"]
            reasons.append(f"{_flag(str(err['loc'][0]))}: {reason}" if err["loc"] else reason)
        _fail("; ".join(reasons))


def serve(**options: Any) -> None:
    """Run the OpenAI-compatible server."""
    host, port, log_level = options.pop("host"), options.pop("port"), options.pop("log_level")
    admin_token_file, admin_port = options.pop("admin_token_file"), options.pop("admin_port")
    if admin_port == port:
        _fail(f"--admin-port must differ from --port (both {port}): the admin endpoint gets a port of its own")
    if not (Path(options["model"]) / "config.json").is_file():
        _fail(f"--model {options['model']}: no config.json there (expected an HF-format model directory)")
    config = build_config(options)
    run_server(config, host, port, log_level, _admin_token(admin_token_file), admin_port)


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket like uvicorn's own (IPv6 when `host` is an IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        _fail(f"cannot listen on {host}:{port}: {e}")


def run_server(config: EngineConfig, host: str, port: int, log_level: str = "info",
               admin_token: str | None = None, admin_port: int | None = None) -> None:
    """Load the engine for ``config`` and serve it until SIGTERM/SIGINT: what `serve` runs once its flags are
    parsed (bench/serve_config.py runs it with fields that are not flags)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from pie_engine.factory import create_engine
    from pie_engine.server.app import create_app

    try:
        engine = create_engine(config)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(f"cannot load the model: {e}")
    fastapi_app = create_app(engine, admin_token=admin_token, admin_port=admin_port)
    # uvicorn handles SIGTERM/SIGINT: it stops accepting, waits (bounded) for open requests, then runs the app's
    # lifespan shutdown, which aborts what is left and stops the engine thread. Afterwards it re-raises the signal
    # with the previous handler restored: this one turns that into a clean exit status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_quietly)
    server = uvicorn.Server(uvicorn.Config(fastapi_app, host=host, port=port, log_level=log_level.lower(),
                                           timeout_graceful_shutdown=30))
    # One server on both ports: one lifespan and one graceful shutdown; AdminPortGuard tells the ports apart.
    server.run(sockets=None if admin_port is None else [_listen(host, port), _listen(host, admin_port)])


# typer reads the flags from the signature: the server's options, then one per EngineConfig field.
serve.__signature__ = _serve_signature()  # type: ignore[attr-defined]
app.command()(serve)


@app.command("make-test-model")
def make_test_model_cmd(
    arch: Arch = typer.Option(Arch.llama, help="architecture"),
    out: Path = typer.Option(..., help="output directory"),
    layers: int = typer.Option(4, min=1),
    hidden: int = typer.Option(64, min=8),
    seed: int = typer.Option(0),
    shards: int = typer.Option(1, min=1, help="number of safetensors files"),
) -> None:
    """Write a small random-weight HF-format checkpoint (for tests, demos and benchmarks)."""
    from pie_engine.models.test_model import make_test_model

    heads = 4 if hidden % 4 == 0 else 1
    try:
        path = make_test_model(arch.value, out, layers=layers, hidden=hidden, heads=heads,
                               kv_heads=2 if heads % 2 == 0 else 1, intermediate=2 * hidden, seed=seed,
                               shards=shards)
    except ValueError as e:
        _fail(str(e))
    typer.echo(str(path))


def main() -> None:
    app()
