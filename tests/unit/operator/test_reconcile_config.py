"""Whole passes (fake_kube.py) under the operator's own policy (config.py): the hostPath allowlist, the engines'
admin NetworkPolicy, and the GPU memory mode nodes report."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pie_operator.config import MEMORY_MODE_LABEL, AdminPeer, OperatorConfig
from pie_operator.reconcile import reconcile
from tests.unit.operator.fake_kube import T0, FakeKube
from tests.unit.operator.test_reconcile import NAME, NS, cluster_writes, pods, spec, status

HOST_PATH = {"model.source": {"hostPath": {"path": "/models/tiny"}}}
PEER = AdminPeer("pie-system", {"app.kubernetes.io/name": "pie-operator", "app.kubernetes.io/instance": "pie"})


def passes(kube: FakeKube, config: OperatorConfig, n: int = 4) -> None:
    for i in range(n):
        reconcile(kube, NS, NAME, now=T0 + timedelta(seconds=i), config=config)
        kube.run_pods()


def condition(kube: FakeKube, type_: str) -> dict[str, Any] | None:
    return next((c for c in status(kube).get("conditions", []) if c["type"] == type_), None)


def test_host_path_outside_the_allowlist_is_invalid_and_touches_nothing() -> None:
    kube = FakeKube()
    kube.add_deployment(NS, NAME, spec(**HOST_PATH))
    reconcile(kube, NS, NAME, now=T0)  # the default config: no hostPath allowed
    st = status(kube)
    assert st["phase"] == "Invalid" and cluster_writes(kube) == [("patch", "status")] and not pods(kube)
    degraded = condition(kube, "Degraded")
    assert degraded is not None and degraded["reason"] == "InvalidSpec"
    assert "/models/tiny" in degraded["message"] and "hostPathAllowlist" in degraded["message"]


def test_host_path_inside_the_allowlist_is_deployed() -> None:
    kube = FakeKube()
    kube.add_deployment(NS, NAME, spec(**HOST_PATH))
    passes(kube, OperatorConfig(host_path_allow=("/models",)))
    assert status(kube)["phase"] == "Ready" and len(pods(kube)) == 2
    (volume,) = [v for v in pods(kube)[0]["spec"]["volumes"] if v["name"] == "model"]
    assert volume["hostPath"]["path"] == "/models/tiny"


def test_admin_network_policy_is_applied_once() -> None:
    kube = FakeKube()
    kube.add_deployment(NS, NAME, spec())
    config = OperatorConfig(admin_peer=PEER)
    passes(kube, config)
    np = kube.objects[("NetworkPolicy", NS, f"{NAME}-admin")]
    (public, admin) = np["spec"]["ingress"]
    assert admin["ports"] == [{"port": 8001, "protocol": "TCP"}] and public["ports"][0]["port"] == 8000
    assert admin["from"][0]["podSelector"]["matchLabels"] == PEER.labels
    kube.clear()
    reconcile(kube, NS, NAME, now=T0 + timedelta(seconds=60), config=config)
    assert kube.writes == []  # unchanged: not applied again
    plain = FakeKube()
    plain.add_deployment(NS, NAME, spec())
    passes(plain, OperatorConfig())
    assert not [k for k in plain.objects if k[0] == "NetworkPolicy"]


def on_nodes(kube: FakeKube, modes: dict[str, str]) -> None:
    """Schedule the pods onto nodes gh-0, gh-1, ... labelled with `modes` (node -> mode; absent: no label)."""
    for i, key in enumerate(sorted(kube.pods)):
        kube.pods[key]["spec"]["nodeName"] = f"gh-{i}"
    kube.nodes = {f"gh-{i}": ({MEMORY_MODE_LABEL: modes[f"gh-{i}"]} if f"gh-{i}" in modes else {})
                  for i in range(len(kube.pods))}


def test_pod_on_a_numa_mode_node_is_a_condition_and_one_warning() -> None:
    kube = FakeKube()
    kube.add_deployment(NS, NAME, spec())
    config = OperatorConfig(memory_mode_label=MEMORY_MODE_LABEL)
    passes(kube, config)
    assert condition(kube, "MemoryModeUnsupported")["status"] == "False"  # type: ignore[index]
    on_nodes(kube, {"gh-0": "cdmm", "gh-1": "numa"})
    kube.clear()
    reconcile(kube, NS, NAME, now=T0 + timedelta(seconds=60), config=config)
    c = condition(kube, "MemoryModeUnsupported")
    assert c is not None and (c["status"], c["reason"]) == ("True", "UnsupportedNodeMemoryMode")
    assert "node gh-1" in c["message"] and f"{MEMORY_MODE_LABEL}=numa" in c["message"] and "gh-0" not in c["message"]
    warnings = [m for t, r, m in kube.events if (t, r) == ("Warning", "UnsupportedNodeMemoryMode")]
    assert len(warnings) == 1 and "gh-1" in warnings[0]
    assert status(kube)["phase"] == "Ready"  # a warning, not a failure: the pods keep serving
    kube.clear()
    reconcile(kube, NS, NAME, now=T0 + timedelta(seconds=61), config=config)
    assert kube.writes == []  # still so: nothing new to say
    on_nodes(kube, {"gh-0": "cdmm", "gh-1": "cdmm"})  # the admin switched the driver
    reconcile(kube, NS, NAME, now=T0 + timedelta(seconds=62), config=config)
    assert condition(kube, "MemoryModeUnsupported")["status"] == "False"  # type: ignore[index]


def test_memory_mode_not_checked_without_the_flag() -> None:
    kube = FakeKube()
    kube.add_deployment(NS, NAME, spec())
    passes(kube, OperatorConfig())
    on_nodes(kube, {"gh-0": "numa", "gh-1": "numa"})
    reconcile(kube, NS, NAME, now=T0 + timedelta(seconds=60))
    assert condition(kube, "MemoryModeUnsupported") is None
