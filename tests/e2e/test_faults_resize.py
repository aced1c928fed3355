"""Faults of in-place resize on the real control plane: kwok plays a kubelet that does not actuate a resize (stage
pod-resize-not-actuated in tests/cluster/kwok-stages.yaml answers PodResizePending, reason Deferred or Infeasible,
for pods labelled pie.test/resize). The operator must report what the kubelet did, not what the apiserver accepted:
Deferred -> status says so and the pod is kept (the kubelet retries; once it actuates, status says Done);
Infeasible -> with memory.apply InPlace the pod is replaced by one that gets the new request. And the QoS rule the
operator uses to never send a resize the apiserver refuses is checked against the apiserver itself.

Each test has its own namespace, operator and PieDeployment, so any one passes alone or in any order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pie_operator.resize import qos_change
from tests.cluster.cluster import Cluster
from tests.e2e.helpers import Operator, events, get, running_operator, wait_for
from tests.e2e.test_operator import NAME, apply_minimal, converged, engine_pods, patch

pytestmark = pytest.mark.e2e
FLOOR = {"memory": {"hostMemory": {"min": "32Gi"}, "headroom": "0"}}  # the pod's request: 16Gi -> 48Gi, in place
LABEL = "pie.test/resize"


@pytest.fixture
def operator(k8s: Cluster, ns: str, tmp_path: Path) -> Iterator[Operator]:
    with running_operator(k8s, ns, tmp_path, "--resync-seconds", "5", "--metrics-interval-seconds", "1") as op:
        yield op


@pytest.fixture
def pod(k8s: Cluster, ns: str, operator: Operator) -> dict[str, Any]:
    """examples/minimal.yaml converged (1 pod); the pod, as read then."""
    apply_minimal(k8s, ns)
    wait_for(lambda: converged(k8s, ns, 1), "tiny to be Ready with 1 pod", op=operator, timeout=90)
    (p,) = engine_pods(k8s, ns)
    return p


def kubelet_answers(k8s: Cluster, ns: str, pod: str, answer: str | None) -> None:
    """From now on kwok answers this pod's resizes with `answer` (Deferred / Infeasible), or actuates them (None)."""
    k8s.kubectl("label", "-n", ns, "pod", pod, f"{LABEL}={answer}" if answer else f"{LABEL}-", "--overwrite")


def pod_status(k8s: Cluster, ns: str, name: str) -> dict[str, Any]:
    st = get(k8s, ns, "pied", NAME).get("status", {})
    return next((p for p in st.get("pods") or [] if p["name"] == name), {})


def test_deferred_resize_is_reported_and_kept_until_the_kubelet_actuates_it(k8s: Cluster, ns: str,
                                                                           operator: Operator,
                                                                           pod: dict[str, Any]) -> None:
    name = pod["metadata"]["name"]
    kubelet_answers(k8s, ns, name, "Deferred")
    patch(k8s, ns, FLOOR)
    deferred = wait_for(lambda: (e := pod_status(k8s, ns, name)).get("resize", "").startswith("Deferred") and e,
                        "status.pods[] to say the resize is Deferred", op=operator, timeout=90)
    # What the apiserver accepted (the spec) and what the container runs with (the kubelet's report) both show.
    assert (deferred["memoryRequest"], deferred["memoryAllocated"]) == ("48Gi", "16Gi"), deferred
    assert "enough capacity" in deferred["resize"]
    kubelet_answers(k8s, ns, name, None)  # room on the node now: kwok actuates the pending resize
    done = wait_for(lambda: (e := pod_status(k8s, ns, name)).get("resize") == "Done" and e,
                    "status.pods[] to say the resize is Done", op=operator, timeout=90)
    assert done["memoryAllocated"] == "48Gi"
    (after,) = engine_pods(k8s, ns)
    assert after["metadata"]["uid"] == pod["metadata"]["uid"]  # the same pod all along: waited, not replaced
    wait_for(lambda: converged(k8s, ns, 1), "Ready after the resize", op=operator, timeout=90)


def test_infeasible_resize_replaces_the_pod_with_the_new_request(k8s: Cluster, ns: str, operator: Operator,
                                                                 pod: dict[str, Any]) -> None:
    name = pod["metadata"]["name"]
    kubelet_answers(k8s, ns, name, "Infeasible")
    patch(k8s, ns, FLOOR)

    def replaced() -> dict[str, Any] | None:
        pods = engine_pods(k8s, ns)
        fresh = [p for p in pods if p["metadata"]["uid"] != pod["metadata"]["uid"]]
        return fresh[0] if len(pods) == 1 and fresh else None

    new = wait_for(replaced, "the pod whose resize is Infeasible to be replaced", op=operator, timeout=120)
    assert new["spec"]["containers"][0]["resources"]["requests"]["memory"] == "48Gi"
    pied = wait_for(lambda: converged(k8s, ns, 1), "Ready on the replacement", op=operator, timeout=90)
    assert pied["status"]["pods"][0]["memoryRequest"] == "48Gi"
    deleted = [e for e in events(k8s, ns, NAME) if e["reason"] == "DeletedResizeInfeasible"]
    assert deleted and name in deleted[0]["message"], [e["reason"] for e in events(k8s, ns, NAME)]


def test_the_qos_rule_agrees_with_the_apiserver(k8s: Cluster, ns: str) -> None:
    """resize.qos_change says which resizes the apiserver refuses (a QoS class change): ask the apiserver."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "g"}, "spec": {
        "containers": [{"name": "engine", "image": "registry.k8s.io/pause:3.10", "resources": {
            "requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}}],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "terminationGracePeriodSeconds": 0}}
    k8s.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(pod))
    k8s.kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/g", "--timeout=60s", timeout=70)
    # Guaranteed -> Burstable (refused), then request and limit together (accepted), then Burstable again.
    for request, limit in (("1Gi", "2Gi"), ("3Gi", "3Gi"), ("2Gi", "3Gi")):
        current = get(k8s, ns, "pod", "g")
        predicted = qos_change(current, request, limit)
        body = {"spec": {"containers": [{"name": "engine", "resources": {
            "requests": {"memory": request}, "limits": {"memory": limit}}}]}}
        r = k8s.kubectl("patch", "-n", ns, "pod/g", "--subresource=resize", "--type=strategic", "-p",
                        json.dumps(body), check=False)
        assert (r.returncode != 0) == (predicted is not None), (request, limit, predicted, r.stderr)
        if predicted is not None:
            assert "qos" in r.stderr.lower(), r.stderr
