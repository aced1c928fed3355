"""Table tests of the pure builders: spec (+ memory decision) -> Pod / Service / ConfigMap / PDB dicts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pie_operator import builders
from pie_operator.config import AdminPeer
from pie_operator.memory import decide
from pie_operator.spec import PieDeploymentSpec
from tests.unit.operator.test_spec import MINIMAL, get, spec_with

NAME, NS = "tiny", "ns1"
OWNER_BODY = {"metadata": {"name": NAME, "uid": "uid-1"}}


def render(doc: dict[str, Any] | None = None, name: str = NAME) -> dict[str, Any]:
    spec = PieDeploymentSpec.model_validate(doc or MINIMAL)
    return builders.pod_template(spec, name, decide(spec.memory))


def container(t: dict[str, Any]) -> dict[str, Any]:
    (c,) = t["spec"]["containers"]
    return c


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


@pytest.mark.parametrize(("path", "expected"), [
    ("metadata.labels", {"app.kubernetes.io/name": "pie-engine", "app.kubernetes.io/instance": NAME,
                         "app.kubernetes.io/managed-by": "pie-operator", "pie.io/deployment": NAME}),
    ("metadata.annotations", {"prometheus.io/scrape": "true", "prometheus.io/port": "8000",
                              "prometheus.io/path": "/metrics"}),
    ("spec.nodeSelector", {"nvidia.com/gpu.product": "NVIDIA-GH200-480GB"}),
    ("spec.tolerations", [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]),
    ("spec.restartPolicy", "Always"),
    ("spec.automountServiceAccountToken", False),
    ("spec.securityContext.runAsNonRoot", True),
    ("spec.securityContext.seccompProfile", {"type": "RuntimeDefault"}),
    ("spec.containers.0.command", ["pie-engine", "serve"]),
    ("spec.containers.0.image", "pie-engine:0.1.0"),
    ("spec.containers.0.ports", [{"name": "http", "containerPort": 8000, "protocol": "TCP"},
                                 {"name": "admin", "containerPort": 8001, "protocol": "TCP"}]),
    ("spec.containers.0.resources.requests.nvidia.com/gpu", "1"),
    ("spec.containers.0.resources.limits", {"nvidia.com/gpu": "1"}),
    ("spec.containers.0.resources.requests.memory", "16Gi"),
    ("spec.containers.0.securityContext", {
        "runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}),
    ("spec.containers.0.readinessProbe.httpGet", {"path": "/health", "port": "http"}),
    ("spec.containers.0.livenessProbe.httpGet", {"path": "/health", "port": "http"}),
    ("spec.containers.0.startupProbe.httpGet", {"path": "/health", "port": "http"}),
    ("spec.containers.0.volumeMounts",
     [{"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"},
      {"name": "admin-token", "mountPath": "/var/run/pie/admin", "readOnly": True}]),
    ("spec.volumes", [{"name": "tmp", "emptyDir": {}}, {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                      {"name": "admin-token", "secret": {"secretName": f"{NAME}-admin-token", "defaultMode": 0o440}}]),
])
def test_default_pod_template(path: str, expected: Any) -> None:
    t = render()
    if ".nvidia.com/gpu" in path:  # a dotted key: resolve the parent, then the key
        assert get(t, path.removesuffix(".nvidia.com/gpu"))["nvidia.com/gpu"] == expected
    else:
        assert get(t, path) == expected


@pytest.mark.parametrize(("patch", "expected"), [
    ({}, ["--model", "/models/tiny", "--host", "0.0.0.0", "--port", "8000", "--served-model-name", NAME,
          "--dtype", "auto", "--gpu-memory-budget", "0.9", "--expansion", "adaptive", "--admin-token-file",
          "/var/run/pie/admin/token", "--admin-port", "8001"]),
    ({"engine.port": 9000, "model.servedModelName": "llama", "model.dtype": "bfloat16", "model.maxModelLen": 4096,
      "memory.gpuMemoryBudget": "70Gi", "memory.expansion": {"mode": "static", "ratio": 3},
      "engine.args": ["--max-num-seqs=32", "--enable-prefix-caching"]},
     ["--model", "/models/tiny", "--host", "0.0.0.0", "--port", "9000", "--served-model-name", "llama",
      "--dtype", "bfloat16", "--max-model-len", "4096", "--gpu-memory-budget", "70Gi", "--expansion", "3.0",
      "--admin-token-file", "/var/run/pie/admin/token", "--admin-port", "8001", "--max-num-seqs=32",
      "--enable-prefix-caching"]),
    ({"memory.hostMemory": {"min": "1Gi", "max": "2Gi"}},
     ["--model", "/models/tiny", "--host", "0.0.0.0", "--port", "8000", "--served-model-name", NAME,
      "--dtype", "auto", "--gpu-memory-budget", "0.9", "--expansion", "adaptive", "--host-memory-limit",
      str(2 * 2**30), "--admin-token-file", "/var/run/pie/admin/token", "--admin-port", "8001"]),
    ({"memory.hostMemory": {"max": "2Gi"}, "memory.expansion": {"mode": "off"}},
     ["--model", "/models/tiny", "--host", "0.0.0.0", "--port", "8000", "--served-model-name", NAME,
      "--dtype", "auto", "--gpu-memory-budget", "0.9", "--expansion", "off", "--admin-token-file",
      "/var/run/pie/admin/token", "--admin-port", "8001"]),
    # the latency target right after the --expansion it tunes, in seconds
    ({"memory.expansion": {"latencyTarget": "50ms"}, "memory.hostMemory": {"max": "2Gi"}},
     ["--model", "/models/tiny", "--host", "0.0.0.0", "--port", "8000", "--served-model-name", NAME,
      "--dtype", "auto", "--gpu-memory-budget", "0.9", "--expansion", "adaptive", "--expansion-latency-target", "0.05",
      "--host-memory-limit", str(2 * 2**30), "--admin-token-file", "/var/run/pie/admin/token", "--admin-port",
      "8001"]),
])
def test_engine_args(patch: dict[str, Any], expected: list[str]) -> None:
    assert container(render(spec_with(**patch)))["args"] == expected


@pytest.mark.parametrize(("latency_target", "value"), [("0.2s", "0.2"), ("4.1ms", "0.0041"), ("2s", "2.0"),
                                                       ("100ms", "0.1"), (None, None)])
def test_latency_target_flag(latency_target: str | None, value: str | None) -> None:
    expansion = {} if latency_target is None else {"latencyTarget": latency_target}
    args = container(render(spec_with(**{"memory.expansion": expansion})))["args"]
    assert flag(args, "--expansion-latency-target") == value
    if value is not None:  # the engine reads the text as the float the operator meant
        assert float(value) == decide(PieDeploymentSpec.model_validate(
            spec_with(**{"memory.expansion": expansion})).memory).expansion_latency_target


# Template hashes of pods that exist in clusters today: a new optional field must not change them (a changed hash is a
# new revision, so an operator upgrade would roll every engine and drop its KV cache).
# NOTE: changed once on purpose (from 1ff6b610a9 / b0604771b8): engines now serve the admin endpoint on their own
# --admin-port, which a running engine cannot start listening on, so the upgrade replaces them (gated, step by step).
@pytest.mark.parametrize(("patch", "revision"), [
    ({}, "6991e8b64d"),
    ({"memory.hostMemory": {"min": "1Gi", "max": "2Gi"}}, "47fc08da57"),
])
def test_template_hash_of_existing_specs_is_stable(patch: dict[str, Any], revision: str) -> None:
    assert builders.template_hash(render(spec_with(**patch))) == revision


@pytest.mark.parametrize(("patch", "path", "expected"), [
    ({"gpu.count": 4}, "resources", {"requests": {"memory": "16Gi", "nvidia.com/gpu": "4"},
                                     "limits": {"nvidia.com/gpu": "4"}}),
    ({"engine.resources": {"requests": {"cpu": "8"}, "limits": {"cpu": 16}}}, "resources",
     {"requests": {"cpu": "8", "memory": "16Gi", "nvidia.com/gpu": "1"}, "limits": {"cpu": 16, "nvidia.com/gpu": "1"}}),
    ({"memory.hostMemory": {"min": "8Gi", "max": "16Gi"}, "memory.headroom": "2Gi", "memory.base": "6Gi"},
     "resources", {"requests": {"memory": "16Gi", "nvidia.com/gpu": "1"},
                   "limits": {"memory": "24Gi", "nvidia.com/gpu": "1"}}),
    ({"engine.env": [{"name": "A", "value": "1"}]}, "env",
     [{"name": "HOME", "value": "/tmp"}, {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
      {"name": "TRITON_CACHE_DIR", "value": "/tmp/.triton"}, {"name": "A", "value": "1"}]),
    ({"engine.imagePullPolicy": "Always"}, "imagePullPolicy", "Always"),
    ({"engine.port": 9000}, "readinessProbe.httpGet", {"path": "/health", "port": "http"}),
    ({"engine.port": 9000, "engine.adminPort": 9001}, "ports",
     [{"name": "http", "containerPort": 9000, "protocol": "TCP"},
      {"name": "admin", "containerPort": 9001, "protocol": "TCP"}]),
])
def test_container_fields(patch: dict[str, Any], path: str, expected: Any) -> None:
    assert get(container(render(spec_with(**patch))), path) == expected


@pytest.mark.parametrize(("source", "volume", "mount"), [
    ({"pvc": {"claimName": "models", "subPath": "tiny"}},
     {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
     {"name": "model", "mountPath": "/models/tiny", "readOnly": True, "subPath": "tiny"}),
    ({"pvc": {"claimName": "models"}},
     {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
     {"name": "model", "mountPath": "/models/tiny", "readOnly": True}),
    ({"hostPath": {"path": "/data/tiny"}}, {"name": "model", "hostPath": {"path": "/data/tiny", "type": "Directory"}},
     {"name": "model", "mountPath": "/models/tiny", "readOnly": True}),
    ({"image": {}}, None, None),
])
def test_model_source_volumes(source: dict[str, Any], volume: Any, mount: Any) -> None:
    t = render(spec_with(**{"model.source": source}))
    model_volumes = [v for v in t["spec"]["volumes"] if v["name"] == "model"]
    model_mounts = [m for m in container(t)["volumeMounts"] if m["name"] == "model"]
    assert model_volumes == ([volume] if volume else [])
    assert model_mounts == ([mount] if mount else [])


@pytest.mark.parametrize(("patch", "same_hash"), [
    ({}, True),
    ({"replicas": 5}, True),  # replicas are not part of the pod
    ({"rollout.maxSurge": 1}, True),
    ({"service.port": 80}, True),
    ({"memory.hostMemory.min": "32Gi"}, True),  # memory request follows the decision, not the revision
    ({"memory.headroom": "4Gi"}, True),
    ({"engine.args": ["--max-num-seqs=8"]}, False),
    ({"engine.image": "pie-engine:0.2.0"}, False),
    ({"memory.gpuMemoryBudget": "0.8"}, True),  # the budget is applied live (or by replacing pods), see tuning.py
    ({"memory.tuning.cooldownSeconds": 5}, True),
    ({"rollout.gate.engineHealth": False}, True),
    ({"memory.hostMemory.max": "64Gi"}, False),  # a new --host-memory-limit flag
    ({"memory.expansion.mode": "adaptive"}, True),  # the default, written out
    ({"memory.expansion.latencyTarget": "50ms"}, False),  # a new --expansion-latency-target flag
    ({"gpu.count": 2}, False),
    ({"model.path": "/models/other"}, False),
])
def test_template_hash(patch: dict[str, Any], same_hash: bool) -> None:
    base = builders.template_hash(render())
    assert len(base) == 10 and all(ch in "0123456789abcdef" for ch in base)
    assert (builders.template_hash(render(spec_with(**patch))) == base) == same_hash


def test_with_memory_sets_the_values_outside_the_hash() -> None:
    t = render(spec_with(**{"memory.hostMemory": {"max": "8Gi"}}))
    t2 = builders.with_memory(t, "20Gi", None, "12Gi")
    c = container(t2)
    assert c["resources"]["requests"]["memory"] == "20Gi" and "memory" not in c["resources"]["limits"]
    assert c["args"][c["args"].index("--gpu-memory-budget") + 1] == "12Gi"
    assert builders.template_hash(t2) == builders.template_hash(t)
    assert container(t)["resources"]["requests"]["memory"] == "16Gi"  # the input is not mutated


def test_admin_secret() -> None:
    s = builders.admin_secret(NAME, NS, "tok", builders.owner_reference(OWNER_BODY))
    assert (s["metadata"]["name"], s["stringData"], s["type"]) == (f"{NAME}-admin-token", {"token": "tok"}, "Opaque")
    assert s["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_rendering_is_deterministic() -> None:
    a, b = render(spec_with(**{"gpu.nodeSelector": {"b": "2", "a": "1"}})), render(
        spec_with(**{"gpu.nodeSelector": {"a": "1", "b": "2"}}))
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert builders.template_hash(a) == builders.template_hash(b)


def test_pod_object() -> None:
    t = render()
    rev = builders.template_hash(t)
    owner = builders.owner_reference(OWNER_BODY)
    p = builders.pod(t, NAME, NS, rev, owner)
    assert p["apiVersion"] == "v1" and p["kind"] == "Pod"
    assert p["metadata"]["generateName"] == f"{NAME}-{rev}-"
    assert p["metadata"]["namespace"] == NS
    assert p["metadata"]["labels"][builders.HASH_LABEL] == rev
    assert p["metadata"]["ownerReferences"] == [{"apiVersion": "pie.io/v1alpha1", "kind": "PieDeployment",
                                                 "name": NAME, "uid": "uid-1", "controller": True,
                                                 "blockOwnerDeletion": True}]
    assert builders.HASH_LABEL not in t["metadata"]["labels"]  # the template itself is not mutated


def test_selector() -> None:
    assert builders.selector_string(NAME) == f"app.kubernetes.io/name=pie-engine,pie.io/deployment={NAME}"


@pytest.mark.parametrize(("patch", "path", "expected"), [
    ({}, "spec.type", "ClusterIP"),
    ({"service.type": "NodePort"}, "spec.type", "NodePort"),
    ({"service.port": 80}, "spec.ports", [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]),
    ({}, "spec.selector", {"app.kubernetes.io/name": "pie-engine", "pie.io/deployment": NAME,
                           "pie.io/serving": "true"}),  # only pods that passed their gate take traffic
    ({}, "metadata.name", NAME),
])
def test_service(patch: dict[str, Any], path: str, expected: Any) -> None:
    spec = PieDeploymentSpec.model_validate(spec_with(**patch))
    svc = builders.service(spec, NAME, NS, builders.owner_reference(OWNER_BODY))
    assert get(svc, path) == expected
    assert svc["metadata"]["ownerReferences"][0]["controller"] is True


@pytest.mark.parametrize(("max_unavailable", "expected"), [(1, 1), (2, 2), ("25%", "25%")])
def test_pdb(max_unavailable: Any, expected: Any) -> None:
    spec = PieDeploymentSpec.model_validate(spec_with(**{"rollout.maxUnavailable": max_unavailable}))
    pdb = builders.pod_disruption_budget(spec, NAME, NS, builders.owner_reference(OWNER_BODY))
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"] == {"maxUnavailable": expected, "selector": {"matchLabels": builders.selector_labels(NAME)}}


def test_config_map_records_the_rendered_command() -> None:
    spec = PieDeploymentSpec.model_validate(spec_with(**{"engine.args": ["--seed=3"]}))
    d = decide(spec.memory)
    cm = builders.config_map(spec, NAME, NS, "abc", d, builders.owner_reference(OWNER_BODY))
    rendered = json.loads(cm["data"]["engine.json"])
    assert cm["metadata"]["name"] == f"{NAME}-engine"
    assert rendered["revision"] == "abc"
    assert rendered["command"] == ["pie-engine", "serve", *builders.engine_args(spec, NAME, d)]
    assert rendered["command"][-1] == "--seed=3"
    assert rendered["memory"]["request"] == "16Gi"


def test_service_never_exposes_the_admin_port() -> None:
    spec = PieDeploymentSpec.model_validate(spec_with(**{"service.type": "LoadBalancer"}))
    svc = builders.service(spec, NAME, NS, builders.owner_reference(OWNER_BODY))
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]


def test_admin_network_policy_admits_only_the_operator_to_the_admin_port() -> None:
    spec = PieDeploymentSpec.model_validate(spec_with(**{"engine.port": 9000, "engine.adminPort": 9001}))
    peer = AdminPeer("pie-system", {"app.kubernetes.io/name": "pie-operator", "app.kubernetes.io/instance": "pie"})
    np = builders.admin_network_policy(spec, NAME, NS, builders.owner_reference(OWNER_BODY), peer)
    assert (np["apiVersion"], np["kind"], np["metadata"]["name"]) == ("networking.k8s.io/v1", "NetworkPolicy",
                                                                    f"{NAME}-admin")
    assert np["metadata"]["ownerReferences"][0]["controller"] is True
    spec_ = np["spec"]
    assert spec_["podSelector"] == {"matchLabels": builders.selector_labels(NAME)}
    assert spec_["policyTypes"] == ["Ingress"]  # egress stays as it is
    public, admin = spec_["ingress"]
    assert public == {"ports": [{"port": 9000, "protocol": "TCP"}]}  # the API, /health, /metrics: from anywhere
    assert admin == {"ports": [{"port": 9001, "protocol": "TCP"}],
                     "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "pie-system"}},
                               "podSelector": {"matchLabels": peer.labels}}]}
    assert builders.owned_names(NAME, network_policy=True)["NetworkPolicy"] == f"{NAME}-admin"
    assert "NetworkPolicy" not in builders.owned_names(NAME)
