"""Table tests of the pure rollout/scaling decisions (planning.py) and status computation (status.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from pie_operator.planning import STUCK_TERMINATING_SECONDS as STUCK
from pie_operator.planning import plan
from pie_operator.rollout import COMPLETE, PAUSED, RolloutState
from pie_operator.scrape import EngineMetrics, Observation
from pie_operator.status import compute_status

NEW, OLD = "new0000000", "old0000000"
NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def pod(name: str, rev: str = NEW, ready: bool = True, phase: str = "Running", age_s: int = 60,
        memory: str = "16Gi", terminating: bool = False, unschedulable: str | None = None,
        overdue_s: int = 0) -> dict[str, Any]:
    """`terminating`: deleted, its grace period (deletionTimestamp) ending `overdue_s` seconds ago."""
    conds = [{"type": "Ready", "status": "True" if ready else "False"}]
    if unschedulable:
        conds.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable})
    meta: dict[str, Any] = {"name": name, "uid": f"uid-{name}", "labels": {"pie.io/template-hash": rev},
                            "creationTimestamp": (NOW - timedelta(seconds=age_s)).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if terminating:
        meta["deletionTimestamp"] = (NOW - timedelta(seconds=overdue_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"metadata": meta, "status": {"phase": phase, "conditions": conds},
            "spec": {"containers": [{"name": "engine", "args": ["--gpu-memory-budget", "0.9"],
                                     "resources": {"requests": {"memory": memory}}}]}}


def run(pods: list[dict[str, Any]], replicas: int, surge: int = 0, unavailable: int = 1,
        replace: dict[str, str] | None = None, hold: bool = False) -> tuple[int, list[str], list[str]]:
    p = plan(pods, desired_revision=NEW, replicas=replicas, max_surge=surge, max_unavailable=unavailable,
             replace=replace, hold=hold, now=NOW)
    return p.create, [d.name for d in p.delete], [d.reason for d in p.delete]


@pytest.mark.parametrize(("pods", "replicas", "surge", "unavailable", "expected"), [
    ([], 2, 0, 1, (2, [], [])),                                            # fresh: create all
    ([pod("a")], 1, 0, 1, (0, [], [])),                                    # converged: nothing
    ([pod("a"), pod("b", age_s=5)], 1, 0, 1, (0, ["b"], [])),              # scale down: newest goes
    ([pod("a"), pod("b", ready=False)], 1, 0, 1, (0, ["b"], [])),          # scale down: not-ready first
    ([pod("a", ready=False, age_s=5), pod("b")], 1, 0, 1, (0, ["a"], [])),
    ([pod("a", phase="Failed")], 1, 0, 1, (1, ["a"], [])),                 # failed pods are replaced
    ([pod("a", terminating=True)], 1, 0, 1, (0, [], [])),                  # a terminating pod holds its GPU...
    ([pod("a", terminating=True)], 1, 1, 1, (1, [], [])),                  # ...unless surge allows one more
    ([pod("a", terminating=True), pod("b")], 2, 0, 1, (0, [], [])),
    ([pod("a", terminating=True, overdue_s=25)], 1, 0, 1, (0, [], [])),    # a kubelet finishing late: still
    # ...but a pod still Terminating well past its grace period (node lost, a finalizer) no longer blocks its
    # replacement (Deployments do not count terminating pods at all by default, KEP-3973)
    ([pod("a", terminating=True, overdue_s=STUCK + 1)], 1, 0, 1, (1, [], [])),
    ([pod("a", terminating=True, overdue_s=STUCK + 1), pod("b")], 2, 0, 1, (1, [], [])),
    ([pod("a", OLD, terminating=True, overdue_s=STUCK + 1), pod("b", OLD)], 2, 0, 1, (1, [], [])),
    # rolling update, maxSurge 0 / maxUnavailable 1: one old pod at a time
    # (the replacement comes in the pass after the old pod is gone: it holds its GPU until then)
    ([pod("a", OLD)], 1, 0, 1, (0, ["a"], [])),
    ([pod("a", OLD), pod("b", OLD)], 2, 0, 1, (0, ["b"], [])),
    ([pod("a", OLD)], 2, 0, 1, (1, [], [])),                               # scaling up at the same time
    ([pod("a", OLD), pod("n", ready=False)], 2, 0, 1, (0, [], [])),        # wait for the new pod to be ready
    ([pod("a", OLD), pod("n")], 2, 0, 1, (0, ["a"], [])),
    ([pod("a", OLD, ready=False), pod("b", OLD)], 2, 0, 1, (0, ["a"], [])),  # not-ready old pods go first
    # maxSurge 1 / maxUnavailable 0: surge first, delete once the new pod is ready
    ([pod("a", OLD), pod("b", OLD)], 2, 1, 0, (1, [], [])),
    ([pod("a", OLD), pod("b", OLD), pod("n", ready=False)], 2, 1, 0, (0, [], [])),
    ([pod("a", OLD), pod("b", OLD, age_s=5), pod("n")], 2, 1, 0, (0, ["b"], [])),
    # replicas 0 deletes everything
    ([pod("a"), pod("b", OLD)], 0, 0, 1, (0, ["a", "b"], [])),
])
def test_plan(pods: list[dict[str, Any]], replicas: int, surge: int, unavailable: int,
              expected: tuple[int, list[str], list[str]]) -> None:
    create, delete, _ = run(pods, replicas, surge, unavailable)
    assert (create, sorted(delete)) == (expected[0], sorted(expected[1]))


@pytest.mark.parametrize(("pods", "replicas", "replace", "expected"), [
    # a memory / GPU-budget change that cannot be applied in place replaces the pod like a new revision...
    ([pod("a")], 1, {"a": "MemoryChanged: memory request 16Gi -> 24Gi"}, (0, ["a"], ["MemoryChanged"])),
    ([pod("a"), pod("b")], 2, {"a": "GPUBudgetChanged: x", "b": "GPUBudgetChanged: x"},
     (0, ["b"], ["GPUBudgetChanged"])),                                     # ...one step at a time
    ([pod("a"), pod("b", ready=False)], 2, {"a": "MemoryChanged: x"}, (0, [], [])),  # b unavailable: a must stay
    ([pod("a")], 1, {}, (0, [], [])),
])
def test_replace(pods: list[dict[str, Any]], replicas: int, replace: dict[str, str],
                 expected: tuple[int, list[str], list[str]]) -> None:
    assert run(pods, replicas, replace=replace) == expected


@pytest.mark.parametrize(("pods", "expected"), [
    ([pod("a", OLD), pod("n", ready=False)], (0, [], [])),       # paused: the failing new pod stays, old ones too
    ([pod("a", OLD), pod("n", phase="Failed")], (1, ["n"], ["Failed"])),  # failed pods go, and are replaced...
    ([pod("a", OLD)], (1, [], [])),                               # ...as is a pod that went away (evicted)
    ([pod("n", ready=False)], (1, [], [])),
    ([pod("a", OLD), pod("b", OLD, terminating=True)], (0, [], [])),  # its GPU is not free yet
    ([pod("a", OLD), pod("b", OLD, terminating=True, overdue_s=STUCK + 1)], (1, [], [])),
    ([pod("a", OLD), pod("b", OLD), pod("n", ready=False)], (0, [], [])),  # surplus: nothing more is deleted
])
def test_hold(pods: list[dict[str, Any]], expected: tuple[int, list[str], list[str]]) -> None:
    """A paused rollout replaces nothing, but keeps `replicas` pods: the pods it creates are of the revision the
    caller builds them from (the last good one, rollout.Target.fill), not of the revision that failed its gate."""
    assert run(pods, 2, hold=True) == expected


def test_stuck_pods_are_named_when_their_replacement_is_created() -> None:
    stuck = pod("a", terminating=True, overdue_s=STUCK + 1)
    p = plan([stuck, pod("b")], desired_revision=NEW, replicas=2, max_surge=0, max_unavailable=1, now=NOW)
    assert (p.create, p.stuck) == (1, ["a"])
    # The replacement exists: the still-stuck pod is not announced again.
    p = plan([stuck, pod("b"), pod("c", ready=False)], desired_revision=NEW, replicas=2, max_surge=0,
             max_unavailable=1, now=NOW)
    assert (p.create, p.stuck) == (0, [])
    # Surge room created the pod anyway: the stuck pod did not hold anything up, so no Event names it.
    p = plan([stuck, pod("b")], desired_revision=NEW, replicas=2, max_surge=1, max_unavailable=1, now=NOW)
    assert (p.create, p.stuck) == (1, [])


def test_plan_converges_when_replayed() -> None:
    """Apply each plan to a simulated cluster (new pods become ready at once): 3 old pods roll to 3 new ones
    without ever dropping below replicas - maxUnavailable ready pods, and then the plan is empty."""
    pods = [pod(f"old{i}", OLD) for i in range(3)]
    for step in range(20):
        create, delete, _ = run(pods, 3, surge=0, unavailable=1)
        if not create and not delete:
            break
        pods = [p for p in pods if p["metadata"]["name"] not in delete]
        assert sum(1 for p in pods if p["status"]["conditions"][0]["status"] == "True") >= 2
        pods += [pod(f"new{step}-{i}") for i in range(create)]
    assert sorted(p["metadata"]["labels"]["pie.io/template-hash"] for p in pods) == [NEW] * 3


def status(pods: list[dict[str, Any]], replicas: int = 1, previous: dict[str, Any] | None = None,
           now: datetime = NOW, rollout: RolloutState | None = None,
           observations: dict[str, Observation | None] | None = None) -> dict[str, Any]:
    if rollout is None:  # every Ready pod passed its gate
        rollout = RolloutState(revision=NEW, phase=COMPLETE, passed=tuple(
            p["metadata"]["name"] for p in pods if p["status"]["conditions"][0]["status"] == "True"))
    return compute_status(name="tiny", pods=pods, replicas=replicas, desired_revision=NEW, generation=3,
                          selector="pie.io/deployment=tiny", memory={"hostMemoryRequest": "16Gi"},
                          previous=previous or {}, now=now, rollout=rollout, observations=observations)


def conds(st: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}


@pytest.mark.parametrize(("pods", "replicas", "phase", "ready", "expected"), [
    ([pod("a")], 1, "Ready", "1/1", {"Ready": ("True", "AllReplicasReady"),
                                     "Progressing": ("False", "RolloutComplete"),
                                     "Degraded": ("False", "AsExpected")}),
    ([], 2, "Progressing", "0/2", {"Ready": ("False", "ReplicasNotReady"), "Progressing": ("True", "ScalingUp"),
                                   "Degraded": ("False", "AsExpected")}),
    ([pod("a", ready=False)], 1, "Progressing", "0/1", {"Ready": ("False", "ReplicasNotReady"),
                                                         "Progressing": ("True", "WaitingForReady"),
                                                         "Degraded": ("False", "AsExpected")}),
    ([pod("a", OLD), pod("b")], 2, "Progressing", "2/2", {"Ready": ("False", "ReplicasNotReady"),
                                                         "Progressing": ("True", "RollingUpdate"),
                                                         "Degraded": ("False", "AsExpected")}),
    ([pod("a"), pod("b")], 1, "Progressing", "2/1", {"Ready": ("False", "ReplicasNotReady"),
                                                     "Progressing": ("True", "ScalingDown"),
                                                     "Degraded": ("False", "AsExpected")}),
    ([pod("a", ready=False, unschedulable="0/2 nodes are available: Insufficient nvidia.com/gpu")], 1, "Degraded",
     "0/1", {"Ready": ("False", "ReplicasNotReady"), "Progressing": ("True", "WaitingForReady"),
             "Degraded": ("True", "Unschedulable")}),
    ([pod("a", phase="Failed")], 1, "Degraded", "0/1", {"Ready": ("False", "ReplicasNotReady"),
                                                         "Progressing": ("True", "ScalingUp"),
                                                         "Degraded": ("True", "PodFailed")}),
    ([], 0, "Ready", "0/0", {"Ready": ("True", "ScaledToZero"), "Progressing": ("False", "RolloutComplete"),
                             "Degraded": ("False", "AsExpected")}),
])
def test_status(pods: list[dict[str, Any]], replicas: int, phase: str, ready: str,
                expected: dict[str, tuple[str, str]]) -> None:
    st = status(pods, replicas)
    expected = {**expected, "MetricsStale": ("False", "MetricsFresh")}
    assert (st["phase"], st["ready"], conds(st)) == (phase, ready, expected)
    assert st["observedGeneration"] == 3 and all(c["observedGeneration"] == 3 for c in st["conditions"])


@pytest.mark.parametrize(("rollout", "phase", "expected"), [
    (RolloutState(revision=NEW, phase=PAUSED, reason="StepTimeout", message="pod a not Ready after 600s"), "Degraded",
     {"Ready": ("False", "ReplicasNotReady"), "Progressing": ("False", "ProgressDeadlineExceeded"),
      "Degraded": ("True", "StepTimeout")}),
    (RolloutState(revision=NEW, phase=PAUSED, reason="GateFailed", message="engine unhealthy"), "Degraded",
     {"Ready": ("False", "ReplicasNotReady"), "Progressing": ("False", "ProgressDeadlineExceeded"),
      "Degraded": ("True", "GateFailed")}),
    (RolloutState(revision=NEW, phase=COMPLETE), "Progressing",  # Ready but the gate has not passed yet
     {"Ready": ("False", "ReplicasNotReady"), "Progressing": ("True", "WaitingForGate"),
      "Degraded": ("False", "AsExpected")}),
])
def test_status_of_the_rollout(rollout: RolloutState, phase: str, expected: dict[str, tuple[str, str]]) -> None:
    st = status([pod("a")], 1, rollout=rollout)
    assert (st["phase"], {k: v for k, v in conds(st).items() if k != "MetricsStale"}) == (phase, expected)
    if rollout.message:
        assert rollout.message in next(c["message"] for c in st["conditions"] if c["type"] == "Degraded")


def test_metrics_stale_condition() -> None:
    ok = Observation(at=1.0, metrics=EngineMetrics({"pie_expansion_ratio": 1.5, "pie_host_kv_used_bytes": 2**20}))
    st = status([pod("a"), pod("b")], 2, observations={"a": ok, "b": Observation(at=1.0, error="timeout")})
    cond = next(c for c in st["conditions"] if c["type"] == "MetricsStale")
    assert (cond["status"], cond["reason"]) == ("True", "ScrapeFailed") and "pod b: timeout" in cond["message"]
    assert st["phase"] == "Ready"  # stale metrics change nothing, not even the phase
    a, b = st["pods"]
    assert (a["metrics"], a["expansionRatio"], a["hostKVUsed"], b["metrics"]) == ("ok", "1.50", "1Mi", "timeout")


def test_status_fields_and_pod_view() -> None:
    st = status([pod("b", OLD), pod("a", ready=False, memory="20Gi")], replicas=2)
    assert (st["replicas"], st["readyReplicas"], st["updatedReplicas"]) == (2, 1, 1)
    assert (st["currentRevision"], st["updateRevision"]) == (OLD, NEW)
    assert st["pods"] == [
        {"name": "a", "memoryRequest": "20Gi", "gpuMemoryBudget": "0.9", "ready": False, "revision": NEW,
         "gatePassed": False, "metrics": ""},
        {"name": "b", "memoryRequest": "16Gi", "gpuMemoryBudget": "0.9", "ready": True, "revision": OLD,
         "gatePassed": True, "metrics": ""}]


def test_unchanged_world_gives_identical_status() -> None:
    """lastTransitionTime moves only when a condition's status flips, so the operator writes nothing."""
    first = status([pod("a", ready=False)])
    later = status([pod("a", ready=False)], previous=first, now=NOW + timedelta(seconds=30))
    assert later == first
    ready = status([pod("a")], previous=first, now=NOW + timedelta(seconds=60))
    ready_cond = next(c for c in ready["conditions"] if c["type"] == "Ready")
    degraded_cond = next(c for c in ready["conditions"] if c["type"] == "Degraded")
    assert ready_cond["lastTransitionTime"] == "2025-01-01T12:01:00Z"
    assert degraded_cond["lastTransitionTime"] == "2025-01-01T12:00:00Z"


def test_invalid_spec_status() -> None:
    from pie_operator.status import invalid_status

    st = invalid_status("spec.memory: bad", 4, {}, NOW)
    assert st["phase"] == "Invalid" and st["observedGeneration"] == 4
    assert {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]} == {
        "Ready": ("False", "InvalidSpec"), "Progressing": ("False", "InvalidSpec"), "Degraded": ("True", "InvalidSpec")}
    assert all(c["message"] == "spec.memory: bad" for c in st["conditions"])
