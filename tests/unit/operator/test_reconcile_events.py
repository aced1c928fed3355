"""Status writes and condition Events (actuate.write_status, status.condition_events), against a recording stand-in
for the two `Kube` methods they use."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from pie_operator.actuate import write_status
from pie_operator.status import api_error_status


class RecordingKube:
    """Records what reconcile would send to the apiserver."""

    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.events: list[tuple[str, str]] = []

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.patches.append(status)

    def post_event(self, owner: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason))


BODY = {"apiVersion": "pie.io/v1alpha1", "kind": "PieDeployment",
        "metadata": {"name": "tiny", "namespace": "ns", "uid": "u"}}


def st(ready: tuple[str, str], progressing: tuple[str, str], degraded: tuple[str, str] = ("False", "AsExpected"),
       stale: tuple[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    kinds = [("Ready", ready), ("Progressing", progressing), ("Degraded", degraded)]
    kinds += [("MetricsStale", stale)] if stale else []
    conds = [{"type": t, "status": s, "reason": r, "message": "m", "lastTransitionTime": "2025-01-01T00:00:00Z"}
             for t, (s, r) in kinds]
    return {"phase": "x", "conditions": conds, **extra}


READY = st(("True", "AllReplicasReady"), ("False", "RolloutComplete"))


@pytest.mark.parametrize(("previous", "new", "written", "events"), [
    (READY, READY, False, []),                                           # unchanged: no write at all
    ({**READY, "kopf": {"x": 1}}, READY, False, []),                     # kopf's own field is not ours to compare
    (READY, {**READY, "replicas": 3}, True, []),                         # a change without a condition flip
    ({}, READY, True, []),                                               # first healthy status is not news
    ({}, st(("False", "ReplicasNotReady"), ("True", "ScalingUp")), True, []),  # a fresh object scaling up
    (READY, st(("False", "ReplicasNotReady"), ("True", "ScalingUp")), True,
     [("Normal", "ReplicasNotReady"), ("Normal", "ScalingUp")]),         # scaling up: readiness drop expected
    (READY, st(("False", "ReplicasNotReady"), ("True", "WaitingForReady")), True,
     [("Warning", "ReplicasNotReady"), ("Normal", "WaitingForReady")]),  # a pod lost readiness on its own
    (READY, st(("False", "ReplicasNotReady"), ("False", "ProgressDeadlineExceeded"), ("True", "StepTimeout")), True,
     [("Warning", "ReplicasNotReady"), ("Warning", "ProgressDeadlineExceeded"), ("Warning", "StepTimeout")]),
    ({}, st(("False", "InvalidSpec"), ("False", "InvalidSpec"), ("True", "InvalidSpec")), True,
     [("Warning", "InvalidSpec")]),                                      # one Event per reason
    (READY, st(("True", "AllReplicasReady"), ("False", "RolloutComplete"), stale=("True", "ScrapeFailed")), True,
     []),                                                                # stale metrics: Events per pod, not here
    (READY, st(("True", "AllReplicasReady"), ("False", "RolloutComplete"), ("True", "GateFailed")), True,
     [("Warning", "GateFailed")]),
    (READY, api_error_status("403 Forbidden", 1, READY, datetime(2025, 1, 2, tzinfo=timezone.utc)), True,
     [("Warning", "ApiError")]),                                         # the API failed a pass: only Degraded flips
])
def test_write_status(previous: dict[str, Any], new: dict[str, Any], written: bool,
                      events: list[tuple[str, str]]) -> None:
    kube = RecordingKube()
    assert write_status(kube, BODY, previous, new) is written  # type: ignore[arg-type]
    assert kube.patches == ([new] if written else [])
    assert kube.events == events
