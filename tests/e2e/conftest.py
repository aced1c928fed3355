"""Fixtures for e2e tests: one real local control plane per test session (see tests/cluster/cluster.py).

The cluster is the only thing tests share. Every test works in a namespace of its own (`k8s_namespace`) with its
own operator and PieDeployments, and gives the cluster's two GPUs back when it ends, so tests pass alone and in any
order: `PIE_TEST_ORDER=reverse pytest -m e2e ...` runs them backwards to show it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.cluster import Cluster
from tests.e2e.helpers import PYTHONPATH, delete_namespace, new_namespace

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


@pytest.fixture
def ns(k8s_namespace: str) -> str:
    """The test's namespace (short name)."""
    return k8s_namespace


@pytest.fixture(scope="session")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint on disk for real engines, built once (read-only: the engines only load it)."""
    out = tmp_path_factory.mktemp("model") / "tiny"
    # hidden 256: 16 KiB of KV per block and layer, so the host KV the load needs is a few MiB (a clear signal)
    subprocess.run([sys.executable, "-m", "pie_engine", "make-test-model", "--out", str(out), "--hidden", "256"],
                   check=True, cwd=REPO, env={"PYTHONPATH": PYTHONPATH, "PATH": "/usr/bin:/bin"}, capture_output=True)
    return out


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("PIE_TEST_ORDER") == "reverse":
        items.reverse()
