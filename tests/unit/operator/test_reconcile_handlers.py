"""How reconciles are triggered at scale (handlers.py): the pod watch is filtered by the apiserver, PieDeployments
are reconciled concurrently (bounded), and a pass whose pod creation backs off gets its retry."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import kopf
import pytest
from kopf._cogs.structs.references import Resource

from pie_operator import handlers
from pie_operator.actuate import Outcome
from pie_operator.builders import DEPLOYMENT_LABEL
from pie_operator.observe import ScrapeSettings
from tests.unit.operator.fake_kube import FakeKube
from tests.unit.operator.test_reconcile import spec

PODS = Resource(group="", version="v1", plural="pods", kind="Pod", namespaced=True)


def test_the_pod_watch_asks_the_apiserver_for_our_pods_only() -> None:
    settings = kopf.OperatorSettings()
    memo = kopf.Memo(kube=FakeKube(), reconciler=handlers.Reconciler(FakeKube()), namespaces=["ns"],
                     resync_seconds=3600.0, scrape=ScrapeSettings(interval=3600.0))

    async def start() -> None:
        await handlers.configure(settings=settings, memo=memo)
        await handlers.stop_resync(memo=memo)

    asyncio.run(start())
    assert list(settings.watching.label_selectors.collect(PODS)) == [DEPLOYMENT_LABEL]


def fleet(n: int) -> FakeKube:
    kube = FakeKube()
    for i in range(n):
        kube.add_deployment("ns", f"d{i}", spec())
    return kube


def test_resync_reconciles_deployments_concurrently(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three passes that each wait for the other two: a serial resync would never get past the first."""
    together = threading.Barrier(3, timeout=30)

    def meet(*args: Any, **kwargs: Any) -> Outcome:
        together.wait()
        return Outcome()

    monkeypatch.setattr(handlers, "reconcile", meet)
    kube = fleet(3)
    memo = kopf.Memo(kube=kube, reconciler=handlers.Reconciler(kube), namespaces=None)
    asyncio.run(handlers.resync_once(memo))
    assert not together.broken


def test_concurrency_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    lock, running, peak = threading.Lock(), [0], [0]

    def slow(*args: Any, **kwargs: Any) -> Outcome:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        threading.Event().wait(0.05)
        with lock:
            running[0] -= 1
        return Outcome()

    monkeypatch.setattr(handlers, "reconcile", slow)
    reconciler = handlers.Reconciler(FakeKube(), concurrency=2)
    asyncio.run(reconciler.run_all([("ns", f"d{i}") for i in range(8)], "test"))
    assert peak[0] == 2


def test_one_failing_deployment_does_not_stop_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    done: list[str] = []

    def flaky(kube: Any, namespace: str, name: str, **kwargs: Any) -> Outcome:
        if name == "d0":
            raise RuntimeError("boom")
        done.append(name)
        return Outcome()

    monkeypatch.setattr(handlers, "reconcile", flaky)
    asyncio.run(handlers.Reconciler(FakeKube()).run_all([("ns", f"d{i}") for i in range(3)], "test"))
    assert sorted(done) == ["d1", "d2"]


def test_a_backed_off_creation_is_retried_when_its_wait_is_over(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [Outcome(retry_after=0.05), Outcome(retry_after=0.05), Outcome()]
    calls: list[str] = []

    def answer(kube: Any, namespace: str, name: str, **kwargs: Any) -> Outcome:
        calls.append(name)
        return answers.pop(0)

    monkeypatch.setattr(handlers, "reconcile", answer)

    async def go() -> None:
        reconciler = handlers.Reconciler(FakeKube())
        await reconciler.run("ns", "d", coalesce=False)
        for _ in range(400):  # nothing else triggers a pass here: only the scheduled retries can
            if not answers:
                break
            await asyncio.sleep(0.025)
        await asyncio.sleep(0.2)  # the last pass asked for no retry: none comes

    asyncio.run(go())
    assert calls == ["d", "d", "d"]
