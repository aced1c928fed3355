"""The Helm release the chart e2e tests install (tests/e2e/test_helm.py, test_helm_rbac.py): a release in a
namespace of its own, watching another namespace or every one, on the real local control plane."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tests.cluster import build
from tests.cluster.cluster import Cluster
from tests.e2e.helpers import delete_namespace

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "pie-operator"
T = TypeVar("T")


@dataclass
class Release:
    name: str
    namespace: str  # where the operator Deployment and its ServiceAccount live
    watched: str  # the one namespace it reconciles (watchNamespaces): RBAC as a Role there
    service_account: str
    notes: str = ""  # what `helm install` printed (NOTES.txt)

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


def wait_for(fn: Callable[[], T], what: str, timeout: float = 45.0, log: Path | None = None,
             state: Callable[[], str] | None = None) -> T:
    """Poll `fn` until truthy; on timeout fail with the last value, `state()` and the operator log."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.25)
    tail = f"\nstate:\n{state()}" if state else ""
    tail += f"\noperator log:\n{log.read_text(errors='replace')[-6000:]}" if log and log.exists() else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}{tail}")


def helm(k8s: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [str(build.build(["helm"]) / "helm"), *args]
    cp = subprocess.run(cmd, text=True, capture_output=True, env=k8s.env, timeout=120)
    if check and cp.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({cp.returncode}):\n{cp.stdout}\n{cp.stderr}")
    return cp


def get(k8s: Cluster, ns: str, *what: str) -> dict[str, Any]:
    return json.loads(k8s.kubectl("get", "-n", ns, *what, "-o", "json").stdout)


def new_namespace(k8s: Cluster, name: str) -> None:
    k8s.kubectl("create", "namespace", name)
    # Pod admission needs the `default` ServiceAccount, which the controller-manager creates asynchronously.
    wait_for(lambda: k8s.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
             f"the default ServiceAccount in {name}")


@contextmanager
def installed(k8s: Cluster, *, all_namespaces: bool = False) -> Iterator[Release]:
    """A fresh release in a namespace of its own, watching another (or, `all_namespaces`, every namespace: the
    chart's default); uninstalled and both namespaces deleted (their pods gone first: GPUs are scarce) at the end."""
    suffix = uuid.uuid4().hex[:6]
    rel = Release(f"pie-{suffix}", f"pie-system-{suffix}", f"helm-{suffix}", f"pie-{suffix}-pie-operator")
    for ns in (rel.namespace, rel.watched):
        new_namespace(k8s, ns)
    try:
        watch = [] if all_namespaces else ["--set", f"watchNamespaces={{{rel.watched}}}"]
        rel.notes = helm(k8s, "install", rel.name, str(CHART), "-n", rel.namespace, *watch).stdout
        yield rel
    finally:
        helm(k8s, "uninstall", rel.name, "-n", rel.namespace, check=False)
        for ns in (rel.watched, rel.namespace):
            delete_namespace(k8s, ns)
