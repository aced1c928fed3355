"""Faults of the control plane itself, for the fault-injection e2e tests: a component stopped and started again with
the same arguments, ports and data (its clients see it vanish and come back, as in an upgrade or a crash loop)."""

from __future__ import annotations

import json
import time

from tests.cluster.cluster import PIDS, Cluster
from tests.cluster.procs import ClusterError, Proc, terminate


def restart(cluster: Cluster, component: str, down_seconds: float = 0.0, timeout: float = 120.0) -> None:
    """Stop `component` (SIGTERM, then SIGKILL), keep it down `down_seconds`, start it again and return once it
    answers (for kube-apiserver: /readyz through the admin kubeconfig)."""
    (old,) = [p for p in cluster._procs if p.name == component]  # noqa: SLF001 -- the cluster's own package
    survivors = terminate([old.pid], [old.popen] if old.popen is not None else [])
    if survivors:
        raise ClusterError(f"{component} survived SIGKILL: {survivors}")
    time.sleep(down_seconds)
    new = Proc(old.name, old.args, old.log, old.env)
    new.start(cluster.detach)
    cluster._procs = [new if p is old else p for p in cluster._procs]  # noqa: SLF001
    (cluster.state_dir / PIDS).write_text(json.dumps({p.name: p.pid for p in cluster._procs}))  # noqa: SLF001
    if component != "kube-apiserver":
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if new.exited() is not None:
            raise new.failure("exited while restarting")
        if cluster.kubectl("get", "--raw", "/readyz", check=False, timeout=20).returncode == 0:
            return
        time.sleep(0.5)
    raise new.failure(f"not ready {timeout}s after a restart")
