"""The operator's cluster policy on the real control plane (kwok GH200 nodes): hostPath model sources only under
the allowlist, and the GPU memory mode a node's label reports (`pie.io/gpu-memory-mode`, docs/operator.md
"Running on GH200"). The operator runs as a subprocess; no engines (the gate is readiness alone)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.cluster import Cluster
from tests.cluster.nodes import node_name
from tests.e2e.helpers import REPO, Operator, condition, events, get, wait_for

pytestmark = pytest.mark.e2e
NAME = "tiny"
LABEL = "pie.io/gpu-memory-mode"
NODES = [node_name(0), node_name(1)]


def apply_tiny(k8s: Cluster, ns: str, **spec: Any) -> None:
    doc = yaml.safe_load((REPO / "examples" / "minimal.yaml").read_text())
    doc["spec"]["rollout"] = {"gate": {"engineHealth": False}}
    doc["spec"].update(spec)
    k8s.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc))


def started(k8s: Cluster, ns: str, tmp_path: Path, *flags: str) -> Operator:
    op = Operator(k8s, ns, tmp_path / "operator.log", "--resync-seconds", "2", *flags)
    op.start()
    return op


@pytest.fixture
def labelled_nodes(k8s: Cluster) -> Iterator[None]:
    """Every GH200 node in NUMA mode; the label is removed again at the end (the cluster is shared by the session)."""
    for node in NODES:
        k8s.kubectl("label", "node", node, f"{LABEL}=numa", "--overwrite")
    try:
        yield
    finally:
        for node in NODES:
            k8s.kubectl("label", "node", node, f"{LABEL}-", check=False)


def test_pod_on_a_numa_mode_node_is_reported(k8s: Cluster, k8s_namespace: str, tmp_path: Path,
                                             labelled_nodes: None) -> None:
    ns = k8s_namespace
    op = started(k8s, ns, tmp_path, "--memory-mode-label", LABEL)
    try:
        apply_tiny(k8s, ns)

        def reported() -> dict[str, Any] | None:
            c = condition(get(k8s, ns, "pied", NAME), "MemoryModeUnsupported")
            return c if c.get("status") == "True" else None

        c = wait_for(reported, "MemoryModeUnsupported=True", timeout=90, op=op)
        (pod,) = [p for p in get(k8s, ns, "pods", "-l", f"pie.io/deployment={NAME}")["items"]
                  if not p["metadata"].get("deletionTimestamp")]
        node = pod["spec"]["nodeName"]
        assert c["reason"] == "UnsupportedNodeMemoryMode" and f"node {node} with {LABEL}=numa" in c["message"], c
        warning = wait_for(lambda: [e for e in events(k8s, ns, NAME) if e["reason"] == "UnsupportedNodeMemoryMode"],
                           "the Warning Event", op=op)
        assert warning[0]["type"] == "Warning" and node in warning[0]["message"]
        assert get(k8s, ns, "pied", NAME)["status"]["phase"] != "Invalid"  # a warning: the pod keeps serving

        k8s.kubectl("label", "node", node, f"{LABEL}=cdmm", "--overwrite")  # the admin switched the driver
        wait_for(lambda: condition(get(k8s, ns, "pied", NAME), "MemoryModeUnsupported").get("status") == "False",
                 "MemoryModeUnsupported=False once the node reports cdmm", timeout=90, op=op)
    finally:
        op.stop()


def test_host_path_source_needs_the_allowlist(k8s: Cluster, k8s_namespace: str, tmp_path: Path) -> None:
    ns = k8s_namespace
    source = {"path": "/models/tiny", "source": {"hostPath": {"path": "/models/tiny"}}}
    op = started(k8s, ns, tmp_path)  # the chart's default: no hostPath allowed
    try:
        apply_tiny(k8s, ns, model=source)

        def invalid() -> dict[str, Any] | None:
            pied = get(k8s, ns, "pied", NAME)
            return pied if pied.get("status", {}).get("phase") == "Invalid" else None

        pied = wait_for(invalid, "phase Invalid for a hostPath source outside the allowlist", timeout=60, op=op)
        message = condition(pied, "Degraded")["message"]
        assert "/models/tiny" in message and "hostPathAllowlist" in message, message
        assert get(k8s, ns, "pods", "-l", f"pie.io/deployment={NAME}")["items"] == []
    finally:
        op.stop()
    op = started(k8s, ns, tmp_path, "--host-path-allow", "/models")  # the admin allows the directory
    try:
        def serving() -> list[dict[str, Any]]:
            return [p for p in get(k8s, ns, "pods", "-l", f"pie.io/deployment={NAME}")["items"]
                    if any(v.get("hostPath", {}).get("path") == "/models/tiny" for v in p["spec"]["volumes"])]

        wait_for(serving, "a pod mounting the allowed hostPath", timeout=60, op=op)
        wait_for(lambda: get(k8s, ns, "pied", NAME)["status"].get("phase") not in (None, "Invalid"),
                 "the Invalid phase cleared", timeout=60, op=op)
    finally:
        op.stop()


def test_a_tokenless_admin_secret_is_reported_not_overwritten(k8s: Cluster, k8s_namespace: str,
                                                              tmp_path: Path) -> None:
    """The operator may create Secrets but not change them: one in the way is a clear condition, and nothing else."""
    ns = k8s_namespace
    k8s.kubectl("create", "secret", "generic", f"{NAME}-admin-token", "-n", ns, "--from-literal=other=x")
    op = started(k8s, ns, tmp_path)
    try:
        apply_tiny(k8s, ns)

        def reported() -> dict[str, Any] | None:
            c = condition(get(k8s, ns, "pied", NAME), "Degraded")
            return c if c.get("status") == "True" and "has no 'token'" in c.get("message", "") else None

        c = wait_for(reported, "Degraded naming the token-less Secret", timeout=60, op=op)
        assert f"kubectl delete secret -n {ns} {NAME}-admin-token" in c["message"], c
        secret = get(k8s, ns, "secret", f"{NAME}-admin-token")
        assert set(secret["data"]) == {"other"}  # untouched
        k8s.kubectl("delete", "secret", f"{NAME}-admin-token", "-n", ns)  # what the message says to do

        def recreated() -> bool:
            cp = k8s.kubectl("get", "-n", ns, "secret", f"{NAME}-admin-token", "-o", "json", check=False)
            data = json.loads(cp.stdout).get("data") or {} if cp.returncode == 0 else {}
            return "token" in data and condition(get(k8s, ns, "pied", NAME), "Degraded").get("reason") != "ApiError"

        wait_for(recreated, "a fresh Secret with a token, and the condition cleared", timeout=90, op=op)
    finally:
        op.stop()
