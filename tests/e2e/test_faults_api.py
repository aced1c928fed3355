"""Faults of the Kubernetes API under the operator, on the real control plane: a ResourceQuota that refuses pods,
a kube-apiserver restart in the middle of a rollout; and what the operator sends when nothing changes (counted from
the apiserver's audit log, tests/cluster/audit-policy.yaml).

Each test has its own namespace and operator; the restart test restarts the session's apiserver (etcd keeps the
data, so the other tests' objects survive it) and waits until it is ready again.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster.cluster import Cluster
from tests.cluster.components import audit_log
from tests.cluster.faults import restart
from tests.e2e.engines import EngineFleet, Load
from tests.e2e.helpers import Operator, condition, events, get, running_operator, wait_for
from tests.e2e.test_closed_loop import LOOP, deployment, fleet, ready  # noqa: F401 -- fixtures
from tests.e2e.test_closed_loop import PORT as ENGINE_PORT
from tests.e2e.test_operator import NAME, apply_minimal, converged, engine_pods, patch

pytestmark = pytest.mark.e2e
WRITES = ("create", "update", "patch", "delete", "deletecollection")


@pytest.fixture
def operator(k8s: Cluster, ns: str, tmp_path: Path) -> Iterator[Operator]:
    # (a generous scrape timeout: a scrape that times out on this loaded machine is a real change of status)
    flags = ("--resync-seconds", "2", "--metrics-interval-seconds", "1", "--metrics-timeout-seconds", "5")
    with running_operator(k8s, ns, tmp_path, *flags) as op:
        yield op


def _at(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


_AUDIT: dict[str, Any] = {"path": None, "offset": 0, "by_ns": {}}


def _audit_events(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Completed requests of the audit log by namespace, read incrementally (a session's log grows to many MiB)."""
    if _AUDIT["path"] != path or path.stat().st_size < _AUDIT["offset"]:  # another cluster, or rotated
        _AUDIT.update(path=path, offset=0, by_ns={})
    with path.open("rb") as f:
        f.seek(_AUDIT["offset"])
        chunk = f.read()
    complete = chunk[:chunk.rfind(b"\n") + 1]  # (a line being written waits for the next call)
    _AUDIT["offset"] += len(complete)
    for line in complete.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("stage") == "ResponseComplete" and (ns := (e.get("objectRef") or {}).get("namespace")):
            _AUDIT["by_ns"].setdefault(ns, []).append(e)
    by_ns: dict[str, list[dict[str, Any]]] = _AUDIT["by_ns"]
    return by_ns


def operator_requests(k8s: Cluster, ns: str, since: float) -> list[dict[str, Any]]:
    """Requests completed since `since` (unix time) in `ns` by anything but kubectl (the tests' own client): in a
    namespace of its own, that is the operator (and the control plane acting on its objects)."""
    return [e for e in _audit_events(audit_log(k8s.state_dir)).get(ns, [])
            if not e.get("userAgent", "").startswith("kubectl") and _at(e["stageTimestamp"]) >= since]


def operator_writes(k8s: Cluster, ns: str, since: float) -> list[str]:
    """`verb resource[/subresource] name` of the operator's writes since `since` (the control plane's own writes,
    e.g. the scheduler binding a pod or kwok setting its status, are not the operator's)."""
    return [f"{e['verb']} {e['objectRef'].get('resource')}"
            f"{'/' + e['objectRef']['subresource'] if e['objectRef'].get('subresource') else ''} "
            f"{e['objectRef'].get('name', '')}"
            for e in operator_requests(k8s, ns, since)
            if e["verb"] in WRITES and e["user"]["username"] == "kubernetes-admin"
            and not (e["objectRef"].get("resource") == "pods" and e["objectRef"].get("subresource") == "status")]


def test_steady_state_makes_no_writes(k8s: Cluster, ns: str, operator: Operator) -> None:
    apply_minimal(k8s, ns)
    wait_for(lambda: converged(k8s, ns, 1), "tiny to be Ready with 1 pod", op=operator)
    # Nothing answers on the pod IP: MetricsStale is the last change the operator makes (then nothing changes).
    wait_for(lambda: condition(get(k8s, ns, "pied", NAME), "MetricsStale").get("status") == "True",
             "MetricsStale", op=operator)
    time.sleep(1)  # (the status write that set it is in flight)
    since = time.time() + 1
    marker = operator.log.read_text(errors="replace")
    # Several resyncs (every 2 s) and scrapes (every 1 s) of an unchanged world.
    wait_for(lambda: len({e["auditID"] for e in operator_requests(k8s, ns, since)
                          if e["verb"] == "get" and e["objectRef"].get("resource") == "piedeployments"
                          and not e["objectRef"].get("subresource")}) >= 6,
             "6 reconcile passes", timeout=90, op=operator, interval=1.0)
    assert operator_writes(k8s, ns, since) == [], operator.log.read_text(errors="replace")[len(marker):]


def engine_numbers(url: str) -> tuple[str, ...]:
    """The engine's numbers that status.pods[] shows (and that move with the load)."""
    text = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    return tuple(line for line in text.splitlines()
                 if line.startswith(("pie_host_kv_used_bytes ", "pie_expansion_ratio ", "pie_kv_cache_usage_perc ")))


def test_scrapes_of_a_busy_engine_write_no_status(k8s: Cluster, ns: str, operator: Operator,
                                                  fleet: EngineFleet) -> None:  # noqa: F811 -- the fixture
    # Host memory pinned (min = max): the closed loop has nothing to decide, only the engine's numbers move.
    memory = deployment(LOOP, 1)["spec"]["memory"] | {"hostMemory": {"min": "64Mi", "max": "64Mi"}}
    k8s.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(deployment(LOOP, 1, memory=memory)))
    wait_for(lambda: ready(k8s, ns, LOOP, 1), "loop Ready behind a healthy engine", timeout=120, op=operator)
    (pod,) = [p for p in get(k8s, ns, "pods", "-l", f"pie.io/deployment={LOOP}")["items"]]
    url = f"http://{pod['status']['podIP']}:{ENGINE_PORT}"
    with Load(url, LOOP) as load:
        wait_for(lambda: load.completed > 0 or len(load.errors) > 3, "a completed request", timeout=90)
        assert load.completed > 0, load.errors[:3]
        since = time.time() + 1
        seen: set[tuple[str, ...]] = set()
        wait_for(lambda: seen.add(engine_numbers(url)) or (len(seen) >= 4 and time.time() > since + 6),
                 "the engine's numbers to move a few times under the load", timeout=120, interval=1.0)
        until = time.time()
    writes = [w for w in operator_writes(k8s, ns, since) if w.startswith("patch piedeployments/status")]
    pied = get(k8s, ns, "pied", LOOP)
    assert condition(pied, "MetricsStale")["status"] == "False", pied["status"]  # (a failed scrape is a change)
    assert writes == [], (len(seen), until - since, writes)


def pied_events(k8s: Cluster, ns: str) -> list[dict[str, Any]]:
    """The Events about the PieDeployment (not its Service, PDB, ... of the same name)."""
    return [e for e in events(k8s, ns, NAME) if e["involvedObject"].get("kind") == "PieDeployment"]


def refused_creates(k8s: Cluster, ns: str, since: float) -> list[float]:
    """When the operator's pod creates were refused (403) since `since`, from the audit log."""
    out = []
    for e in operator_requests(k8s, ns, since):
        ref = e["objectRef"]
        if e["verb"] == "create" and ref.get("resource") == "pods" and not ref.get("subresource") and (
                e.get("responseStatus") or {}).get("code") == 403:
            out.append(_at(e["stageTimestamp"]))
    return sorted(out)


def test_quota_refusal_is_degraded_backs_off_and_is_announced_once(k8s: Cluster, ns: str,
                                                                   operator: Operator) -> None:
    k8s.kubectl("create", "quota", "gpu-pods", "--hard=pods=1", "-n", ns)
    wait_for(lambda: get(k8s, ns, "resourcequota", "gpu-pods").get("status", {}).get("hard"),
             "the quota controller to count the namespace")
    started = time.time()
    apply_minimal(k8s, ns)
    patch(k8s, ns, {"replicas": 2})

    def refused() -> dict[str, Any] | None:
        st = get(k8s, ns, "pied", NAME).get("status", {})
        cond = condition({"status": st}, "Degraded")
        return st if cond.get("reason") == "CreateRejected" and (st.get("podCreation") or {}).get(
            "failures", 0) >= 3 else None

    st = wait_for(refused, "three refused creates, Degraded/CreateRejected", timeout=120, op=operator)
    cond = condition({"status": st}, "Degraded")
    assert (st["phase"], cond["status"]) == ("Degraded", "True")
    assert "exceeded quota: gpu-pods" in cond["message"] and "403" in cond["message"], cond
    # Backing off: 5 s, then 10 s, ... between attempts, whatever else triggers passes (the resync: every 2 s).
    # (The wait is measured from status.podCreation.lastFailureTime, in whole seconds: up to 1 s early.)
    tries = refused_creates(k8s, ns, started)
    gaps = [b - a for a, b in zip(tries, tries[1:], strict=False)]
    assert len(tries) >= 3 and all(g >= 5 * 2**i - 1.5 for i, g in enumerate(gaps)), gaps
    # One Warning for the refusal, no per-try Events (and none of kopf's "handler failed, will retry").
    warnings = [(e["reason"], e.get("count", 1)) for e in pied_events(k8s, ns)
                if e["type"] != "Normal" and e["reason"] != "MetricsStale"]  # (nothing listens on the pod IP)
    assert warnings == [("CreateRejected", 1)], warnings

    k8s.kubectl("delete", "quota", "gpu-pods", "-n", ns)
    pied = wait_for(lambda: converged(k8s, ns, 2), "2 pods once the quota is gone", timeout=120, op=operator)
    assert condition(pied, "Degraded")["status"] == "False" and "podCreation" not in pied["status"]


class PodLog:
    """Every engine pod uid seen (polled through the API in the background, with the apiserver gone for a while)."""

    def __init__(self, k8s: Cluster, ns: str) -> None:
        self.k8s, self.ns, self._stop = k8s, ns, threading.Event()
        self.uids: dict[str, str] = {}  # uid -> revision
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for p in engine_pods(self.k8s, self.ns, include_terminating=True):
                    self.uids[p["metadata"]["uid"]] = p["metadata"]["labels"]["pie.io/template-hash"]
            except Exception:  # the apiserver is down: try again
                pass
            time.sleep(0.2)

    def __enter__(self) -> PodLog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_apiserver_restart_mid_rollout_converges_without_duplicates(k8s: Cluster, ns: str,
                                                                    operator: Operator) -> None:
    apply_minimal(k8s, ns)
    patch(k8s, ns, {"replicas": 2})
    pied = wait_for(lambda: converged(k8s, ns, 2), "2 ready pods", timeout=90, op=operator)
    old_rev = pied["status"]["updateRevision"]
    with PodLog(k8s, ns) as seen:
        patch(k8s, ns, {"engine": {"args": ["--max-num-seqs=32"]}})
        # Mid-rollout: the first old pod is on its way out (maxSurge 0: one at a time).
        wait_for(lambda: len([p for p in engine_pods(k8s, ns) if p["metadata"]["labels"]["pie.io/template-hash"]
                              == old_rev]) < 2, "the rollout to start", op=operator)
        restart(k8s, "kube-apiserver", down_seconds=5)
        pied = wait_for(lambda: converged(k8s, ns, 2), "the rollout to finish after the restart", timeout=180,
                        op=operator)
        time.sleep(2)  # (one more poll of the pods)
    new_rev = pied["status"]["updateRevision"]
    assert new_rev != old_rev
    new = [u for u, r in seen.uids.items() if r == new_rev]
    old = [u for u, r in seen.uids.items() if r == old_rev]
    assert (len(new), len(old)) == (2, 2), seen.uids  # no duplicate pod was created
    reasons = [e["reason"] for e in pied_events(k8s, ns)]
    assert "DeletedScaledDown" not in reasons, reasons  # no surplus (a duplicate) had to be removed
    assert reasons.count("DeletedOutdated") <= 2, reasons  # (Events are best effort: fewer if the API was away)
    assert {p["metadata"]["uid"] for p in engine_pods(k8s, ns, include_terminating=True)} == set(new)
