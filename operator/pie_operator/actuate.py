"""Act: carry out one pass's ReconcilePlan against the cluster (k8s.Kube) and the engines (their admin endpoint),
with an Event for each action and an entry in the bounded decision history (status.decisions); write the status.

Nothing here decides. The one thing acting can learn is an engine's answer to a live GPU budget change; an answer
other than "applied" ends the pass early with `requeue` set, so that the next pass decides with it (decide.py).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from pie_operator import builders
from pie_operator.decide import GpuLive, MemoryAction, ReconcilePlan
from pie_operator.k8s import Kube
from pie_operator.planning import Plan
from pie_operator.records import Record
from pie_operator.scaling import DRAIN_TIMEOUT
from pie_operator.scrape import AdminResult, set_gpu_budget
from pie_operator.snapshot import Snapshot
from pie_operator.status import condition_events, without_volatile
from pie_operator.tuning import (
    GPU_ATTEMPTS,
    GPU_REJECTED,
    GPU_RESTART,
    GPU_RETRY_AT,
    GPU_WAITING,
    RESIZE_REJECTED,
    TS,
    retry_delay,
    ts,
)

log = logging.getLogger(__name__)
HISTORY = 20  # status.decisions keeps the last this many
DECISIONS = {  # status.decisions[].field -> (what it is called, the Event's reason)
    "memory": ("memory request", "MemoryDecision"), "gpuMemoryBudget": ("GPU memory budget", "GPUBudgetDecision"),
    "replicas": ("replicas", "ReplicaDecision")}
# The apiserver's definite no, which retrying cannot change: 400/422 (validation or a webhook, e.g. a resize that
# would change the QoS class), 403 (quota, Pod Security, RBAC). Everything else is treated as transient.
REFUSED = (400, 403, 422)
SetBudget = Callable[[str, int, str, int], AdminResult]  # (pod IP, port, admin token, bytes) -> the engine's answer


@dataclass
class Outcome:
    """What one pass did (for logs and tests) and what it learned (for the status)."""

    revision: str = ""
    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    gpu_live: list[str] = field(default_factory=list)
    pods_changed: bool = False  # pods were created, deleted or resized: the snapshot's pods are out of date
    requeue: bool = False  # ended early on an engine's answer: decide again now
    learned: dict[str, dict[str, Any]] = field(default_factory=dict)  # pod -> status.pods[] fields
    decisions: list[dict[str, Any]] = field(default_factory=list)  # status.decisions after this pass
    status: dict[str, Any] = field(default_factory=dict)
    status_written: bool = False
    create_refused: str = ""  # the apiserver refused a new pod (quota, Pod Security, a webhook): its answer
    retry_after: float | None = None  # seconds until pod creation is tried again (it backs off while refused)


class History:
    """status.decisions: time, pod, field, from -> to, reason, how it was applied. A decision that repeats (e.g. a
    replacement still waiting for its rollout step) is recorded, and announced, once."""

    def __init__(self, kube: Kube, body: dict[str, Any], previous: list[dict[str, Any]], stamp: str) -> None:
        self.kube, self.body, self.entries, self.stamp = kube, body, list(previous), stamp

    def add(self, r: Record) -> None:
        last = next((e for e in reversed(self.entries) if e.get("pod") == r.pod and e.get("field") == r.field), None)
        if last is not None and (last.get("to"), last.get("reason"), last.get("via")) == (r.new, r.reason, r.via):
            return
        self.entries = [*self.entries, {"time": self.stamp, "pod": r.pod, "field": r.field, "from": r.old,
                                        "to": r.new, "reason": r.reason, "via": r.via}][-HISTORY:]
        what, event = DECISIONS[r.field]
        change = f"{what} {r.old} -> {r.new}" if r.old != r.new else f"{what} stays {r.new}"
        oom = r.reason.startswith("OOMKilled")
        self.kube.post_event(self.body, "Warning" if oom else "Normal", "OOMKilled" if oom else event,
                             f"{f'pod {r.pod}: ' if r.pod else ''}{change} ({r.reason}: {r.message}); applied: {r.via}")


def act(kube: Kube, snap: Snapshot, plan: ReconcilePlan, *, set_budget: SetBudget = set_gpu_budget) -> Outcome:
    """Carry out `plan` (decided from `snap`), in the order that keeps a half-done pass safe to repeat."""
    out = Outcome(revision=plan.revision, decisions=list(snap.previous.get("decisions") or []))
    if plan.invalid:
        return out
    body, stamp = snap.body, snap.now.strftime(TS)
    history = History(kube, body, out.decisions, stamp)
    for e in plan.events:
        kube.post_event(body, e.type, e.reason, e.message)
    token = snap.admin_token
    if plan.admin_secret is not None:
        token = kube.ensure_admin_token(plan.admin_secret)
    for r in plan.recorded:
        history.add(r)
    # Engines first: the ConfigMap and new pods carry the budgets the plan expects them to take live.
    for g in plan.gpu:
        _gpu(g, set_budget(g.ip, g.port, token, g.bytes), history, stamp, snap.now.timestamp(), out)
    if not out.requeue:
        _serving(kube, body, plan.serving)  # before the Service: an upgraded selector finds its pods labelled
        for obj in plan.apply:
            kube.apply(obj)
        if plan.scaling is not None and plan.scaling.record is not None:
            history.add(plan.scaling.record)  # (drained pods leave in _execute; new replicas are its creations)
        _execute(kube, body, plan.steps, plan.new_pod, out)
        for m in plan.memory:
            _memory(kube, body, m, history, stamp, out)
    out.decisions = history.entries
    return out


def _gpu(g: GpuLive, res: AdminResult, history: History, stamp: str, now: float, out: Outcome) -> None:
    c = g.change
    learned = out.learned.setdefault(c.pod, {})
    if res.applied:
        out.gpu_live.append(c.pod)
        learned.update({"gpuMemoryBudget": c.new, "gpuBudgetLive": True, "gpuBudgetChangedAt": stamp,
                        "gpuBudgetRestarts": g.restarts, GPU_RESTART: "", GPU_REJECTED: "", GPU_WAITING: "",
                        GPU_ATTEMPTS: "", GPU_RETRY_AT: ""})
        via = "live (engine admin endpoint)"
    elif res.rejected:
        learned[GPU_REJECTED] = c.new
        via = f"rejected by the engine ({res.detail})"
    elif res.needs_restart:  # a definite answer: only a restart applies it
        learned[GPU_RESTART] = c.new
        via = f"Rolling ({res.detail})"
    else:
        # Busy (a running request needs the KV) or a blip (timeout, 429, 5xx): a replacement would kill in-flight
        # requests for nothing, so the same change is tried again later, with backoff.
        attempts = g.attempts + 1
        why = "busy" if res.busy else "not reachable or failing"
        learned.update({GPU_WAITING: f"{c.new}: engine {why} ({res.detail})", GPU_ATTEMPTS: attempts,
                        GPU_RETRY_AT: ts(now + retry_delay(attempts))})
        log.info("GPU budget of %s not applied yet (%s): retrying later", c.pod, res.detail)
        return
    out.requeue = out.requeue or not res.applied
    history.add(Record(c.pod, "gpuMemoryBudget", c.old, c.new, c.reason, c.message, via))


def _serving(kube: Kube, body: dict[str, Any], serving: dict[str, bool]) -> None:
    """Traffic follows the gate: label the pods the Service may route to, unlabel the others (removals first)."""
    for pod, on in sorted(serving.items(), key=lambda kv: kv[1]):
        if kube.label_pod(body["metadata"]["namespace"], pod, {builders.SERVING_LABEL: "true" if on else None}):
            log.info("pod %s %s traffic", pod, "takes" if on else "no longer takes")


def _execute(kube: Kube, body: dict[str, Any], steps: Plan, new_pod: dict[str, Any], out: Outcome) -> None:
    """Deletions (uid precondition) then creations of the rollout/scaling plan."""
    ns = body["metadata"]["namespace"]
    out.pods_changed = out.pods_changed or not steps.empty
    for stuck in steps.stuck:
        kube.post_event(body, "Warning", "ReplacingStuckPod",
                        f"pod {stuck} is still Terminating long after its grace period (its node may be lost, or a "
                        "finalizer holds it): creating its replacement, which may stay Pending until its GPU is free")
    for d in steps.delete:
        if kube.delete_pod(ns, d.name, d.uid):
            out.deleted.append(d.name)
            bad = d.reason in ("Failed", DRAIN_TIMEOUT)
            kube.post_event(body, "Warning" if bad else "Normal", f"Deleted{d.reason}", d.message)
    for _ in range(steps.create):
        try:
            created = kube.create_pod(new_pod)
        except ApiException as e:
            if e.status not in REFUSED:
                raise  # transient (5xx, 429, a timeout): kopf and the next trigger retry
            # Retrying at once would get the same answer: the pass ends here and its status says why (reconcile).
            # The apiserver names the pod it generated for this attempt: without that name, the same refusal reads
            # the same every time (one status, one Event).
            gen = new_pod["metadata"]["generateName"]
            out.create_refused = re.sub(re.escape(gen) + r"[a-z0-9]+", gen + "*",
                                        describe_api_error(e, "the apiserver refused a new pod"))
            out.pods_changed = bool(out.deleted or out.created)
            return
        pod_name = created["metadata"]["name"]
        out.created.append(pod_name)
        kube.post_event(body, "Normal", "CreatedPod", f"created pod {pod_name} (revision {out.revision})")


def _memory(kube: Kube, body: dict[str, Any], m: MemoryAction, history: History, stamp: str, out: Outcome) -> None:
    """A memory decision: resized in place (requested once the apiserver accepted it; status.pods[].resize follows
    what the kubelet does with it), or recorded as it is."""
    pod = m.record.pod
    if m.resize is not None:
        try:
            kube.resize_pod(body["metadata"]["namespace"], pod, builders.ENGINE_CONTAINER, *m.resize)
        except ApiException as e:
            definite = e.status in REFUSED
            if definite:  # the same request would be refused again: the next pass replaces the pod instead
                out.learned.setdefault(pod, {})[RESIZE_REJECTED] = m.resize[0]
            kube.post_event(body, "Warning", "ResizeFailed", f"could not resize pod {pod}: {e.reason}: {e.body}"
                            + ("; the pod is replaced instead" if definite else "; retried on a later pass"))
            return
        out.resized.append(pod)
        out.pods_changed = True
        out.learned.setdefault(pod, {}).update({"memoryChangedAt": stamp, RESIZE_REJECTED: ""})
    history.add(m.record)


def describe_api_error(err: ApiException, what: str) -> str:
    """`<what>: <code> <reason>: <the apiserver's message>` (the Status object's message when the body is one)."""
    try:
        message = json.loads(err.body)["message"]
    except (TypeError, ValueError, KeyError):
        message = str(err.body or "")[:300]
    return f"{what}: {err.status} {err.reason}: {message}".rstrip(": ")


def write_status(kube: Kube, body: dict[str, Any], previous: dict[str, Any], status: dict[str, Any]) -> bool:
    """Patch status only when it changed (an unchanged world writes nothing; nor does a scrape that only moved the
    engines' numbers: status.without_volatile), with an Event for every condition that flipped
    (status.condition_events)."""
    before, after = without_volatile(previous), without_volatile(status)
    if all(before.get(k) == v for k, v in after.items()):
        return False
    meta = body["metadata"]
    kube.patch_status(meta["namespace"], meta["name"], status)
    for type_, reason, message in condition_events(previous, status):
        kube.post_event(body, type_, reason, message)
    return True
