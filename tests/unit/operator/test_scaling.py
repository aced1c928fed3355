"""scaling.py, pure: the replica side of one pass from (spec, pods, scrapes, status.autoscaling, now)."""

from __future__ import annotations

from typing import Any

import pytest

from pie_operator.observe import PodView
from pie_operator.scaling import CONFLICT_HOLD, DRAIN_TIMEOUT, DRAINED, scale
from pie_operator.scrape import REQUIRED, EngineMetrics, Observation
from pie_operator.spec import PieDeploymentSpec
from pie_operator.tuning import ts
from tests.unit.operator.test_spec import spec_with

NOW = 1_700_000_000.0
AUTO = {"enabled": True, "maxReplicas": 4, "scaleDown": {"drainTimeoutSeconds": 300}}


def spec(replicas: int = 2, **autoscaling: Any) -> PieDeploymentSpec:
    return PieDeploymentSpec.model_validate(spec_with(replicas=replicas, autoscaling={**AUTO, **autoscaling}))


def pod(name: str, ready: bool = True, terminating: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": f"uid-{name}"}
    if terminating:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"conditions": [{"type": "Ready", "status": str(ready)}]}}


def view(at: float, running: int = 0, waiting: int = 0) -> PodView:
    m = EngineMetrics({**dict.fromkeys(REQUIRED, 0.0), "pie_expansion_ratio": 1.0, "pie_kv_cache_usage_perc": 0.95,
                       "pie_num_requests_running": running, "pie_num_requests_waiting": waiting})
    return PodView(last=Observation(at, metrics=m), last_ok=Observation(at, metrics=m))


def draining(pod_name: str, ago: float) -> dict[str, Any]:
    return {"desiredReplicas": 1, "specReplicas": 2, "draining": [{"pod": pod_name, "since": ts(NOW - ago)}]}


def test_off_it_is_spec_replicas_and_no_status() -> None:
    s = scale(spec(3, enabled=False), [pod("a")], {}, {"desiredReplicas": 1}, evaluated_at=None, now=NOW)
    assert (s.replicas, s.status, s.conflict, s.evaluated) == (3, None, None, False)


def test_it_starts_where_spec_replicas_is_and_keeps_its_own_count_after() -> None:
    first = scale(spec(2), [pod("a"), pod("b")], {}, None, evaluated_at=None, now=NOW)
    assert first.replicas == 2 and first.status is not None and first.status["specReplicas"] == 2
    assert first.decision is not None and first.decision.reason == "NoMetrics"  # nothing scraped: no change
    later = scale(spec(2), [pod("a"), pod("b"), pod("c")], {}, {"desiredReplicas": 3, "specReplicas": 2},
                  evaluated_at=None, now=NOW)
    assert later.replicas == 3 and later.conflict is not None and not later.conflict[0]


@pytest.mark.parametrize(("pods", "views", "ago", "deleted"), [
    # scraped DRAIN_SETTLE after the label went, with nothing running or waiting: deleted
    ([pod("a"), pod("b")], {"b": view(NOW - 5)}, 20, DRAINED),
    # idle, but scraped before the endpoints could drop it: not yet
    ([pod("a"), pod("b")], {"b": view(NOW - 15)}, 20, None),
    ([pod("a"), pod("b")], {"b": view(NOW - 5, running=1)}, 20, None),
    ([pod("a"), pod("b")], {"b": view(NOW - 5, waiting=1)}, 20, None),
    ([pod("a"), pod("b")], {}, 20, None),  # never scraped: waits ...
    ([pod("a"), pod("b")], {}, 300, DRAIN_TIMEOUT),  # ... until the timeout
    ([pod("a"), pod("b")], {"b": view(NOW - 5, running=2)}, 301, DRAIN_TIMEOUT),
    ([pod("a"), pod("b", ready=False)], {}, 1, DRAINED),  # not Ready: nothing routes to it
])
def test_a_draining_pod_is_deleted_once_drained_or_timed_out(pods: list[dict[str, Any]], views: dict[str, PodView],
                                                            ago: float, deleted: str | None) -> None:
    s = scale(spec(), pods, views, draining("b", ago), evaluated_at=None, now=NOW)
    assert s.draining == frozenset({"b"}) and s.replicas == 1
    assert [(d.name, d.uid, d.reason) for d in s.delete] == ([] if deleted is None else [("b", "uid-b", deleted)])


def test_a_draining_pod_that_is_gone_is_forgotten() -> None:
    s = scale(spec(), [pod("a"), pod("b", terminating=True)], {}, draining("b", 20), evaluated_at=None, now=NOW)
    assert s.draining == frozenset() and s.delete == () and s.status is not None and s.status["draining"] == []


@pytest.mark.parametrize(("previous", "spec_replicas", "conflict"), [
    ({"desiredReplicas": 1, "specReplicas": 1}, 1, False),
    ({"desiredReplicas": 1, "specReplicas": 1}, 3, True),  # changed just now
    ({"desiredReplicas": 1, "specReplicas": 3, "conflictAt": ts(NOW - 60)}, 3, True),  # within the hold
    ({"desiredReplicas": 1, "specReplicas": 3, "conflictAt": ts(NOW - CONFLICT_HOLD)}, 3, False),
])
def test_someone_else_changing_spec_replicas_is_a_conflict_for_a_while(previous: dict[str, Any], spec_replicas: int,
                                                                       conflict: bool) -> None:
    s = scale(spec(spec_replicas), [pod("a")], {}, previous, evaluated_at=None, now=NOW)
    assert s.replicas == 1 and s.conflict is not None and s.conflict[0] is conflict
    assert s.status is not None and s.status["specReplicas"] == spec_replicas  # said once, not again next pass

