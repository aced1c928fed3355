"""``pie-engine`` / ``python -m pie_engine``: ``serve`` (the OpenAI server) and ``make-test-model``.

NOTE: the operator starts engines with exactly these ``serve`` flags; renaming one breaks deployed CRs.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from enum import Enum
from pathlib import Path

import typer

from pie_engine.config import EngineConfig, parse_budget, parse_bytes

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Pie LLM engine")


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Arch(str, Enum):
    llama = "llama"
    qwen2 = "qwen2"
    mistral = "mistral"
    opt = "opt"


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _exit_quietly(signum: int, frame: object) -> None:
    sys.exit(0)


def _check_expansion(value: str) -> None:
    from pie_engine.pie.controller_config import parse_expansion

    try:
        parse_expansion(value)
    except ValueError:
        _fail(f"--expansion must be off, adaptive or a ratio >= 1.0 (e.g. 2.0), got {value!r}")


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


@app.command()
def serve(
    model: Path = typer.Option(..., help="model directory (config.json, *.safetensors, tokenizer.json)"),
    host: str = typer.Option("0.0.0.0", help="address to bind"),
    port: int = typer.Option(8000, min=1, max=65535, help="port to bind"),
    served_model_name: str | None = typer.Option(None, help="model name in the API (default: the directory name)"),
    dtype: DType = typer.Option(DType.auto, help="weights and KV dtype"),
    device: Device = typer.Option(Device.auto, help="cuda if available, else cpu"),
    max_model_len: int | None = typer.Option(None, min=1, help="default: the model's max_position_embeddings"),
    block_size: int = typer.Option(16, min=1, help="tokens per KV block"),
    max_num_seqs: int = typer.Option(64, min=1, help="max sequences in a batch"),
    max_num_batched_tokens: int = typer.Option(2048, min=1, help="max tokens per step (chunked prefill budget)"),
    gpu_memory_budget: str | None = typer.Option(None, help='device KV budget: bytes ("8Gi") or a GPU fraction'),
    num_device_blocks: int | None = typer.Option(None, min=1, help="exact device KV blocks per layer (overrides)"),
    enable_prefix_caching: bool = typer.Option(False, "--enable-prefix-caching", help="reuse KV of shared prefixes"),
    max_waiting_requests: int = typer.Option(256, min=1, help="answer 429 beyond this many waiting requests"),
    seed: int = typer.Option(0, help="seed for requests without their own seed"),
    expansion: str = typer.Option("off", help="Pie KV expansion: off | adaptive | <ratio>"),
    host_memory_limit: str | None = typer.Option(None, help='cap on host KV memory, bytes ("16Gi")'),
    admin_token_file: Path | None = typer.Option(
        None, help="file with the bearer token for admin endpoints (default: $PIE_ADMIN_TOKEN; none: disabled)"),
    swap_staging_slots: int = typer.Option(2, min=1, help="Pie: device slots host-backed layers rotate through"),
    expansion_epsilon: float = typer.Option(0.05, min=0.0, help="adaptive: shrink when latency overhead > this"),
    expansion_grow_overhead: float = typer.Option(0.04, min=0.0, help="adaptive: grow only while overhead < this"),
    expansion_window: int = typer.Option(8, min=1, help="adaptive: iterations of evidence per decision"),
    expansion_cooldown: int = typer.Option(4, min=0, help="adaptive: iterations ignored after a change"),
    log_level: str = typer.Option("info", help="uvicorn / engine log level"),
) -> None:
    """Run the OpenAI-compatible server."""
    if not (model / "config.json").is_file():
        _fail(f"--model {model}: no config.json there (expected an HF-format model directory)")
    _check_expansion(expansion)
    try:
        if host_memory_limit is not None:
            parse_bytes(host_memory_limit)
        if gpu_memory_budget is not None:
            parse_budget(gpu_memory_budget, total=1)  # syntax only; the device total is known after loading
    except ValueError as e:
        _fail(str(e))
    admin_token = _admin_token(admin_token_file)
    config = EngineConfig(
        model=str(model), served_model_name=served_model_name, dtype=dtype.value, device=device.value,
        max_model_len=max_model_len, block_size=block_size, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, gpu_memory_budget=gpu_memory_budget,
        num_device_blocks=num_device_blocks, enable_prefix_caching=enable_prefix_caching,
        max_waiting_requests=max_waiting_requests, seed=seed, expansion=expansion,
        host_memory_limit=host_memory_limit, swap_staging_slots=swap_staging_slots,
        expansion_epsilon=expansion_epsilon, expansion_grow_overhead=expansion_grow_overhead,
        expansion_window=expansion_window, expansion_cooldown=expansion_cooldown)
    from pie_engine.pie.runtime import controller_config_from

    try:
        controller_config_from(config)
    except ValueError as e:
        _fail(f"--expansion-epsilon / --expansion-grow-overhead: {e}")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from pie_engine.factory import create_engine
    from pie_engine.server.app import create_app

    try:
        engine = create_engine(config)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(f"cannot load the model: {e}")
    fastapi_app = create_app(engine, admin_token=admin_token)
    # uvicorn handles SIGTERM/SIGINT: it stops accepting, waits (bounded) for open requests, then runs the app's
    # lifespan shutdown, which aborts what is left and stops the engine thread. Afterwards it re-raises the signal
    # with the previous handler restored: this one turns that into a clean exit status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_quietly)
    uvicorn.run(fastapi_app, host=host, port=port, log_level=log_level.lower(), timeout_graceful_shutdown=30)


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
