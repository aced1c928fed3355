"""The Pie `serve` flags: they exist, bad values fail clearly before the model loads, the admin token sources."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pie_engine.cli import _admin_token, app

runner = CliRunner()
ENV = {"COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"}
PIE_FLAGS = ["--expansion", "--host-memory-limit", "--gpu-memory-budget", "--admin-token-file",
             "--swap-staging-slots", "--expansion-epsilon", "--expansion-grow-overhead", "--expansion-window",
             "--expansion-cooldown"]


def test_serve_has_the_pie_flags() -> None:
    r = runner.invoke(app, ["serve", "--help"], env=ENV)
    assert r.exit_code == 0
    for flag in PIE_FLAGS:
        assert flag in r.output, flag


@pytest.mark.parametrize(("args", "message"), [
    (["--expansion", "inf"], "--expansion"),
    (["--expansion", "nan"], "--expansion"),
    (["--expansion", "-2"], "--expansion"),
    (["--swap-staging-slots", "0"], "--swap-staging-slots"),
    (["--expansion-window", "0"], "--expansion-window"),
    (["--expansion-cooldown", "-1"], "--expansion-cooldown"),
    (["--expansion-epsilon", "-0.1"], "--expansion-epsilon"),
    (["--expansion-epsilon", "0.01", "--expansion-grow-overhead", "0.05"], "grow_overhead < epsilon"),
    (["--host-memory-limit", "-5"], "must be >= 0"),
    (["--host-memory-limit", "512m"], "less than one byte"),
    (["--gpu-memory-budget", "1.5"], "must be in (0, 1]"),
])
def test_bad_pie_flags_fail_clearly(tiny_model, args: list[str], message: str) -> None:
    r = runner.invoke(app, ["serve", "--model", str(tiny_model("llama")), *args], env=ENV)
    assert r.exit_code == 2, r.output
    assert message in r.output, r.output


def test_admin_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIE_ADMIN_TOKEN", raising=False)
    assert _admin_token(None) is None  # admin endpoints disabled
    monkeypatch.setenv("PIE_ADMIN_TOKEN", " from-env \n")
    assert _admin_token(None) == "from-env"
    f = tmp_path / "token"
    f.write_text("from-file\n")
    assert _admin_token(f) == "from-file"  # the file wins over the environment
