"""reconcile() (observe -> decide -> act) against the in-memory fake of `Kube` (fake_kube.py): what a pass writes,
and that an unchanged world makes it write nothing."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from pie_operator import decide as decide_module
from pie_operator import memory
from pie_operator import reconcile as reconcile_module
from pie_operator.actuate import Outcome
from pie_operator.builders import HASH_LABEL, selector_string
from pie_operator.reconcile import reconcile
from pie_operator.scrape import AdminResult
from tests.unit.operator.fake_kube import T0, FakeKube, api_error
from tests.unit.operator.test_spec import spec_with

NS, NAME = "ns", "tiny"


def spec(**patch: Any) -> dict[str, Any]:
    """Two replicas; no engines run here, so the rollout gate is readiness alone."""
    return spec_with(**{"replicas": 2, "rollout.gate.engineHealth": False, **patch})


def pods(kube: FakeKube) -> list[dict[str, Any]]:
    uid = kube.deployments[(NS, NAME)]["metadata"]["uid"]
    return kube.list_pods(NS, selector_string(NAME), uid)


def status(kube: FakeKube) -> dict[str, Any]:
    return kube.deployments[(NS, NAME)].get("status") or {}


def cluster_writes(kube: FakeKube) -> list[tuple[str, str]]:
    """The writes other than Events (their text is status.py's and actuate.py's business)."""
    return [w for w in kube.writes if w[0] != "event"]


def converged(patch: dict[str, Any] | None = None, kube_class: type[FakeKube] = FakeKube, **kw: Any) -> FakeKube:
    """A FakeKube in which tiny has run to completion: pods Ready, rollout Complete, status settled."""
    kube = kube_class(**kw)
    kube.add_deployment(NS, NAME, spec(**(patch or {})))
    for i in range(4):
        reconcile(kube, NS, NAME, now=T0 + timedelta(seconds=i))
        kube.run_pods()
    assert status(kube)["phase"] == "Ready", status(kube)
    kube.clear()
    return kube


def later(seconds: int = 60, **kw: Any) -> dict[str, Any]:
    return {"now": T0 + timedelta(seconds=seconds), **kw}


def test_from_scratch_creates_what_the_spec_says() -> None:
    kube = FakeKube()
    kube.add_deployment(NS, NAME, spec())
    out = reconcile(kube, NS, NAME, now=T0)
    assert out is not None and len(out.created) == 2
    assert cluster_writes(kube) == [("create", "Secret"), ("apply", "Service"), ("apply", "ConfigMap"),
                                    ("apply", "PodDisruptionBudget"), ("create", "Pod"), ("create", "Pod"),
                                    ("patch", "status")]
    st = status(kube)
    assert (st["phase"], st["replicas"], st["readyReplicas"], st["updateRevision"]) == (
        "Progressing", 2, 0, out.revision)
    for pod in pods(kube):
        (c,) = pod["spec"]["containers"]
        assert pod["metadata"]["labels"][HASH_LABEL] == out.revision
        assert c["resources"]["requests"]["memory"] == "16Gi" and "0.9" in c["args"]
    assert ("Normal", "CreatedPod") in [(t, r) for t, r, _ in kube.events]

    kube.run_pods()
    reconcile(kube, NS, NAME, now=T0 + timedelta(seconds=5))
    st = status(kube)
    assert (st["phase"], st["ready"], st["rollout"]["phase"]) == ("Ready", "2/2", "Complete")


def test_unchanged_world_makes_no_write() -> None:
    kube = converged()
    out = reconcile(kube, NS, NAME, **later())
    assert out is not None and not out.status_written
    assert kube.writes == []


def test_owned_object_drift_is_repaired() -> None:
    kube = converged()
    kube.objects[("Service", NS, NAME)]["spec"]["ports"][0]["port"] = 9999  # someone edited it
    reconcile(kube, NS, NAME, **later())
    assert cluster_writes(kube) == [("apply", "Service")]
    assert kube.objects[("Service", NS, NAME)]["spec"]["ports"][0]["port"] == 8000


SPEC_CHANGES = [  # (spec patch, the writes of the next pass)
    ({"replicas": 3}, [("create", "Pod"), ("patch", "status")]),
    ({"replicas": 1}, [("delete", "*"), ("patch", "status")]),
    # A new memory floor: both pods resized in place; the ConfigMap shows the new request.
    ({"memory.hostMemory": {"min": "32Gi"}, "memory.headroom": "0"},
     [("apply", "ConfigMap"), ("resize", "*"), ("resize", "*"), ("patch", "status")]),
    # A new revision: one pod at a time (maxUnavailable 1, maxSurge 0: its replacement once it is gone).
    ({"engine.image": "pie-engine:0.2.0"}, [("apply", "ConfigMap"), ("delete", "*"), ("patch", "status")]),
    ({"service.port": 9000}, [("apply", "Service"), ("patch", "status")]),
]


@pytest.mark.parametrize(("patch", "expected"), SPEC_CHANGES, ids=[str(p) for p, _ in SPEC_CHANGES])
def test_spec_change_makes_exactly_the_expected_writes(patch: dict[str, Any],
                                                       expected: list[tuple[str, str]]) -> None:
    kube = converged()
    kube.set_spec(NS, NAME, spec(**patch))
    reconcile(kube, NS, NAME, **later())
    assert [(verb, "*" if verb in ("delete", "resize") else what) for verb, what in cluster_writes(kube)] == expected


def test_decide_runs_once_per_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    kube = converged()
    kube.set_spec(NS, NAME, spec(**{"memory.hostMemory": {"min": "32Gi"}, "replicas": 3}))
    calls = {"plan": 0, "memory": 0}

    def counting(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(reconcile_module, "decide", counting("plan", decide_module.decide))
    monkeypatch.setattr(memory, "decide", counting("memory", memory.decide))
    out = reconcile(kube, NS, NAME, **later())
    assert out is not None and out.created and out.resized
    assert calls == {"plan": 1, "memory": 1}


@pytest.mark.parametrize("method", ["list_pods", "apply"])  # (a refused create_pod: test_reconcile_faults.py)
def test_api_error_is_a_status_condition(method: str) -> None:
    kube = converged()
    kube.set_spec(NS, NAME, spec(replicas=3))
    kube.fail[method] = api_error(403, "Forbidden", f"{method} is forbidden")
    if method == "apply":
        kube.set_spec(NS, NAME, spec(replicas=3, **{"service.port": 9000}))
    with pytest.raises(ApiException):
        reconcile(kube, NS, NAME, **later())
    st = status(kube)
    degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
    assert (st["phase"], degraded["status"], degraded["reason"]) == ("Degraded", "True", "ApiError")
    assert f"403 Forbidden: {method} is forbidden" in degraded["message"]
    assert ("Warning", "ApiError") in [(t, r) for t, r, _ in kube.events]

    del kube.fail[method]  # the API answers again: the next pass clears it
    reconcile(kube, NS, NAME, **later(61))
    degraded = next(c for c in status(kube)["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("False", "AsExpected")


def test_invalid_spec_touches_nothing_but_status() -> None:
    kube = converged()
    kube.set_spec(NS, NAME, spec(**{"memory.hostMemory": {"min": "64Gi", "max": "32Gi"}}))
    reconcile(kube, NS, NAME, **later())
    assert cluster_writes(kube) == [("patch", "status")]
    assert status(kube)["phase"] == "Invalid" and len(pods(kube)) == 2


def test_gone_or_deleting_deployment_is_left_to_garbage_collection() -> None:
    kube = FakeKube()
    assert reconcile(kube, NS, NAME) is None
    kube.add_deployment(NS, NAME, spec())["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    assert reconcile(kube, NS, NAME) is None and kube.writes == []


class Engines:
    """The engines' admin endpoint: answers `result` to every POST and records them."""

    def __init__(self, result: AdminResult) -> None:
        self.result = result
        self.calls: list[tuple[str, int]] = []
        self.ports: set[int] = set()

    def __call__(self, ip: str, port: int, token: str, budget: int) -> AdminResult:
        assert token == "fake-token"
        self.calls.append((ip, budget))
        self.ports.add(port)
        return self.result


BOTH = {"rollout.maxUnavailable": 2}  # live budget changes reach maxUnavailable engines per pass: here both


def gpu_change(result: AdminResult) -> tuple[FakeKube, Engines, Outcome]:
    kube = converged(BOTH)
    kube.set_spec(NS, NAME, spec(**BOTH, **{"memory.gpuMemoryBudget": "8Gi"}))
    engines = Engines(result)
    out = reconcile(kube, NS, NAME, set_budget=engines, **later())
    assert out is not None and len(engines.calls) == 2 and {b for _, b in engines.calls} == {8 * 2**30}
    assert engines.ports == {8001}  # the admin port (engine.adminPort's default), never the public one
    return kube, engines, out


def test_gpu_budget_applied_live() -> None:
    kube, _, out = gpu_change(AdminResult(True, False, "applied live"))
    assert not out.requeue and sorted(out.gpu_live) == sorted(p["metadata"]["name"] for p in pods(kube))
    assert cluster_writes(kube) == [("apply", "ConfigMap"), ("patch", "status")]
    st = status(kube)
    assert {(p["gpuMemoryBudget"], p["gpuBudgetLive"]) for p in st["pods"]} == {("8Gi", True)}
    assert {d["via"] for d in st["decisions"]} == {"live (engine admin endpoint)"}


def test_gpu_budget_the_engine_cannot_take_live_replaces_the_pod() -> None:
    kube, engines, out = gpu_change(AdminResult(False, True, "409: needs a restart"))
    # The plan assumed live: the pass ends with the answers in status and asks to be decided again.
    assert out.requeue and cluster_writes(kube) == [("patch", "status")]
    assert {p["gpuBudgetRestart"] for p in status(kube)["pods"]} == {"8Gi"}
    kube.clear()
    engines.calls.clear()
    out2 = reconcile(kube, NS, NAME, set_budget=engines, **later(61))
    assert out2 is not None and not out2.requeue and engines.calls == []  # not asked again
    assert [w[0] for w in cluster_writes(kube)] == ["apply", "delete", "delete", "patch"]  # maxUnavailable 2
    assert ("Normal", "DeletedGPUBudgetChanged") in [(t, r) for t, r, _ in kube.events]


def test_gpu_budget_the_engine_rejects_is_not_forced() -> None:
    kube, engines, out = gpu_change(AdminResult(False, False, "400: too small", rejected=True))
    assert out.requeue and {p["gpuBudgetRejected"] for p in status(kube)["pods"]} == {"8Gi"}
    kube.clear()
    engines.calls.clear()
    reconcile(kube, NS, NAME, set_budget=engines, **later(61))
    # Nothing is sent again and no pod replaced; the ConfigMap and status.memory say what new pods get (the spec's).
    assert engines.calls == [] and [w[0] for w in cluster_writes(kube)] == ["apply", "patch"]
    assert len(pods(kube)) == 2
    kube.clear()
    reconcile(kube, NS, NAME, set_budget=engines, **later(62))
    assert engines.calls == [] and kube.writes == []


def test_reconciler_runs_requeued_passes_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from pie_operator import handlers

    answers = [Outcome(requeue=True), Outcome(requeue=True), Outcome()]
    monkeypatch.setattr(handlers, "reconcile", lambda *a, **kw: answers.pop(0))
    assert asyncio.run(handlers.Reconciler(FakeKube()).run(NS, NAME, coalesce=False)) is not None
    assert answers == []

    calls: list[Outcome] = []

    def always(*args: Any, **kwargs: Any) -> Outcome:
        calls.append(Outcome(requeue=True))
        return calls[-1]

    monkeypatch.setattr(handlers, "reconcile", always)
    asyncio.run(handlers.Reconciler(FakeKube()).run(NS, NAME, coalesce=False))
    assert len(calls) == 1 + handlers.REQUEUES  # bounded: the triggers (resync, scrapes) bring the next ones
