"""Fixtures for e2e tests: one real local control plane per test session (see tests/cluster/cluster.py)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.cluster import Cluster

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
    """A fresh namespace whose ``default`` ServiceAccount exists (pods can be created at once); deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    k8s.kubectl("create", "namespace", name)
    deadline = time.monotonic() + 60
    # The controller-manager's serviceaccount controller creates it asynchronously; pod admission needs it.
    while k8s.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"ServiceAccount default never appeared in namespace {name}")
        time.sleep(0.2)
    yield name
    k8s.kubectl("delete", "namespace", name, "--wait=false", check=False)
