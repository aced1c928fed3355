"""load.py: a pod as the autoscaler sees it -- its queue, its latencies, and whether expansion can still absorb load."""

from __future__ import annotations

from typing import Any

import pytest

from pie_operator.autoscale import PodLoad
from pie_operator.load import exhaustion, pod_load
from pie_operator.observe import PodView
from pie_operator.scrape import REQUIRED, EngineMetrics, Observation

GiB = 2**30


def metrics(**values: float) -> EngineMetrics:
    return EngineMetrics({**dict.fromkeys(REQUIRED, 0.0), "pie_expansion_ratio": 1.5, "pie_kv_cache_usage_perc": 0.95,
                          **values})


@pytest.mark.parametrize(("m", "mode", "host_max", "exhausted", "says"), [
    # the engine says: layers it may still move to host (its controller's view: host limit, ceiling, latency)
    (metrics(pie_expansion_headroom_layers=2), "adaptive", None, False, "1.50x, 2 more layer(s) to host possible"),
    (metrics(pie_expansion_headroom_layers=0), "adaptive", None, True, "1.50x, at its ceiling"),
    # KV not full: the load is not short of KV, which is all expansion adds, whatever the headroom
    (metrics(pie_expansion_headroom_layers=5, pie_kv_cache_usage_perc=0.4, pie_num_requests_waiting=9), "adaptive",
     None, True, "40% of its KV used"),
    # older engines (no headroom gauge): judged from the spec and the host KV
    (metrics(pie_host_kv_capacity_bytes=8 * GiB), "adaptive", 8 * GiB, True, "host KV 8Gi at memory.hostMemory.max"),
    (metrics(pie_host_kv_capacity_bytes=4 * GiB), "adaptive", 8 * GiB, False, "host KV 4Gi"),
    (metrics(pie_host_kv_capacity_bytes=4 * GiB), "adaptive", None, False, "host KV 4Gi"),
    (metrics(), "static", None, True, "(static)"),
    (metrics(), "off", None, True, "(off)"),
])
def test_exhaustion(m: EngineMetrics, mode: str, host_max: int | None, exhausted: bool, says: str) -> None:
    got, message = exhaustion(m, mode, host_max)
    assert got == exhausted and says in message, message


def pod(name: str = "p", ready: bool = True) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"conditions": [{"type": "Ready", "status": str(ready)}]}}


def test_pod_load_from_the_latest_fresh_scrape() -> None:
    fresh = Observation(100.0, metrics=metrics(pie_num_requests_running=3, pie_num_requests_waiting=7,
                                               pie_expansion_headroom_layers=0))
    view = PodView(last=Observation(115.0, error="timeout"), last_ok=fresh, ttft_p95=0.8, tpot_p95=0.04)
    load = pod_load(pod(), view, draining=True, mode="adaptive", host_max=None)
    assert load == PodLoad("p", ready=True, draining=True, in_flight=3, waiting=7, ttft_p95=0.8, tpot_p95=0.04,
                           expansion_exhausted=True, expansion="1.50x, at its ceiling", at=100.0)


@pytest.mark.parametrize("view", [None, PodView(last=Observation(1.0, error="timeout"))])
def test_no_fresh_scrape_is_no_evidence(view: PodView | None) -> None:
    """at None: the policy holds (no evidence never causes a change), and never takes the pod as idle."""
    assert pod_load(pod(ready=False), view, draining=False, mode="adaptive", host_max=None) == PodLoad(
        "p", ready=False, draining=False)
