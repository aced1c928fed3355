"""One pass of the closed loop, pure: pods + what the operator observed + status -> memory/GPU actions.

For every running pod of the target revision, decisions.py decides its memory request and GPU budget; this module
turns decisions into actions by spec.memory.apply and cluster support:
- memory: InPlace (pods/resize; the cluster must support it) | replacement by the rollout (Rolling, or InPlace
  where resize is unsupported) | Off (only status.pods[].memoryRecommendation);
- GPU budget: reconcile POSTs it to the engine's admin endpoint and replaces the pod where that is not possible.
Per-pod memory of these decisions (last change times, the OOM kill already answered, a budget applied live) is
carried in status.pods[], so it survives an operator restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pie_operator.builders import ENGINE_CONTAINER
from pie_operator.decisions import Change, GpuInputs, MemoryInputs, OOMKill, Tuning, decide_gpu, decide_memory
from pie_operator.memory import MemoryDecision, limit_bytes, pool_bounds, request_bytes
from pie_operator.observe import PodView
from pie_operator.planning import Pod, memory_request
from pie_operator.quantity import format_bytes, parse_bytes, resolve_budget
from pie_operator.resize import INFEASIBLE, WAITING, qos_change, resize_state
from pie_operator.spec import PieDeploymentSpec

TS = "%Y-%m-%dT%H:%M:%SZ"
# status.pods[] fields that carry an engine's answer to a live GPU budget change into the next pass (decide.py).
GPU_RESTART = "gpuBudgetRestart"  # this budget cannot be applied live: the pod is replaced to apply it
GPU_REJECTED = "gpuBudgetRejected"  # the engine refused this budget: it is not sent again
# A live change the engine did not take yet -- busy (a running request needs the KV) or a transient error -- is
# retried, never turned into a replacement: why it waits, how many tries failed, and not before when.
RESIZE_REJECTED = "resizeRejected"  # a memory request the apiserver refused to resize to: replaced, not resent
GPU_WAITING = "gpuBudgetWaiting"
GPU_ATTEMPTS = "gpuBudgetAttempts"
GPU_RETRY_AT = "gpuBudgetRetryAt"
RETRY_BASE_SECONDS, RETRY_MAX_SECONDS = 5.0, 300.0


def retry_delay(attempts: int) -> float:
    """Exponential backoff after `attempts` failed tries (5 s, 10 s, 20 s, ... at most 5 min)."""
    return float(min(RETRY_BASE_SECONDS * 2 ** max(attempts - 1, 0), RETRY_MAX_SECONDS))


def ts(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime(TS)


def parse_ts(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def knobs(spec: PieDeploymentSpec) -> Tuning:
    t = spec.memory.tuning
    return Tuning(percentile=float(t.percentile), window_seconds=float(t.window_seconds), min_samples=t.min_samples,
                  change_threshold=t.change_threshold_percent / 100.0, cooldown_seconds=float(t.cooldown_seconds),
                  source=t.source)


def container_status(pod: Pod) -> dict[str, Any]:
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        if cs.get("name") == ENGINE_CONTAINER:
            return cs
    return {}


def memory_limit(pod: Pod) -> int | None:
    """The engine container's memory limit in bytes as the pod spec says (None: no limit)."""
    for c in pod.get("spec", {}).get("containers", []):
        if c.get("name") == ENGINE_CONTAINER and (value := (c.get("resources", {}).get("limits") or {}).get("memory")):
            return parse_bytes(value)
    return None


def budget_arg(pod: Pod) -> str | None:
    """The --gpu-memory-budget the pod's engine was started with."""
    for c in pod.get("spec", {}).get("containers", []):
        args = c.get("args") or []
        if c.get("name") == ENGINE_CONTAINER and "--gpu-memory-budget" in args[:-1]:
            return args[args.index("--gpu-memory-budget") + 1]
    return None


def effective_budget(pod: Pod, prev: dict[str, Any]) -> str:
    """The budget the engine runs with: the one applied live (while the container has not restarted since, which
    would bring back its --gpu-memory-budget), else the flag."""
    restarts = container_status(pod).get("restartCount", 0)
    if prev.get("gpuBudgetLive") and prev.get("gpuBudgetRestarts") == restarts and prev.get("gpuMemoryBudget"):
        return str(prev["gpuMemoryBudget"])
    return budget_arg(pod) or ""


def oom_kill(pod: Pod, prev: dict[str, Any]) -> tuple[OOMKill | None, str]:
    """The engine container's last OOM kill (if its last termination was one) and its finishedAt, the marker that
    status.pods[].oomHandledAt keeps once it was answered."""
    term = (container_status(pod).get("lastState") or {}).get("terminated") or {}
    if term.get("reason") != "OOMKilled":
        return None, ""
    marker = str(term.get("finishedAt") or "")
    return OOMKill(finished_at=parse_ts(marker) or 0.0, handled=prev.get("oomHandledAt") == marker), marker


@dataclass(frozen=True)
class GpuChange:
    pod: str
    old: str
    new: str
    bytes: int | None  # None: cannot be expressed in bytes now (a fraction, GPU total unknown) -> replace the pod
    reason: str
    message: str


@dataclass
class TuningPlan:
    resize: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # pod -> (request, limit)
    replace: dict[str, str] = field(default_factory=dict)  # pod -> "Reason: detail" (planning.plan's `replace`)
    gpu: list[GpuChange] = field(default_factory=list)  # reconcile applies these (live or by replacement)
    changes: list[tuple[str, Change, str]] = field(default_factory=list)  # (pod, memory change, how applied)
    memo: dict[str, dict[str, Any]] = field(default_factory=dict)  # pod -> status.pods[] fields to carry
    template_request: int = 0
    template_limit: int | None = None  # a limit an OOM kill raised: new pods get it too


def template_request(spec: PieDeploymentSpec, previous: str | None) -> int:
    """The request new pods get: the latest decided one (status.memory.hostMemoryRequest) within the bounds."""
    lo_pool, hi_pool = pool_bounds(spec.memory)
    lo = request_bytes(spec.memory, lo_pool)
    hi = None if hi_pool is None else request_bytes(spec.memory, hi_pool)
    value = parse_bytes(previous) if previous else lo
    return max(lo, value if hi is None else min(value, hi))


def template_budget(spec: PieDeploymentSpec, previous: str | None) -> str:
    """The GPU budget new pods get: the spec's, or with GPU tuning the latest decided one."""
    if spec.memory.tuning.gpu_memory_budget_min is None or not previous:
        return spec.memory.gpu_memory_budget
    return previous


def plan_tuning(spec: PieDeploymentSpec, decision: MemoryDecision, pods: list[Pod], prev_pods: dict[str, dict],
                views: dict[str, PodView], *, now: float, resize_supported: bool | None, tmpl_request: int,
                tmpl_limit: int | None = None) -> TuningPlan:
    """Decide memory and GPU changes for `pods` (the running pods of the target revision). `resize_supported`
    None (InPlace, but the apiserver could not say whether it resizes): no memory decision this pass -- neither a
    resize nor a replacement is decided on a transient error."""
    out = TuningPlan(template_request=tmpl_request, template_limit=tmpl_limit)
    t, mem = knobs(spec), spec.memory
    min_pool, max_pool = pool_bounds(mem)
    for pod in pods:
        name = pod["metadata"]["name"]
        prev, view = prev_pods.get(name, {}), views.get(name) or PodView(None)
        memo = out.memo.setdefault(name, {})
        stale = view.last is None or not view.last.ok
        born = parse_ts(pod["metadata"].get("creationTimestamp")) or now
        state, why = resize_state(pod)
        if state == INFEASIBLE and mem.apply == "InPlace":  # the node can never fit it: elsewhere, then
            out.replace[name] = f"ResizeInfeasible: the node cannot fit the resized pod ({why or 'Infeasible'})"
        elif state in WAITING:
            pass  # the kubelet has not finished the last resize (a Deferred one it retries by itself): wait
        elif (current := memory_request(pod)) is not None and resize_supported is not None:
            oom, marker = oom_kill(pod, prev)
            pod_limit = memory_limit(pod)
            c = decide_memory(MemoryInputs(
                current=parse_bytes(current), min_pool=min_pool, max_pool=max_pool,
                to_request=lambda pool: request_bytes(mem, pool), samples=view.samples, stale=stale,
                last_change=parse_ts(prev.get("memoryChangedAt")) or born, oom=oom, limit=pod_limit), now, t)
            if c is not None:
                if c.reason.startswith("OOMKilled"):
                    memo["oomHandledAt"] = marker
                _memory_action(out, pod, c, mem.apply, resize_supported, _new_limit(c, limit_bytes(
                    mem, decision, c.new), pod_limit), prev)
        gpu = _gpu_change(spec, t, pod, prev, view, stale, born, now)
        if gpu is not None:
            out.gpu.append(gpu)
    return out


def _new_limit(c: Change, formula: int | None, current: int | None) -> int | None:
    """The limit that goes with a new request: an OOM rule's raised limit, else the spec's (base + max +
    headroom(max)) but never below the pod's limit now -- a limit an OOM kill raised stays raised."""
    if c.limit is not None:
        return c.limit
    return None if formula is None else max(formula, current or 0)


def _memory_action(out: TuningPlan, pod: Pod, c: Change, apply: str, resize_supported: bool, limit: int | None,
                   prev: dict[str, Any]) -> None:
    name = pod["metadata"]["name"]
    if c.reason == "OOMKilledAtMax":  # nothing left to give; reported once
        out.changes.append((name, c, "none"))
        return
    if apply == "Off":
        out.memo[name]["memoryRecommendation"] = format_bytes(c.new)
        return
    request, new_limit = format_bytes(c.new), None if limit is None else format_bytes(limit)
    how = "Rolling" if apply == "Rolling" else "Rolling (in-place resize unsupported by the cluster)"
    if apply == "InPlace" and resize_supported:
        # What the apiserver refuses is never sent (again): a QoS class change, or a value it refused already.
        if (qos := qos_change(pod, request, new_limit)) is not None:
            how = f"Rolling (a resize would change the pod's QoS class {qos[0]} -> {qos[1]})"
        elif prev.get(RESIZE_REJECTED) == request:
            how = "Rolling (the apiserver refused the resize)"
        else:
            how = "InPlace"
            out.resize[name] = (request, new_limit)
    if how != "InPlace":
        out.replace[name] = f"MemoryChanged: memory request {format_bytes(c.old)} -> {request}"
    out.template_request = c.new
    if c.limit is not None:  # killed at its limit: so would a new pod be
        out.template_limit = max(out.template_limit or 0, c.limit)
    out.changes.append((name, c, how))


def _gpu_change(spec: PieDeploymentSpec, t: Tuning, pod: Pod, prev: dict[str, Any], view: PodView, stale: bool,
                born: float, now: float) -> GpuChange | None:
    name, effective = pod["metadata"]["name"], effective_budget(pod, prev)
    metrics = view.last.metrics if view.last is not None and view.last.ok else None
    total = metrics.bytes("pie_gpu_memory_total_bytes") if metrics is not None else None
    overhead = metrics.optional_bytes("pie_gpu_memory_overhead_bytes") if metrics is not None else None
    wanted = spec.memory.gpu_memory_budget
    if spec.memory.tuning.gpu_memory_budget_min is None:
        if not effective or effective == wanted:
            return None
        return GpuChange(name, effective, wanted, resolve_budget(wanted, total, overhead), "Spec",
                         f"memory.gpuMemoryBudget is {wanted}, the engine runs with {effective}")
    cur = resolve_budget(effective, total, overhead) if effective else None
    lo = resolve_budget(spec.memory.tuning.gpu_memory_budget_min, total, overhead)
    hi = resolve_budget(wanted, total, overhead)
    if cur is None or lo is None or hi is None or hi <= 0:
        return None  # a fraction while the GPU total or the engine's overhead is unknown: nothing to compare with
    c = decide_gpu(GpuInputs(current=cur, lo=min(lo, hi), hi=hi, samples=view.samples, stale=stale,
                             last_change=parse_ts(prev.get("gpuBudgetChangedAt")) or born), now, t)
    if c is None:
        return None
    return GpuChange(name, effective, format_bytes(c.new), c.new, c.reason, c.message)
