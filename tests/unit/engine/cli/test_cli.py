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
ENV = {"COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"}


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


def test_serve_flags_are_generated_from_the_engine_config() -> None:
    import annotated_types
    import typer.main

    from pie_engine.config import NOT_A_FLAG, EngineConfig

    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    params = {p.name: p for p in serve.params}
    for name, field in EngineConfig.model_fields.items():
        if field.json_schema_extra == NOT_A_FLAG:
            assert name not in params, name
            continue
        p = params[name]
        assert p.opts == ["--" + name.replace("_", "-")], name
        assert p.help == field.description, name
        assert p.required == field.is_required() and (p.required or p.default == field.default), name
        ge = [m.ge for m in field.metadata if isinstance(m, annotated_types.Ge)]
        le = [m.le for m in field.metadata if isinstance(m, annotated_types.Le)]
        assert ([p.min] if p.min is not None else [], [p.max] if p.max is not None else []) == (ge, le), name


def test_serve_builds_the_engine_config_from_its_flags(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pie_engine.config import EngineConfig

    seen: list[EngineConfig] = []

    def create_engine(config: EngineConfig) -> None:
        seen.append(config)
        raise RuntimeError("stop before loading")

    monkeypatch.setattr("pie_engine.factory.create_engine", create_engine)
    r = runner.invoke(app, ["serve", "--model", str(model_dir), "--dtype", "float32", "--block-size", "8",
                            "--gpu-memory-budget", "1.5Gi", "--enable-prefix-caching", "--expansion", "2.0",
                            "--host-memory-limit", "1e9", "--expansion-window", "16", "--port", "9000"], env=ENV)
    assert r.exit_code == 2 and "cannot load the model: stop before loading" in r.output, r.output
    assert seen == [EngineConfig(model=str(model_dir), dtype="float32", block_size=8, gpu_memory_budget="1.5Gi",
                                 enable_prefix_caching=True, expansion="2.0", host_memory_limit="1e9",
                                 expansion_window=16)]


def test_engine_config_validates_from_python_too() -> None:
    from pydantic import ValidationError

    from pie_engine.config import EngineConfig

    config = EngineConfig(model="m", device="cpu", gpu_memory_budget="8Gi")
    assert config.model_copy(update={"block_size": 8}).block_size == 8
    for bad in ({"gpu_memory_budget": "512m"}, {"host_memory_limit": "8GB"}, {"expansion": "lots"},
                {"block_size": 0}, {"expansion_epsilon": 0.01, "expansion_grow_overhead": 0.05}, {"typo": 1}):
        with pytest.raises(ValidationError):
            EngineConfig(model="m", **bad)
    with pytest.raises(ValidationError, match="less than one byte"):
        config.gpu_memory_budget = "512m"  # assignment validates as well
