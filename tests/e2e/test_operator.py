"""The operator, as a real subprocess, against the real local control plane (kwok GH200 nodes): apply, scale,
change, resize, kill/restart, delete of `tiny` (examples/minimal.yaml).

Each test has its own namespace, operator and (fixture `tiny`) PieDeployment, so any one passes alone or in any order.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.cluster import Cluster
from tests.e2e.helpers import REPO, Operator, condition, get, running_operator, wait_for

pytestmark = pytest.mark.e2e
NAME = "tiny"
# NOTE: every local cluster hands out the same pod IPs (127.0.<node+1>.x): a random engine port keeps this test's
# "nothing answers on the pod IP" true even while `make demo` (or another test session) serves on 127.0.1.1:8000.
PORT = random.randint(30000, 39999)


@pytest.fixture
def operator(k8s: Cluster, ns: str, tmp_path: Path) -> Iterator[Operator]:
    with running_operator(k8s, ns, tmp_path, "--resync-seconds", "5", "--metrics-interval-seconds", "1") as op:
        yield op


def apply_minimal(k8s: Cluster, ns: str) -> None:
    # No engine runs behind these pods (kwok only marks them Ready; tests/e2e/test_closed_loop.py runs real
    # engines), so the rollout gate is Ready alone here.
    doc = yaml.safe_load((REPO / "examples" / "minimal.yaml").read_text())
    doc["spec"]["rollout"] = {"gate": {"engineHealth": False}}
    doc["spec"]["engine"]["port"] = PORT
    k8s.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc))


@pytest.fixture
def tiny(k8s: Cluster, ns: str, operator: Operator) -> dict[str, Any]:
    """examples/minimal.yaml applied and converged: Ready with 1 pod."""
    apply_minimal(k8s, ns)
    return wait_for(lambda: converged(k8s, ns, 1), "tiny to be Ready with 1 pod", op=operator)


def engine_pods(k8s: Cluster, ns: str, include_terminating: bool = False) -> list[dict[str, Any]]:
    items = get(k8s, ns, "pods", "-l", f"pie.io/deployment={NAME}")["items"]
    return [p for p in items if include_terminating or not p["metadata"].get("deletionTimestamp")]


def converged(k8s: Cluster, ns: str, replicas: int) -> dict[str, Any] | None:
    """The PieDeployment when status says Ready with `replicas` pods, all on the update revision and Ready, and
    exactly that many pods exist (terminating ones included)."""
    pied = get(k8s, ns, "pied", NAME)
    st = pied.get("status", {})
    if st.get("observedGeneration") != pied["metadata"]["generation"] or st.get("phase") != "Ready":
        return None
    pods = engine_pods(k8s, ns, include_terminating=True)
    rev = st.get("updateRevision")
    ok = (st.get("ready") == f"{replicas}/{replicas}" and len(pods) == replicas and
          all(p["metadata"]["labels"]["pie.io/template-hash"] == rev for p in pods) and
          all(any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
              for p in pods))
    return pied if ok else None


def patch(k8s: Cluster, ns: str, spec: dict[str, Any]) -> None:
    k8s.kubectl("patch", "-n", ns, "pied", NAME, "--type=merge", "-p", json.dumps({"spec": spec}))


INVALID = [
    ({"replicas": -1}, "should be greater than or equal to 0"),
    ({"memory": {"hostMemory": {"min": "64Gi", "max": "32Gi"}}},
     "memory.hostMemory.min must be less than or equal to memory.hostMemory.max"),
    ({"memory": {"expansion": {"mode": "sometimes"}}}, 'Unsupported value: "sometimes"'),
    ({"model": None}, "spec.model: Required value"),
    ({"memory": {"expansion": {"ratio": 2}}},
     "memory.expansion.ratio is only allowed with memory.expansion.mode static"),
    ({"memory": {"expansion": {"mode": "static"}}},
     "memory.expansion.ratio is required when memory.expansion.mode is static"),
    ({"memory": {"expansion": {"mode": "static", "ratio": 2, "latencyTarget": "50ms"}}},
     "memory.expansion.latencyTarget is only allowed with memory.expansion.mode adaptive"),
    ({"memory": {"expansion": {"latencyTarget": "50"}}},  # a unit is required
     "spec.memory.expansion.latencyTarget in body should match"),
    ({"memory": {"expansion": {"latencyTarget": "0ms"}}}, "latencyTarget: Invalid value: \"0ms\""),
    ({"engine": {"image": "x", "args": ["--expansion-latency-target", "0.05"]}},
     "--expansion-latency-target, --host-memory-limit, --admin-token-file or --admin-port"),
    ({"engine": {"image": "x", "args": ["--admin-port=9001"]}}, "--admin-token-file or --admin-port"),
    ({"engine": {"image": "x", "port": 9000, "adminPort": 9000}}, "engine.adminPort must differ from engine.port"),
    ({"engine": {"image": "x", "adminPort": 8000}}, "engine.adminPort must differ from engine.port"),
    ({"rollout": {"maxSurge": 0, "maxUnavailable": 0}}, "must not both be 0"),
    ({"engine": {"image": "x", "args": ["--port=9000"]}}, "engine.args must not set --model, --host, --port"),
    ({"engine": {"image": "x", "resources": {"requests": {"memory": "1Gi"}}}},
     "engine.resources must not set memory or nvidia.com/gpu"),
    ({"model": {"path": "/m", "source": {"image": {}, "hostPath": {"path": "/m"}}}},
     "model.source must set exactly one of pvc, hostPath, image"),
    ({"autoscaling": {"enabled": True}}, "autoscaling.maxReplicas is required when autoscaling.enabled is true"),
    ({"autoscaling": {"minReplicas": 3, "maxReplicas": 2}},
     "autoscaling.minReplicas must be less than or equal to autoscaling.maxReplicas"),
    ({"autoscaling": {"maxReplicas": 2, "scaleToZero": True}}, "autoscaling.scaleToZero is not supported yet"),
    ({"autoscaling": {"minReplicas": 0}}, "should be greater than or equal to 1"),
    ({"autoscaling": {"target": {"type": "TTFT", "value": 1}}}, "autoscaling.target.value must be a positive number"),
    ({"autoscaling": {"target": {"type": "TPOT", "value": "50"}}},
     "autoscaling.target.value must be a positive number"),
    ({"autoscaling": {"target": {"type": "QueueDepth", "value": "4s"}}},
     "autoscaling.target.value must be a positive number"),
    ({"autoscaling": {"target": {"type": "QueueDepth", "value": "0"}}},
     "spec.autoscaling.target.value in body should match"),
    ({"autoscaling": {"target": {"type": "TTFT"}}}, "spec.autoscaling.target.value: Required value"),
    ({"autoscaling": {"target": {"type": "QPS", "value": 4}}}, 'Unsupported value: "QPS"'),
]


@pytest.mark.parametrize(("spec_patch", "message"), INVALID, ids=[m[:40] for _, m in INVALID])
def test_invalid_specs_are_rejected(k8s: Cluster, ns: str, spec_patch: dict[str, Any], message: str) -> None:
    spec: dict[str, Any] = {"model": {"path": "/models/tiny"}, "engine": {"image": "pie-engine:0.1.0"}}
    spec.update(spec_patch)
    spec = {k: v for k, v in spec.items() if v is not None}
    doc = {"apiVersion": "pie.io/v1alpha1", "kind": "PieDeployment", "metadata": {"name": "bad"}, "spec": spec}
    cp = k8s.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(doc), check=False)
    if cp.returncode == 0:
        k8s.kubectl("delete", "-n", ns, "pied", "bad", check=False)
    assert cp.returncode != 0, f"accepted: {spec}"
    assert message in cp.stderr, cp.stderr


def test_valid_latency_targets_are_accepted(k8s: Cluster, ns: str) -> None:
    # The other side of the rows above: the pattern and the CEL rule let these through (mode adaptive, by default).
    for expansion in ({"latencyTarget": "50ms"}, {"latencyTarget": "0.2s"}, {"latencyTarget": ".5s"},
                      {"mode": "adaptive", "latencyTarget": "1s"}):
        spec = {"model": {"path": "/models/tiny"}, "engine": {"image": "pie-engine:0.1.0"},
                "memory": {"expansion": expansion}}
        doc = {"apiVersion": "pie.io/v1alpha1", "kind": "PieDeployment", "metadata": {"name": "ok"}, "spec": spec}
        cp = k8s.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(doc), check=False)
        assert cp.returncode == 0, f"rejected: {expansion}: {cp.stderr}"


def test_valid_autoscaling_is_accepted(k8s: Cluster, ns: str) -> None:
    # The other side of the autoscaling rows above: both forms of a target value, and knobs written while disabled.
    for autoscaling in ({"enabled": True, "maxReplicas": 3},
                        {"enabled": True, "minReplicas": 2, "maxReplicas": 2, "target": {"type": "QueueDepth",
                                                                                          "value": "2.5"}},
                        {"enabled": True, "maxReplicas": 4, "target": {"type": "TTFT", "value": "500ms"}},
                        {"maxReplicas": 4, "target": {"type": "TPOT", "value": "0.05s"}}, {"minReplicas": 3}):
        spec = {"model": {"path": "/models/tiny"}, "engine": {"image": "pie-engine:0.1.0"}, "autoscaling": autoscaling}
        doc = {"apiVersion": "pie.io/v1alpha1", "kind": "PieDeployment", "metadata": {"name": "ok"}, "spec": spec}
        cp = k8s.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(doc), check=False)
        assert cp.returncode == 0, f"rejected: {autoscaling}: {cp.stderr}"


def test_explain_teaches_the_api(k8s: Cluster) -> None:
    # The apiserver publishes a new CRD's OpenAPI a moment after it is Established.
    out = wait_for(lambda: (cp := k8s.kubectl("explain", "piedeployment.spec.memory", check=False)).returncode == 0
                   and "hostMemory" in cp.stdout and cp.stdout, "kubectl explain piedeployment.spec.memory")
    for text in ("GPU and host memory for the KV cache", "gpuMemoryBudget", "hostMemory", "expansion", "headroom",
                 "InPlace"):
        assert text in out, out


def test_apply_minimal_creates_ready_engine_pods(k8s: Cluster, ns: str, operator: Operator) -> None:
    apply_minimal(k8s, ns)
    pied = wait_for(lambda: converged(k8s, ns, 1), "tiny to be Ready with 1 pod", op=operator)
    uid = pied["metadata"]["uid"]
    (pod,) = engine_pods(k8s, ns)
    spec, (c,) = pod["spec"], pod["spec"]["containers"]
    assert spec["nodeName"].startswith("gh200-") and pod["status"]["podIP"].startswith("127.0.")
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-GH200-480GB"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1" and c["resources"]["requests"]["memory"] == "16Gi"
    assert c["command"] == ["pie-engine", "serve"]
    args = c["args"]
    for flag, value in (("--model", "/models/tiny-llama"), ("--port", str(PORT)), ("--host", "0.0.0.0"),
                        ("--served-model-name", NAME), ("--gpu-memory-budget", "0.9"), ("--expansion", "adaptive")):
        assert args[args.index(flag) + 1] == value
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert {"path": "/health", "port": "http"}.items() <= c[probe]["httpGet"].items()
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    rev = pied["status"]["updateRevision"]
    assert pod["metadata"]["name"].startswith(f"{NAME}-{rev}-")
    for kind, name in (("pod", pod["metadata"]["name"]), ("service", NAME), ("configmap", f"{NAME}-engine"),
                       ("poddisruptionbudget", NAME), ("secret", f"{NAME}-admin-token")):
        (ref,) = get(k8s, ns, kind, name)["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("PieDeployment", NAME, uid, True), kind
    (svc_port,) = get(k8s, ns, "service", NAME)["spec"]["ports"]  # the admin port is never exposed
    assert (svc_port["port"], svc_port["targetPort"]) == (8000, "http")
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("http", PORT), ("admin", 8001)]
    assert args[args.index("--admin-port") + 1] == "8001"
    conds = {c["type"]: c["status"] for c in pied["status"]["conditions"]}
    assert {k: conds[k] for k in ("Ready", "Progressing", "Degraded")} == {
        "Ready": "True", "Progressing": "False", "Degraded": "False"}
    assert "--admin-token-file" in args and pied["status"]["rollout"]["phase"] == "Complete"
    # Nothing answers on the pod IP (no engine here): MetricsStale, which changes nothing else.
    stale = wait_for(lambda: (c := condition(get(k8s, ns, "pied", NAME), "MetricsStale")).get("status") == "True"
                     and c, "MetricsStale", op=operator)
    assert "unreachable" in stale["message"] and converged(k8s, ns, 1)

    header, row = k8s.kubectl("get", "-n", ns, "pied").stdout.splitlines()
    assert header.split() == ["NAME", "READY", "EXPANSION", "HOST-MEM", "GPU-BUDGET", "STATUS", "AGE"]
    assert row.split()[:6] == [NAME, "1/1", "adaptive", "16Gi", "0.9", "Ready"]
    assert NAME in k8s.kubectl("get", "-n", ns, "pie").stdout  # the `pie` category


def test_scale_and_update_converge(k8s: Cluster, ns: str, operator: Operator, tiny: dict[str, Any]) -> None:
    k8s.kubectl("scale", "-n", ns, "pied", NAME, "--replicas=2")  # through the scale subresource
    wait_for(lambda: converged(k8s, ns, 2), "2 ready pods", op=operator)
    assert {p["spec"]["nodeName"] for p in engine_pods(k8s, ns)} == {"gh200-0", "gh200-1"}  # one GPU per node
    patch(k8s, ns, {"replicas": 1})
    wait_for(lambda: converged(k8s, ns, 1), "1 ready pod", op=operator)

    (before,) = engine_pods(k8s, ns)
    old_rev = before["metadata"]["labels"]["pie.io/template-hash"]
    patch(k8s, ns, {"engine": {"args": ["--max-num-seqs=32"]}})
    pied = wait_for(lambda: converged(k8s, ns, 1), "the args change to roll out", op=operator)
    (after,) = engine_pods(k8s, ns)
    assert pied["status"]["updateRevision"] != old_rev
    assert after["metadata"]["name"] != before["metadata"]["name"]  # replaced, not mutated
    assert after["spec"]["containers"][0]["args"][-1] == "--max-num-seqs=32"
    reasons = {e["reason"] for e in get(k8s, ns, "events", "--field-selector", f"involvedObject.name={NAME}")["items"]}
    assert {"CreatedPod", "DeletedOutdated", "DeletedScaledDown"} <= reasons


def test_memory_change_resizes_in_place(k8s: Cluster, ns: str, operator: Operator, tiny: dict[str, Any]) -> None:
    (before,) = engine_pods(k8s, ns)
    patch(k8s, ns, {"memory": {"hostMemory": {"min": "32Gi"}, "headroom": "0"}})

    def resized() -> dict[str, Any] | None:
        pods = engine_pods(k8s, ns)
        req = pods[0]["spec"]["containers"][0]["resources"]["requests"]["memory"] if len(pods) == 1 else None
        return pods[0] if req == "48Gi" else None

    after = wait_for(resized, "the pod's memory request to become 48Gi", op=operator)
    assert after["metadata"]["name"] == before["metadata"]["name"]  # same pod: no restart, KV cache kept
    pied = wait_for(lambda: converged(k8s, ns, 1), "Ready after the resize", op=operator)
    assert pied["status"]["memory"]["hostMemoryRequest"] == "48Gi"
    assert pied["status"]["pods"][0]["memoryRequest"] == "48Gi"


def test_restart_after_sigkill_does_not_duplicate(k8s: Cluster, ns: str, operator: Operator,
                                                 tiny: dict[str, Any]) -> None:
    (survivor,) = engine_pods(k8s, ns)
    operator.kill()
    patch(k8s, ns, {"replicas": 2})  # made while no operator runs
    operator.start()
    wait_for(lambda: converged(k8s, ns, 2), "the replicas change made while down", op=operator)
    names = {p["metadata"]["name"] for p in engine_pods(k8s, ns, include_terminating=True)}
    assert survivor["metadata"]["name"] in names and len(names) == 2

    # A second restart with nothing to do changes nothing (the pods are not recreated).
    operator.kill()
    marker = operator.log.read_text(errors="replace").count("Handler 'on_change' succeeded")
    operator.start()
    wait_for(lambda: operator.log.read_text(errors="replace").count("Handler 'on_change' succeeded") > marker,
             "the restarted operator to resume tiny", op=operator)
    assert converged(k8s, ns, 2)
    assert {p["metadata"]["name"] for p in engine_pods(k8s, ns, include_terminating=True)} == names


def test_state_lives_in_status_not_annotations(k8s: Cluster, ns: str, operator: Operator,
                                               tiny: dict[str, Any]) -> None:
    pied = get(k8s, ns, "pied", NAME)
    annotations = pied["metadata"].get("annotations", {})
    assert not [k for k in annotations if "kopf" in k or "pie.io" in k], annotations
    assert not pied["metadata"].get("finalizers")  # deletion never waits for the operator
    assert "lastHandledConfiguration" in pied["status"]["kopf"]


def test_unschedulable_pod_is_reported(k8s: Cluster, ns: str, operator: Operator) -> None:
    doc = {"apiVersion": "pie.io/v1alpha1", "kind": "PieDeployment", "metadata": {"name": "big"},
           "spec": {"model": {"path": "/models/big"}, "engine": {"image": "pie-engine:0.1.0"}, "gpu": {"count": 2}}}
    k8s.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc))

    def degraded() -> dict[str, Any] | None:
        st = get(k8s, ns, "pied", "big").get("status", {})
        cond = next((c for c in st.get("conditions", []) if c["type"] == "Degraded"), {})
        return cond if st.get("phase") == "Degraded" and cond.get("reason") == "Unschedulable" else None

    cond = wait_for(degraded, "big (2 GPUs per pod, nodes have 1) to be Degraded/Unschedulable", op=operator)
    assert "Insufficient nvidia.com/gpu" in cond["message"], cond


def test_delete_garbage_collects_children(k8s: Cluster, ns: str, operator: Operator, tiny: dict[str, Any]) -> None:
    k8s.kubectl("delete", "-n", ns, "pied", NAME, "--wait=true", timeout=60)

    def gone() -> bool:
        left = k8s.kubectl("get", "-n", ns, "pods,services,configmaps,poddisruptionbudgets,secrets", "-l",
                           f"pie.io/deployment={NAME}", "-o", "name").stdout.split()
        return not left

    # NOTE: the controller-manager maps a CRD created moments ago only after its next discovery sync (~30 s), so
    # on a fresh cluster garbage collection of PieDeployment children can lag by up to that much.
    wait_for(gone, "garbage collection of pods, Service, ConfigMap, PDB and Secret", timeout=90, op=operator)
