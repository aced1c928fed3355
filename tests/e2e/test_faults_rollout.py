"""Faults during serving and rollouts, on the real control plane: a node lost under a serving pod (kwok node tainted
NoExecute: the taint-eviction controller evicts), an eviction during a paused rollout (real engines: the last good
revision keeps serving, the Service never selects the failed one), a pod stuck Terminating (a finalizer) under
maxSurge 0.

Each test has its own namespace and operator, and gives back what it changed on the shared cluster (taints,
finalizers) when it ends, so any one passes alone or in any order.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from tests.cluster.cluster import Cluster
from tests.e2e.engines import EngineFleet
from tests.e2e.helpers import Operator, events, get, running_operator, wait_for
from tests.e2e.test_closed_loop import PORT, deployment, patch, ready

pytestmark = pytest.mark.e2e
NAME = "fault"
SERVING = "pie.io/serving"
STEP = 60  # rollout.stepTimeoutSeconds of the kwok-only tests: the bound on a replacement's way to Ready
KWOK_PORT = random.randint(40000, 44999)  # nothing listens behind kwok-only pods (see test_operator.PORT)


@pytest.fixture
def operator(k8s: Cluster, ns: str, tmp_path: Path) -> Iterator[Operator]:
    flags = ("--resync-seconds", "2", "--metrics-interval-seconds", "1", "--metrics-timeout-seconds", "1")
    with running_operator(k8s, ns, tmp_path, *flags) as op:
        yield op


def live_pods(k8s: Cluster, ns: str, name: str = NAME) -> list[dict[str, Any]]:
    return [p for p in get(k8s, ns, "pods", "-l", f"pie.io/deployment={name}")["items"]
            if not p["metadata"].get("deletionTimestamp")]


def is_ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def revision(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["labels"]["pie.io/template-hash"])


def serving(pod: dict[str, Any]) -> bool:
    return pod["metadata"]["labels"].get(SERVING) == "true"


def kwok_only(k8s: Cluster, ns: str, op: Operator) -> dict[str, Any]:
    """One replica, no engine behind it (the gate is readiness), converged: its one pod Ready and serving."""
    doc = {"apiVersion": "pie.io/v1alpha1", "kind": "PieDeployment", "metadata": {"name": NAME},
           "spec": {"replicas": 1, "model": {"path": "/models/tiny"},
                    "engine": {"image": "pie-engine:v1", "port": KWOK_PORT},
                    "rollout": {"stepTimeoutSeconds": STEP, "gate": {"engineHealth": False}}}}
    k8s.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc))

    def up() -> dict[str, Any] | None:
        pods = live_pods(k8s, ns)
        return pods[0] if len(pods) == 1 and is_ready(pods[0]) and serving(pods[0]) else None

    return wait_for(up, "one Ready, serving pod", timeout=90, op=op)


def replaced(k8s: Cluster, ns: str, old: str) -> dict[str, Any] | None:
    """The PieDeployment's one live pod, once it is not `old`, Ready and serving, and the status says Ready."""
    pods = live_pods(k8s, ns)
    st = get(k8s, ns, "pied", NAME).get("status", {})
    ok = (len(pods) == 1 and pods[0]["metadata"]["name"] != old and is_ready(pods[0]) and serving(pods[0])
          and st.get("phase") == "Ready")
    return pods[0] if ok else None


def test_node_lost_mid_serving_is_replaced_within_the_step_timeout(k8s: Cluster, ns: str, operator: Operator) -> None:
    pod = kwok_only(k8s, ns, operator)
    node, old = pod["spec"]["nodeName"], pod["metadata"]["name"]
    # The node is lost: a NoExecute taint the pod does not tolerate, as the node lifecycle controller puts on an
    # unreachable node (its own taint is tolerated for 300 s by default; this one not at all).
    k8s.kubectl("taint", "node", node, "pie.test/lost=true:NoExecute")
    try:
        new = wait_for(lambda: replaced(k8s, ns, old), f"a Ready replacement within {STEP}s", timeout=STEP,
                       op=operator)
        assert new["spec"]["nodeName"] != node
    finally:
        k8s.kubectl("taint", "node", node, "pie.test/lost-", check=False)


def test_pod_stuck_terminating_is_replaced_under_max_surge_0(k8s: Cluster, ns: str, operator: Operator) -> None:
    pod = kwok_only(k8s, ns, operator)
    old = pod["metadata"]["name"]
    k8s.kubectl("patch", "-n", ns, "pod", old, "--type=merge", "-p",
                json.dumps({"metadata": {"finalizers": ["pie.test/hold"]}}))
    try:
        k8s.kubectl("delete", "-n", ns, "pod", old, "--wait=false")
        new = wait_for(lambda: replaced(k8s, ns, old), "the stuck pod's replacement Ready and serving", timeout=150,
                       op=operator)
        stuck = get(k8s, ns, "pod", old)
        assert stuck["metadata"].get("deletionTimestamp") and new["spec"]["nodeName"] != stuck["spec"]["nodeName"]
        (event,) = [e for e in events(k8s, ns, NAME) if e["reason"] == "ReplacingStuckPod"]
        assert event["type"] == "Warning" and old in event["message"] and "Terminating" in event["message"]
    finally:
        k8s.kubectl("patch", "-n", ns, "pod", old, "--type=merge", "-p",
                    json.dumps({"metadata": {"finalizers": None}}), check=False)


class Routed:
    """Every pod the Service `name` ever selected, polled until stopped: the pods its own selector (as the apiserver
    has it) matches. (EndpointSlices cannot show it here: their validation refuses the loopback pod IPs of this
    cluster; the endpoint controller would put exactly these pods, when Ready, behind the Service.)"""

    def __init__(self, k8s: Cluster, namespace: str, name: str) -> None:
        self.api = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(str(k8s.kubeconfig)))
        self.namespace, self.name = namespace, name
        self.ever: set[str] = set()
        self.now: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                selector = self.api.read_namespaced_service(self.name, self.namespace).spec.selector
                pods = self.api.list_namespaced_pod(
                    self.namespace, label_selector=",".join(f"{k}={v}" for k, v in selector.items())).items
                self.now = {p.metadata.name for p in pods if not p.metadata.deletion_timestamp}
                self.ever |= self.now
            except kubernetes.client.ApiException as e:  # no Service yet; or the apiserver blinked
                print(f"routed: {e.status} {e.reason}")
            self._stop.wait(0.2)

    def __enter__(self) -> Routed:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_eviction_during_a_paused_rollout_keeps_the_last_good_revision(k8s: Cluster, ns: str, model: Path,
                                                                      operator: Operator, tmp_path: Path) -> None:
    with EngineFleet(k8s, ns, NAME, model, tmp_path / "engines") as fleet, Routed(k8s, ns, NAME) as routed:
        k8s.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(deployment(NAME, 2)))
        pied = wait_for(lambda: ready(k8s, ns, NAME, 2), "2 healthy engines", timeout=120, op=operator)
        good = pied["status"]["updateRevision"]
        wait_for(lambda: len(routed.now) == 2, "both pods behind the Service", timeout=60, op=operator)

        # A revision whose engine never comes up: its pod is Ready for kwok, but fails the engine gate.
        patch(k8s, ns, NAME, {"engine": {"image": "pie-engine:v2", "port": PORT, "args": ["--max-num-seqs=0"]}})

        def paused() -> dict[str, Any] | None:
            pied = get(k8s, ns, "pied", NAME)
            return pied if pied["status"].get("rollout", {}).get("phase") == "Paused" else None

        wait_for(paused, "the rollout to pause on the failed gate", timeout=120, op=operator)
        (bad,) = [p for p in live_pods(k8s, ns) if revision(p) != good]
        (last_good,) = [p for p in live_pods(k8s, ns) if revision(p) == good]
        assert not serving(bad) and serving(last_good)

        k8s.kubectl("delete", "-n", ns, "pod", last_good["metadata"]["name"], "--wait=false")  # evicted

        def restored() -> list[dict[str, Any]] | None:
            pods = live_pods(k8s, ns)
            fresh = [p for p in pods if revision(p) == good and p["metadata"]["name"] != last_good["metadata"]["name"]]
            ok = (len(pods) == 2 and len(fresh) == 1 and is_ready(fresh[0]) and serving(fresh[0])
                  and routed.now == {fresh[0]["metadata"]["name"]})
            return pods if ok else None

        pods = wait_for(restored, "the evicted pod replaced at the last good revision, behind the Service",
                        timeout=120, op=operator)
        assert sorted(revision(p) for p in pods) == sorted([good, revision(bad)])
        pied = get(k8s, ns, "pied", NAME)
        assert pied["status"]["rollout"]["phase"] == "Paused"
        assert pied["status"]["rollout"]["lastGoodRevision"] == good
        # No request could have reached the failed revision: the Service never selected its pod.
        assert bad["metadata"]["name"] not in routed.ever, (routed.ever, fleet.started)
