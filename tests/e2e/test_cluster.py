"""The local control plane behaves like a real cluster of GH200 nodes: scheduling, taints, GC, explain, pod resize."""

from __future__ import annotations

import ipaddress
import json
import time
from typing import Any

import pytest

from tests.cluster.cluster import Cluster

pytestmark = pytest.mark.e2e

GH200_LABELS = {
    "nvidia.com/gpu.product": "NVIDIA-GH200-480GB",
    "nvidia.com/gpu.present": "true",
    "kubernetes.io/arch": "arm64",
    "node.kubernetes.io/instance-type": "gh200",
    "type": "kwok",
}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _pod(name: str, tolerate: bool, resources: dict[str, Any]) -> str:
    spec: dict[str, Any] = {
        "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10", "resources": resources}],
        "terminationGracePeriodSeconds": 0,
    }
    if tolerate:
        spec["tolerations"] = [GPU_TOLERATION]
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})


def _get(k8s: Cluster, *args: str) -> dict[str, Any]:
    return json.loads(k8s.kubectl("get", *args, "-o", "json").stdout)


def test_nodes_are_ready_gh200s(k8s: Cluster) -> None:
    items = {n["metadata"]["name"]: n for n in _get(k8s, "nodes")["items"]}
    assert sorted(items) == ["gh200-0", "gh200-1"]
    for i, name in enumerate(sorted(items)):
        node = items[name]
        assert GH200_LABELS.items() <= node["metadata"]["labels"].items()
        for field in ("capacity", "allocatable"):
            got = node["status"][field]
            assert (got["cpu"], got["memory"], got["nvidia.com/gpu"], got["pods"]) == ("72", "480Gi", "1", "110")
        assert node["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
        assert node["spec"]["podCIDR"] == f"127.0.{i + 1}.0/24"
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True"


def test_gpu_pod_is_scheduled_and_gets_a_loopback_ip(k8s: Cluster, k8s_namespace: str) -> None:
    ns = k8s_namespace
    k8s.kubectl("apply", "-n", ns, "-f", "-", input=_pod("gpu", True, {"limits": {"nvidia.com/gpu": "1"}}))
    k8s.kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/gpu", "--timeout=60s", timeout=70)
    pod = _get(k8s, "-n", ns, "pod/gpu")
    node = _get(k8s, "node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-GH200-480GB"
    assert pod["status"]["phase"] == "Running"
    ip = ipaddress.ip_address(pod["status"]["podIP"])
    assert ip.is_loopback and ip in ipaddress.ip_network(node["spec"]["podCIDR"])
    # The binding came from kube-scheduler (nothing here sets spec.nodeName), which records it as an event.
    events = _get(k8s, "events", "-n", ns, "--field-selector", "involvedObject.name=gpu,reason=Scheduled")["items"]
    assert events and events[0]["reportingComponent"] == "default-scheduler"


def test_pod_without_toleration_stays_pending(k8s: Cluster, k8s_namespace: str) -> None:
    ns = k8s_namespace
    k8s.kubectl("apply", "-n", ns, "-f", "-", input=_pod("plain", False, {"requests": {"cpu": "100m"}}))
    # The scheduler has looked at the pod and rejected every node because of the GPU taint.
    k8s.kubectl("wait", "-n", ns, "--for=condition=PodScheduled=False", "pod/plain", "--timeout=60s", timeout=70)
    pod = _get(k8s, "-n", ns, "pod/plain")
    cond = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
    assert cond["reason"] == "Unschedulable"
    assert "untolerated taint" in cond["message"]
    assert pod["status"]["phase"] == "Pending" and "nodeName" not in pod["spec"]


def test_dependents_are_garbage_collected(k8s: Cluster, k8s_namespace: str) -> None:
    ns = k8s_namespace
    k8s.kubectl("create", "configmap", "owner", "-n", ns)
    uid = _get(k8s, "-n", ns, "configmap/owner")["metadata"]["uid"]
    owned = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "owned", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]}}
    k8s.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(owned))
    k8s.kubectl("delete", "configmap", "owner", "-n", ns, "--cascade=background")
    k8s.kubectl("wait", "-n", ns, "--for=delete", "configmap/owned", "--timeout=60s", timeout=70)
    assert k8s.kubectl("get", "configmap", "owned", "-n", ns, check=False).returncode != 0


def test_rbac_applies_to_service_account_tokens(k8s: Cluster, k8s_namespace: str) -> None:
    ns = k8s_namespace
    k8s.kubectl("create", "serviceaccount", "reader", "-n", ns)
    token = k8s.kubectl("create", "token", "reader", "-n", ns).stdout.strip()  # signed with the SA key pair
    # Only the token: an empty kubeconfig keeps the admin client cert out of these requests.
    as_sa = ["--kubeconfig=/dev/null", f"--server={k8s.api_url}", f"--certificate-authority={k8s.ca_cert}",
             f"--token={token}", "-n", ns]
    denied = k8s.kubectl(*as_sa, "get", "pods", check=False)
    assert denied.returncode != 0 and f"system:serviceaccount:{ns}:reader" in denied.stderr
    k8s.kubectl("create", "role", "pod-reader", "--verb=list", "--resource=pods", "-n", ns)
    k8s.kubectl("create", "rolebinding", "reader", "--role=pod-reader", f"--serviceaccount={ns}:reader", "-n", ns)
    deadline = time.monotonic() + 30
    while k8s.kubectl(*as_sa, "get", "pods", check=False).returncode != 0:  # the authorizer's cache catches up
        assert time.monotonic() < deadline, "RoleBinding never took effect"
        time.sleep(0.2)
    assert k8s.kubectl(*as_sa, "get", "configmaps", check=False).returncode != 0  # still least privilege


def test_kubectl_explain_uses_openapi(k8s: Cluster) -> None:
    out = k8s.kubectl("explain", "pods.spec").stdout
    assert "FIELDS:" in out and "containers" in out and "tolerations" in out


def test_pod_resize_subresource_accepts_memory_request(k8s: Cluster, k8s_namespace: str) -> None:
    ns = k8s_namespace
    resources = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
    k8s.kubectl("apply", "-n", ns, "-f", "-", input=_pod("rs", True, resources))
    k8s.kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/rs", "--timeout=60s", timeout=70)
    names = {r["name"] for r in json.loads(k8s.kubectl("get", "--raw", "/api/v1").stdout)["resources"]}
    assert "pods/resize" in names
    patch = {"spec": {"containers": [{"name": "c", "resources": {"requests": {"memory": "2Gi"}}}]}}
    k8s.kubectl("patch", "-n", ns, "pod/rs", "--subresource=resize", "--type=strategic", "-p", json.dumps(patch))
    pod = _get(k8s, "-n", ns, "pod/rs")
    assert pod["spec"]["containers"][0]["resources"]["requests"]["memory"] == "2Gi"
    assert pod["metadata"]["generation"] == 2
    # kwok's pod-resize stage (tests/cluster/kwok-stages.yaml) then acts as the kubelet and reports it actuated.
    k8s.kubectl("wait", "-n", ns, "pod/rs", "--for=jsonpath={.status.observedGeneration}=2", "--timeout=30s",
                timeout=40)
    status = _get(k8s, "-n", ns, "pod/rs")["status"]["containerStatuses"][0]
    assert status["resources"]["requests"]["memory"] == "2Gi" and status["allocatedResources"]["memory"] == "2Gi"
    assert status["ready"] is True and "running" in status["state"]
    # A plain update of the same field is still refused: resources only change through the resize subresource.
    patch["spec"]["containers"][0]["resources"]["requests"]["memory"] = "3Gi"
    r = k8s.kubectl("patch", "-n", ns, "pod/rs", "--type=strategic", "-p", json.dumps(patch), check=False)
    assert r.returncode != 0 and "Forbidden" in r.stderr
