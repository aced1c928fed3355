"""Replica autoscaling in a pass, pure: (spec, pods, scrapes, status.autoscaling, now) -> the replica count the pass
converges to, the pods it drains and deletes, and the next status.autoscaling (decide.py calls it once per pass).

With spec.autoscaling.enabled the operator owns the count: autoscale.decide (the policy) runs on every pass from
status.autoscaling (the desired count, the windows, the pods draining) and the pods' loads (load.py), and the count
it returns is what planning, the rollout and the status use instead of spec.replicas. A scale-up is planning
creating pods like any other missing replica. A scale-down drains: the pods named leave the Service at once (their
serving label goes, decide.py), and each is deleted once a scrape taken DRAIN_SETTLE seconds after that shows its
engine with no request running or waiting -- or at once when it is not Ready (no endpoint routes to it, and it is not
scraped), or after scaleDown.drainTimeoutSeconds at the latest. Only then is the next decision made (the policy
holds while a pod drains).

Exclusive with an HPA / KEDA on the scale subresource: spec.replicas is the starting point and is not followed
afterwards. A change of it while enabled (someone else scaling) sets AutoscalerConflict=True for CONFLICT_HOLD
seconds after the last such change, saying the operator's decision wins; the change itself is ignored.

When the windows were last evaluated (AutoscaleState.at: the policy restarts them after a gap nobody watched) is not
in the status -- it would be written on every pass -- but in the operator's memory with the scrapes (observe.py):
after a restart it is unknown, so the windows start afresh, which the missing scrapes would cause anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pie_operator import autoscale
from pie_operator.autoscale import AutoscaleState, PodLoad
from pie_operator.load import pod_load
from pie_operator.observe import PodView
from pie_operator.planning import Deletion, Pod, is_finished, is_ready, is_terminating
from pie_operator.quantity import parse_bytes
from pie_operator.records import Record
from pie_operator.spec import PieDeploymentSpec
from pie_operator.tuning import parse_ts, ts

AUTOSCALER_CONFLICT = "AutoscalerConflict"
CONFLICT_HOLD = 600.0  # seconds AutoscalerConflict stays True after the last change of spec.replicas by someone else
DRAIN_SETTLE = 10.0  # seconds for the Service's endpoints to drop a pod whose serving label went (kube-proxy, ...)
DRAINED, DRAIN_TIMEOUT = "Drained", "DrainTimeout"  # deletion reasons (Events DeletedDrained, DeletedDrainTimeout)


@dataclass(frozen=True)
class Scaling:
    """The replica side of one pass."""

    replicas: int  # what the pass converges to: the autoscaler's decision, else spec.replicas
    draining: frozenset[str] = frozenset()  # pods routed no more, leaving (planning and the rollout leave them be)
    delete: tuple[Deletion, ...] = ()  # drained pods to delete now
    record: Record | None = None  # a change of the count, for status.decisions and its Event
    status: dict[str, Any] | None = None  # status.autoscaling; None: autoscaling is off (removed from the status)
    conflict: tuple[bool, str, str] | None = None  # AutoscalerConflict (status, reason, message); None: no condition
    loads: tuple[PodLoad, ...] = ()  # the pods as the policy saw them (the operator's /metrics)
    recommended: int = 0  # what the policy wants at this instant, windows aside (for an HPA / KEDA: exporter.py)
    decision: autoscale.Decision | None = None  # None: not evaluated (autoscaling is off)

    @property
    def evaluated(self) -> bool:
        return self.decision is not None


def scale(spec: PieDeploymentSpec, pods: list[Pod], views: Mapping[str, PodView], previous: dict[str, Any] | None,
          *, evaluated_at: float | None, now: float) -> Scaling:
    """The replica side of a pass at `now` (module docstring). `previous`: status.autoscaling as the last pass left
    it; `evaluated_at`: when this operator last evaluated the windows (None: not since it started)."""
    a, prev = spec.autoscaling, previous or {}
    live = {p["metadata"]["name"]: p for p in pods if not is_terminating(p) and not is_finished(p)}
    draining = {e["pod"]: parse_ts(e.get("since")) or now for e in prev.get("draining") or []
                if e.get("pod") in live} if a.enabled else {}
    mode, host_max = spec.memory.expansion.mode, spec.memory.host_memory.max
    loads = tuple(pod_load(p, views.get(name), draining=name in draining, mode=mode,
                           host_max=None if host_max is None else parse_bytes(host_max))
                  for name, p in sorted(live.items()))
    if not a.enabled:  # (the loads and what the policy would want are still exported: exporter.py)
        return Scaling(spec.replicas, loads=loads, recommended=autoscale.recommend(a.policy(), spec.replicas, loads,
                                                                                   now))
    desired = int(prev.get("desiredReplicas") or spec.replicas)  # (the first pass starts where spec.replicas is)
    conflict_at = parse_ts(prev.get("conflictAt"))
    if spec.replicas != int(prev.get("specReplicas", spec.replicas)):
        conflict_at = now
    d = autoscale.decide(a.policy(), desired, loads, AutoscaleState(
        parse_ts(prev.get("upSince")), parse_ts(prev.get("downSince")), evaluated_at), now)
    record = None
    if d.replicas != desired:
        via = f"draining {', '.join(d.drain)}" if d.drain else "creating pods" if d.replicas > desired else "none"
        record = Record("", "replicas", str(desired), str(d.replicas), d.reason, d.message, via)
    draining.update(dict.fromkeys(d.drain, now))
    delete = tuple(x for name, since in sorted(draining.items())
                   if (x := _drained(live[name], since, views.get(name), now, a.scale_down.drain_timeout_seconds)))
    status = {"desiredReplicas": d.replicas, "specReplicas": spec.replicas, "reason": d.reason, "message": d.message,
              "upSince": _ts(d.state.up_since), "downSince": _ts(d.state.down_since),
              "draining": [{"pod": name, "since": ts(since)} for name, since in sorted(draining.items())],
              "conflictAt": _ts(conflict_at)}
    return Scaling(d.replicas, frozenset(draining), delete, record, status, _conflict(conflict_at, now, d.replicas),
                   loads, autoscale.recommend(a.policy(), desired, loads, now), d)


def _ts(t: float | None) -> str:
    return "" if t is None else ts(t)


def _drained(pod: Pod, since: float, view: PodView | None, now: float, timeout: float) -> Deletion | None:
    """A deletion once `pod` (draining since `since`) has finished its requests, or may not wait any longer."""
    name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
    if not is_ready(pod):
        return Deletion(name, uid, DRAINED, f"pod {name} drained: not Ready, so no request reaches it")
    obs = view.last_ok if view is not None else None
    m = obs.metrics if obs is not None else None
    if obs is not None and m is not None and obs.at >= since + DRAIN_SETTLE:
        busy = int(m["pie_num_requests_running"] + m["pie_num_requests_waiting"])
        if busy == 0:
            return Deletion(name, uid, DRAINED, f"pod {name} drained: no request running or waiting "
                                                f"{obs.at - since:.0f}s after it stopped taking traffic")
    if now - since >= timeout:
        left = "its engine not scraped since" if m is None or obs is None or obs.at < since + DRAIN_SETTLE else (
            f"{int(m['pie_num_requests_running'] + m['pie_num_requests_waiting'])} request(s) still in it")
        return Deletion(name, uid, DRAIN_TIMEOUT, f"pod {name} not drained after autoscaling.scaleDown."
                                                  f"drainTimeoutSeconds={timeout:g} ({left}): deleting it")
    return None


def _conflict(at: float | None, now: float, desired: int) -> tuple[bool, str, str]:
    if at is not None and now - at < CONFLICT_HOLD:
        return True, "SpecReplicasChanged", (
            f"spec.replicas was changed by someone else at {ts(at)} while spec.autoscaling is enabled (an HPA or "
            f"KEDA ScaledObject on the scale subresource, kubectl scale, an edit): the operator's own decision "
            f"({desired} replicas) wins and spec.replicas is not followed; remove the other autoscaler, or disable "
            "spec.autoscaling to let it decide")
    return False, "NoConflict", "the operator decides the replica count (spec.autoscaling); spec.replicas is left alone"
