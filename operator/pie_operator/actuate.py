"""Executing one reconcile pass's decisions against the cluster and the engines, with an Event for each and an entry
in the bounded decision history (status.decisions)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from pie_operator import builders
from pie_operator.decisions import Change
from pie_operator.k8s import Kube
from pie_operator.planning import Plan, Pod
from pie_operator.quantity import format_bytes
from pie_operator.scrape import Observation, set_gpu_budget
from pie_operator.tuning import TS, GpuChange, TuningPlan, container_status

log = logging.getLogger(__name__)
HISTORY = 20  # status.decisions keeps the last this many


@dataclass
class Outcome:
    """What one pass did (for logs and tests)."""

    revision: str = ""
    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    gpu_live: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    status_written: bool = False


class History:
    """status.decisions: time, pod, field, from -> to, reason, how it was applied. A decision that repeats (e.g. a
    replacement still waiting for its rollout step) is recorded, and announced, once."""

    def __init__(self, kube: Kube, body: dict[str, Any], previous: list[dict[str, Any]], now: datetime) -> None:
        self.kube, self.body, self.entries, self.now = kube, body, list(previous), now.strftime(TS)

    def add(self, pod: str, field_: str, old: str, new: str, reason: str, message: str, via: str) -> None:
        last = next((e for e in reversed(self.entries) if e.get("pod") == pod and e.get("field") == field_), None)
        if last is not None and (last.get("to"), last.get("reason"), last.get("via")) == (new, reason, via):
            return
        self.entries = [*self.entries, {"time": self.now, "pod": pod, "field": field_, "from": old, "to": new,
                                        "reason": reason, "via": via}][-HISTORY:]
        what = "memory request" if field_ == "memory" else "GPU memory budget"
        change = f"{what} {old} -> {new}" if old != new else f"{what} stays {new}"
        event = "OOMKilled" if reason.startswith("OOMKilled") else (
            "MemoryDecision" if field_ == "memory" else "GPUBudgetDecision")
        self.kube.post_event(self.body, "Warning" if reason.startswith("OOMKilled") else "Normal", event,
                             f"pod {pod}: {change} ({reason}: {message}); applied: {via}")


def execute(kube: Kube, body: dict[str, Any], steps: Plan, new_pod: dict[str, Any], out: Outcome) -> None:
    """Deletions (uid precondition) then creations of the rollout/scaling plan."""
    ns = body["metadata"]["namespace"]
    for d in steps.delete:
        if kube.delete_pod(ns, d.name, d.uid):
            out.deleted.append(d.name)
            kube.post_event(body, "Warning" if d.reason == "Failed" else "Normal", f"Deleted{d.reason}", d.message)
    for _ in range(steps.create):
        try:
            created = kube.create_pod(new_pod)
        except ApiException as e:
            kube.post_event(body, "Warning", "CreateFailed", f"could not create a pod: {e.reason}: {e.body}")
            raise
        pod_name = created["metadata"]["name"]
        out.created.append(pod_name)
        kube.post_event(body, "Normal", "CreatedPod", f"created pod {pod_name} (revision {out.revision})")


def resize(kube: Kube, body: dict[str, Any], tplan: TuningPlan, history: History, now: str, out: Outcome) -> None:
    """In-place memory resizes (pods/resize), each recorded once it was accepted."""
    ns = body["metadata"]["namespace"]
    changes: dict[str, tuple[Change, str]] = {pod: (c, via) for pod, c, via in tplan.changes}
    for pod, (c, via) in changes.items():
        if pod in tplan.resize:
            request, limit = tplan.resize[pod]
            try:
                kube.resize_pod(ns, pod, builders.ENGINE_CONTAINER, request, limit)
            except ApiException as e:
                kube.post_event(body, "Warning", "ResizeFailed", f"could not resize pod {pod}: {e.reason}: {e.body}")
                continue
            out.resized.append(pod)
            tplan.memo.setdefault(pod, {})["memoryChangedAt"] = now
        history.add(pod, "memory", format_bytes(c.old), format_bytes(c.new), c.reason, c.message, via)


def apply_gpu(body: dict[str, Any], pods: dict[str, Pod], changes: list[GpuChange], token: str, port: int,
              tplan: TuningPlan, history: History, now: str, out: Outcome) -> str | None:
    """GPU budgets: live through the engine's admin endpoint, else by replacing the pod (added to tplan.replace).
    Returns the budget new pods should start with (the last one decided), or None when nothing was decided."""
    latest = None
    for g in changes:
        pod = pods[g.pod]
        if g.bytes is None:
            result_detail, live, restart = "the budget is a fraction and the GPU size is unknown", False, True
        else:
            res = set_gpu_budget(pod["status"]["podIP"], port, token, g.bytes)
            result_detail, live, restart = res.detail, res.applied, res.needs_restart
            if res.rejected:  # the engine refuses the value: say so once, do not force it through a restart
                history.add(g.pod, "gpuMemoryBudget", g.old, g.new, g.reason, g.message,
                            f"rejected by the engine ({res.detail})")
                continue
            if not live and not restart and g.reason in ("Spec", "Bounds"):
                restart = True  # the engine cannot be reached, but the spec wants the change: a restart applies it
        if live:
            out.gpu_live.append(g.pod)
            tplan.memo.setdefault(g.pod, {}).update({
                "gpuMemoryBudget": g.new, "gpuBudgetLive": True, "gpuBudgetChangedAt": now,
                "gpuBudgetRestarts": container_status(pod).get("restartCount", 0)})
            via = "live (engine admin endpoint)"
        elif restart:
            tplan.replace[g.pod] = f"GPUBudgetChanged: GPU memory budget {g.old} -> {g.new}"
            via = f"Rolling ({result_detail})"
        else:
            log.info("GPU budget of %s not applied yet (%s): retrying on a later pass", g.pod, result_detail)
            continue
        latest = g.new
        history.add(g.pod, "gpuMemoryBudget", g.old, g.new, g.reason, g.message, via)
    return latest


def scrape_events(kube: Kube, body: dict[str, Any], prev_pods: dict[str, dict[str, Any]],
                  observations: dict[str, Observation | None]) -> None:
    """One Event when a pod's metrics go stale (and one when they recover), not one per scrape."""
    for pod, obs in observations.items():
        if obs is None:
            continue
        before = prev_pods.get(pod, {}).get("metrics", "")
        now = "ok" if obs.ok else obs.error
        if now == before:
            continue
        if not obs.ok:
            kube.post_event(body, "Warning", "MetricsStale", f"pod {pod}: {obs.error}; its metrics are ignored "
                                                             "(no decision is made from stale data)")
        elif before:
            kube.post_event(body, "Normal", "MetricsRecovered", f"pod {pod}: metrics are fresh again")
