"""The operator's own /metrics (exporter.py): what each pass sets per PieDeployment, and what KEDA would read."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pie_operator.autoscale import PodLoad
from pie_operator.exporter import Exporter
from pie_operator.handlers import Reconciler
from pie_operator.scaling import Scaling
from pie_operator.spec_autoscaling import MAX_SAMPLE_AGE
from tests.unit.operator.fake_kube import FakeKube
from tests.unit.operator.test_reconcile import NAME, NS, spec
from tests.unit.operator.test_reconcile_autoscale import World, engine

NOW = 1_000.0
KEY = ("ns", "llama")


def value(e: Exporter, metric: str, key: tuple[str, str] = KEY) -> float | None:
    return e.registry.get_sample_value(metric, {"namespace": key[0], "name": key[1]})


def load(name: str, waiting: int = 0, exhausted: bool = True, at: float | None = NOW - 5, **kw: Any) -> PodLoad:
    return PodLoad(name, ready=True, waiting=waiting, expansion_exhausted=exhausted, at=at, **kw)


def test_a_pass_sets_the_signals_over_fresh_serving_pods() -> None:
    e = Exporter()
    loads = (load("a", 6, ttft_p95=0.4, tpot_p95=0.03), load("b", 2, exhausted=False, ttft_p95=0.9),
             load("c", 50, draining=True), load("d", 50, at=NOW - MAX_SAMPLE_AGE - 1), load("e", 50, at=None))
    e.update(KEY, Scaling(3, loads=loads, recommended=4), NOW)
    assert value(e, "pie_operator_desired_replicas") == 3 and value(e, "pie_operator_recommended_replicas") == 4
    assert value(e, "pie_operator_scraped_replicas") == 2  # draining, stale and unscraped pods are not evidence
    assert value(e, "pie_operator_queue_depth") == 4.0
    assert value(e, "pie_operator_expansion_exhausted_replicas") == 1
    assert (value(e, "pie_operator_ttft_p95_seconds"), value(e, "pie_operator_tpot_p95_seconds")) == (0.9, 0.03)
    e.update(KEY, Scaling(3, loads=(load("a"), load("b")), recommended=2), NOW)
    assert value(e, "pie_operator_ttft_p95_seconds") is None  # none measured now: no series, not a stale one
    assert value(e, "pie_operator_queue_depth") == 0.0 and value(e, "pie_operator_recommended_replicas") == 2


def test_a_deployment_that_is_gone_loses_its_series_and_only_its_own() -> None:
    e = Exporter()
    other = ("ns", "other")
    for key in (KEY, other):
        e.update(key, Scaling(2, loads=(load("a", ttft_p95=0.1),), recommended=2), NOW)
    e.forget(KEY)
    assert value(e, "pie_operator_desired_replicas") is None and value(e, "pie_operator_ttft_p95_seconds") is None
    assert value(e, "pie_operator_desired_replicas", other) == 2


@pytest.mark.parametrize(("enabled", "desired"), [(True, 2), (False, 1)])
def test_reconcile_exports_what_the_policy_wants_with_or_without_the_operator_acting(enabled: bool,
                                                                                    desired: int) -> None:
    """With autoscaling off (KEDA on the scale subresource) the knobs still say what the policy wants, memory first:
    pie_operator_recommended_replicas is what a ScaledObject with AverageValue 1 scales to."""
    w = World(maxReplicas=4, enabled=enabled, scaleUp={"windowSeconds": 0})
    w.exporter = e = Exporter()
    key = (NS, NAME)
    w.scrape(engine(waiting=10, headroom=2))  # the engine can still expand: memory first, no replica wanted
    w.run()
    assert (value(e, "pie_operator_recommended_replicas", key), value(e, "pie_operator_queue_depth", key)) == (1, 10)
    w.scrape(engine(waiting=10))  # exhausted: ceil(1 x 10 / 4) = 3
    w.run()
    assert value(e, "pie_operator_recommended_replicas", key) == 3
    assert value(e, "pie_operator_desired_replicas", key) == desired  # off: spec.replicas, which KEDA would set


def test_the_reconciler_forgets_a_deleted_deployment() -> None:
    kube, e = FakeKube(), Exporter()
    kube.add_deployment(NS, NAME, spec())
    asyncio.run(Reconciler(kube, exporter=e).run(NS, NAME, coalesce=False))
    assert value(e, "pie_operator_desired_replicas", (NS, NAME)) == 2
    del kube.deployments[(NS, NAME)]
    asyncio.run(Reconciler(kube, exporter=e).run(NS, NAME, coalesce=False))
    assert value(e, "pie_operator_desired_replicas", (NS, NAME)) is None
