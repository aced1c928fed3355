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

import logging
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from kubernetes.client.exceptions import ApiException

from pie_operator.actuate import Outcome, SetBudget, act, describe_api_error, write_status
from pie_operator.config import OperatorConfig
from pie_operator.decide import decide, desired_status
from pie_operator.exporter import Exporter
from pie_operator.k8s import Kube
from pie_operator.observe import Observations, PodTarget
from pie_operator.planning import is_ready, is_terminating
from pie_operator.scrape import set_gpu_budget
from pie_operator.snapshot import Snapshot, observe
from pie_operator.status import CREATE_REJECTED, api_error_status, create_rejected_status

log = logging.getLogger(__name__)
__all__ = ["Outcome", "reconcile"]


BACKOFF_FIRST, BACKOFF_MAX = 5.0, 300.0  # seconds between pod-create attempts while the apiserver refuses them


def create_backoff(failures: int) -> float:
    """Seconds to wait after `failures` refusals in a row: 5 s, doubled per refusal, at most 5 minutes."""
    return min(BACKOFF_FIRST * 2 ** max(failures - 1, 0), BACKOFF_MAX)


def create_wait(previous: dict[str, Any], now: datetime) -> float:
    """Seconds left before pods may be created again (0: now), from status.podCreation (refusals survive a
    restart of the operator there)."""
    pc = previous.get("podCreation") or {}
    try:
        last = datetime.strptime(pc["lastFailureTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        failures = int(pc["failures"])
    except (KeyError, TypeError, ValueError):
        return 0.0
    return max(0.0, create_backoff(failures) - (now - last).total_seconds())


def reconcile(kube: Kube, namespace: str, name: str, *, now: datetime | None = None,
              observations: Observations | None = None, set_budget: SetBudget = set_gpu_budget,
              config: OperatorConfig | None = None, exporter: Exporter | None = None) -> Outcome | None:
    """One pass toward the spec. Returns None when the PieDeployment is gone or being deleted (garbage collection
    through ownerReferences removes the children; no finalizer needed). An error from the Kubernetes API is put in
    the status (Degraded, reason ApiError) and raised again, so that the caller retries; a pod the apiserver refuses
    (quota, Pod Security, a webhook) is not an error of the pass: the status says so (Degraded, CreateRejected) and
    creation backs off (`Outcome.retry_after`)."""
    body = kube.get_deployment(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    now = now or datetime.now(timezone.utc)
    try:
        snap = observe(kube, body, now=now, observations=observations, config=config)
        plan = decide(snap)
        wait = create_wait(snap.previous, now)
        held = wait > 0 and plan.steps.create > 0
        if held:
            plan.steps = replace(plan.steps, create=0)
        out = act(kube, snap, plan, set_budget=set_budget)
        pods = kube.list_pods(namespace, snap.selector, body["metadata"]["uid"]) if out.pods_changed else snap.pods
        if observations is not None and snap.spec is not None:
            # The engine gate needs a served probe request: sent to the pods that have not passed it yet.
            model = (snap.spec.model.served_model_name or name) if snap.spec.rollout.gate.engine_health else ""
            passed = set(plan.rollout.passed) if plan.rollout is not None else set()
            passed |= plan.scaling.draining if plan.scaling is not None else set()  # (leaving: no gate to pass)
            observations.set_targets((namespace, name), snap.spec.engine.port, [
                PodTarget(p["metadata"]["name"], p["metadata"]["uid"], p.get("status", {}).get("podIP", ""),
                          is_ready(p), "" if p["metadata"]["name"] in passed else model)
                for p in pods if not is_terminating(p)], snap.spec.memory.tuning.window_seconds)
        out.status = desired_status(snap, plan, pods, out.learned, out.decisions, stopped=out.requeue)
        _creation(kube, snap, out, held, wait)
        out.status_written = write_status(kube, body, snap.previous, out.status)
        if observations is not None and plan.scaling is not None and plan.scaling.evaluated:
            observations.set_evaluated((namespace, name), now.timestamp())  # (the windows' continuity: scaling.py)
        if exporter is not None and plan.scaling is not None:
            exporter.update((namespace, name), plan.scaling, now.timestamp())
        return out
    except ApiException as e:
        _report(kube, body, e, now)
        raise


def _creation(kube: Kube, snap: Snapshot, out: Outcome, held: bool, wait: float) -> None:
    """status.podCreation and the Degraded condition while the apiserver refuses pods; one Event per distinct
    refusal (the Degraded flip announces the first: status.condition_events)."""
    prev: dict[str, Any] = snap.previous.get("podCreation") or {}
    pc: dict[str, Any]
    if out.create_refused:
        failures = int(prev.get("failures") or 0) + 1
        pc = {"failures": failures, "lastFailureTime": snap.now.strftime("%Y-%m-%dT%H:%M:%SZ"),
              "message": out.create_refused}
        out.retry_after = create_backoff(failures)
        if prev.get("message") and prev.get("message") != out.create_refused:
            kube.post_event(snap.body, "Warning", CREATE_REJECTED, out.create_refused)
    elif held:
        pc, out.retry_after = prev, wait
    else:
        if prev:
            out.status["podCreation"] = None  # (a merge patch: null removes it)
        return
    out.status["podCreation"] = pc
    out.status = create_rejected_status(out.status, pc["message"], snap.generation, snap.previous, snap.now)


def _report(kube: Kube, body: dict[str, Any], err: ApiException, now: datetime) -> None:
    """Best effort: when the API failed the pass it may well fail this write too (the caller logs `err`)."""
    previous = body.get("status") or {}
    status = api_error_status(describe_api_error(err, "the Kubernetes API failed this pass"),
                              body["metadata"].get("generation", 0), previous, now)
    try:
        write_status(kube, body, previous, status)
    except ApiException as e:
        log.warning("could not report the API error in the status of %s/%s: %s", body["metadata"]["namespace"],
                    body["metadata"]["name"], e.reason)
