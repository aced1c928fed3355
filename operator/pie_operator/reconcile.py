"""One level-triggered, idempotent reconcile pass over one PieDeployment: observe -> decide -> act.

- observe (snapshot.py): read the PieDeployment, its pods and owned objects, and the operator's latest engine
  scrapes into one immutable Snapshot;
- decide (decide.py): a pure function of the snapshot, computed once, returns the ReconcilePlan;
- act (actuate.py): carry the plan out, then write the status when (and only when) it changed.

An unchanged world therefore makes no write at all. Everything that must survive a restart is in the cluster: pods
(labels, requests), status.rollout (gate results, the last good template), status.pods[] (last change times, OOM
kills answered, budgets applied live, engines' answers) and status.memory (what new pods get). The only in-memory
state, the scrapes (observe.py), starts empty after a restart, and no evidence never causes a change, so a restarted
operator continues where the previous one stopped.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

from kubernetes.client.exceptions import ApiException

from pie_operator.actuate import Outcome, SetBudget, act, write_status
from pie_operator.config import OperatorConfig
from pie_operator.decide import decide, desired_status
from pie_operator.k8s import Kube
from pie_operator.observe import Observations, PodTarget
from pie_operator.planning import is_ready, is_terminating
from pie_operator.scrape import set_gpu_budget
from pie_operator.snapshot import observe
from pie_operator.status import api_error_status

log = logging.getLogger(__name__)
__all__ = ["Outcome", "reconcile"]


def reconcile(kube: Kube, namespace: str, name: str, *, now: datetime | None = None,
              observations: Observations | None = None, set_budget: SetBudget = set_gpu_budget,
              config: OperatorConfig | None = None) -> Outcome | None:
    """One pass toward the spec. Returns None when the PieDeployment is gone or being deleted (garbage collection
    through ownerReferences removes the children; no finalizer needed). An error from the Kubernetes API is put in
    the status (Degraded, reason ApiError) and raised again, so that the caller retries."""
    body = kube.get_deployment(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    now = now or datetime.now(timezone.utc)
    try:
        snap = observe(kube, body, now=now, observations=observations, config=config)
        plan = decide(snap)
        out = act(kube, snap, plan, set_budget=set_budget)
        pods = kube.list_pods(namespace, snap.selector, body["metadata"]["uid"]) if out.pods_changed else snap.pods
        if observations is not None and snap.spec is not None:
            observations.set_targets((namespace, name), snap.spec.engine.port, [
                PodTarget(p["metadata"]["name"], p["metadata"]["uid"], p.get("status", {}).get("podIP", ""),
                          is_ready(p)) for p in pods if not is_terminating(p)])
        out.status = desired_status(snap, plan, pods, out.learned, out.decisions, stopped=out.requeue)
        out.status_written = write_status(kube, body, snap.previous, out.status)
        return out
    except ApiException as e:
        _report(kube, body, e, now)
        raise


def _report(kube: Kube, body: dict[str, Any], err: ApiException, now: datetime) -> None:
    """Best effort: when the API failed the pass it may well fail this write too (the caller logs `err`)."""
    previous = body.get("status") or {}
    status = api_error_status(_describe(err), body["metadata"].get("generation", 0), previous, now)
    try:
        write_status(kube, body, previous, status)
    except ApiException as e:
        log.warning("could not report the API error in the status of %s/%s: %s", body["metadata"]["namespace"],
                    body["metadata"]["name"], e.reason)


def _describe(err: ApiException) -> str:
    """`<code> <reason>: <the apiserver's message>` (the Status object's message when the body is one)."""
    try:
        message = json.loads(err.body)["message"]
    except (TypeError, ValueError, KeyError):
        message = str(err.body or "")[:300]
    return f"the Kubernetes API failed this pass: {err.status} {err.reason}: {message}".rstrip(": ")
