"""Pure rollout/scaling decisions: (desired revision, replicas, bounds, observed pods) -> which pods to create or
delete. No I/O; reconcile.py executes the plan, and re-running on the resulting cluster state converges.

Rules (Deployment-like, adapted to bare GPU pods):
- Failed/Succeeded pods are deleted (bare pods are never restarted by anyone else) and replaced.
- Pods of the current revision beyond `replicas` are deleted: not-ready first, then newest.
- Pods of an outdated revision are deleted: not-gated (not ready) ones always, gated ones only while at least
  `replicas - maxUnavailable` gated pods remain.
- New pods are created up to `replicas` of the current revision, with at most `replicas + maxSurge` pods in total.
  Terminating pods, and pods this pass deletes, count toward that total: they still hold their GPU, and a
  replacement created before the GPU is free would only sit Pending (Unschedulable) when no GPU is spare. A pod
  still Terminating STUCK_TERMINATING_SECONDS after its grace period ended (its node is lost, a finalizer holds it)
  stops counting: it would otherwise block its own replacement forever under maxSurge 0. Its replacement may sit
  Pending until that GPU is free, which is better than never (Deployments never count terminating pods, KEP-3973).
- Pods named in `replace` (a memory or GPU-budget change that cannot be applied in place) count as outdated.
- A `gate(pod) -> bool` decides whether a pod counts as available: Ready and passed its rollout gate (rollout.py).
- `hold` (a paused rollout): nothing is replaced (only Failed pods are deleted), but pods that went away are
  created again up to `replicas`, within the same surge bound. Which revision they are is the caller's: the last
  good one (rollout.Target.fill), so an eviction during a pause never hands a replica to the revision that failed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pie_operator.builders import ENGINE_CONTAINER, HASH_LABEL

Pod = dict[str, Any]
Gate = Callable[[Pod], bool]
STUCK_TERMINATING_SECONDS = 30  # past the end of the grace period (deletionTimestamp): the kubelet is not coming


def is_ready(pod: Pod) -> bool:
    """The pod's Ready condition is True (all containers pass their readiness probes)."""
    conds = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def revision(pod: Pod) -> str:
    return pod.get("metadata", {}).get("labels", {}).get(HASH_LABEL, "")


def is_terminating(pod: Pod) -> bool:
    return pod.get("metadata", {}).get("deletionTimestamp") is not None


def is_stuck(pod: Pod, now: datetime) -> bool:
    """Terminating, and STUCK_TERMINATING_SECONDS past its deletionTimestamp (the end of its grace period)."""
    deleted = pod.get("metadata", {}).get("deletionTimestamp")
    if not deleted:
        return False
    deadline = datetime.fromisoformat(deleted.replace("Z", "+00:00"))
    return now - deadline > timedelta(seconds=STUCK_TERMINATING_SECONDS)


def is_finished(pod: Pod) -> bool:
    return pod.get("status", {}).get("phase") in ("Failed", "Succeeded")


def memory_request(pod: Pod) -> str | None:
    for c in pod.get("spec", {}).get("containers", []):
        if c.get("name") == ENGINE_CONTAINER:
            return c.get("resources", {}).get("requests", {}).get("memory")
    return None


@dataclass(frozen=True)
class Deletion:
    name: str
    uid: str
    reason: str  # an Event reason: Failed | ScaledDown | Outdated | MemoryChanged | GPUBudgetChanged
    message: str


@dataclass
class Plan:
    """What one reconcile pass does. `create` pods are of the desired revision."""

    create: int = 0
    delete: list[Deletion] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)  # stuck terminating pods that `create` replaces (an Event each)

    @property
    def empty(self) -> bool:
        return not (self.create or self.delete)

    def with_deletions(self, more: tuple[Deletion, ...] | list[Deletion]) -> Plan:
        """This plan, deleting `more` too (pods leaving outside of it: drained ones, scaling.py)."""
        self.delete += more
        return self


def _newest_first(pods: list[Pod]) -> list[Pod]:
    return sorted(pods, key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]),
                  reverse=True)


def plan(pods: list[Pod], *, desired_revision: str, replicas: int, max_surge: int, max_unavailable: int,
         replace: Mapping[str, str] | None = None, hold: bool = False, gate: Gate = is_ready,
         now: datetime | None = None) -> Plan:
    """Decide one step toward `replicas` pods of `desired_revision` (see the module docstring for the rules);
    `now` tells stuck terminating pods (None: none is)."""
    out = Plan()
    live = [p for p in pods if not is_terminating(p)]
    stuck = [p["metadata"]["name"] for p in pods if is_terminating(p) and now is not None and is_stuck(p, now)]
    terminating = len(pods) - len(live) - len(stuck)
    for p in live:
        if is_finished(p):
            phase = p["status"]["phase"]
            out.delete.append(Deletion(p["metadata"]["name"], p["metadata"]["uid"], "Failed",
                                       f"pod {p['metadata']['name']} is {phase}; replacing it"))
    live = [p for p in live if not is_finished(p)]
    if hold:
        return _create(out, len(live), replicas, replicas + max_surge - len(live) - terminating, stuck)
    replace = replace or {}

    def outdated(p: Pod) -> bool:
        return revision(p) != desired_revision or p["metadata"]["name"] in replace

    current = [p for p in live if not outdated(p)]
    old = [p for p in live if outdated(p)]

    # Scale down the current revision: not-ready (not gated) first, then the newest.
    if len(current) > replicas:
        ordered = sorted(_newest_first(current), key=lambda p: gate(p))
        for p in ordered[: len(current) - replicas]:
            out.delete.append(Deletion(p["metadata"]["name"], p["metadata"]["uid"], "ScaledDown",
                                       f"pod {p['metadata']['name']} is surplus: {len(current)} > {replicas} replicas"))
        current = [p for p in current if p not in ordered[: len(current) - replicas]]

    # Replace outdated pods within the availability budget.
    min_available = max(replicas - max_unavailable, 0)
    available = sum(gate(p) for p in current) + sum(gate(p) for p in old)
    for p in sorted(_newest_first(old), key=lambda p: gate(p)):
        if gate(p):
            if available - 1 < min_available:
                continue
            available -= 1
        name = p["metadata"]["name"]
        if revision(p) == desired_revision:
            why, detail = replace[name].split(":", 1)[0], replace[name]
        else:
            why, detail = "Outdated", f"revision {revision(p) or '?'} -> {desired_revision}"
        out.delete.append(Deletion(name, p["metadata"]["uid"], why, f"replacing pod {name}: {detail}"))

    # Create the missing pods of the desired revision, within the surge bound.
    total = len(live) + terminating  # failed pods (already excluded) hold no GPU
    return _create(out, len(current), replicas, replicas + max_surge - total, stuck)


def _create(out: Plan, have: int, replicas: int, room: int, stuck: list[str]) -> Plan:
    """Create up to `replicas - have` pods within `room`; name the stuck pods only when they took room."""
    out.create = max(0, min(replicas - have, room))
    if out.create > max(0, min(replicas - have, room - len(stuck))):
        out.stuck = stuck
    return out
