"""Live GPU budget changes over whole passes (reconcile against fake_kube.py, the engines' answers scripted): gated
one engine at a time, and an engine that is busy or failing for a moment is asked again later, never replaced."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pie_operator.observe import Observations
from pie_operator.reconcile import reconcile
from pie_operator.scrape import REQUIRED, AdminResult, EngineMetrics, Observation
from pie_operator.tuning import TS
from tests.unit.operator.fake_kube import T0, FakeKube
from tests.unit.operator.test_reconcile import NAME, NS, cluster_writes, converged, later, pods, spec, status

APPLIED = AdminResult(True, False, "applied live")
BUSY = AdminResult(False, False, "409: an unfinished request needs 58 blocks", busy=True)
BOOM = AdminResult(False, False, "500: boom")


class Engines:
    """The admin endpoint of every engine: answers from `answers` in turn (the last one repeats)."""

    def __init__(self, *answers: AdminResult) -> None:
        self.answers: list[AdminResult] = list(answers)
        self.calls: list[str] = []

    def __call__(self, ip: str, port: int, token: str, budget: int) -> AdminResult:
        self.calls.append(ip)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def budget_change(**patch: Any) -> tuple[FakeKube, Observations]:
    kube = converged(patch)
    kube.set_spec(NS, NAME, spec(**patch, **{"memory.gpuMemoryBudget": "8Gi"}))
    return kube, Observations()


def scraped_healthy(store: Observations, at: float) -> None:
    """A scrape round: every registered engine answered /health and /metrics at `at` (unix seconds)."""
    obs = Observation(at=at, metrics=EngineMetrics(dict.fromkeys(REQUIRED, 0.0)))
    for key, _, targets in store.targets():
        for target in targets:
            store.record(key, target, obs)


def at(seconds: int) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime(TS)


def pod_status(kube: FakeKube) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in status(kube)["pods"]}


def test_live_changes_go_one_engine_at_a_time_each_after_the_previous_is_healthy() -> None:
    kube, store = budget_change()
    engines = Engines(APPLIED)
    first, second = sorted(p["status"]["podIP"] for p in pods(kube))
    reconcile(kube, NS, NAME, set_budget=engines, observations=store, **later(60))
    assert engines.calls == [first]
    # Not yet scraped since its change: the next engine waits, whatever the number of passes.
    for s in (61, 62, 90):
        reconcile(kube, NS, NAME, set_budget=engines, observations=store, **later(s))
    assert engines.calls == [first]
    scraped_healthy(store, (T0.timestamp() + 95))
    reconcile(kube, NS, NAME, set_budget=engines, observations=store, **later(96))
    assert engines.calls == [first, second]
    assert {p["gpuMemoryBudget"] for p in pod_status(kube).values()} == {"8Gi"}


def test_a_busy_engine_is_asked_again_later_and_never_replaced() -> None:
    kube, store = budget_change()
    engines = Engines(BUSY, APPLIED)
    out = reconcile(kube, NS, NAME, set_budget=engines, observations=store, **later(60))
    assert out is not None and not out.requeue and len(engines.calls) == 1
    (waiting,) = [p for p in pod_status(kube).values() if p.get("gpuBudgetWaiting")]
    assert "busy" in waiting["gpuBudgetWaiting"] and waiting["gpuBudgetAttempts"] == 1
    assert waiting["gpuBudgetRetryAt"] == at(65)  # 5 s after the first try
    reconcile(kube, NS, NAME, set_budget=engines, observations=store, **later(62))  # backing off: not asked
    assert len(engines.calls) == 1
    reconcile(kube, NS, NAME, set_budget=engines, observations=store, **later(66))
    assert len(engines.calls) == 2
    entry = pod_status(kube)[waiting["name"]]
    assert entry["gpuMemoryBudget"] == "8Gi" and "gpuBudgetWaiting" not in entry and "gpuBudgetAttempts" not in entry
    assert not any(w[0] in ("delete", "create") for w in cluster_writes(kube))
    assert len(pods(kube)) == 2


def test_a_failing_engine_backs_off_exponentially_and_is_never_replaced() -> None:
    """A 5xx / timeout while the spec wants the change used to roll the pod: only a definite answer rolls now."""
    kube, store = budget_change()
    engines = Engines(BOOM)
    retry_at = []
    for s in range(60, 120):
        reconcile(kube, NS, NAME, set_budget=engines, observations=store, **later(s))
        retry_at += [p["gpuBudgetRetryAt"] for p in pod_status(kube).values() if p.get("gpuBudgetRetryAt")]
    # tries at 60, 65, 75 and 95 s: 5, 10, 20, then 40 s apart
    assert len(engines.calls) == 4 and sorted(set(retry_at)) == [at(65), at(75), at(95), at(135)]
    assert not any(w[0] in ("delete", "create") for w in cluster_writes(kube))
    assert not any(p.get("gpuBudgetRestart") for p in pod_status(kube).values())
