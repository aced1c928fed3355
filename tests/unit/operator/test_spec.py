"""Table tests of the spec models, quantity helpers and the memory decision (no cluster)."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
from pydantic import ValidationError

from pie_operator.memory import decide, headroom_bytes, pod_memory
from pie_operator.spec import (
    ADMIN_PORT_MESSAGE,
    LATENCY_TARGET_MODE_MESSAGE,
    PieDeploymentSpec,
    RolloutSpec,
    format_bytes,
    parse_bytes,
    parse_duration,
)

MINIMAL: dict[str, Any] = {"model": {"path": "/models/tiny"}, "engine": {"image": "pie-engine:0.1.0"}}


def spec_with(**patch: Any) -> dict[str, Any]:
    """MINIMAL with dotted-path overrides: spec_with(**{"memory.hostMemory.min": "1Gi"})."""
    doc = copy.deepcopy(MINIMAL)
    for path, value in patch.items():
        *parents, leaf = path.split(".")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return doc


def get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


@pytest.mark.parametrize(("path", "expected"), [
    ("replicas", 1),
    ("model.dtype", "auto"),
    ("model.source", {"image": {}}),
    ("engine.imagePullPolicy", "IfNotPresent"),
    ("engine.port", 8000),
    ("gpu.count", 1),
    ("gpu.nodeSelector", {"nvidia.com/gpu.product": "NVIDIA-GH200-480GB"}),
    ("gpu.tolerations", [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]),
    ("memory.gpuMemoryBudget", "0.9"),
    ("memory.hostMemory.min", "0"),
    ("memory.expansion.mode", "adaptive"),
    ("memory.base", "16Gi"),
    ("memory.headroom", "10%"),
    ("memory.apply", "InPlace"),
    ("rollout.maxUnavailable", 1),
    ("rollout.maxSurge", 0),
    ("rollout.stepTimeoutSeconds", 600),
    ("rollout.autoRollback", False),
    ("service.port", 8000),
    ("service.type", "ClusterIP"),
    ("engine.adminPort", 8001),
])
def test_defaults(path: str, expected: Any) -> None:
    dumped = PieDeploymentSpec.model_validate(MINIMAL).model_dump(by_alias=True, exclude_none=True)
    assert get(dumped, path) == expected


@pytest.mark.parametrize(("patch", "message"), [
    ({"replicas": -1}, "greater than or equal to 0"),
    ({"memory.hostMemory.min": "8Gi", "memory.hostMemory.max": "4Gi"}, "must be <= memory.hostMemory.max"),
    ({"memory.expansion.mode": "sometimes"}, "'adaptive', 'static' or 'off'"),
    ({"memory.expansion.ratio": 2.0}, "only allowed with memory.expansion.mode: static"),
    ({"memory.expansion.mode": "static"}, "required when memory.expansion.mode is static"),
    ({"memory.expansion.mode": "static", "memory.expansion.ratio": 0.5}, "greater than or equal to 1"),
    ({"memory.expansion": {"mode": "static", "ratio": 2, "latencyTarget": "50ms"}}, LATENCY_TARGET_MODE_MESSAGE),
    ({"memory.expansion": {"mode": "off", "latencyTarget": "50ms"}}, LATENCY_TARGET_MODE_MESSAGE),
    ({"memory.expansion.latencyTarget": "50"}, "not a positive duration: '50'"),
    ({"memory.expansion.latencyTarget": "0ms"}, "not a positive duration"),
    ({"memory.expansion.latencyTarget": "1m"}, "not a positive duration"),
    ({"memory.expansion.latencyTarget": 0.05}, "should be a valid string"),
    ({"memory.expansion.latencyTarget": "1" * 32 + "s"}, "at most 32 characters"),
    ({"engine.args": ["--expansion-latency-target=0.05"]}, "must not set --expansion-latency-target"),
    ({"memory.gpuMemoryBudget": "1.5"}, "must be in (0, 1]"),
    ({"memory.gpuMemoryBudget": "0.0"}, "must be in (0, 1]"),
    ({"memory.gpuMemoryBudget": "512m"}, "less than one byte"),
    ({"memory.tuning.gpuMemoryBudgetMin": "8GB"}, "not a byte quantity"),
    ({"memory.hostMemory.min": "64GB"}, "not a byte quantity"),
    ({"memory.hostMemory.max": "512m"}, "less than one byte"),
    ({"memory.base": "2Ei"}, "more than 1Ei"),
    ({"memory.headroom": "ten"}, "not a byte quantity"),
    ({"rollout.maxSurge": 0, "rollout.maxUnavailable": "0%"}, "must not both be 0"),
    ({"rollout.maxSurge": "many"}, "percentage"),
    ({"engine.args": ["--port=9000"]}, "must not set --port"),
    ({"engine.args": ["--admin-port=9001"]}, "must not set --admin-port"),
    ({"engine.adminPort": 8000}, ADMIN_PORT_MESSAGE),
    ({"engine.port": 9000, "engine.adminPort": 9000}, ADMIN_PORT_MESSAGE),
    ({"engine.adminPort": 0}, "greater than or equal to 1"),
    ({"engine.args": ["--max-num-seqs", "8", "--model", "/x"]}, "must not set --model"),
    ({"engine.resources": {"requests": {"memory": "1Gi"}}}, "must not set memory"),
    ({"engine.resources": {"limits": {"nvidia.com/gpu": 2}}}, "must not set nvidia.com/gpu"),
    ({"model.source": {"pvc": {"claimName": "m"}, "image": {}}}, "exactly one of pvc, hostPath, image"),
    ({"model.path": "relative/dir"}, "should match pattern"),
    ({"gpu.count": 0}, "greater than or equal to 1"),
    ({"service.type": "ExternalName"}, "'ClusterIP', 'NodePort' or 'LoadBalancer'"),
    ({"unknownField": 1}, "Extra inputs are not permitted"),
])
def test_invalid_specs_are_rejected_with_a_clear_message(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as e:
        PieDeploymentSpec.model_validate(spec_with(**patch))
    assert message in str(e.value)


def test_missing_model_is_rejected() -> None:
    with pytest.raises(ValidationError, match="model\n  Field required"):
        PieDeploymentSpec.model_validate({"engine": {"image": "x"}})


@pytest.mark.parametrize(("value", "expected"), [
    ("0", 0), (1024, 1024), ("1Ki", 1024), ("16Gi", 16 * 2**30), ("1.5Gi", 3 * 2**29), ("2G", 2 * 10**9),
    ("100k", 100_000), ("3M", 3_000_000), ("1Ti", 2**40), ("1.5", 2), ("1500m", 2), ("1e3", 1000),
])
def test_parse_bytes(value: str | int, expected: int) -> None:
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("value", ["", "1.5.2Gi", "8GB", "-1", "1m", "0.5", "Gi", -5, True])
def test_parse_bytes_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_bytes(value)


@pytest.mark.parametrize(("value", "seconds"), [
    ("50ms", 0.05), ("0.2s", 0.2), ("1s", 1.0), ("1.5s", 1.5), (".5s", 0.5), ("1.s", 1.0), ("100ms", 0.1),
    ("0.5ms", 0.0005), ("4.1ms", 0.0041), ("33.3ms", 0.0333), ("007ms", 0.007), ("0.001s", 0.001),
    ("9" * 31 + "s", 1e31),
])
def test_parse_duration(value: str, seconds: float) -> None:
    assert parse_duration(value) == seconds  # exact: "4.1ms" is the float nearest 0.0041, not 4.1 / 1000


@pytest.mark.parametrize("value", ["", "0s", "0ms", "0.0s", ".0ms", "00.000s", "-1s", "+1s", "50", "5 ms", "1m",
                                   "1h", "1us", "1e3ms", "ms", ".s", "1.5.2s", "50MS", "50ms\n", "1" * 32 + "s",
                                   0.05, None])
def test_parse_duration_rejects(value: Any) -> None:
    with pytest.raises(ValueError, match="not a positive duration"):
        parse_duration(value)


@pytest.mark.parametrize(("n", "expected"), [
    (0, "0"), (1000, "1000"), (1024, "1Ki"), (1536 * 2**20, "1536Mi"), (16 * 2**30, "16Gi"), (2**40, "1Ti"),
])
def test_format_bytes_round_trips(n: int, expected: str) -> None:
    assert format_bytes(n) == expected
    assert parse_bytes(expected) == n


@pytest.mark.parametrize(("replicas", "surge", "unavailable", "expected"), [
    (3, 0, 1, (0, 1)),
    (4, "25%", "25%", (1, 1)),
    (3, "50%", 0, (2, 0)),       # surge rounds up
    (3, 1, "50%", (1, 1)),       # unavailable rounds down
    (1, 1, "10%", (1, 0)),
    (1, "0%", "10%", (0, 1)),    # both resolve to 0: one pod may be unavailable, as in a Deployment
])
def test_rollout_bounds(replicas: int, surge: Any, unavailable: Any, expected: tuple[int, int]) -> None:
    assert RolloutSpec(max_surge=surge, max_unavailable=unavailable).bounds(replicas) == expected


GI = 2**30


@pytest.mark.parametrize(("memory", "args", "mem_request", "limit", "ratio"), [
    ({}, ("0.9", "adaptive", None), 16 * GI, None, "adaptive"),
    # request = base + pool + 10% of the pool; limit = base + max + 10% of max
    ({"hostMemory": {"min": "64Gi", "max": "256Gi"}}, ("0.9", "adaptive", 256 * GI),
     16 * GI + 64 * GI + math.ceil(6.4 * GI), 16 * GI + 256 * GI + math.ceil(25.6 * GI), "adaptive"),
    ({"hostMemory": {"min": "64Gi"}, "headroom": "8Gi"}, ("0.9", "adaptive", None), 88 * GI, None, "adaptive"),
    ({"hostMemory": {"min": "10Gi", "max": "20Gi"}, "headroom": "2Gi", "base": "4Gi"},
     ("0.9", "adaptive", 20 * GI), 16 * GI, 26 * GI, "adaptive"),
    ({"expansion": {"mode": "static", "ratio": 2}, "hostMemory": {"min": "32Gi"}, "headroom": "0"},
     ("0.9", "2.0", None), 48 * GI, None, "2.0"),
    ({"expansion": {"mode": "static", "ratio": 2.5}, "gpuMemoryBudget": "70Gi"}, ("70Gi", "2.5", None), 16 * GI,
     None, "2.5"),
    # off: no host pool and no host limit, whatever hostMemory says
    ({"expansion": {"mode": "off"}, "hostMemory": {"min": "64Gi", "max": "128Gi"}}, ("0.9", "off", None), 16 * GI,
     None, "1.0"),
])
def test_memory_decision(memory: dict[str, Any], args: tuple[str, str, int | None], mem_request: int,
                         limit: int | None, ratio: str) -> None:
    spec = PieDeploymentSpec.model_validate({**MINIMAL, "memory": memory})
    d = decide(spec.memory)
    assert (d.gpu_memory_budget, d.expansion, d.host_memory_limit) == args
    req, lim = pod_memory(spec.memory, d)
    assert parse_bytes(req) == mem_request
    assert (None if lim is None else parse_bytes(lim)) == limit
    assert d.expansion_ratio == ratio


@pytest.mark.parametrize(("expansion", "seconds"), [
    ({}, None), ({"mode": "adaptive"}, None), ({"latencyTarget": "50ms"}, 0.05),
    ({"mode": "adaptive", "latencyTarget": "0.2s"}, 0.2),
])
def test_memory_decision_latency_target(expansion: dict[str, Any], seconds: float | None) -> None:
    spec = PieDeploymentSpec.model_validate(spec_with(**{"memory.expansion": expansion}))
    assert decide(spec.memory).expansion_latency_target == seconds


def test_default_memory_request_is_readable() -> None:
    spec = PieDeploymentSpec.model_validate(MINIMAL)
    assert pod_memory(spec.memory, decide(spec.memory)) == ("16Gi", None)


def test_headroom_percent_of_pool() -> None:
    spec = PieDeploymentSpec.model_validate({**MINIMAL, "memory": {"headroom": "25%"}})
    assert headroom_bytes(spec.memory, 100 * 2**30) == 25 * 2**30
    assert headroom_bytes(spec.memory, 0) == 0
