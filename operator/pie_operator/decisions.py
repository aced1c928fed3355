"""Pure sizing decisions: a pod's engine-metric samples -> its host-memory request and GPU-memory budget.

No I/O and no clock: callers pass `now` (unix seconds) and the samples. Rules, in order, for each field:

1. Bounds (spec-driven, immediate): a value outside the spec's bounds is clamped to them.
2. OOM (memory only, immediate): an engine container OOM-killed since the last bump gets max(request x 1.2,
   request + 100Mi), clamped to the maximum -- as the Vertical Pod Autoscaler does. A container with a memory limit
   was killed at that limit, so the limit moves by the same rule (else the next kill would come at the same place);
   one without a limit was killed under node memory pressure, which only a larger request (scheduling) avoids.
3. Metrics: a high percentile of the samples in the window, clamped to the bounds, replaces the current value only
   when ALL hold: the latest scrape is fresh (stale data never causes a change), the window holds at least
   `min_samples` samples (so an operator restart, which empties the in-memory window, never causes a change by
   itself), the change exceeds `change_threshold` of the current value, the last change is `cooldown` old, and --
   for a decrease -- no OOM kill happened within the window.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MiB = 2**20
OOM_BUMP_RATIO = 1.2  # VPA's OOMBumpUpRatio
OOM_MIN_BUMP = 100 * MiB  # VPA's OOMMinBumpUp
ROUND_TO = MiB  # decided values are rounded up to whole MiB (readable quantities, no byte-level churn)


@dataclass(frozen=True, slots=True)
class Sample:
    """One successful scrape of one engine (bytes)."""

    at: float
    host_kv_used: int
    host_recommended: int
    gpu_recommended: int


class SampleWindow:
    """The samples of one pod's last `window_seconds` (spec.memory.tuning.windowSeconds): older ones are dropped as
    new ones come, so memory follows the time window and the scrape interval, never a fixed count.

    In memory only: after an operator restart it starts empty, and rule 3 waits for `min_samples` fresh ones.
    """

    def __init__(self, window_seconds: float = 1800.0) -> None:
        self.window_seconds = window_seconds
        self._samples: deque[Sample] = deque()

    def add(self, sample: Sample) -> None:
        if self._samples and sample.at < self._samples[-1].at:
            return  # out of order (a slow scrape finishing late): the newer sample already describes the pod
        self._samples.append(sample)
        self._expire(sample.at)

    def set_window(self, window_seconds: float) -> None:
        """A new tuning window (the spec changed): a shorter one drops what is now too old."""
        self.window_seconds = window_seconds
        if self._samples:
            self._expire(self._samples[-1].at)

    def _expire(self, newest: float) -> None:
        while self._samples and self._samples[0].at < newest - self.window_seconds:
            self._samples.popleft()

    def recent(self, now: float, window_seconds: float) -> list[Sample]:
        return [s for s in self._samples if now - window_seconds <= s.at <= now]

    def __len__(self) -> int:
        return len(self._samples)


@dataclass(frozen=True)
class Tuning:
    """The knobs (spec.memory.tuning), as plain numbers."""

    percentile: float = 95.0
    window_seconds: float = 1800.0
    min_samples: int = 5
    change_threshold: float = 0.10  # a fraction of the current value
    cooldown_seconds: float = 300.0
    source: str = "Used"  # Used: pie_host_kv_used_bytes | Recommended: pie_recommended_host_memory_bytes


@dataclass(frozen=True)
class OOMKill:
    """The engine container's last termination was an OOM kill at `finished_at`; `handled`: already bumped."""

    finished_at: float
    handled: bool


@dataclass(frozen=True)
class Change:
    """A decided change of one field of one pod. `new == old` for OOMKilledAtMax (nothing left to give), and for an
    OOM kill at a limit while the request is at its maximum (only the limit moves)."""

    field: str  # "memory" | "gpuMemoryBudget"
    old: int
    new: int
    reason: str  # Bounds | OOMKilled | OOMKilledAtMax | Metrics
    message: str
    limit: int | None = None  # memory only: the container's new memory limit when this change moves it


def percentile(values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile (q in (0, 100]): always one of the observed values, never an interpolation."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100.0 * len(ordered)) - 1, 0)]


def round_up(n: int, to: int = ROUND_TO) -> int:
    return -(-n // to) * to


def clamp(value: int, lo: int, hi: int | None) -> int:
    return max(lo, value if hi is None else min(value, hi))


def _fmt(n: int) -> str:
    for suffix, unit in (("Gi", 2**30), ("Mi", MiB), ("Ki", 2**10)):
        if n >= unit:
            return f"{n / unit:.4g}{suffix}"
    return f"{n}B"


def _bounds(field: str, current: int, lo: int, hi: int | None, what: str) -> Change | None:
    if current < lo:
        return Change(field, current, lo, "Bounds", f"{_fmt(current)} is below the minimum {_fmt(lo)} ({what})")
    if hi is not None and current > hi:
        return Change(field, current, hi, "Bounds", f"{_fmt(current)} is above the maximum {_fmt(hi)} ({what})")
    return None


def _gated(field: str, current: int, target: int, last_change: float, now: float, t: Tuning,
           why: str) -> Change | None:
    """Hysteresis: only a change beyond the threshold, and only after the cooldown."""
    if abs(target - current) <= t.change_threshold * current:
        return None
    if now - last_change < t.cooldown_seconds:
        return None
    return Change(field, current, target, "Metrics", why)


@dataclass(frozen=True)
class MemoryInputs:
    """One pod's memory request and what is known about it. Requests in bytes; `to_request(pool)` maps a host KV
    pool to a request (base + pool + headroom); pools are bounded by [min_pool, max_pool]."""

    current: int
    min_pool: int
    max_pool: int | None
    to_request: Callable[[int], int]
    samples: Sequence[Sample]
    stale: bool
    last_change: float
    oom: OOMKill | None = None
    limit: int | None = None  # the container's memory limit now (None: no limit)


def _bump(n: int) -> int:
    return round_up(max(math.ceil(n * OOM_BUMP_RATIO), n + OOM_MIN_BUMP))


def _oom(x: MemoryInputs, lo: int, hi: int | None) -> Change:
    """The answer to an OOM kill: where it happened decides what moves (module docstring, rule 2)."""
    request = clamp(_bump(x.current), lo, hi)
    if x.limit is not None:
        limit = max(_bump(x.limit), request)
        return Change("memory", x.current, request, "OOMKilled",
                      f"the engine was OOM-killed at its memory limit {_fmt(x.limit)}: limit raised to "
                      f"{_fmt(limit)}, request {_fmt(x.current)} -> {_fmt(request)}", limit=limit)
    if request > x.current:
        return Change("memory", x.current, request, "OOMKilled",
                      f"the engine was OOM-killed with no memory limit (node memory pressure, request "
                      f"{_fmt(x.current)}): request bumped to {_fmt(request)}")
    return Change("memory", x.current, x.current, "OOMKilledAtMax",
                  f"the engine was OOM-killed with no memory limit (node memory pressure) at the maximum request "
                  f"{_fmt(x.current)}: raise memory.hostMemory.max")


def decide_memory(x: MemoryInputs, now: float, t: Tuning) -> Change | None:
    """The pod's next memory request, or None to keep it (module docstring: the rules)."""
    lo = x.to_request(x.min_pool)
    hi = None if x.max_pool is None else x.to_request(x.max_pool)
    if (c := _bounds("memory", x.current, lo, hi, "memory.hostMemory bounds")) is not None:
        return c
    if x.oom is not None and not x.oom.handled:
        return _oom(x, lo, hi)
    if x.stale:
        return None
    recent = x.samples
    if len(recent) < t.min_samples:
        return None
    signal = [s.host_kv_used if t.source == "Used" else s.host_recommended for s in recent]
    pool = clamp(round_up(percentile(signal, t.percentile)), x.min_pool, x.max_pool)
    target = clamp(round_up(x.to_request(pool)), lo, hi)
    if target < x.current and x.oom is not None and now - x.oom.finished_at < t.window_seconds:
        return None  # keep the OOM bump for a whole window, as VPA keeps the OOM sample
    metric = "pie_host_kv_used_bytes" if t.source == "Used" else "pie_recommended_host_memory_bytes"
    return _gated("memory", x.current, target, x.last_change, now, t,
                  f"p{t.percentile:g} of {metric} over {len(recent)} samples is {_fmt(pool)}: request "
                  f"{_fmt(x.current)} -> {_fmt(target)}")


@dataclass(frozen=True)
class GpuInputs:
    """One pod's GPU-memory budget in bytes and its bounds (the spec's min and initial budget, resolved)."""

    current: int
    lo: int
    hi: int
    samples: Sequence[Sample]
    stale: bool
    last_change: float


def decide_gpu(x: GpuInputs, now: float, t: Tuning) -> Change | None:
    """The pod's next GPU budget (the engine's recommendation, clamped), or None to keep it."""
    if (c := _bounds("gpuMemoryBudget", x.current, x.lo, x.hi, "memory.tuning.gpuMemoryBudgetMin and "
                                                                  "memory.gpuMemoryBudget")) is not None:
        return c
    if x.stale:
        return None
    # A zero recommendation means the engine has seen no KV demand yet: no evidence, not "needs nothing".
    recs = [s.gpu_recommended for s in x.samples if s.gpu_recommended > 0]
    if len(recs) < t.min_samples:
        return None
    target = clamp(round_up(percentile(recs, t.percentile)), x.lo, x.hi)
    return _gated("gpuMemoryBudget", x.current, target, x.last_change, now, t,
                  f"p{t.percentile:g} of pie_recommended_gpu_memory_bytes over {len(recs)} samples: budget "
                  f"{_fmt(x.current)} -> {_fmt(target)}")
