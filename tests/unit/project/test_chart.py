"""The Helm chart (charts/pie-operator) without a cluster: lint, render, exact RBAC, CLI args, CRD no-drift.

Needs the helm binary that `make k8s` builds (tests/cluster/build.py); skipped with a reason when it is missing.
"""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from pie_operator.cli import app
from tests.cluster import build

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "pie-operator"
HELM = build.bin_dir() / "helm"
KUBE_VERSION = "1.35.4"  # a source-built helm defaults to v1.20, below the chart's kubeVersion
PEERING_API = ["--api-versions", "kopf.dev/v1/ClusterKopfPeering", "--api-versions", "kopf.dev/v1/KopfPeering"]
SM_API = ["--api-versions", "monitoring.coreos.com/v1/ServiceMonitor"]
pytestmark = pytest.mark.skipif(not HELM.exists(), reason=f"no helm at {HELM}: run `make k8s` to build it")

# --- THE expected RBAC (mirrors charts/pie-operator/templates/_rbac.tpl; change both deliberately) -----------------
# (apiGroup, resource, verbs). Seen in the operator's code: k8s.py (get/list PieDeployments, patch /status, list/
# create/delete pods, patch pods/resize, server-side apply of Service/ConfigMap/PDB, create core Events), kopf
# (list/watch of PieDeployments and owned pods, /status patches, CRD watch), the blockOwnerDeletion ownerReferences
# (finalizers update), and the admin-token Secret (get/create: never patch, never list).
NAMESPACED = {
    ("pie.io", "piedeployments", ("get", "list", "watch", "patch")),
    ("pie.io", "piedeployments/status", ("patch",)),
    ("pie.io", "piedeployments/finalizers", ("update",)),
    ("", "pods", ("list", "watch", "create", "delete", "patch")),
    ("", "pods/resize", ("patch",)),
    ("", "services", ("get", "create", "patch")),
    ("", "configmaps", ("get", "create", "patch")),
    ("", "secrets", ("get", "create")),
    ("policy", "poddisruptionbudgets", ("get", "create", "patch")),
    ("", "events", ("create",)),
    ("networking.k8s.io", "networkpolicies", ("get", "create", "patch")),  # the engines' admin NetworkPolicy
}
NODES = {("", "nodes", ("list",))}  # the GPU memory mode label (gh200.memoryModeLabel), read-only
CRDS = {("apiextensions.k8s.io", "customresourcedefinitions", ("list", "watch"))}
NAMESPACES = {("", "namespaces", ("list", "watch"))}  # only when watching named namespaces (kopf lists them)
PEERING_CLUSTER = {("kopf.dev", "clusterkopfpeerings", ("get", "list", "watch", "patch"))}
PEERING_NAMESPACED = {("kopf.dev", "kopfpeerings", ("get", "list", "watch", "patch"))}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)
    if check and cp.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{cp.stdout}\n{cp.stderr}")
    return cp


def render(*args: str) -> list[dict[str, Any]]:
    out = helm("template", "pie", str(CHART), "-n", "pie-system", "--kube-version", KUBE_VERSION, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def rules(role: dict[str, Any]) -> set[tuple[str, str, tuple[str, ...]]]:
    """Flattened to one (group, resource, verbs) per resource, so grouping resources in one rule is free."""
    out = set()
    for r in role["rules"]:
        assert set(r) == {"apiGroups", "resources", "verbs"}, r  # no resourceNames / nonResourceURLs surprises
        for g in r["apiGroups"]:
            for res in r["resources"]:
                out.add((g, res, tuple(r["verbs"])))
    return out


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = by_kind(docs, "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


OPTIONAL = ["--set", "serviceMonitor.enabled=true", "--set", "networkPolicy.enabled=true",
            "--set", "watchNamespaces={llm,batch}", "--set", "verbose=true"]


@pytest.mark.parametrize("values", [[], OPTIONAL, ["--set", "liveness.enabled=false", "--set", "rbac.create=false"]],
                         ids=["defaults", "optional-parts", "minimal"])
def test_lint_is_clean(values: list[str]) -> None:
    cp = helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, *values)
    assert "0 chart(s) failed" in cp.stdout and "[WARNING]" not in cp.stdout and "[ERROR]" not in cp.stdout, cp.stdout


def test_defaults_render_a_hardened_standalone_operator() -> None:
    docs = render()
    assert sorted(d["kind"] for d in docs) == ["ClusterRole", "ClusterRoleBinding", "Deployment", "ServiceAccount"]
    (dep,) = by_kind(docs, "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "pie-pie-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = container(docs)
    assert c["image"] == "ghcr.io/pie-project/pie-operator:0.1.0"
    assert c["args"] == ["run", "--all-namespaces", "--resync-seconds=30", "--standalone",
                         "--liveness=http://0.0.0.0:8080/healthz", "--metrics-port=9090",
                         "--admin-peer-namespace=pie-system",
                         "--admin-peer-labels=app.kubernetes.io/name=pie-operator,app.kubernetes.io/instance=pie",
                         "--memory-mode-label=pie.io/gpu-memory-mode"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    (crb,) = by_kind(docs, "ClusterRoleBinding")
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": "pie-pie-operator", "namespace": "pie-system"}]


def test_metrics_can_be_turned_off_alone() -> None:
    c = container(render("--set", "metrics.enabled=false"))
    assert not any(a.startswith("--metrics-port") for a in c["args"]) and [p["name"] for p in c["ports"]] == ["health"]
    c = container(render("--set", "liveness.enabled=false", "--set", "metrics.port=9100"))
    assert "--metrics-port=9100" in c["args"] and c["ports"] == [{"name": "metrics", "containerPort": 9100,
                                                                  "protocol": "TCP"}]
    assert "livenessProbe" not in c


def test_cluster_rbac_is_exactly_the_expected_list() -> None:
    (role,) = by_kind(render(), "ClusterRole")
    assert rules(role) == NAMESPACED | CRDS | NODES


def test_namespaced_rbac_is_a_role_per_namespace_plus_read_only_discovery() -> None:
    docs = render("--set", "watchNamespaces={llm,batch}")
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["batch", "llm"]
    for role in roles:
        assert rules(role) == NAMESPACED
    (disc,) = by_kind(docs, "ClusterRole")
    assert disc["metadata"]["name"] == "pie-pie-operator-discovery" and rules(disc) == CRDS | NAMESPACES | NODES
    assert sorted(b["metadata"]["namespace"] for b in by_kind(docs, "RoleBinding")) == ["batch", "llm"]
    assert container(docs)["args"][:3] == ["run", "--namespace=llm", "--namespace=batch"]
    no_cluster = render("--set", "watchNamespaces={llm}", "--set", "rbac.discovery=false",
                        "--set", "gh200.memoryModeLabel=")
    assert not by_kind(no_cluster, "ClusterRole") and not by_kind(no_cluster, "ClusterRoleBinding")


def test_peering_adds_only_the_peering_rules_and_objects() -> None:
    docs = render("--set", "peering.enabled=true", "--set", "replicas=2", *PEERING_API)
    (role,) = by_kind(docs, "ClusterRole")
    assert rules(role) == NAMESPACED | CRDS | NODES | PEERING_CLUSTER
    (peering,) = by_kind(docs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "default"
    (dep,) = by_kind(docs, "Deployment")
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert {"--peering", "--priority=auto"} <= set(container(docs)["args"])
    ns_docs = render("--set", "peering.enabled=true", "--set", "watchNamespaces={llm}", *PEERING_API)
    (ns_role,) = by_kind(ns_docs, "Role")
    assert rules(ns_role) == NAMESPACED | PEERING_NAMESPACED
    assert [p["metadata"]["namespace"] for p in by_kind(ns_docs, "KopfPeering")] == ["llm"]


@pytest.mark.parametrize("values", [[], ["--set", "watchNamespaces={a,b}", "--set", "verbose=true"],
                                    ["--set", "peering.enabled=true", "--set", "replicas=3", *PEERING_API]],
                         ids=["defaults", "namespaces", "peering"])
def test_rendered_args_parse_with_the_operator_cli(values: list[str]) -> None:
    """The chart's args are exactly what `pie-operator` accepts (parsed by its click command, not run)."""
    args = container(render(*values))["args"]
    cmd = typer.main.get_command(app)
    with cmd.make_context("pie-operator", list(args), resilient_parsing=False) as ctx:
        sub = cmd.get_command(ctx, args[0])  # type: ignore[attr-defined]
        assert sub is not None
        sub.make_context(args[0], list(args[1:]), parent=ctx)


def test_service_monitor_only_when_enabled_and_the_api_exists() -> None:
    assert not by_kind(render("--set", "serviceMonitor.enabled=true"), "ServiceMonitor")  # no API: skipped
    assert not by_kind(render(*SM_API), "ServiceMonitor")  # API but not enabled
    (sm,) = by_kind(render("--set", "serviceMonitor.enabled=true", "--set", "serviceMonitor.labels.release=prom",
                           *SM_API), "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "pie-engine",
                                                     "app.kubernetes.io/managed-by": "pie-operator"}
    assert sm["spec"]["namespaceSelector"] == {"any": True}
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]


def test_network_policy_limits_the_operator_to_apiserver_dns_and_engine_ports() -> None:
    assert not by_kind(render(), "NetworkPolicy")
    (np,) = by_kind(render("--set", "networkPolicy.enabled=true", "--set", "watchNamespaces={llm}",
                           "--set", "networkPolicy.apiServer.cidrs={10.0.0.1/32}"), "NetworkPolicy")
    spec = np["spec"]
    assert spec["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "pie-operator",
                                                  "app.kubernetes.io/instance": "pie"}
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["ingress"] == [{"ports": [{"port": "health", "protocol": "TCP"}]},
                               {"ports": [{"port": "metrics", "protocol": "TCP"}]}]
    api, engines, dns = spec["egress"]
    assert api == {"ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}],
                   "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}]}
    (peer,) = engines["to"]
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "pie-engine"
    assert peer["namespaceSelector"]["matchExpressions"][0]["values"] == ["llm"]
    assert engines["ports"] == [{"port": "http", "protocol": "TCP"}, {"port": "admin", "protocol": "TCP"}]
    assert {p["port"] for p in dns["ports"]} == {53}


@pytest.mark.parametrize(("values", "message"), [
    (["--set", "replicas=2"], "replicas > 1 needs peering.enabled=true"),
    (["--set", "peering.enabled=true"], "needs kopf's peering CRDs"),
    (["--set", "watchNamespaces={Bad_Name}"], "is not a valid namespace name"),
    (["--set", "serviceAccount.create=false"], "serviceAccount.name is required"),
    (["--set", "hostPathAllowlist={models}"], "hostPathAllowlist: \"models\" is not an absolute, normalized"),
    (["--set", "hostPathAllowlist={/models/../etc}"], "is not an absolute, normalized"),
    (["--set", "watchNamespaces={llm}", "--set", "rbac.discovery=false"], "gh200.memoryModeLabel needs"),
], ids=["replicas-without-peering", "peering-without-crds", "bad-namespace", "no-sa-name", "relative-host-path",
        "climbing-host-path", "memory-mode-without-cluster-rbac"])
def test_bad_values_fail_with_a_clear_message(values: list[str], message: str) -> None:
    cp = helm("template", "pie", str(CHART), "--kube-version", KUBE_VERSION, *values, check=False)
    assert cp.returncode != 0 and message in cp.stderr, cp.stderr


def test_packaged_chart_carries_the_repo_crds_byte_for_byte(tmp_path: Path) -> None:
    """ONE source of truth: charts/pie-operator/crds is a symlink to ../../crds; `helm package` must follow it."""
    assert (CHART / "crds").is_symlink() and (CHART / "crds").resolve() == (REPO / "crds").resolve()
    helm("package", str(CHART), "-d", str(tmp_path))
    (tgz,) = tmp_path.glob("pie-operator-*.tgz")
    with tarfile.open(tgz) as tar:
        packaged = {Path(m.name).name: tar.extractfile(m).read()  # type: ignore[union-attr]
                    for m in tar.getmembers() if m.isfile() and m.name.startswith("pie-operator/crds/")}
    repo = {p.name: p.read_bytes() for p in (REPO / "crds").iterdir() if p.is_file()}
    assert packaged == repo and "piedeployments.pie.io.yaml" in repo
    crds = [d for d in render("--include-crds") if d["kind"] == "CustomResourceDefinition"]
    assert [d["metadata"]["name"] for d in crds] == ["piedeployments.pie.io"]


def test_host_path_allowlist_is_empty_by_default_and_passed_as_flags() -> None:
    assert not [a for a in container(render())["args"] if a.startswith("--host-path-allow")]
    args = container(render("--set", "hostPathAllowlist={/models,/data/llm}"))["args"]
    assert [a for a in args if a.startswith("--host-path-allow")] == ["--host-path-allow=/models",
                                                                       "--host-path-allow=/data/llm"]


def test_optional_engine_policies_drop_their_flags_and_rbac() -> None:
    docs = render("--set", "engineAdmin.networkPolicy=false", "--set", "gh200.memoryModeLabel=")
    (role,) = by_kind(docs, "ClusterRole")
    assert rules(role) == NAMESPACED - {("networking.k8s.io", "networkpolicies", ("get", "create", "patch"))} | CRDS
    assert not [a for a in container(docs)["args"] if a.startswith(("--admin-peer", "--memory-mode"))]
