"""A live GPU budget change that a real engine cannot take now: a running request needs more KV than the new budget
holds, so the engine answers 409 with code `busy`. The operator must keep the pod (replacing it would kill the
request), say so in status, and apply the change once the engine is idle -- live, on the same pod.

Real `pie-engine serve` processes play the pods' containers (tests/e2e/engines.py), as in test_closed_loop.py,
whose fixtures this reuses; the test has its own namespace, operator, engine and PieDeployment.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster.cluster import Cluster
from tests.e2e.engines import EngineFleet, Load
from tests.e2e.helpers import Operator, events, get, running_operator, wait_for
from tests.e2e.test_closed_loop import LOOP, PORT, apply_loop, deployment, fleet, patch, pods  # noqa: F401 -- fixtures

pytestmark = pytest.mark.e2e
Ki = 2**10
# Expansion off: the device budget is the whole KV capacity (1Mi: 16 blocks per layer of 16 tokens), so a budget of
# 64Ki (1 block per layer) cannot hold any of the load's requests (20 words + 64 tokens: 6 blocks).
SMALL = "64Ki"


@pytest.fixture
def operator(k8s: Cluster, ns: str, tmp_path: Path) -> Iterator[Operator]:
    flags = ("--resync-seconds", "2", "--metrics-interval-seconds", "1", "--metrics-timeout-seconds", "1")
    with running_operator(k8s, ns, tmp_path, *flags) as op:
        yield op


def test_busy_engine_keeps_its_pod_and_takes_the_budget_once_idle(k8s: Cluster, ns: str, operator: Operator,
                                                                  fleet: EngineFleet) -> None:  # noqa: F811 -- the fixture
    memory = deployment(LOOP, 1)["spec"]["memory"] | {"expansion": {"mode": "off"}}
    apply_loop(k8s, ns, operator, 1, memory=memory)
    (pod,) = pods(k8s, ns, LOOP)
    base = f"http://{pod['status']['podIP']}:{PORT}"

    def engine_budget() -> int:
        return int(httpx.get(f"{base}/v1/pie/expansion", trust_env=False).json()["device_kv_budget_bytes"])

    def entry() -> dict[str, Any]:
        return (get(k8s, ns, "pied", LOOP).get("status", {}).get("pods") or [{}])[0]

    with Load(base, LOOP, streams=4) as load:
        wait_for(lambda: load.completed > 0, "the load to be served", op=operator, timeout=60)
        patch(k8s, ns, LOOP, {"memory": {"gpuMemoryBudget": SMALL}})
        waiting = wait_for(lambda: "busy" in (e := entry()).get("gpuBudgetWaiting", "") and e,
                           "status.pods[] to say the engine is busy", op=operator, timeout=60)
        assert waiting["gpuBudgetWaiting"].startswith(SMALL) and waiting["gpuBudgetAttempts"] >= 1, waiting
        assert engine_budget() == 2**20  # not applied while the requests run
    # Idle now: a later try takes it live, on the very same pod.
    done = wait_for(lambda: (e := entry()).get("gpuMemoryBudget") == SMALL and e.get("gpuBudgetLive") and e,
                    "the budget applied live once the engine is idle", op=operator, timeout=120)
    assert "gpuBudgetWaiting" not in done and engine_budget() == 64 * Ki
    assert [p["metadata"]["uid"] for p in pods(k8s, ns, LOOP)] == [pod["metadata"]["uid"]]
    assert not [e for e in events(k8s, ns, LOOP) if e["reason"].startswith("Deleted")]
