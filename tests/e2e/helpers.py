"""Shared by the operator e2e tests: the operator as a real subprocess, polling, kubectl JSON and namespaces."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tests.cluster.cluster import Cluster

REPO = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join(str(REPO / p) for p in ("engine", "operator", "."))
T = TypeVar("T")


class Operator:
    """`python -m pie_operator run --standalone --namespace NS <extra args>`, logging to a file."""

    def __init__(self, k8s: Cluster, namespace: str, log: Path, *extra: str) -> None:
        self.k8s, self.namespace, self.log, self.extra = k8s, namespace, log, extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**self.k8s.env, "PYTHONPATH": PYTHONPATH}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pie_operator", "run", "--standalone", "--namespace", self.namespace,
                 *(self.extra or ("--resync-seconds", "5"))], cwd=REPO, env=env, stdout=out,
                stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye -- as when a node dies under the operator."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""


@contextmanager
def running_operator(k8s: Cluster, namespace: str, tmp_path: Path, *flags: str) -> Iterator[Operator]:
    """The operator running for one test (``flags``: its timing), stopped afterwards with its log's tail printed
    (pytest shows it for a failed test)."""
    op = Operator(k8s, namespace, tmp_path / "operator.log", *flags)
    op.start()
    try:
        yield op
    finally:
        op.stop()
        print(f"--- operator log ({op.log}) ---\n{op.tail()}")


def wait_for(fn: Callable[[], T], what: str, timeout: float = 45.0, op: Operator | None = None,
             interval: float = 0.25) -> T:
    """Poll `fn` until it returns something truthy; on timeout fail with the last value and the operator log."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    log = f"\noperator log:\n{op.tail()}" if op else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}{log}")


def get(k8s: Cluster, ns: str, *what: str) -> dict[str, Any]:
    return json.loads(k8s.kubectl("get", "-n", ns, *what, "-o", "json").stdout)


def new_namespace(k8s: Cluster, prefix: str) -> str:
    """A fresh namespace, once its `default` ServiceAccount exists: the controller-manager creates it
    asynchronously, and pod admission needs it."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    k8s.kubectl("create", "namespace", name)
    wait_for(lambda: k8s.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
             f"the default ServiceAccount in {name}", timeout=60)
    return name


def delete_namespace(k8s: Cluster, name: str) -> None:
    """Delete the namespace's pods and wait until they are gone, then the namespace without waiting. The cluster has
    two GPUs for all tests: the next test must not find them held by this one's pods. (Stop whatever recreates pods
    -- an operator -- first.)"""
    k8s.kubectl("delete", "pods", "--all", "-n", name, "--wait=true", "--timeout=90s", check=False, timeout=100)
    k8s.kubectl("delete", "namespace", name, "--wait=false", check=False)


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def events(k8s: Cluster, ns: str, name: str) -> list[dict[str, Any]]:
    return get(k8s, ns, "events", "--field-selector", f"involvedObject.name={name}")["items"]
