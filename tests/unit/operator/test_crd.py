"""The CRD file is a structural schema that documents every field, and its defaults agree with spec.py."""

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pie_operator import spec as S
from pie_operator import spec_autoscaling as A
from pie_operator.quantity import MAX_BYTES, format_bytes
from tests.unit.operator.test_spec import MINIMAL, spec_with

CRD_PATH = Path(__file__).resolve().parents[3] / "crds" / "piedeployments.pie.io.yaml"
CRD = yaml.safe_load(CRD_PATH.read_text())
(VERSION,) = CRD["spec"]["versions"]
ROOT = VERSION["schema"]["openAPIV3Schema"]
SPEC, STATUS = ROOT["properties"]["spec"], ROOT["properties"]["status"]
# Every key a schema node may have here; anything else (e.g. a description split at a comma) is a typo.
SCHEMA_KEYS = {"type", "description", "properties", "items", "required", "default", "enum", "pattern", "minimum",
               "maximum", "minLength", "maxLength", "maxItems", "maxProperties", "format", "anyOf",
               "additionalProperties", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
               "x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys"}


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node below `node` (properties, items, additionalProperties), with a dotted path."""
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


NODES = list(walk(ROOT))


def test_identity() -> None:
    assert CRD["metadata"]["name"] == "piedeployments.pie.io"
    assert CRD["spec"]["group"] == S.GROUP and VERSION["name"] == S.VERSION
    names = CRD["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"], names["categories"]) == (
        S.KIND, S.PLURAL, ["pied"], ["pie"])
    assert CRD["spec"]["scope"] == "Namespaced"
    assert VERSION["served"] and VERSION["storage"]


@pytest.mark.parametrize(("path", "node"), NODES, ids=[p or "<root>" for p, _ in NODES])
def test_every_node_is_typed_described_and_well_formed(path: str, node: dict[str, Any]) -> None:
    assert set(node) <= SCHEMA_KEYS, f"{path}: unexpected keys {set(node) - SCHEMA_KEYS}"
    typed = "type" in node or node.get("x-kubernetes-int-or-string") is True
    assert typed, f"{path}: no type"
    if node.get("x-kubernetes-int-or-string"):
        assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
    if path != "metadata":  # the apiserver forbids anything but `type: object` on the root's metadata
        assert isinstance(node.get("description"), str) and len(node["description"]) > 8, f"{path}: no description"
    for rule in node.get("x-kubernetes-validations", []):
        assert set(rule) == {"rule", "message"}, f"{path}: every CEL rule needs a user-facing message"
    for req in node.get("required", []):
        assert req in node["properties"], f"{path}: required {req} is not a property"


def test_subresources_and_printer_columns() -> None:
    assert VERSION["subresources"] == {"status": {}, "scale": {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}}
    cols = {c["name"]: c["jsonPath"] for c in VERSION["additionalPrinterColumns"]}
    assert list(cols) == ["Ready", "Expansion", "Host-Mem", "GPU-Budget", "Status", "Age"]
    for name, json_path in cols.items():
        if name != "Age":  # every column reads a status field the schema declares
            node = ROOT
            for part in json_path.strip(".").split("."):
                node = node["properties"][part]
            assert node["type"] == "string", name
    assert STATUS["properties"]["kopf"]["x-kubernetes-preserve-unknown-fields"] is True


def crd_default(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the apiserver does it: absent fields with a default get it (and that default is
    itself defaulted), recursively into objects and list items."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for name, sub in schema["properties"].items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = crd_default(sub, out[name])
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [crd_default(schema["items"], v) for v in value]
    return value


def prune_empty(value: Any) -> Any:
    """Drop empty maps/lists (absent and empty mean the same to both sides)."""
    if isinstance(value, dict):
        pruned = {k: prune_empty(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in ({}, [], None)}
    if isinstance(value, list):
        return [prune_empty(v) for v in value]
    return value


@pytest.mark.parametrize("doc", [
    MINIMAL,
    spec_with(**{"memory.expansion": {"mode": "static", "ratio": 2.0}}),
    spec_with(**{"memory.expansion": {"latencyTarget": "50ms"}}),
    spec_with(**{"gpu.tolerations": [{"key": "a"}], "memory.hostMemory": {"max": "8Gi"}}),
    spec_with(**{"model.source": {"pvc": {"claimName": "m"}}, "rollout": {"maxSurge": 1}}),
    spec_with(**{"memory.tuning": {"cooldownSeconds": 5, "gpuMemoryBudgetMin": "8Gi"},
                 "rollout": {"autoRollback": True, "gate": {"engineHealth": False}}}),
    spec_with(**{"autoscaling": {"enabled": True, "maxReplicas": 3}}),
    spec_with(**{"autoscaling": {"maxReplicas": 4, "target": {"type": "TTFT", "value": "500ms"},
                                 "scaleDown": {"maxPods": 2}, "scaleUp": {"windowSeconds": 0}}}),
])
def test_crd_defaults_equal_pydantic_defaults(doc: dict[str, Any]) -> None:
    by_crd = crd_default(SPEC, doc)
    by_pydantic = S.PieDeploymentSpec.model_validate(doc).model_dump(by_alias=True, exclude_none=True)
    assert prune_empty(by_crd) == prune_empty(by_pydantic)
    # and what the apiserver stores parses in the operator (extra="forbid": no field the models do not know)
    assert S.PieDeploymentSpec.model_validate(by_crd).model_dump(by_alias=True, exclude_none=True) == by_pydantic


def _literal_values(model: type, field: str) -> list[str]:
    return list(typing.get_args(model.model_fields[field].annotation))


@pytest.mark.parametrize(("path", "model", "field"), [
    ("model.dtype", S.ModelSpec, "dtype"),
    ("engine.imagePullPolicy", S.EngineSpec, "image_pull_policy"),
    ("memory.expansion.mode", S.Expansion, "mode"),
    ("memory.apply", S.MemorySpec, "apply"),
    ("memory.tuning.source", S.TuningSpec, "source"),
    ("service.type", S.ServiceSpec, "type"),
    ("autoscaling.target.type", A.AutoscaleTarget, "type"),
])
def test_enums_match(path: str, model: type, field: str) -> None:
    node = SPEC
    for part in path.split("."):
        node = node["properties"][part]
    assert node["enum"] == _literal_values(model, field)


def test_patterns_match_the_operator() -> None:
    mem = SPEC["properties"]["memory"]["properties"]
    assert mem["gpuMemoryBudget"]["pattern"] == S.BUDGET_RE
    assert mem["tuning"]["properties"]["gpuMemoryBudgetMin"]["pattern"] == S.BUDGET_RE
    assert mem["hostMemory"]["properties"]["min"]["pattern"] == S.QUANTITY_RE
    assert mem["hostMemory"]["properties"]["max"]["pattern"] == S.QUANTITY_RE
    assert mem["base"]["pattern"] == S.QUANTITY_RE
    assert mem["headroom"]["pattern"] == S.QUANTITY_OR_PERCENT_RE
    assert SPEC["properties"]["rollout"]["properties"]["maxSurge"]["pattern"] == S.PERCENT_RE
    (rule,) = SPEC["properties"]["engine"]["properties"]["args"]["x-kubernetes-validations"]
    assert S.OWNED_FLAGS_RE in rule["rule"]
    assert all(f"--{f}" in rule["message"] for f in S.OWNED_FLAGS), rule["message"]  # the message names every flag
    target = mem["expansion"]["properties"]["latencyTarget"]
    assert (target["pattern"], target["maxLength"]) == (S.DURATION_RE, S.DURATION_MAX_LENGTH)


def test_latency_target_rule_says_what_the_operator_says() -> None:
    rules = SPEC["properties"]["memory"]["properties"]["expansion"]["x-kubernetes-validations"]
    (rule,) = [r for r in rules if "latencyTarget" in r["rule"]]
    assert " ".join(rule["message"].split()) == S.LATENCY_TARGET_MODE_MESSAGE


def test_every_byte_quantity_has_the_range_rule() -> None:
    """The pattern admits the syntax; one CEL rule per field adds the parser's range
    (tests/e2e/test_quantity_apiserver.py)."""
    mem = SPEC["properties"]["memory"]["properties"]
    fields = [mem["gpuMemoryBudget"], mem["tuning"]["properties"]["gpuMemoryBudgetMin"], mem["base"],
              mem["headroom"], mem["hostMemory"]["properties"]["min"], mem["hostMemory"]["properties"]["max"]]
    for node in fields:
        (rule,) = node["x-kubernetes-validations"]
        assert f"quantity('{format_bytes(MAX_BYTES)}')" in rule["rule"] and "quantity('1')" in rule["rule"]
    quantity_fields = [n for _, n in NODES if "[KMGTPE]i" in n.get("pattern", "")]
    assert len(quantity_fields) == len(fields)


@pytest.mark.parametrize(("value", "ok"), [("0.9", True), (".5", True), ("1", True), ("1.0", True), ("80Gi", True),
                                           ("1.5Gi", True), ("1000", True), ("1e9", True), ("0.0", False),
                                           ("1.5", False), ("90%", False), ("8GB", False), ("-1", False)])
def test_budget_pattern(value: str, ok: bool) -> None:
    assert (re.fullmatch(S.BUDGET_RE, value) is not None) == ok


AUTOSCALING = SPEC["properties"]["autoscaling"]


@pytest.mark.parametrize("message", [A.MAX_REQUIRED_MESSAGE, A.MIN_MAX_MESSAGE, A.SCALE_TO_ZERO_MESSAGE])
def test_autoscaling_rules_say_what_the_operator_says(message: str) -> None:
    assert message in [" ".join(r["message"].split()) for r in AUTOSCALING["x-kubernetes-validations"]]


def test_autoscaling_target_rule_is_the_operators() -> None:
    """The CEL rule ties the value's form to the type with the operator's own patterns (written with [.] for a
    literal dot: CEL string escapes are not needed then) and says the operator's words."""
    target = AUTOSCALING["properties"]["target"]
    (rule,) = target["x-kubernetes-validations"]
    assert " ".join(rule["message"].split()) == A.TARGET_VALUE_MESSAGE
    cel = " ".join(rule["rule"].split())
    for pattern in (A.QUEUE_DEPTH_RE, S.DURATION_RE):
        assert f"matches('{pattern.replace(chr(92) + '.', '[.]')}')" in cel
    assert "type(self.value) == int ? self.value > 0" in cel  # an integer is a queue depth, never a duration
    value = target["properties"]["value"]
    assert (value["pattern"], value["maxLength"], value["minimum"]) == (A.TARGET_VALUE_RE, S.DURATION_MAX_LENGTH, 1)
    assert target["default"] == A.AutoscalingSpec().target.model_dump(by_alias=True)
