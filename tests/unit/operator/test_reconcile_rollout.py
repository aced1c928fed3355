"""reconcile() against the in-memory fake of `Kube`: a paused rollout keeps the last good revision serving, traffic
follows the gate (the serving label), and a pod stuck Terminating no longer blocks its replacement."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pie_operator.builders import HASH_LABEL, SERVING_LABEL
from pie_operator.planning import STUCK_TERMINATING_SECONDS
from pie_operator.reconcile import reconcile
from tests.unit.operator.fake_kube import T0, FakeKube
from tests.unit.operator.test_reconcile import NAME, NS, cluster_writes, converged, pods, spec, status

STEP = 60  # rollout.stepTimeoutSeconds in these tests


def at(seconds: float) -> dict[str, Any]:
    return {"now": T0 + timedelta(seconds=seconds)}


def serving(kube: FakeKube) -> dict[str, str]:
    """Pod name -> revision, of the pods the Service selects."""
    return {p["metadata"]["name"]: p["metadata"]["labels"][HASH_LABEL] for p in pods(kube)
            if p["metadata"]["labels"].get(SERVING_LABEL) == "true"}


def test_pods_that_passed_their_gate_take_traffic_and_an_unchanged_world_writes_nothing() -> None:
    kube = converged()
    assert len(serving(kube)) == 2
    service = kube.objects[("Service", NS, NAME)]
    assert service["spec"]["selector"][SERVING_LABEL] == "true"
    reconcile(kube, NS, NAME, **at(120))
    assert cluster_writes(kube) == []


def never_ready(kube: FakeKube) -> None:
    """The pods without an IP run but never get Ready (FakeKube.run_pods leaves them so)."""
    for pod in kube.pods.values():
        if not pod.get("status", {}).get("podIP"):
            pod["status"] = {"phase": "Running", "podIP": "127.0.9.9", "conditions": [{"type": "Ready",
                                                                                    "status": "False"}]}


def paused(kube: FakeKube) -> tuple[str, str]:
    """Roll tiny (converged, 2 pods) to an image whose pod never gets Ready: one step, then paused. Returns
    (last good revision, failed revision)."""
    good = status(kube)["updateRevision"]
    kube.set_spec(NS, NAME, spec(**{"rollout.stepTimeoutSeconds": STEP, "engine.image": "pie-engine:broken"}))
    for s in range(1, 4):  # one old pod goes, its replacement is created and stays Pending
        kube.now = T0 + timedelta(seconds=s)
        reconcile(kube, NS, NAME, **at(s))
    never_ready(kube)
    reconcile(kube, NS, NAME, **at(STEP + 10))
    st = status(kube)
    assert st["rollout"]["phase"] == "Paused", st["rollout"]
    return good, st["updateRevision"]


def test_eviction_during_a_paused_rollout_is_replaced_at_the_last_good_revision() -> None:
    kube = converged({"rollout.stepTimeoutSeconds": STEP})
    good, bad = paused(kube)
    assert sorted(p["metadata"]["labels"][HASH_LABEL] for p in pods(kube)) == sorted([good, bad])
    assert set(serving(kube).values()) == {good}  # the failing pod never takes traffic
    (old,) = [p for p in pods(kube) if p["metadata"]["labels"][HASH_LABEL] == good]
    del kube.pods[(NS, old["metadata"]["name"])]  # evicted

    reconcile(kube, NS, NAME, **at(STEP + 11))
    kube.run_pods()
    reconcile(kube, NS, NAME, **at(STEP + 12))
    revisions = sorted(p["metadata"]["labels"][HASH_LABEL] for p in pods(kube))
    assert revisions == sorted([good, bad]) and status(kube)["rollout"]["phase"] == "Paused"
    assert list(serving(kube).values()) == [good]  # the replacement passed its gate and serves

    # The failing pod goes too (deleted by hand): still paused, and the replica comes back at the last good revision.
    (failing,) = [p for p in pods(kube) if p["metadata"]["labels"][HASH_LABEL] == bad]
    del kube.pods[(NS, failing["metadata"]["name"])]
    for s in range(13, 16):
        reconcile(kube, NS, NAME, **at(STEP + s))
        kube.run_pods()
    assert [p["metadata"]["labels"][HASH_LABEL] for p in pods(kube)] == [good, good]
    assert status(kube)["rollout"]["phase"] == "Paused" and len(serving(kube)) == 2


def test_pods_of_a_paused_revision_stop_taking_traffic() -> None:
    """maxSurge 1: the first new pod passes, the second fails; the one that passed is of a suspect revision now."""
    kube = converged({"rollout.stepTimeoutSeconds": STEP})
    good = status(kube)["updateRevision"]
    kube.set_spec(NS, NAME, spec(**{"rollout.stepTimeoutSeconds": STEP, "engine.image": "pie-engine:flaky",
                                    "rollout.maxSurge": 1, "rollout.maxUnavailable": 0}))
    reconcile(kube, NS, NAME, **at(1))  # surge: one new pod
    kube.run_pods()
    reconcile(kube, NS, NAME, **at(2))  # it passed: it takes traffic; one old pod goes
    bad = status(kube)["updateRevision"]
    assert bad in serving(kube).values()
    kube.now = T0 + timedelta(seconds=3)
    reconcile(kube, NS, NAME, **at(3))  # the second new pod: never Ready
    never_ready(kube)
    reconcile(kube, NS, NAME, **at(STEP + 10))
    assert status(kube)["rollout"]["phase"] == "Paused"
    assert set(serving(kube).values()) == {good}


def test_pod_stuck_terminating_is_replaced_with_an_event() -> None:
    """maxSurge 0: a terminating pod holds its GPU, so its replacement waits -- but not forever."""
    kube = converged()
    name = pods(kube)[0]["metadata"]["name"]
    kube.pods[(NS, name)]["metadata"]["deletionTimestamp"] = "2025-01-01T12:01:00Z"  # grace period ends at T0+60s
    reconcile(kube, NS, NAME, **at(61))
    assert len(pods(kube)) == 2 and not [e for e in kube.events if e[1] == "ReplacingStuckPod"]
    reconcile(kube, NS, NAME, **at(60 + STUCK_TERMINATING_SECONDS + 1))
    assert len(pods(kube)) == 3
    (event,) = [e for e in kube.events if e[1] == "ReplacingStuckPod"]
    assert event[0] == "Warning" and name in event[2]
    kube.run_pods()
    reconcile(kube, NS, NAME, **at(60 + STUCK_TERMINATING_SECONDS + 30))  # announced once, not once per pass
    assert len([e for e in kube.events if e[1] == "ReplacingStuckPod"]) == 1 and len(pods(kube)) == 3
