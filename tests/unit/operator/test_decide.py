"""Table tests of the pure decide(): a Snapshot of a world in, the plan of one pass out (no Kube, no clock).

Worlds are built by running reconcile on the fake Kube (fake_kube.py) and reading them back with snapshot.observe;
each case then changes one thing in the snapshot."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from pie_operator.decide import ReconcilePlan, decide
from pie_operator.observe import PodView
from pie_operator.planning import Pod
from pie_operator.scrape import Observation
from pie_operator.snapshot import Snapshot, observe
from pie_operator.tuning import GPU_REJECTED, GPU_RESTART
from tests.unit.operator.fake_kube import T0, FakeKube
from tests.unit.operator.test_reconcile import NAME, NS, converged, spec

NOW = T0 + timedelta(minutes=5)
Change = Callable[[Snapshot], Snapshot]


def world(patch: dict[str, Any] | None = None, **kw: Any) -> Snapshot:
    """tiny converged (2 Ready pods, rollout Complete), read back as decide() sees it; `patch`: the spec now."""
    kube = converged(**kw)
    if patch is not None:
        kube.set_spec(NS, NAME, spec(**patch))
    body = kube.get_deployment(NS, NAME)
    assert body is not None
    return observe(kube, body, now=NOW, observations=None)


def with_pods(snap: Snapshot, change: Callable[[Pod], None], first_only: bool = True) -> Snapshot:
    pods = copy.deepcopy(snap.pods)
    for p in pods[:1] if first_only else pods:
        change(p)
    return replace(snap, pods=pods)


def with_status_pods(snap: Snapshot, **fields: Any) -> Snapshot:
    body = copy.deepcopy(snap.body)
    for entry in body["status"]["pods"]:
        entry.update(fields)
    return replace(snap, body=body)


def fresh() -> Snapshot:
    kube = FakeKube()
    body = kube.add_deployment(NS, NAME, spec())
    return observe(kube, body, now=NOW, observations=None)


def failed(p: Pod) -> None:
    p["status"]["phase"] = "Failed"


def stale(snap: Snapshot) -> Snapshot:
    name = snap.pods[0]["metadata"]["name"]
    return replace(snap, views={name: PodView(Observation(NOW.timestamp(), error="timeout"))})


def summary(plan: ReconcilePlan) -> dict[str, Any]:
    """The plan without pod names and rendered objects."""
    return {"secret": plan.admin_secret is not None, "apply": [o["kind"] for o in plan.apply],
            "create": plan.steps.create, "delete": [d.reason for d in plan.steps.delete],
            "gpu": [(g.change.reason, g.bytes) for g in plan.gpu], "recorded": [r.via for r in plan.recorded],
            "memory": [(m.record.reason, m.record.via, m.resize) for m in plan.memory],
            "events": [e.reason for e in plan.events]}


NOTHING = {"secret": False, "apply": [], "create": 0, "delete": [], "gpu": [], "recorded": [], "memory": [],
           "events": []}
GiB = 2**30
FLOOR = {"memory.hostMemory": {"min": "32Gi"}, "memory.headroom": "0"}
CASES: list[tuple[str, Callable[[], Snapshot], dict[str, Any]]] = [
    ("fresh object: everything is created", fresh,
     {"secret": True, "apply": ["Service", "ConfigMap", "PodDisruptionBudget"], "create": 2}),
    ("converged: nothing to do", world, {}),
    ("a Failed pod is deleted and replaced", lambda: with_pods(world(), failed),
     {"delete": ["Failed"], "create": 1}),
    ("scale up", lambda: world({"replicas": 3}), {"create": 1}),
    ("scale down", lambda: world({"replicas": 1}), {"delete": ["ScaledDown"]}),
    ("new revision: one pod at a time", lambda: world({"engine.image": "pie-engine:0.2.0"}),
     {"apply": ["ConfigMap"], "delete": ["Outdated"]}),
    ("new memory floor: resized in place", lambda: world(FLOOR),
     {"apply": ["ConfigMap"], "memory": [("Bounds", "InPlace", ("48Gi", None))] * 2}),
    ("new memory floor, no pods/resize: rolled", lambda: world(FLOOR, resize=False),
     {"apply": ["ConfigMap"], "delete": ["MemoryChanged"],
      "memory": [("Bounds", "Rolling (in-place resize unsupported by the cluster)", None)] * 2}),
    ("new GPU budget: live, one engine per pass (maxUnavailable 1)", lambda: world({"memory.gpuMemoryBudget": "8Gi"}),
     {"apply": ["ConfigMap"], "gpu": [("Spec", 8 * GiB)]}),
    ("new GPU budget, maxUnavailable 2: live on both",
     lambda: world({"memory.gpuMemoryBudget": "8Gi", "rollout.maxUnavailable": 2}),
     {"apply": ["ConfigMap", "PodDisruptionBudget"], "gpu": [("Spec", 8 * GiB)] * 2}),
    ("a GPU budget fraction of an unknown GPU: rolled", lambda: world({"memory.gpuMemoryBudget": "0.8"}),
     {"apply": ["ConfigMap"], "delete": ["GPUBudgetChanged"],
      "recorded": ["Rolling (the budget is a fraction and the GPU size is unknown)"] * 2}),
    ("the engines said they need a restart: rolled, not asked again",
     lambda: with_status_pods(world({"memory.gpuMemoryBudget": "8Gi"}), **{GPU_RESTART: "8Gi"}),
     {"apply": ["ConfigMap"], "delete": ["GPUBudgetChanged"]}),
    ("the engines rejected the budget: not sent again",
     lambda: with_status_pods(world({"memory.gpuMemoryBudget": "8Gi"}), **{GPU_REJECTED: "8Gi"}),
     {"apply": ["ConfigMap"]}),
    ("stale metrics: one Event, no decision", lambda: stale(world()), {"events": ["MetricsStale"]}),
]


@pytest.mark.parametrize(("make", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decide(make: Callable[[], Snapshot], expected: dict[str, Any]) -> None:
    assert summary(decide(make())) == {**NOTHING, **expected}


def test_invalid_spec_plans_nothing() -> None:
    snap = replace(world(), spec=None, invalid="spec.replicas: bad")
    assert decide(snap) == ReconcilePlan(invalid="spec.replicas: bad")


def test_answers_about_budgets_no_longer_decided_are_dropped() -> None:
    snap = with_status_pods(world(), **{GPU_RESTART: "4Gi", GPU_REJECTED: "2Gi"})
    plan = decide(snap)
    assert summary(plan) == NOTHING
    assert {k: v for m in plan.memo.values() for k, v in m.items()} == {GPU_RESTART: "", GPU_REJECTED: ""}


def test_decide_is_pure() -> None:
    snap = world({"replicas": 3, "memory.hostMemory": {"min": "32Gi"}})
    before = copy.deepcopy(snap)
    assert decide(snap) == decide(snap) and snap == before
