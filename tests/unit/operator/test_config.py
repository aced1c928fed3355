"""The operator's own policy rules (config.py), pure: hostPath allowlist, chart-rendered flags, GPU memory modes."""

from __future__ import annotations

from typing import Any

import pytest

from pie_operator.config import (
    HOST_PATH_VALUE,
    MEMORY_MODE_LABEL,
    host_path_violation,
    memory_mode_condition,
    memory_mode_problems,
    normalize_allow,
    parse_labels,
)
from pie_operator.spec import PieDeploymentSpec
from tests.unit.operator.test_spec import spec_with


def host_path_spec(path: str) -> PieDeploymentSpec:
    return PieDeploymentSpec.model_validate(spec_with(**{"model.source": {"hostPath": {"path": path}}}))


@pytest.mark.parametrize(("path", "allow", "ok"), [
    ("/models/llama", (), False),  # the default: no hostPath at all
    ("/models/llama", ("/models",), True),
    ("/models", ("/models",), True),
    ("/models/llama", ("/models/",), True),
    ("/models2/llama", ("/models",), False),  # a prefix of the name is not a parent directory
    ("/etc", ("/models", "/data"), False),
    ("/data/x/y", ("/models", "/data"), True),
    ("/models/../etc", ("/models",), False),  # climbing out
    ("/models//llama", ("/models",), False),  # not normalized: refused rather than guessed
    ("/anything", ("/",), True),
])
def test_host_path_allowlist(path: str, allow: tuple[str, ...], ok: bool) -> None:
    why = host_path_violation(host_path_spec(path), allow)
    assert (why == "") == ok, why
    if not ok:
        assert path in why


def test_host_path_rejection_names_the_value_to_set() -> None:
    why = host_path_violation(host_path_spec("/models/llama"), ())
    assert HOST_PATH_VALUE in why and "--host-path-allow" in why and "allowed: none" in why


def test_other_sources_need_no_allowlist() -> None:
    assert host_path_violation(PieDeploymentSpec.model_validate(spec_with()), ()) == ""
    pvc = spec_with(**{"model.source": {"pvc": {"claimName": "m"}}})
    assert host_path_violation(PieDeploymentSpec.model_validate(pvc), ()) == ""


@pytest.mark.parametrize("bad", ["models", "/models/../etc", "/a//b", ""])
def test_bad_allowlist_entries_fail_clearly(bad: str) -> None:
    with pytest.raises(ValueError, match="absolute, normalized"):
        normalize_allow([bad])


def test_allowlist_entries() -> None:
    assert normalize_allow(["/models", "/data/", "/"]) == ("/models", "/data/", "/")


def test_parse_labels() -> None:
    assert parse_labels("app.kubernetes.io/name=pie-operator,app.kubernetes.io/instance=pie") == {
        "app.kubernetes.io/name": "pie-operator", "app.kubernetes.io/instance": "pie"}
    assert parse_labels("") == {}
    with pytest.raises(ValueError, match="not key=value"):
        parse_labels("just-a-key")


def pod(name: str, node: str, terminating: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if terminating:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"nodeName": node}}


@pytest.mark.parametrize(("modes", "problem_pods"), [
    ({}, []),  # no node says anything: nothing to warn about
    ({"gh-0": "cdmm", "gh-1": "CDMM"}, []),
    ({"gh-1": "numa"}, ["b"]),
    ({"gh-0": "numa", "gh-1": "something-new"}, ["a", "b"]),  # an unknown mode cannot be accounted for either
])
def test_memory_mode_problems(modes: dict[str, str], problem_pods: list[str]) -> None:
    pods = [pod("a", "gh-0"), pod("b", "gh-1"), pod("c", "gh-1", terminating=True), pod("d", "")]
    problems = memory_mode_problems(pods, modes, MEMORY_MODE_LABEL)
    assert [p.split()[1] for p in problems] == problem_pods
    status, reason, message = memory_mode_condition(problems, MEMORY_MODE_LABEL)
    assert status == bool(problem_pods)
    assert reason == ("UnsupportedNodeMemoryMode" if problem_pods else "AsExpected")
    if problem_pods:
        assert f"{MEMORY_MODE_LABEL}=" in message and "CDMM" in message
