"""The Helm chart on the real local control plane: install, prove its RBAC is enough (and no more), uninstall.

No container runs on kwok nodes, so the operator Deployment's pod never executes. Instead the operator runs here as a
subprocess with the Deployment's own args, authenticated AS the chart's ServiceAccount (a token from the TokenRequest
API): if it reconciles a PieDeployment end to end (create, resize, scale down, Events, status) without a single 403,
the chart's RBAC is sufficient.

Tests that only look share one release (`release`, never changed); tests that change one (upgrade, the operator
reconciling in its namespace, uninstall) install their own (`own_release`), so any test passes alone or in any order.
The `kubectl auth can-i` tables of both install modes are in test_helm_rbac.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.cluster import Cluster
from tests.e2e.helm_release import CHART, Release, get, helm, installed, wait_for

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
NAME = "tiny"  # examples/minimal.yaml


@pytest.fixture(scope="module")
def release(k8s: Cluster) -> Iterator[Release]:
    """A release the tests only look at (none of them may change it)."""
    with installed(k8s) as rel:
        yield rel


@pytest.fixture
def own_release(k8s: Cluster) -> Iterator[Release]:
    """A release for one test to change."""
    with installed(k8s) as rel:
        yield rel

def test_install_creates_what_the_values_say(k8s: Cluster, release: Release) -> None:
    status = json.loads(helm(k8s, "status", release.name, "-n", release.namespace, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    dep = get(k8s, release.namespace, "deployment", release.service_account)
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["serviceAccountName"] == release.service_account and dep["spec"]["strategy"]["type"] == "Recreate"
    assert c["args"][:2] == ["run", f"--namespace={release.watched}"] and "--standalone" in c["args"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health", "scheme": "HTTP"}
    sc = c["securityContext"]
    assert (sc["readOnlyRootFilesystem"], sc["allowPrivilegeEscalation"], sc["capabilities"]) == \
        (True, False, {"drop": ["ALL"]})
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    # Namespace mode: a Role in the watched namespace, nothing namespaced elsewhere, a read-only discovery role.
    get(k8s, release.watched, "role", release.service_account)
    get(k8s, release.watched, "rolebinding", release.service_account)
    assert k8s.kubectl("get", "role", "-n", release.namespace, "-o", "name").stdout.strip() == ""
    crole = json.loads(k8s.kubectl("get", "clusterrole", f"{release.service_account}-discovery", "-o", "json").stdout)
    assert {v for r in crole["rules"] for v in r["verbs"]} == {"list", "watch"}
    k8s.kubectl("wait", "--for=condition=Established", "crd/piedeployments.pie.io", "--timeout=30s")
    assert f"It reconciles PieDeployments in: {release.watched} (one Role per namespace)" in release.notes


def test_upgrade_changes_the_operator_args(k8s: Cluster, own_release: Release) -> None:
    release = own_release
    helm(k8s, "upgrade", release.name, str(CHART), "-n", release.namespace, "--reuse-values",
         "--set", "resyncSeconds=10")
    dep = get(k8s, release.namespace, "deployment", release.service_account)
    assert "--resync-seconds=10" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert dep["metadata"]["generation"] == 2

def _token_kubeconfig(k8s: Cluster, release: Release, path: Path) -> Path:
    token = k8s.kubectl("create", "token", release.service_account, "-n", release.namespace,
                        "--duration=1h").stdout.strip()
    cluster = {"server": k8s.api_url, "certificate-authority": str(k8s.ca_cert)}
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "sa",
           "clusters": [{"name": "local", "cluster": cluster}],
           "users": [{"name": "sa", "user": {"token": token}}],
           "contexts": [{"name": "sa", "context": {"cluster": "local", "user": "sa", "namespace": release.watched}}]}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_operator_as_the_service_account_reconciles(k8s: Cluster, own_release: Release, tmp_path: Path) -> None:
    release = own_release
    kubeconfig = _token_kubeconfig(k8s, release, tmp_path / "sa-kubeconfig")
    denied = subprocess.run([str(k8s.bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig), "get", "secrets",
                             "-n", "kube-system"],
                            capture_output=True, text=True, timeout=30)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()  # really authenticated as the SA
    (c,) = get(k8s, release.namespace, "deployment", release.service_account)["spec"]["template"]["spec"]["containers"]
    port = _free_port()
    # The Deployment's args, verbatim, except the liveness address (loopback, a free port) and a faster resync.
    args = [f"--liveness=http://127.0.0.1:{port}/healthz" if a.startswith("--liveness=") else
            "--resync-seconds=5" if a.startswith("--resync-seconds=") else a for a in c["args"]]
    env = {k: v for k, v in k8s.env.items() if k != "KUBERNETES_SERVICE_HOST"}
    env.update(KUBECONFIG=str(kubeconfig),
               PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("engine", "operator", ".")))
    log = tmp_path / "operator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pie_operator", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    ns = release.watched

    def state() -> str:
        return k8s.kubectl("get", "-n", ns, "pied,pods", "-o", "yaml", check=False).stdout[-8000:]

    try:
        k8s.kubectl("apply", "-n", ns, "-f", str(REPO / "examples" / "minimal.yaml"))
        wait_for(lambda: _converged(k8s, ns, 1), "tiny Ready with 1 pod", log=log, state=state)
        for kind, name in (("service", NAME), ("configmap", f"{NAME}-engine"), ("poddisruptionbudget", NAME),
                           ("networkpolicy", f"{NAME}-admin")):
            get(k8s, ns, kind, name)  # server-side applied under the Role
        (pod,) = _pods(k8s, ns)
        # pods/resize: a new memory floor is applied in place.
        k8s.kubectl("patch", "-n", ns, "pied", NAME, "--type=merge",
                    "-p", json.dumps({"spec": {"memory": {"hostMemory": {"min": "32Gi"}, "headroom": "0"}}}))
        wait_for(lambda: [p for p in _pods(k8s, ns) if p["metadata"]["name"] == pod["metadata"]["name"] and
                          p["spec"]["containers"][0]["resources"]["requests"]["memory"] == "48Gi"],
                 "the pod resized in place to 48Gi", log=log, state=state)
        # delete: scale to zero.
        k8s.kubectl("scale", "-n", ns, "pied", NAME, "--replicas=0")
        wait_for(lambda: _converged(k8s, ns, 0), "tiny scaled to 0", log=log, state=state)
        events = get(k8s, ns, "events", "--field-selector", f"involvedObject.name={NAME}")["items"]
        reasons = {e["reason"] for e in events}  # posted by the operator: events create
        assert "CreatedPod" in reasons and not reasons & {"CreateFailed", "ResizeFailed"}, reasons
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as rsp:
            assert rsp.status == 200  # what the chart's livenessProbe asks
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    text = log.read_text(errors="replace")
    for sign in ("Forbidden", "forbidden", " 403", "Not enough permissions"):
        assert sign not in text, f"{sign!r} in the operator log:\n{text[-6000:]}"


def _pods(k8s: Cluster, ns: str) -> list[dict[str, Any]]:
    items = get(k8s, ns, "pods", "-l", f"pie.io/deployment={NAME}")["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def _converged(k8s: Cluster, ns: str, replicas: int) -> dict[str, Any] | None:
    """Status (written by the operator through /status) says `replicas` Ready pods, and exactly those exist.

    NOTE: not `phase: Ready`: the rollout gate also wants each new engine's /metrics, and no engine runs on kwok
    nodes. The RBAC question is whether every API call succeeds, which this answers."""
    pied = get(k8s, ns, "pied", NAME)
    st = pied.get("status", {})
    done = (st.get("observedGeneration") == pied["metadata"]["generation"] and st.get("replicas") == replicas
            and st.get("readyReplicas") == replicas and st.get("ready") == f"{replicas}/{replicas}")
    all_pods = get(k8s, ns, "pods", "-l", f"pie.io/deployment={NAME}")["items"]
    ready = [p for p in all_pods if any(c["type"] == "Ready" and c["status"] == "True"
                                        for c in p.get("status", {}).get("conditions", []))]
    return pied if done and len(all_pods) == len(ready) == replicas else None


@pytest.mark.parametrize("values", [[], ["networkPolicy.enabled=true", "verbose=true", "liveness.enabled=false",
                                         "networkPolicy.apiServer.cidrs={10.0.0.1/32}", "watchNamespaces={WATCHED}"]],
                         ids=["defaults", "optional-parts"])
def test_rendered_chart_passes_server_side_validation(k8s: Cluster, release: Release, values: list[str]) -> None:
    """What `helm template` renders is valid for the real API server's schemas (all-namespaces mode included)."""
    server = json.loads(k8s.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
    sets = [a for v in values for a in ("--set", v.replace("WATCHED", release.watched))]
    out = helm(k8s, "template", "extra", str(CHART), "-n", release.namespace, "--kube-version", server, *sets).stdout
    cp = k8s.kubectl("apply", "--dry-run=server", "-f", "-", input=out, check=False)
    assert cp.returncode == 0, cp.stderr
    assert ("networkpolicy.networking.k8s.io/extra-pie-operator" in cp.stdout) == bool(values), cp.stdout


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_applies_server_side(k8s: Cluster, release: Release, example: Path) -> None:
    cp = k8s.kubectl("apply", "--dry-run=server", "-n", release.watched, "-f", str(example), check=False)
    assert cp.returncode == 0, f"{example.name}:\n{cp.stdout}\n{cp.stderr}"
    assert "piedeployment.pie.io/" in cp.stdout


def test_uninstall_removes_everything_but_the_crd(k8s: Cluster, own_release: Release) -> None:
    release = own_release
    helm(k8s, "uninstall", release.name, "-n", release.namespace, "--wait")
    selector = f"app.kubernetes.io/instance={release.name}"
    for ns, kinds in ((release.namespace, "deployments,serviceaccounts,roles,rolebindings"),
                      (release.watched, "roles,rolebindings")):
        assert k8s.kubectl("get", kinds, "-n", ns, "-l", selector, "-o", "name").stdout.strip() == "", ns
    assert k8s.kubectl("get", "clusterroles,clusterrolebindings", "-l", selector, "-o", "name").stdout.strip() == ""
    # Helm never deletes CRDs from crds/ (that would delete every PieDeployment); documented in docs/helm.md.
    k8s.kubectl("get", "crd", "piedeployments.pie.io")
