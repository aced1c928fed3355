"""The memory decision: how much host memory a pod requests and which budgets its engine gets.

Pure functions. Before any metrics exist the KV pool starts at hostMemory.min; afterwards each pod's request follows
its own engine's metrics (decisions.py, tuning.py) and `decide()` carries the latest decided request and GPU budget
into the pod template, so new pods start with them. Neither is part of the pod template hash: `spec.memory.apply`
says how a changed request lands (InPlace: resize the running pod; Rolling: replace pods; Off: only report it), and
a changed GPU budget is applied live through the engine's admin endpoint or else by replacing the pod.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pie_operator.spec import MemorySpec, format_bytes, is_percent, parse_bytes


@dataclass(frozen=True)
class MemoryDecision:
    """What the operator currently wants for every pod of one PieDeployment."""

    host_pool_bytes: int  # host memory for the KV pool (the part adaptive expansion sizes)
    gpu_memory_budget: str  # --gpu-memory-budget: a fraction ("0.9") or bytes
    expansion: str  # --expansion: off | adaptive | <ratio>
    host_memory_limit: int | None  # --host-memory-limit in bytes (hostMemory.max); None: unlimited / not used
    # --expansion-latency-target in seconds (expansion.latencyTarget, adaptive only); None: no flag, so the pods of
    # specs without the field keep exactly their args and template hash (no rollout on operator upgrade).
    expansion_latency_target: float | None
    memory_request: int | None = None  # the decided pod memory request; None: base + pool + headroom(pool)
    memory_limit: int | None = None  # a limit an OOM kill raised: new pods keep it (else they die at the old one)

    @property
    def expansion_ratio(self) -> str:
        """For status/printer columns: the static ratio, 1.0 when off, 'adaptive' until measured."""
        return {"off": "1.0"}.get(self.expansion, self.expansion)


def headroom_bytes(memory: MemorySpec, pool_bytes: int) -> int:
    """Extra host memory on top of the KV pool: a fixed quantity or a percentage of the pool."""
    if is_percent(memory.headroom):
        return math.ceil(pool_bytes * float(str(memory.headroom).rstrip("%")) / 100.0)
    return parse_bytes(memory.headroom)


def initial_decision(memory: MemorySpec) -> MemoryDecision:
    """The decision before any metrics exist: the pool starts at hostMemory.min (0 when expansion is off)."""
    mode = memory.expansion.mode
    expansion = {"off": "off", "adaptive": "adaptive"}.get(mode) or f"{memory.expansion.ratio:g}"
    if mode == "static" and "." not in expansion:
        expansion += ".0"  # "2" -> "2.0": the engine reads a bare integer the same, humans read a ratio
    hm = memory.host_memory
    return MemoryDecision(
        host_pool_bytes=0 if mode == "off" else parse_bytes(hm.min),
        gpu_memory_budget=memory.gpu_memory_budget,
        expansion=expansion,
        host_memory_limit=None if mode == "off" or hm.max is None else parse_bytes(hm.max),
        expansion_latency_target=memory.expansion.latency_target_seconds,
    )


def decide(memory: MemorySpec, memory_request: int | None = None, gpu_memory_budget: str | None = None,
           memory_limit: int | None = None) -> MemoryDecision:
    """The decision new pods get: the initial one, with the latest decided request / GPU budget / OOM-raised limit
    when given."""
    d = initial_decision(memory)
    return replace(d, memory_request=memory_request, gpu_memory_budget=gpu_memory_budget or d.gpu_memory_budget,
                   memory_limit=memory_limit)


def pool_bounds(memory: MemorySpec) -> tuple[int, int | None]:
    """[min, max] of the host KV pool in bytes (0 and unbounded with expansion off: no pool to size)."""
    if memory.expansion.mode == "off":
        return 0, None
    hm = memory.host_memory
    return parse_bytes(hm.min), None if hm.max is None else parse_bytes(hm.max)


def request_bytes(memory: MemorySpec, pool_bytes: int) -> int:
    """Pod memory request for a KV pool: base + pool + headroom(pool)."""
    return parse_bytes(memory.base) + pool_bytes + headroom_bytes(memory, pool_bytes)


def limit_bytes(memory: MemorySpec, decision: MemoryDecision, request: int) -> int | None:
    """The memory limit (only when hostMemory.max bounds the pool): base + max + headroom(max), >= the request, and
    at least a limit an OOM kill raised (decision.memory_limit)."""
    if decision.host_memory_limit is None:
        return None
    return max(request, request_bytes(memory, decision.host_memory_limit), decision.memory_limit or 0)


def pod_memory(memory: MemorySpec, decision: MemoryDecision) -> tuple[str, str | None]:
    """(request, limit) quantities for the engine container.

    request = base + pool + headroom(pool); limit = base + max + headroom(max) when hostMemory.max bounds the pool
    (the engine never grows its pool beyond --host-memory-limit, so the limit is never the reason for an OOM kill
    of a well-behaved engine), else no limit.
    """
    request = decision.memory_request
    if request is None:
        request = request_bytes(memory, decision.host_pool_bytes)
    limit = limit_bytes(memory, decision, request)
    return format_bytes(request), None if limit is None else format_bytes(limit)
