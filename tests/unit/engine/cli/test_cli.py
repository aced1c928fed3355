"""The CLI: the operator's `serve` flags exist, bad flags fail clearly, `make-test-model` writes a loadable model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pie_engine.cli import app

OPERATOR_FLAGS = ["--model", "--host", "--port", "--served-model-name", "--dtype", "--device", "--max-model-len",
                  "--block-size", "--max-num-seqs", "--max-num-batched-tokens", "--gpu-memory-budget",
                  "--num-device-blocks", "--enable-prefix-caching", "--max-waiting-requests", "--seed", "--expansion",
                  "--host-memory-limit", "--admin-token-file"]

runner = CliRunner()


def test_serve_has_every_operator_flag() -> None:
    r = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"})
    assert r.exit_code == 0
    for flag in OPERATOR_FLAGS:
        assert flag in r.output, flag


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "m"
    r = runner.invoke(app, ["make-test-model", "--arch", "qwen2", "--out", str(out), "--layers", "2", "--hidden",
                            "32", "--seed", "3", "--shards", "2"])
    assert r.exit_code == 0, r.output
    return out


def test_make_test_model_writes_a_loadable_checkpoint(model_dir: Path) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 32
    assert len(list(model_dir.glob("*.safetensors"))) == 2
    from pie_engine.config import EngineConfig
    from pie_engine.core.sampling_params import SamplingParams
    from pie_engine.factory import create_engine

    engine = create_engine(EngineConfig(model=str(model_dir), device="cpu"))
    out = engine.generate(["hi"], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "/does/not/exist"], "no config.json"),
    (["--expansion", "lots"], "--expansion"),
    (["--expansion", "0.5"], "--expansion"),
    (["--host-memory-limit", "12 apples"], "not a byte quantity"),
    (["--gpu-memory-budget", "lots"], "not a byte quantity"),
    (["--port", "70000"], "--port"),
    (["--block-size", "0"], "--block-size"),
    (["--dtype", "int3"], "--dtype"),
    (["--admin-token-file", "/does/not/exist"], "--admin-token-file"),
    (["--no-such-flag"], "No such option"),
])
def test_bad_serve_flags_fail_clearly(model_dir: Path, args: list[str], message: str) -> None:
    if "--model" not in args:
        args = ["--model", str(model_dir), *args]
    r = runner.invoke(app, ["serve", *args], env={"COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"})
    assert r.exit_code == 2
    assert message in r.output, r.output
