"""Table tests of the pure sizing decisions (decisions.py) and of their wiring to the spec (tuning.py helpers)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from pie_operator.decisions import (
    Change,
    GpuInputs,
    MemoryInputs,
    OOMKill,
    Sample,
    SampleWindow,
    Tuning,
    decide_gpu,
    decide_memory,
    percentile,
)
from pie_operator.memory import pool_bounds, request_bytes
from pie_operator.spec import PieDeploymentSpec, format_bytes
from pie_operator.tuning import template_request
from tests.unit.operator.test_spec import spec_with

Mi, Gi = 2**20, 2**30
NOW = 10_000.0
T = Tuning(percentile=95, window_seconds=600, min_samples=3, change_threshold=0.10, cooldown_seconds=300)


def samples(*used_mi: float, gpu_mi: float = 0, rec_mi: float = 0, start: float = NOW - 60) -> list[Sample]:
    return [Sample(at=start + i, host_kv_used=int(u * Mi), host_recommended=int(rec_mi * Mi),
                   gpu_recommended=int(gpu_mi * Mi)) for i, u in enumerate(used_mi)]


def mem(current_gi: float = 1, **kw: Any) -> MemoryInputs:
    """Request = 1Gi base + pool (no headroom); pool in [0, 3Gi]; the last change long ago; fresh metrics."""
    base: dict[str, Any] = dict(current=int(current_gi * Gi), min_pool=0, max_pool=3 * Gi,
                                to_request=lambda pool: Gi + pool, samples=[], stale=False, last_change=0.0)
    return MemoryInputs(**{**base, **kw})


def outcome(c: Change | None) -> tuple[str, int] | None:
    return None if c is None else (c.reason, c.new)


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([5], 95, 5), ([1, 2, 3, 4], 50, 2), ([1, 2, 3, 4], 100, 4), (list(range(1, 101)), 95, 95),
    ([10, 1, 7], 95, 10), ([3, 3, 3], 1, 3),
])
def test_percentile_is_nearest_rank(values: list[int], q: float, expected: int) -> None:
    assert percentile(values, q) == expected


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 95)


def test_window_is_bounded_by_its_time_window() -> None:
    w = SampleWindow(window_seconds=3)
    for s in samples(*range(10), start=0):
        w.add(s)
    assert len(w) == 4 and [s.at for s in w.recent(now=9, window_seconds=100)] == [6, 7, 8, 9]
    assert [s.at for s in w.recent(now=9, window_seconds=1.5)] == [8, 9]
    w.add(Sample(at=3, host_kv_used=0, host_recommended=0, gpu_recommended=0))  # late: ignored
    assert [s.at for s in w.recent(now=9, window_seconds=100)] == [6, 7, 8, 9]
    w.set_window(1)  # the spec's window shrank
    assert [s.at for s in w.recent(now=9, window_seconds=100)] == [8, 9]


def test_window_memory_follows_time_not_a_count() -> None:
    """A scrape every second for 3 hours under a 30-minute window keeps 30 minutes of samples; a short window at a
    fast scrape keeps no more than its seconds' worth either."""
    w = SampleWindow(window_seconds=1800)
    for t in range(3 * 3600):
        w.add(Sample(at=float(t), host_kv_used=t, host_recommended=0, gpu_recommended=0))
    assert len(w) == 1801
    short = SampleWindow(window_seconds=60)
    for t in range(5000):
        short.add(Sample(at=t * 0.1, host_kv_used=t, host_recommended=0, gpu_recommended=0))
    assert len(short) == 601


@pytest.mark.parametrize(("inputs", "expected"), [
    # bounds (spec-driven: immediate, even without metrics)
    (mem(0.5), ("Bounds", Gi)),
    (mem(5), ("Bounds", 4 * Gi)),
    (mem(5, stale=True, last_change=NOW), ("Bounds", 4 * Gi)),
    # no evidence, no change: stale data, an empty window (e.g. right after an operator restart), too few samples
    (mem(1, samples=samples(900, 900, 900), stale=True), None),
    (mem(1, samples=[]), None),
    (mem(1, samples=samples(900, 900)), None),
    # growth: p95 of the pool (rounded up to MiB) + base
    (mem(1, samples=samples(100, 200, 512)), ("Metrics", Gi + 512 * Mi)),
    (mem(1, samples=samples(100.2, 100.2, 100.2)), None),             # +10.0%: not beyond the threshold
    (mem(1, samples=samples(103, 103, 103)), ("Metrics", Gi + 103 * Mi)),
    (mem(1, samples=samples(512, 512, 512), last_change=NOW - 299), None),  # cooldown
    (mem(1, samples=samples(512, 512, 512), last_change=NOW - 300), ("Metrics", Gi + 512 * Mi)),
    (mem(1, samples=samples(9000, 9000, 9000)), ("Metrics", 4 * Gi)),  # clamped to max
    (mem(1, samples=samples(9000, 9000, 9000), max_pool=None), ("Metrics", Gi + 9000 * Mi)),
    # shrink when the load is gone, down to the minimum
    (mem(3, samples=samples(0, 0, 0)), ("Metrics", Gi)),
    (mem(3, samples=samples(0, 0, 0), min_pool=Gi), ("Metrics", 2 * Gi)),
    (mem(3, samples=samples(0, 0, 2048)), None),                        # p95 still sees the peak
    # OOM kills bump like VPA, at once (no cooldown), once, up to the maximum
    (mem(1, oom=OOMKill(NOW - 5, handled=False), last_change=NOW), ("OOMKilled", 1229 * Mi)),  # ceil(1.2x) to MiB
    (mem(0.25, min_pool=0, to_request=lambda p: p + Gi // 4, oom=OOMKill(NOW, False)),
     ("OOMKilled", Gi // 4 + 100 * Mi)),                                # at least +100Mi
    (mem(3.9, oom=OOMKill(NOW, False)), ("OOMKilled", 4 * Gi)),
    (mem(4, oom=OOMKill(NOW, False)), ("OOMKilledAtMax", 4 * Gi)),
    (mem(2, oom=OOMKill(NOW - 5, True), samples=samples(0, 0, 0)), None),  # keep the bump for a whole window...
    (mem(2, oom=OOMKill(NOW - 601, True), samples=samples(0, 0, 0)), ("Metrics", Gi)),  # ...then shrink
    (mem(1, oom=OOMKill(NOW - 5, True), samples=samples(512, 512, 512)), ("Metrics", Gi + 512 * Mi)),
])
def test_decide_memory(inputs: MemoryInputs, expected: tuple[str, int] | None) -> None:
    assert outcome(decide_memory(inputs, NOW, T)) == expected


def test_oom_at_a_limit_moves_the_limit() -> None:
    """Killed at its limit: the limit moves too (else the next kill comes at the same place), also when the request
    is already at its maximum; the message names the limit, not the request."""
    c = decide_memory(mem(1, limit=2 * Gi, oom=OOMKill(NOW, False)), NOW, T)
    assert c is not None and (c.reason, c.new, c.limit) == ("OOMKilled", 1229 * Mi, 2458 * Mi)
    assert "OOM-killed at its memory limit 2Gi" in c.message and "limit raised to 2.4" in c.message
    at_max = decide_memory(mem(4, limit=4 * Gi, oom=OOMKill(NOW, False)), NOW, T)
    assert at_max is not None and (at_max.reason, at_max.new, at_max.limit) == ("OOMKilled", 4 * Gi, 4916 * Mi)


def test_oom_without_a_limit_says_node_memory_pressure() -> None:
    c = decide_memory(mem(1, oom=OOMKill(NOW, False)), NOW, T)
    assert c is not None and c.limit is None and "no memory limit (node memory pressure, request 1Gi)" in c.message
    at_max = decide_memory(mem(4, oom=OOMKill(NOW, False)), NOW, T)
    assert at_max is not None and at_max.reason == "OOMKilledAtMax" and "node memory pressure" in at_max.message


def test_memory_source_recommended() -> None:
    x = mem(1, samples=samples(0, 0, 0, rec_mi=300))
    assert decide_memory(x, NOW, T) is None  # Used: nothing is used
    assert outcome(decide_memory(x, NOW, replace(T, source="Recommended"))) == ("Metrics", Gi + 300 * Mi)


def test_change_says_why() -> None:
    c = decide_memory(mem(1, samples=samples(100, 200, 512)), NOW, T)
    assert c is not None and (c.field, c.old) == ("memory", Gi)
    assert "p95 of pie_host_kv_used_bytes over 3 samples" in c.message


def gpu(current_mi: int = 800, **kw: Any) -> GpuInputs:
    base: dict[str, Any] = dict(current=current_mi * Mi, lo=256 * Mi, hi=Gi, samples=[], stale=False, last_change=0.0)
    return GpuInputs(**{**base, **kw})


@pytest.mark.parametrize(("inputs", "expected"), [
    (gpu(100), ("Bounds", 256 * Mi)),
    (gpu(2000), ("Bounds", Gi)),
    (gpu(samples=samples(0, 0, 0, gpu_mi=300)), ("Metrics", 300 * Mi)),
    (gpu(samples=samples(0, 0, 0, gpu_mi=300), stale=True), None),
    (gpu(samples=samples(0, 0, 0, gpu_mi=0)), None),                    # the engine saw no demand yet: no evidence
    (gpu(samples=samples(0, 0, gpu_mi=300)), None),                     # too few samples
    (gpu(samples=samples(0, 0, 0, gpu_mi=100)), ("Metrics", 256 * Mi)),  # clamped to the minimum
    (gpu(samples=samples(0, 0, 0, gpu_mi=5000)), ("Metrics", Gi)),
    (gpu(samples=samples(0, 0, 0, gpu_mi=760)), None),                   # within 10%
    (gpu(samples=samples(0, 0, 0, gpu_mi=300), last_change=NOW - 10), None),
])
def test_decide_gpu(inputs: GpuInputs, expected: tuple[str, int] | None) -> None:
    assert outcome(decide_gpu(inputs, NOW, T)) == expected


@pytest.mark.parametrize(("patch", "previous", "expected"), [
    ({}, None, 16 * Gi),                                                  # base 16Gi, pool min 0
    ({}, "20Gi", 20 * Gi),                                                # the latest decision
    ({"memory.hostMemory": {"min": "32Gi"}, "memory.headroom": "0"}, "20Gi", 48 * Gi),  # clamped up to the new min
    ({"memory.hostMemory": {"min": "0", "max": "8Gi"}, "memory.headroom": "0"}, "40Gi", 24 * Gi),
])
def test_template_request_follows_decisions_within_bounds(patch: dict[str, Any], previous: str | None,
                                                          expected: int) -> None:
    assert template_request(PieDeploymentSpec.model_validate(spec_with(**patch)), previous) == expected


def test_pool_bounds_and_request_from_the_spec() -> None:
    m = PieDeploymentSpec.model_validate(spec_with(**{"memory.hostMemory": {"min": "1Gi", "max": "4Gi"}})).memory
    assert pool_bounds(m) == (Gi, 4 * Gi)
    assert request_bytes(m, 10 * Gi) == 16 * Gi + 10 * Gi + Gi  # base + pool + 10% headroom
    off = PieDeploymentSpec.model_validate(spec_with(**{"memory.expansion": {"mode": "off"},
                                                        "memory.hostMemory": {"max": "4Gi"}})).memory
    assert pool_bounds(off) == (0, None)


def engine_pod(name: str = "p", memory: str = "16Gi", budget: str = "0.9", restarts: int = 0,
               oom_at: str | None = None, limit: str | None = None) -> dict[str, Any]:
    cs: dict[str, Any] = {"name": "engine", "restartCount": restarts}
    if oom_at:
        cs["lastState"] = {"terminated": {"reason": "OOMKilled", "finishedAt": oom_at}}
    return {"metadata": {"name": name, "uid": f"u-{name}", "creationTimestamp": "1970-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "engine", "args": ["--gpu-memory-budget", budget],
                                     "resources": {"requests": {"memory": memory},
                                                   "limits": {"memory": limit} if limit else {}}}]},
            "status": {"podIP": "127.0.1.5", "containerStatuses": [cs]}}


def tune(patch: dict[str, Any], pods: list[dict[str, Any]], views: dict[str, Any] | None = None,
         prev: dict[str, dict[str, Any]] | None = None, resize_supported: bool = True) -> Any:
    from pie_operator.memory import decide
    from pie_operator.tuning import plan_tuning

    spec = PieDeploymentSpec.model_validate(spec_with(**{"memory.tuning": {"minSamples": 3, "cooldownSeconds": 0},
                                                         **patch}))
    return plan_tuning(spec, decide(spec.memory), pods, prev or {}, views or {}, now=NOW,
                       resize_supported=resize_supported, tmpl_request=16 * Gi)


def loaded(pool_mi: float, gpu_total: int = 0, gpu_mi: float = 0, overhead: int | None = None) -> dict[str, Any]:
    from pie_operator.observe import PodView
    from pie_operator.scrape import EngineMetrics, Observation

    values = {"pie_gpu_memory_total_bytes": float(gpu_total)}
    if overhead is not None:
        values["pie_gpu_memory_overhead_bytes"] = float(overhead)
    obs = Observation(at=NOW, metrics=EngineMetrics(values))
    return {"p": PodView(obs, samples(pool_mi, pool_mi, pool_mi, gpu_mi=gpu_mi))}


@pytest.mark.parametrize(("patch", "resize_supported", "resize", "replace"), [
    ({}, True, {"p": ("21Gi", None)}, {}),  # 16Gi base + 4Gi pool + 1Gi headroom (from the minimum, 17Gi)
    ({"memory.hostMemory": {"max": "8Gi"}}, True, {"p": ("21Gi", "25Gi")}, {}),  # the limit: 16Gi + 8Gi + 1Gi
    ({"memory.hostMemory": {"max": "2Gi"}}, True, {"p": ("19Gi", "19Gi")}, {}),  # the pool is clamped to max
    ({"memory.apply": "Rolling"}, True, {}, {"p": "MemoryChanged: memory request 17Gi -> 21Gi"}),
    ({}, False, {}, {"p": "MemoryChanged: memory request 17Gi -> 21Gi"}),  # no pods/resize: roll instead
    ({"memory.apply": "Off"}, True, {}, {}),
])
def test_plan_tuning_memory_by_apply_mode(patch: dict[str, Any], resize_supported: bool,
                                          resize: dict[str, Any], replace: dict[str, str]) -> None:
    tp = tune({"memory.headroom": "1Gi", **patch}, [engine_pod(memory="17Gi")], loaded(4096),
              resize_supported=resize_supported)
    assert (tp.resize, tp.replace) == (resize, replace)
    if patch.get("memory.apply") == "Off":
        assert tp.memo["p"]["memoryRecommendation"] == "21Gi" and tp.changes == []
    else:
        (pod, change, _), = tp.changes
        assert (pod, change.reason, format_bytes(tp.template_request)) == ("p", "Metrics", resize.get(
            "p", ("21Gi",))[0])


def test_plan_tuning_without_metrics_changes_nothing() -> None:
    tp = tune({}, [engine_pod()], {})  # e.g. right after an operator restart
    assert (tp.resize, tp.replace, tp.gpu, tp.changes) == ({}, {}, [], [])


def test_plan_tuning_oom_bump_is_answered_once() -> None:
    oom = "2025-01-01T00:00:00Z"
    tp = tune({}, [engine_pod(oom_at=oom)], {})
    assert tp.resize == {"p": ("19661Mi", None)} and tp.memo["p"]["oomHandledAt"] == oom  # 16Gi x 1.2
    again = tune({}, [engine_pod(memory="19661Mi", oom_at=oom)], {}, prev={"p": {"oomHandledAt": oom}})
    assert again.resize == {} and again.changes == []


def test_plan_tuning_oom_at_the_limit_resizes_the_limit_and_keeps_it() -> None:
    oom, mx = "2025-01-01T00:00:00Z", {"memory.hostMemory": {"max": "8Gi"}, "memory.headroom": "0"}
    tp = tune(mx, [engine_pod(memory="24Gi", limit="24Gi", oom_at=oom)], {})
    assert tp.resize == {"p": ("24Gi", "29492Mi")}  # the request is at its maximum: the limit moves (x 1.2)
    # a later metric decision keeps the raised limit (never back down to base + max + headroom)
    later = tune(mx, [engine_pod(memory="17Gi", limit="29492Mi", oom_at=oom)], loaded(4096),
                 prev={"p": {"oomHandledAt": oom}})
    assert later.resize == {"p": ("20Gi", "29492Mi")}


@pytest.mark.parametrize(("patch", "pod", "prev", "view", "expected"), [
    ({}, engine_pod(budget="0.9"), {}, {}, None),                                   # as the spec says
    ({"memory.gpuMemoryBudget": "0.8"}, engine_pod(budget="0.9"), {}, {},           # spec change, GPU size unknown
     ("0.9", "0.8", None, "Spec")),
    # A fraction means what it means at the engine's start-up: the share of the GPU the engine holds in all, so
    # the KV gets it minus the engine's overhead (weights, activation reserve: pie_gpu_memory_overhead_bytes).
    ({"memory.gpuMemoryBudget": "0.5"}, engine_pod(budget="0.9"), {}, loaded(0, gpu_total=80 * Gi, overhead=20 * Gi),
     ("0.9", "0.5", 20 * Gi, "Spec")),
    ({"memory.gpuMemoryBudget": "0.5"}, engine_pod(budget="0.9"), {}, loaded(0, gpu_total=80 * Gi),
     ("0.9", "0.5", None, "Spec")),  # an engine without the overhead metric: not resolvable live, so replaced
    # The default 0.9 bounds the tuning at 0.9 x 80Gi - 20Gi = 52Gi of KV, where the engine already is (not at 72Gi,
    # more KV than the GPU holds next to the weights).
    ({"memory.tuning.gpuMemoryBudgetMin": "1Gi"}, engine_pod(budget="0.9"), {},
     loaded(0, gpu_total=80 * Gi, gpu_mi=60 * 1024, overhead=20 * Gi), None),
    ({"memory.tuning.gpuMemoryBudgetMin": "1Gi"}, engine_pod(budget="0.9"), {},
     loaded(0, gpu_total=80 * Gi, gpu_mi=30 * 1024, overhead=20 * Gi), ("0.9", "30Gi", 30 * Gi, "Metrics")),
    ({"memory.gpuMemoryBudget": "8Gi", "memory.tuning.gpuMemoryBudgetMin": "1Gi"}, engine_pod(budget="8Gi"), {},
     loaded(0, gpu_mi=3000), ("8Gi", "3000Mi", 3000 * Mi, "Metrics")),              # tuned to the recommendation
    ({"memory.gpuMemoryBudget": "8Gi", "memory.tuning.gpuMemoryBudgetMin": "1Gi"}, engine_pod(budget="8Gi"),
     {"gpuMemoryBudget": "3000Mi", "gpuBudgetLive": True, "gpuBudgetRestarts": 0}, loaded(0, gpu_mi=3000), None),
    ({"memory.gpuMemoryBudget": "8Gi", "memory.tuning.gpuMemoryBudgetMin": "1Gi"}, engine_pod(budget="8Gi", restarts=1),
     {"gpuMemoryBudget": "3000Mi", "gpuBudgetLive": True, "gpuBudgetRestarts": 0}, loaded(0, gpu_mi=3000),
     ("8Gi", "3000Mi", 3000 * Mi, "Metrics")),  # the container restarted: back on its flag, so decide again
    ({"memory.tuning.gpuMemoryBudgetMin": "0.1"}, engine_pod(budget="0.9"), {}, loaded(0, gpu_mi=3000), None),
])
def test_plan_tuning_gpu(patch: dict[str, Any], pod: dict[str, Any], prev: dict[str, Any], view: dict[str, Any],
                         expected: tuple[str, str, int | None, str] | None) -> None:
    tp = tune(patch, [pod], view, prev={"p": prev})
    got = [(g.old, g.new, g.bytes, g.reason) for g in tp.gpu]
    assert got == ([] if expected is None else [expected])
