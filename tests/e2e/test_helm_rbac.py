"""The chart's RBAC on the real control plane, asked with `kubectl auth can-i` as its ServiceAccount: exactly what the
operator needs, and no more, in both install modes (named namespaces: Roles; every namespace, the default: a
ClusterRole). tests/e2e/test_helm.py runs the operator as that identity to prove the list is sufficient."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.cluster import Cluster
from tests.e2e.helm_release import Release, installed

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def release(k8s: Cluster) -> Iterator[Release]:
    """A release watching one namespace (Roles), only looked at."""
    with installed(k8s) as rel:
        yield rel


@pytest.fixture(scope="module")
def cluster_release(k8s: Cluster) -> Iterator[Release]:
    """A release with the chart's defaults (every namespace: a ClusterRole), only looked at."""
    with installed(k8s, all_namespaces=True) as rel:
        yield rel


CAN_I = [  # (verb, resource, namespace key, allowed)
    ("create", "pods", "watched", True),
    ("patch", "pods/resize", "watched", True),
    ("patch", "pods", "watched", True),  # the serving label
    ("create", "secrets", "watched", True),
    ("patch", "piedeployments.pie.io/status", "watched", True),
    ("list", "namespaces", None, True),
    ("create", "pods", "namespace", False),  # only in the watched namespace
    ("list", "secrets", "watched", False),  # get by name only: no bulk read of Secrets
    ("patch", "secrets", "watched", False),  # and never a change to a Secret it finds
    ("update", "pods", "watched", False),
    ("delete", "services", "watched", False),
    ("update", "piedeployments.pie.io", "watched", False),
    ("delete", "nodes", None, False),
    ("get", "secrets", "kube-system", False),
    ("create", "clusterroles.rbac.authorization.k8s.io", None, False),
]


@pytest.mark.parametrize(("verb", "resource", "where", "allowed"), CAN_I, ids=[f"{v}-{r}-{w}" for v, r, w, _ in CAN_I])
def test_service_account_can_do_exactly_its_job(k8s: Cluster, release: Release, verb: str, resource: str,
                                                where: str | None, allowed: bool) -> None:
    _can_i(k8s, release, verb, resource, where, allowed)


# The default install (every namespace): what it must do anywhere, and no more. `watched` is just some namespace.
CAN_I_ALL_NAMESPACES = [
    ("create", "pods", "watched", True),
    ("delete", "pods", "watched", True),
    ("patch", "pods/resize", "namespace", True),
    ("get", "secrets", "watched", True),  # the admin-token Secret, read by name
    ("create", "secrets", "watched", True),
    ("patch", "secrets", "watched", False),  # a Secret it finds is never modified
    ("update", "secrets", "watched", False),
    ("list", "secrets", "watched", False),
    ("watch", "secrets", "kube-system", False),
    ("delete", "secrets", "watched", False),
    ("patch", "pods", "watched", True),  # the serving label (traffic follows the rollout gate)
    ("update", "pods", "watched", False),
    ("list", "namespaces", None, False),  # kopf lists Namespaces only when watching named ones
    ("delete", "nodes", None, False),
    ("create", "clusterroles.rbac.authorization.k8s.io", None, False),
    ("create", "rolebindings.rbac.authorization.k8s.io", "watched", False),
]


@pytest.mark.parametrize(("verb", "resource", "where", "allowed"), CAN_I_ALL_NAMESPACES,
                         ids=[f"{v}-{r}-{w}" for v, r, w, _ in CAN_I_ALL_NAMESPACES])
def test_all_namespaces_service_account_can_do_exactly_its_job(k8s: Cluster, cluster_release: Release, verb: str,
                                                               resource: str, where: str | None,
                                                               allowed: bool) -> None:
    _can_i(k8s, cluster_release, verb, resource, where, allowed)


def _can_i(k8s: Cluster, release: Release, verb: str, resource: str, where: str | None, allowed: bool) -> None:
    ns = {"watched": release.watched, "namespace": release.namespace, None: None}.get(where, where)
    resource, _, sub = resource.partition("/")
    cp = k8s.kubectl("auth", "can-i", verb, resource, *([f"--subresource={sub}"] if sub else []),
                     f"--as={release.user}", *(["-n", ns] if ns else []), check=False)
    assert cp.stdout.strip() == ("yes" if allowed else "no"), (verb, resource, ns, cp.stdout, cp.stderr)
