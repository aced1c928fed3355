"""Fixtures for e2e tests: one real local control plane per test session (see tests/cluster/cluster.py).

The cluster is the only thing tests share. Every test works in a namespace of its own (`k8s_namespace`) with its
own operator and PieDeployments, and gives the cluster's two GPUs back when it ends, so tests pass alone and in any
order: `PIE_TEST_ORDER=reverse pytest -m e2e ...` runs them backwards to show it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.cluster import Cluster
from tests.e2e.helpers import delete_namespace, new_namespace

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def k8s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A started cluster (2 fake GH200 nodes) with the CRDs from ``crds/`` installed and Established.

    Its state dir (certs, kubeconfig, one log per component under ``logs/``) stays in pytest's tmp dir for debugging;
    every process is stopped at session end, and also on Ctrl-C, SIGTERM or a crash of the test process.
    """
    cluster = Cluster(tmp_path_factory.mktemp("k8s"), nodes=2)
    cluster.start()
    try:
        cluster.apply_crds(REPO / "crds")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def k8s_namespace(k8s: Cluster) -> Iterator[str]:
    """A fresh namespace whose ``default`` ServiceAccount exists (pods can be created at once); afterwards its pods
    are gone (their GPUs free for the next test) and the namespace is being deleted."""
    name = new_namespace(k8s, "t")
    yield name
    delete_namespace(k8s, name)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("PIE_TEST_ORDER") == "reverse":
        items.reverse()
