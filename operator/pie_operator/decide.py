"""Decide: Snapshot -> ReconcilePlan, pure (no I/O, no clock but the snapshot's), computed once per pass.

It strings together the pure rules -- scaling.py (how many replicas: spec.replicas, or the autoscaler's count and
the pods it drains), rollout.py (which revision pods converge to, may the rollout step),
tuning.py / decisions.py (per-pod memory requests and GPU budgets), planning.py (which pods to create and delete),
builders.py (the desired objects) -- into the actions actuate.py carries out, and renders the status from the plan
and what acting did (`desired_status`).

A live GPU budget change is the one action whose effect only the engine knows: the plan assumes it lands live. An
engine that answers otherwise leaves its answer in status.pods[] (GPU_RESTART, GPU_REJECTED) and the pass is decided
again at once, with the answer in the snapshot (actuate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pie_operator import builders, memory
from pie_operator.config import MEMORY_MODE_CONDITION, memory_mode_condition, memory_mode_problems
from pie_operator.memory import initial_decision, pod_memory
from pie_operator.planning import Plan, Pod, is_finished, is_ready, is_terminating, plan, revision
from pie_operator.quantity import format_bytes, parse_bytes
from pie_operator.records import Event, Record
from pie_operator.rollout import RolloutState, advance, baseline_stall, gate_verdict, serving
from pie_operator.scaling import AUTOSCALER_CONFLICT, Scaling, scale
from pie_operator.scrape import Observation
from pie_operator.snapshot import Snapshot
from pie_operator.status import compute_status, condition, invalid_status
from pie_operator.tuning import (
    GPU_ATTEMPTS,
    GPU_REJECTED,
    GPU_RESTART,
    GPU_RETRY_AT,
    GPU_WAITING,
    GpuChange,
    container_status,
    parse_ts,
    plan_tuning,
    template_budget,
    template_request,
)


@dataclass(frozen=True)
class GpuLive:
    """POST `change` to the engine of `change.pod` at `ip`:`port`."""

    change: GpuChange
    bytes: int
    ip: str
    port: int
    restarts: int  # the container's restartCount now: a restart would bring back its --gpu-memory-budget
    attempts: int = 0  # earlier tries of a change the engine did not take yet (busy, transient): the backoff


@dataclass(frozen=True)
class MemoryAction:
    record: Record
    resize: tuple[str, str | None] | None = None  # (request, limit) through pods/resize; None: nothing to call


@dataclass
class ReconcilePlan:
    """Everything one pass does, and what its status is rendered from."""

    invalid: str = ""  # the spec is invalid: the status says why and nothing else is touched
    revision: str = ""  # the revision pods converge to
    admin_secret: dict[str, Any] | None = None  # create it (its random token is actuate's) when it has no token
    gpu: list[GpuLive] = field(default_factory=list)
    recorded: list[Record] = field(default_factory=list)  # decided with nothing to call (applied by replacement)
    apply: list[dict[str, Any]] = field(default_factory=list)  # owned objects that differ from the cluster's
    steps: Plan = field(default_factory=Plan)
    new_pod: dict[str, Any] = field(default_factory=dict)
    memory: list[MemoryAction] = field(default_factory=list)
    serving: dict[str, bool] = field(default_factory=dict)  # pod -> set (True) or remove its serving label
    events: list[Event] = field(default_factory=list)
    rollout: RolloutState | None = None
    memo: dict[str, dict[str, Any]] = field(default_factory=dict)  # pod -> status.pods[] fields to carry
    status_memory: dict[str, str] = field(default_factory=dict)  # status.memory: what new pods get
    replicas: int = 0  # what pods converge to: spec.replicas, or the autoscaler's decision (scaling.py)
    scaling: Scaling | None = None


def decide(snap: Snapshot) -> ReconcilePlan:
    """One step toward the spec (docs/operator.md, "The reconcile loop")."""
    spec = snap.spec
    if spec is None:
        return ReconcilePlan(invalid=snap.invalid)
    name, namespace, now, previous = snap.name, snap.namespace, snap.now, snap.previous
    last = {pod: v.last for pod, v in snap.views.items()}
    prev_pods = {e["name"]: e for e in previous.get("pods") or [] if e.get("name")}
    prev_memory = previous.get("memory") or {}
    owner = builders.owner_reference(snap.body)
    # The replica count first: with autoscaling it is the operator's own, and the pods it drains are left out of the
    # rollout and the plan (they leave once drained: scaling.py).
    scaling = scale(spec, snap.pods, snap.views, previous.get("autoscaling"), evaluated_at=snap.evaluated_at,
                    now=now.timestamp())
    replicas, active = scaling.replicas, [p for p in snap.pods if p["metadata"]["name"] not in scaling.draining]

    # The revision hashes the template without its memory values (those follow the per-pod decisions below).
    initial = initial_decision(spec.memory)
    spec_template = builders.pod_template(spec, name, initial)
    spec_revision = builders.template_hash(spec_template)
    gate = spec.rollout.gate
    baseline = baseline_stall(snap.pods, last, spec_revision)
    rollout, target = advance(
        RolloutState.from_status(previous.get("rollout")), spec_revision=spec_revision, spec_template=spec_template,
        pods=active, replicas=replicas, auto_rollback=spec.rollout.auto_rollback,
        verdict=lambda p: gate_verdict(p, last.get(p["metadata"]["name"]), now=now,
                                       step_timeout=spec.rollout.step_timeout_seconds,
                                       engine_health=gate.engine_health, baseline_stall=baseline,
                                       max_stall_regression=gate.max_stall_regression))

    # The closed loop: memory and GPU decisions for the running pods of the target revision.
    tuned = [p for p in snap.pods if not is_terminating(p) and not is_finished(p)
             and revision(p) == target.revision and p.get("status", {}).get("podIP")]
    tplan = plan_tuning(spec, initial, tuned, prev_pods, snap.views, now=now.timestamp(),
                        resize_supported=snap.resize_supported,
                        tmpl_request=template_request(spec, prev_memory.get("hostMemoryRequest")),
                        tmpl_limit=parse_bytes(prev_memory["hostMemoryLimit"]) if prev_memory.get("hostMemoryLimit")
                        else None)
    surge, unavailable = spec.rollout.bounds(replicas)
    gpu = _gpu(tplan.gpu, {p["metadata"]["name"]: p for p in tuned}, prev_pods, spec.engine.admin_port, last=last,
               now=now.timestamp(), max_live=max(1, unavailable))
    budget = template_budget(spec, prev_memory.get("gpuMemoryBudget"))
    if gpu.latest is not None and spec.memory.tuning.gpu_memory_budget_min is not None:
        budget = gpu.latest
    decision = memory.decide(spec.memory, tplan.template_request, budget, tplan.template_limit)  # what new pods get
    request, limit = pod_memory(spec.memory, decision)
    status_memory = {"hostMemoryRequest": request, "gpuMemoryBudget": decision.gpu_memory_budget}
    if tplan.template_limit is not None or "hostMemoryLimit" in prev_memory:  # (a merge patch never drops a key)
        status_memory["hostMemoryLimit"] = format_bytes(tplan.template_limit) if tplan.template_limit else ""

    passed = set(rollout.passed)
    create_revision, create_template = target.creates()
    routed = serving(rollout, active)
    desired = [builders.service(spec, name, namespace, owner),
               builders.config_map(spec, name, namespace, target.revision, decision, owner),
               builders.pod_disruption_budget(spec, name, namespace, owner)]
    if (peer := snap.config.admin_peer) is not None:
        desired.append(builders.admin_network_policy(spec, name, namespace, owner, peer))
    return ReconcilePlan(
        revision=target.revision,
        admin_secret=None if snap.admin_token else builders.admin_secret(name, namespace, "", owner),
        gpu=gpu.live, recorded=gpu.recorded,
        apply=[obj for obj in desired if not _contains(snap.owned.get(obj["kind"]), obj)],
        steps=plan(active, desired_revision=target.revision, replicas=replicas, max_surge=surge,
                   max_unavailable=unavailable, replace={**tplan.replace, **gpu.replace}, hold=target.hold,
                   gate=lambda p: is_ready(p) and p["metadata"]["name"] in passed, now=now).with_deletions(
                       scaling.delete),
        new_pod=builders.pod(builders.with_memory(create_template, request, limit, decision.gpu_memory_budget),
                             name, namespace, create_revision, owner),
        serving={p["metadata"]["name"]: want for p in snap.pods if not is_terminating(p)
                 and (want := p["metadata"]["name"] in routed)
                 != (p["metadata"].get("labels", {}).get(builders.SERVING_LABEL) == "true")},
        memory=[MemoryAction(Record(pod, "memory", format_bytes(c.old), format_bytes(c.new), c.reason, c.message, via),
                             tplan.resize.get(pod)) for pod, c, via in tplan.changes],
        events=_scrape_events(prev_pods, last),
        rollout=rollout,
        memo={pod: {**tplan.memo.get(pod, {}), **gpu.memo.get(pod, {})} for pod in {*tplan.memo, *gpu.memo}},
        status_memory={**status_memory, "expansionRatio": _expansion_ratio(last, decision.expansion_ratio)},
        replicas=replicas, scaling=scaling)


def desired_status(snap: Snapshot, plan: ReconcilePlan, pods: list[Pod], learned: dict[str, dict[str, Any]],
                   decisions: list[dict[str, Any]], *, stopped: bool) -> dict[str, Any]:
    """The status after acting: `pods` as they are now, `learned` the status.pods[] fields acting found out,
    `decisions` the status.decisions history; `stopped`: acting ended early (nothing the plan assumed applies)."""
    previous = snap.previous
    if snap.spec is None:
        return invalid_status(plan.invalid, snap.generation, previous, snap.now)
    prev_pods = {e["name"]: e for e in previous.get("pods") or [] if e.get("name")}
    memo = {pod: {**prev_pods.get(pod, {}), **plan.memo.get(pod, {}), **learned.get(pod, {})}
            for pod in {p["metadata"]["name"] for p in pods}}
    status = compute_status(
        name=snap.name, pods=pods, replicas=plan.replicas, desired_revision=plan.revision,
        generation=snap.generation, selector=snap.selector,
        memory=(previous.get("memory") or plan.status_memory) if stopped else plan.status_memory,
        previous=previous, now=snap.now, rollout=plan.rollout, observations={p: v.last for p, v in snap.views.items()},
        memo=memo, decisions=decisions, draining=plan.scaling.draining if plan.scaling is not None else frozenset())
    if label := snap.config.memory_mode_label:  # only where the operator was told which node label to read
        mode = memory_mode_condition(memory_mode_problems(pods, snap.node_modes, label), label)
        status["conditions"].append(condition(MEMORY_MODE_CONDITION, *mode, snap.generation,
                                              previous.get("conditions") or [], snap.now))
    if (sc := plan.scaling) is not None and sc.status is not None:
        # (acting stopped early: nothing it decided was done, so the autoscaler's status stays as it was)
        live = {e["name"] for e in status["pods"]}
        status["autoscaling"] = previous.get("autoscaling") if stopped else {
            **sc.status, "draining": [e for e in sc.status["draining"] if e["pod"] in live]}
    elif previous.get("autoscaling"):
        status["autoscaling"] = None  # switched off (a merge patch: null removes it)
    if sc is not None and sc.conflict is not None:
        status["conditions"].append(condition(AUTOSCALER_CONFLICT, *sc.conflict, snap.generation,
                                              previous.get("conditions") or [], snap.now))
    return status


@dataclass
class _Gpu:
    live: list[GpuLive] = field(default_factory=list)
    replace: dict[str, str] = field(default_factory=dict)  # pod -> "GPUBudgetChanged: ..." (planning.plan)
    recorded: list[Record] = field(default_factory=list)
    memo: dict[str, dict[str, Any]] = field(default_factory=dict)
    latest: str | None = None  # the last budget decided (new pods start with it)


def _settling(prev: dict[str, Any], obs: Observation | None) -> bool:
    """A budget applied live whose engine has not been seen healthy since (no ok scrape begun after the change)."""
    changed = parse_ts(prev.get("gpuBudgetChangedAt"))
    if changed is None or not prev.get("gpuBudgetLive"):
        return False
    return obs is None or not obs.ok or obs.at < changed + 1  # the stamp has whole seconds


def _gpu(changes: list[GpuChange], pods: dict[str, Pod], prev_pods: dict[str, dict[str, Any]], port: int, *,
         last: dict[str, Observation | None], now: float, max_live: int) -> _Gpu:
    """How each GPU budget change is applied: live through the engine, or by replacing the pod where the engine
    cannot take it live (a fraction of an unknown GPU size; an earlier answer, GPU_RESTART).

    Live changes are gated like a rollout step: at most `max_live` engines (maxUnavailable, at least one) are
    changed or settling at a time -- the next one only once the previous one's engine was scraped healthy after its
    change -- and a change the engine did not take yet waits out its backoff (GPU_RETRY_AT)."""
    out = _Gpu()
    settling = {pod for pod in pods if _settling(prev_pods.get(pod, {}), last.get(pod))}
    waiting = {pod for pod in pods if prev_pods.get(pod, {}).get(GPU_WAITING)}  # they keep their slot
    slots = max_live - len(settling | waiting)
    for g in sorted(changes, key=lambda g: g.pod):
        prev = prev_pods.get(g.pod, {})
        if prev.get(GPU_REJECTED) == g.new:
            continue  # refused by the engine: not forced through a restart either (a new decision is tried)
        if g.bytes is None or prev.get(GPU_RESTART) == g.new:
            out.replace[g.pod] = f"GPUBudgetChanged: GPU memory budget {g.old} -> {g.new}"
            if g.bytes is None:  # (an engine's GPU_RESTART answer was recorded when it came)
                out.recorded.append(Record(g.pod, "gpuMemoryBudget", g.old, g.new, g.reason, g.message,
                                           "Rolling (the budget is a fraction and the GPU size is unknown)"))
        elif g.pod not in settling and (g.pod in waiting or slots > 0):
            if g.pod not in waiting:
                slots -= 1
            if now >= (parse_ts(prev.get(GPU_RETRY_AT)) or 0.0):
                p = pods[g.pod]
                out.live.append(GpuLive(g, g.bytes, p["status"]["podIP"], port,
                                        container_status(p).get("restartCount", 0),
                                        attempts=int(prev.get(GPU_ATTEMPTS) or 0)))
        out.latest = g.new
    # An answer about a budget no longer decided is stale (the decision moved on, or the engine runs with it now).
    for pod, prev in prev_pods.items():
        for key in (GPU_RESTART, GPU_REJECTED):
            if prev.get(key) and not any(g.pod == pod and g.new == prev[key] for g in changes):
                out.memo.setdefault(pod, {})[key] = ""
        if prev.get(GPU_WAITING) and not any(g.pod == pod for g in changes):
            out.memo.setdefault(pod, {}).update({GPU_WAITING: "", GPU_ATTEMPTS: "", GPU_RETRY_AT: ""})
    return out


def _contains(actual: Any, desired: Any) -> bool:
    """Whether the object as read already has every field we set, with our value: applying it would change
    nothing we own, so it is not sent (server-side apply would only be a no-op write)."""
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(_contains(actual.get(k), v) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(actual, list) and len(actual) == len(desired) and all(map(_contains, actual, desired))
    return bool(actual == desired)


def _scrape_events(prev_pods: dict[str, dict[str, Any]], last: dict[str, Observation | None]) -> list[Event]:
    """One Event when a pod's metrics go stale (and one when they recover), not one per scrape: the previous
    status.pods[].metrics says what was announced."""
    out = []
    for pod, obs in last.items():
        if obs is None:
            continue
        before, now = prev_pods.get(pod, {}).get("metrics", ""), "ok" if obs.ok else obs.error
        if now == before:
            continue
        if not obs.ok:
            out.append(Event("Warning", "MetricsStale", f"pod {pod}: {obs.error}; its metrics are ignored "
                                                        "(no decision is made from stale data)"))
        elif before:
            out.append(Event("Normal", "MetricsRecovered", f"pod {pod}: metrics are fresh again"))
    return out


def _expansion_ratio(last: dict[str, Observation | None], default: str) -> str:
    """The mean measured expansion ratio over freshly scraped engines (the printer column), else the setting."""
    ratios = [o.metrics["pie_expansion_ratio"] for o in last.values() if o is not None and o.metrics is not None]
    return f"{sum(ratios) / len(ratios):.2f}" if ratios else default
