"""Pure status computation: observed pods + spec -> the PieDeployment's `.status` (minus kopf's own field).

Conditions follow the Kubernetes convention (type/status/reason/message/lastTransitionTime/observedGeneration);
lastTransitionTime changes only when a condition's status flips, so an unchanged world gives an identical status
and the operator writes nothing.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pie_operator.config import MEMORY_MODE_CONDITION
from pie_operator.planning import Pod, is_finished, is_ready, is_terminating, memory_request, revision
from pie_operator.quantity import format_bytes
from pie_operator.resize import DONE, actual_memory, resize_state
from pie_operator.rollout import PAUSED, ROLLED_BACK, RolloutState
from pie_operator.scaling import AUTOSCALER_CONFLICT
from pie_operator.scrape import Observation
from pie_operator.tuning import (
    GPU_ATTEMPTS,
    GPU_REJECTED,
    GPU_RESTART,
    GPU_RETRY_AT,
    GPU_WAITING,
    RESIZE_REJECTED,
    effective_budget,
)

PHASES = ("Ready", "Progressing", "Degraded", "Invalid")
API_ERROR = "ApiError"  # Degraded's reason when the Kubernetes API failed a pass


def _ts(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, status: bool, reason: str, message: str, generation: int, previous: list[dict[str, Any]],
              now: datetime) -> dict[str, Any]:
    """One condition; keeps the previous lastTransitionTime while the status is unchanged."""
    value = "True" if status else "False"
    prev = next((c for c in previous if c.get("type") == type_), None)
    since = prev["lastTransitionTime"] if prev and prev.get("status") == value and prev.get(
        "lastTransitionTime") else _ts(now)
    return {"type": type_, "status": value, "reason": reason, "message": message, "lastTransitionTime": since,
            "observedGeneration": generation}


def _unschedulable(pod: Pod) -> str | None:
    for c in pod.get("status", {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return c.get("message") or "unschedulable"
    return None


# status.pods[] fields the closed loop carries from pass to pass (tuning.py says what they mean).
CARRIED = ("memoryChangedAt", "gpuBudgetChangedAt", "gpuBudgetLive", "gpuBudgetRestarts", "oomHandledAt",
           "memoryRecommendation", GPU_RESTART, GPU_REJECTED, GPU_WAITING, GPU_ATTEMPTS, GPU_RETRY_AT, RESIZE_REJECTED)


def pod_entry(pod: Pod, rollout: RolloutState, obs: Observation | None, memo: dict[str, Any]) -> dict[str, Any]:
    """One status.pods[] item: what the pod runs with, its gate, and the latest scrape of its engine."""
    entry: dict[str, Any] = {"name": pod["metadata"]["name"], "memoryRequest": memory_request(pod) or "",
                             "gpuMemoryBudget": effective_budget(pod, memo), "ready": is_ready(pod),
                             "revision": revision(pod), "gatePassed": pod["metadata"]["name"] in rollout.passed,
                             "metrics": "" if obs is None else ("ok" if obs.ok else obs.error)}
    if obs is not None and obs.metrics is not None:
        entry["expansionRatio"] = f"{obs.metrics['pie_expansion_ratio']:.2f}"
        entry["hostKVUsed"] = format_bytes(obs.metrics.bytes("pie_host_kv_used_bytes"))
    entry.update({k: memo[k] for k in CARRIED if memo.get(k) not in (None, "")})
    if actual := actual_memory(pod):
        entry["memoryAllocated"] = actual
    state, why = resize_state(pod)
    if state and (state != DONE or memo.get("memoryChangedAt")):  # Done: only for pods the operator resized
        entry["resize"] = f"{state}: {why}" if why else state
    return entry


def metrics_condition(pods: list[Pod], observations: dict[str, Observation | None]) -> tuple[bool, str, str]:
    """MetricsStale: a Ready pod whose latest scrape failed (its data is ignored: it causes no change)."""
    ready = [p for p in pods if is_ready(p)]
    bad = [(p["metadata"]["name"], o.error) for p in ready if (o := observations.get(p["metadata"]["name"]))
           is not None and not o.ok]
    if bad:
        return True, "ScrapeFailed", "; ".join(f"pod {n}: {e}" for n, e in bad) + " (no decisions from stale data)"
    fresh = sum(1 for p in ready if (o := observations.get(p["metadata"]["name"])) is not None and o.ok)
    return False, "MetricsFresh", f"{fresh}/{len(ready)} ready pods scraped"


def compute_status(*, name: str, pods: list[Pod], replicas: int, desired_revision: str, generation: int,
                   selector: str, memory: dict[str, str], previous: dict[str, Any], now: datetime,
                   rollout: RolloutState | None = None, observations: dict[str, Observation | None] | None = None,
                   memo: dict[str, dict[str, Any]] | None = None, decisions: list[dict[str, Any]] | None = None,
                   draining: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The whole status (everything but status.kopf). `desired_revision`: the revision pods converge to (the
    rollout's target); `memory`: {hostMemoryRequest, gpuMemoryBudget, expansionRatio} of new pods; `draining`: pods
    the autoscaler is draining (scaling.py): they exist, but are no longer replicas, so readiness is judged without
    them (a scale-down is not a drop in readiness)."""
    rollout = rollout or RolloutState(revision=desired_revision)
    observations, memo = observations or {}, memo or {}
    live = sorted((p for p in pods if not is_terminating(p)), key=lambda p: p["metadata"]["name"])
    running = [p for p in live if not is_finished(p)]
    staying = [p for p in running if p["metadata"]["name"] not in draining]
    leaving = sorted(p["metadata"]["name"] for p in running if p["metadata"]["name"] in draining)
    ready = [p for p in staying if is_ready(p)]
    updated = [p for p in staying if revision(p) == desired_revision]
    outdated = [p for p in staying if revision(p) != desired_revision]
    waiting_gate = [p for p in ready if p["metadata"]["name"] not in rollout.passed]
    prev_conds = previous.get("conditions") or []

    # Degraded: something a human may need to look at (a gate failed, no GPU node fits, a pod died).
    problems: list[tuple[str, str]] = []
    if rollout.phase in (PAUSED, ROLLED_BACK):
        problems.append((rollout.reason, rollout.message))
    if failed := [p["metadata"]["name"] for p in live if is_finished(p)]:
        problems.append(("PodFailed", f"pods failed and are being replaced: {', '.join(failed)}"))
    for p in running:
        if msg := _unschedulable(p):
            problems.append(("Unschedulable", f"pod {p['metadata']['name']} cannot be scheduled: {msg}"))
            break

    converged = len(updated) == replicas and not outdated and len(staying) == replicas
    all_ready = len(ready) >= replicas and converged and not waiting_gate
    if outdated:
        prog_reason, prog_msg = "RollingUpdate", (f"{len(updated)}/{replicas} pods on revision {desired_revision}, "
                                                  f"{len(outdated)} outdated")
    elif len(staying) < replicas:
        prog_reason, prog_msg = "ScalingUp", f"{len(staying)}/{replicas} pods exist"
    elif len(staying) > replicas:
        prog_reason, prog_msg = "ScalingDown", f"{len(staying)} pods exist, {replicas} desired"
    elif leaving:
        prog_reason, prog_msg = "Draining", (f"draining {', '.join(leaving)}: deleted once their requests finished "
                                             f"({replicas} replica{'' if replicas == 1 else 's'} serve)")
    elif len(ready) < replicas:
        prog_reason, prog_msg = "WaitingForReady", f"{len(ready)}/{replicas} pods ready"
    elif waiting_gate:
        prog_reason, prog_msg = "WaitingForGate", ("waiting for the rollout gate of " +
                                                   ", ".join(p["metadata"]["name"] for p in waiting_gate))
    elif rollout.phase == ROLLED_BACK:
        prog_reason, prog_msg = "RolledBack", rollout.message
    else:
        prog_reason, prog_msg = "RolloutComplete", (f"{replicas} pod{'' if replicas == 1 else 's'} on revision "
                                                    f"{desired_revision}, all ready")
    progressing = prog_reason not in ("RolloutComplete", "RolledBack")
    if rollout.phase == PAUSED:
        progressing, prog_reason, prog_msg = False, "ProgressDeadlineExceeded", rollout.message

    ready_reason = ("AllReplicasReady" if all_ready else "ReplicasNotReady") if replicas else "ScaledToZero"
    ready_msg = f"{len(ready)}/{replicas} replicas ready" + ("" if converged else f" ({prog_msg})")
    stale, stale_reason, stale_msg = metrics_condition(running, observations)
    conditions = [
        condition("Ready", all_ready, ready_reason, ready_msg, generation, prev_conds, now),
        condition("Progressing", progressing, prog_reason, prog_msg, generation, prev_conds, now),
        condition("Degraded", bool(problems), problems[0][0] if problems else "AsExpected",
                  "; ".join(m for _, m in problems) or "no problems observed", generation, prev_conds, now),
        condition("MetricsStale", stale, stale_reason, stale_msg, generation, prev_conds, now),
    ]
    phase = "Degraded" if problems else ("Ready" if all_ready else "Progressing")
    return {
        "observedGeneration": generation,
        "replicas": len(running),
        "readyReplicas": len(ready),
        "updatedReplicas": len(updated),
        "ready": f"{len(ready)}/{replicas}",
        "selector": selector,
        "phase": phase,
        "currentRevision": _current_revision(running, ready, desired_revision, previous),
        "updateRevision": desired_revision,
        "conditions": conditions,
        "memory": memory,
        "pods": [pod_entry(p, rollout, observations.get(p["metadata"]["name"]), memo.get(p["metadata"]["name"], {}))
                 for p in running],
        "rollout": rollout.to_status(),
        "decisions": decisions or [],
    }


def _current_revision(running: list[Pod], ready: list[Pod], desired: str, previous: dict[str, Any]) -> str:
    """The revision serving traffic: the desired one once all running pods are on it, else the most common one
    among ready pods (the rollout's starting point), else what status said before."""
    if running and all(revision(p) == desired for p in running):
        return desired
    counts: dict[str, int] = {}
    for p in ready:
        counts[revision(p)] = counts.get(revision(p), 0) + 1
    if counts:
        return max(sorted(counts), key=lambda r: counts[r])
    return previous.get("currentRevision") or desired


def invalid_status(error: str, generation: int, previous: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Status for a spec that passes the CRD schema but not the operator's validation: nothing is touched."""
    prev_conds = previous.get("conditions") or []
    return {
        "observedGeneration": generation,
        "phase": "Invalid",
        "conditions": [
            condition("Ready", False, "InvalidSpec", error, generation, prev_conds, now),
            condition("Progressing", False, "InvalidSpec", error, generation, prev_conds, now),
            condition("Degraded", True, "InvalidSpec", error, generation, prev_conds, now),
        ],
    }


def condition_events(previous: dict[str, Any], status: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events for the conditions that flipped from `previous` to `status`: Warning
    for what a human should look at, Normal otherwise; none for the first status of a healthy object, one per
    reason, none for MetricsStale (its Events are per pod: decide.py)."""
    before = {c["type"]: c for c in previous.get("conditions") or []}
    posted: set[str] = set()
    # Readiness dropping because we scale up or roll is expected; dropping while nothing changes is not.
    expected_drop = any(c["type"] == "Progressing" and c["reason"] in ("ScalingUp", "RollingUpdate")
                        for c in status["conditions"])
    out = []
    for c in status["conditions"]:
        old = before.get(c["type"])
        if c["type"] == "MetricsStale" or (
                old is not None and old.get("status") == c["status"] and old.get("reason") == c["reason"]):
            continue
        bad = c["reason"] in ("ProgressDeadlineExceeded", "InvalidSpec") or (
            c["type"] in ("Degraded", MEMORY_MODE_CONDITION, AUTOSCALER_CONFLICT) and c["status"] == "True") or (
            c["type"] == "Ready" and c["status"] == "False" and old is not None and old.get("status") == "True"
            and not expected_drop)
        if (old is None and not bad) or c["reason"] in posted:
            continue
        posted.add(c["reason"])
        out.append(("Warning" if bad else "Normal", c["reason"], f"{c['type']}={c['status']}: {c['message']}"))
    return out


def api_error_status(error: str, generation: int, previous: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The previous status with Degraded=True, reason ApiError: a pass that the Kubernetes API failed says so where
    users look; the next pass that gets through computes the whole status again."""
    prev_conds = previous.get("conditions") or []
    degraded = condition("Degraded", True, API_ERROR, error, generation, prev_conds, now)
    conds = [degraded if c.get("type") == "Degraded" else c for c in prev_conds]
    return {"phase": "Degraded", "conditions": conds if degraded in conds else [*conds, degraded]}


CREATE_REJECTED = "CreateRejected"  # Degraded's reason while the apiserver refuses new pods


def create_rejected_status(status: dict[str, Any], message: str, generation: int, previous: dict[str, Any],
                           now: datetime) -> dict[str, Any]:
    """`status` with Degraded=True, reason CreateRejected, and the apiserver's `message`: a quota, Pod Security or
    webhook refusal does not go away by retrying, so it must be where users look (the other conditions stay as
    computed: the pods that exist are still described)."""
    prev_conds = previous.get("conditions") or []
    degraded = condition("Degraded", True, CREATE_REJECTED, message, generation, prev_conds, now)
    conds = [degraded if c.get("type") == "Degraded" else c for c in status.get("conditions") or []]
    return {**status, "phase": "Degraded", "conditions": conds}


# Engine numbers shown in status.pods[] / status.memory that move with load on every scrape; a status that differs
# only in these is not written (they are refreshed with the next real change; live values are on /metrics).
VOLATILE_POD_FIELDS = ("expansionRatio", "hostKVUsed")
VOLATILE_MEMORY_FIELDS = ("expansionRatio",)
VOLATILE_AUTOSCALING_FIELDS = ("message",)  # the policy's hold message counts the seconds a window has run


def without_volatile(status: dict[str, Any]) -> dict[str, Any]:
    """`status` minus the fields a scrape moves by itself (VOLATILE_*), for telling a real change from a scrape."""
    out = dict(status)
    if isinstance(out.get("pods"), list):
        out["pods"] = [{k: v for k, v in p.items() if k not in VOLATILE_POD_FIELDS} if isinstance(p, dict) else p
                       for p in out["pods"]]
    for key, volatile in (("memory", VOLATILE_MEMORY_FIELDS), ("autoscaling", VOLATILE_AUTOSCALING_FIELDS)):
        if isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in out[key].items() if k not in volatile}
    return out
