"""The autoscaler's view of one pod, pure: (pod, the operator's scrapes of its engine) -> autoscale.PodLoad.

Memory first (autoscale.py): a replica is added only once expansion cannot absorb the load on every pod. Whether it
can is the engine's to say: pie_expansion_headroom_layers, the layers its controller may still move to host memory
now, is 0 once expansion is off or static, the host KV reached --host-memory-limit (memory.hostMemory.max), a
back-off's ceiling stands, or latency / overhead / stall leave no room to grow (engine/pie_engine/pie/controller.py).
Expansion only absorbs load that waits for KV, though: an engine whose KV is not full (pie_kv_cache_usage_perc below
KV_BOUND, the level at which the engine's controller counts demand) and still misses the target is short of compute
or of sequence slots, which host memory cannot give, so its expansion counts as exhausted too. An engine without the
headroom gauge (older) is judged by what the operator sees: expansion not adaptive, or its host KV at
memory.hostMemory.max.
"""

from __future__ import annotations

from pie_operator.autoscale import PodLoad
from pie_operator.observe import PodView
from pie_operator.planning import Pod, is_ready
from pie_operator.quantity import format_bytes
from pie_operator.scrape import EngineMetrics
from pie_operator.tuning import parse_ts

KV_BOUND = 0.9  # the engine controller's usage_high (pie_engine/pie/controller_config.py)


def exhaustion(m: EngineMetrics, mode: str, host_max: int | None) -> tuple[bool, str]:
    """(expansion cannot absorb more load, how far it expanded: for the decision's message)."""
    at = f"{m['pie_expansion_ratio']:.2f}x"
    usage = m["pie_kv_cache_usage_perc"]
    if usage < KV_BOUND:
        return True, f"{at} with {usage:.0%} of its KV used: not short of KV, which is all expansion adds"
    headroom = m.values.get("pie_expansion_headroom_layers")
    if headroom is not None:
        layers = int(headroom)
        return layers == 0, f"{at}, {layers} more layer(s) to host possible" if layers else f"{at}, at its ceiling"
    host = m.bytes("pie_host_kv_capacity_bytes")
    if mode != "adaptive":
        return True, f"{at} ({mode})"
    if host_max is not None and host >= host_max:
        return True, f"{at}, host KV {format_bytes(host)} at memory.hostMemory.max"
    return False, f"{at}, host KV {format_bytes(host)}"


def pod_load(pod: Pod, view: PodView | None, *, draining: bool, mode: str, host_max: int | None) -> PodLoad:
    """`pod` as the policy sees it from its latest fresh scrape (`view.last_ok`; none: no evidence)."""
    name = pod["metadata"]["name"]
    created = parse_ts(pod["metadata"].get("creationTimestamp"))
    obs = view.last_ok if view is not None else None
    if obs is None or obs.metrics is None:
        return PodLoad(name, is_ready(pod), draining, created=created)
    m = obs.metrics
    exhausted, expansion = exhaustion(m, mode, host_max)
    assert view is not None
    return PodLoad(name, is_ready(pod), draining, in_flight=int(m["pie_num_requests_running"]),
                   waiting=int(m["pie_num_requests_waiting"]), ttft_p95=view.ttft_p95, tpot_p95=view.tpot_p95,
                   expansion_exhausted=exhausted, expansion=expansion, at=obs.at, created=created)
