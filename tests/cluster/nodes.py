"""The fake GH200 nodes that kwok plays the kubelet for (see /work/prompts/cluster_contract.md)."""

from __future__ import annotations

from typing import Any

# kwok only manages nodes carrying this annotation, so a stray real node would never be touched.
KWOK_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
LABELS = {
    "nvidia.com/gpu.product": "NVIDIA-GH200-480GB",
    "nvidia.com/gpu.present": "true",
    "kubernetes.io/arch": "arm64",
    "kubernetes.io/os": "linux",
    "node.kubernetes.io/instance-type": "gh200",
    "type": "kwok",
}
CAPACITY = {"cpu": "72", "memory": "480Gi", "nvidia.com/gpu": "1", "pods": "110"}


def node_name(i: int) -> str:
    return f"gh200-{i}"


def pod_cidr(i: int) -> str:
    """Node i's pod range: 127.0.<i+1>.0/24, so every pod IP kwok hands out is a loopback address."""
    if not 0 <= i < 255:
        raise ValueError(f"node index {i} out of range: pod CIDRs are 127.0.1.0/24 .. 127.0.255.0/24")
    return f"127.0.{i + 1}.0/24"


def gh200_node(i: int) -> dict[str, Any]:
    """Node manifest; status is accepted on create for nodes, and kwok's node-initialize stage keeps capacity."""
    name = node_name(i)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_ANNOTATION[0]: KWOK_ANNOTATION[1]},
            "labels": {**LABELS, "kubernetes.io/hostname": name},
        },
        "spec": {"podCIDR": pod_cidr(i), "podCIDRs": [pod_cidr(i)], "taints": [dict(GPU_TAINT)]},
        "status": {
            "capacity": dict(CAPACITY),
            "allocatable": dict(CAPACITY),
            "nodeInfo": {
                "architecture": "arm64", "operatingSystem": "linux", "osImage": "kwok GH200 (simulated)",
                "bootID": "", "machineID": "", "systemUUID": "", "kernelVersion": "", "kubeletVersion": "",
                "kubeProxyVersion": "", "containerRuntimeVersion": "",
            },
        },
    }


def is_ready(node: dict[str, Any]) -> bool:
    """Ready condition True and no node.kubernetes.io/* taint left (the controller-manager lifts not-ready)."""
    conds = node.get("status", {}).get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)
    taints = node.get("spec", {}).get("taints") or []
    return ready and not any(t.get("key", "").startswith("node.kubernetes.io/") for t in taints)
