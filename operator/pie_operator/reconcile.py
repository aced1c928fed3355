"""Level-triggered, idempotent reconcile of one PieDeployment: read the cluster (and the operator's latest engine
scrapes), decide with pure functions (rollout.py, tuning.py, planning.py, status.py), act, write status, post Events.

Everything that must survive a restart is in the cluster: pods (labels, requests), status.rollout (gate results, the
last good template), status.pods[] (last change times, OOM kills answered, budgets applied live) and status.memory
(what new pods get). The only in-memory state, the scrapes (observe.py), starts empty after a restart, and no
evidence never causes a change, so a restarted operator continues where the previous one stopped.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from pie_operator import actuate, builders
from pie_operator.actuate import History, Outcome
from pie_operator.k8s import Kube
from pie_operator.memory import decide, pod_memory
from pie_operator.observe import Observations, PodTarget
from pie_operator.planning import is_finished, is_ready, is_terminating, plan, revision
from pie_operator.rollout import RolloutState, advance, baseline_stall, gate_verdict
from pie_operator.spec import PieDeploymentSpec
from pie_operator.status import compute_status, invalid_status
from pie_operator.tuning import TS, plan_tuning, template_budget, template_request

log = logging.getLogger(__name__)
__all__ = ["Outcome", "reconcile", "validation_message"]


def validation_message(err: ValidationError) -> str:
    """A pydantic error as one line a user can act on: `spec.memory.hostMemory: <why>; ...`."""
    parts = []
    for e in err.errors():
        where = ".".join(["spec", *(str(x) for x in e["loc"])])
        parts.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def reconcile(kube: Kube, namespace: str, name: str, *, now: datetime | None = None,
              observations: Observations | None = None) -> Outcome | None:
    """One pass toward the spec. Returns None when the PieDeployment is gone or being deleted (garbage
    collection through ownerReferences removes the children; no finalizer needed)."""
    body = kube.get_deployment(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    now = now or datetime.now(timezone.utc)
    generation = body["metadata"].get("generation", 0)
    previous = body.get("status") or {}
    try:
        spec = PieDeploymentSpec.model_validate(body.get("spec") or {})
    except ValidationError as e:
        status = invalid_status(validation_message(e), generation, previous, now)
        return Outcome(status=status, status_written=_write_status(kube, body, previous, status))

    owner = builders.owner_reference(body)
    token = kube.ensure_admin_token(builders.admin_secret(name, namespace, "", owner))
    selector, uid = builders.selector_string(name), body["metadata"]["uid"]
    pods = kube.list_pods(namespace, selector, uid)
    views = observations.view((namespace, name), now.timestamp(), spec.memory.tuning.window_seconds) \
        if observations is not None else {}
    last = {pod: v.last for pod, v in views.items()}
    prev_pods = {e["name"]: e for e in previous.get("pods") or [] if e.get("name")}
    prev_memory = previous.get("memory") or {}

    # The desired template (the current memory values are outside its hash) and the rollout toward it.
    tmpl_request = template_request(spec, prev_memory.get("hostMemoryRequest"))
    tmpl_budget = template_budget(spec, prev_memory.get("gpuMemoryBudget"))
    spec_template = builders.pod_template(spec, name, decide(spec.memory, tmpl_request, tmpl_budget))
    spec_rev = builders.template_hash(spec_template)
    gate = spec.rollout.gate
    baseline = baseline_stall(pods, last, spec_rev)
    rollout, target = advance(
        RolloutState.from_status(previous.get("rollout")), spec_revision=spec_rev, spec_template=spec_template,
        pods=pods, replicas=spec.replicas, auto_rollback=spec.rollout.auto_rollback,
        verdict=lambda p: gate_verdict(p, last.get(p["metadata"]["name"]), now=now,
                                       step_timeout=spec.rollout.step_timeout_seconds,
                                       engine_health=gate.engine_health, baseline_stall=baseline,
                                       max_stall_regression=gate.max_stall_regression))

    # The closed loop: per-pod memory and GPU decisions for the running pods of the target revision.
    running = [p for p in pods if not is_terminating(p) and not is_finished(p)]
    tuned = [p for p in running if revision(p) == target.revision and p.get("status", {}).get("podIP")]
    resize_ok = spec.memory.apply == "InPlace" and kube.supports_resize()
    decision = decide(spec.memory, tmpl_request, tmpl_budget)
    tplan = plan_tuning(spec, decision, tuned, prev_pods, views, now=now.timestamp(), resize_supported=resize_ok,
                        tmpl_request=tmpl_request)
    history = History(kube, body, previous.get("decisions") or [], now)
    stamp = now.strftime(TS)
    out = Outcome(revision=target.revision)
    new_budget = actuate.apply_gpu(body, {p["metadata"]["name"]: p for p in tuned}, tplan.gpu, token,
                                   spec.engine.port, tplan, history, stamp, out)
    if new_budget is not None and spec.memory.tuning.gpu_memory_budget_min is not None:
        tmpl_budget = new_budget
    decision = decide(spec.memory, tplan.template_request, tmpl_budget)
    request, limit = pod_memory(spec.memory, decision)
    new_pod = builders.pod(builders.with_memory(target.template, request, limit, decision.gpu_memory_budget),
                           name, namespace, target.revision, owner)

    for obj in (builders.service(spec, name, namespace, owner),
                builders.config_map(spec, name, namespace, target.revision, decision, owner),
                builders.pod_disruption_budget(spec, name, namespace, owner)):
        kube.apply(obj)

    surge, unavailable = spec.rollout.bounds(spec.replicas)
    passed = set(rollout.passed)
    steps = plan(pods, desired_revision=target.revision, replicas=spec.replicas, max_surge=surge,
                 max_unavailable=unavailable, replace=tplan.replace, hold=target.hold,
                 gate=lambda p: is_ready(p) and p["metadata"]["name"] in passed)
    actuate.execute(kube, body, steps, new_pod, out)
    actuate.resize(kube, body, tplan, history, stamp, out)
    actuate.scrape_events(kube, body, prev_pods, last)
    if not steps.empty or out.resized:
        pods = kube.list_pods(namespace, selector, uid)
    if observations is not None:
        observations.set_targets((namespace, name), spec.engine.port, [
            PodTarget(p["metadata"]["name"], p["metadata"]["uid"], p.get("status", {}).get("podIP", ""), is_ready(p))
            for p in pods if not is_terminating(p)])

    memo = {pod: {**prev_pods.get(pod, {}), **tplan.memo.get(pod, {})} for pod in
            {p["metadata"]["name"] for p in pods}}
    memory = {"hostMemoryRequest": request, "gpuMemoryBudget": decision.gpu_memory_budget,
              "expansionRatio": _expansion_ratio(last, decision.expansion_ratio)}
    out.status = compute_status(name=name, pods=pods, replicas=spec.replicas, desired_revision=target.revision,
                                generation=generation, selector=selector, memory=memory, previous=previous,
                                now=now, rollout=rollout, observations=last, memo=memo, decisions=history.entries)
    out.status_written = _write_status(kube, body, previous, out.status)
    return out


def _expansion_ratio(last: dict[str, Any], default: str) -> str:
    """The mean measured expansion ratio over freshly scraped engines (the printer column), else the setting."""
    ratios = [o.metrics["pie_expansion_ratio"] for o in last.values() if o is not None and o.ok]
    return f"{sum(ratios) / len(ratios):.2f}" if ratios else default


def _write_status(kube: Kube, body: dict[str, Any], previous: dict[str, Any], status: dict[str, Any]) -> bool:
    """Patch status only when it changed (an unchanged world writes nothing), and post an Event for every
    condition that flipped (MetricsStale excepted: actuate.scrape_events posts one per pod)."""
    if all(previous.get(k) == v for k, v in status.items()):
        return False
    meta = body["metadata"]
    kube.patch_status(meta["namespace"], meta["name"], status)
    before = {c["type"]: c for c in previous.get("conditions") or []}
    posted: set[str] = set()
    # Readiness dropping because we scale up or roll is expected; dropping while nothing changes is not.
    expected_drop = any(c["type"] == "Progressing" and c["reason"] in ("ScalingUp", "RollingUpdate")
                        for c in status["conditions"])
    for c in status["conditions"]:
        old = before.get(c["type"])
        if c["type"] == "MetricsStale" or (
                old is not None and old.get("status") == c["status"] and old.get("reason") == c["reason"]):
            continue
        bad = c["reason"] in ("ProgressDeadlineExceeded", "InvalidSpec") or (
            c["type"] == "Degraded" and c["status"] == "True") or (
            c["type"] == "Ready" and c["status"] == "False" and old is not None and old.get("status") == "True"
            and not expected_drop)
        if (old is None and not bad) or c["reason"] in posted:
            continue  # the first status of a healthy object is not news; one Event per reason
        posted.add(c["reason"])
        kube.post_event(body, "Warning" if bad else "Normal", c["reason"], f"{c['type']}={c['status']}: {c['message']}")
    return True
