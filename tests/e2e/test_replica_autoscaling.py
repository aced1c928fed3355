"""Two loops, one policy (issue 20), on the real control plane with real engines (tests/e2e/engines.py).

A burst that one engine cannot hold: it expands first (its KV into host memory, up to memory.hostMemory.max), and the
operator adds the second replica only once that expansion is exhausted and more requests wait than the target over
the scale-up window. After the burst a light load stays: the operator drains one replica (the Service stops routing
to it, its requests finish) and deletes it. The client routes like the Service -- each request to a Ready pod with
the serving label -- and counts every request: none may fail. The replica count never leaves [min, max].
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster.cluster import Cluster
from tests.e2e.engines import EngineFleet, Load, Router
from tests.e2e.helpers import Operator, condition, events, get, running_operator, wait_for
from tests.e2e.test_closed_loop import LOOP, PORT, apply_loop, deployment, fleet, pods  # noqa: F401 -- fixtures

pytestmark = pytest.mark.e2e
AUTOSCALING = {"enabled": True, "minReplicas": 1, "maxReplicas": 2, "target": {"type": "QueueDepth", "value": 1},
               "scaleUp": {"windowSeconds": 15, "maxPods": 1},
               "scaleDown": {"windowSeconds": 8, "maxPods": 1, "headroomPercent": 70, "drainTimeoutSeconds": 120}}


@pytest.fixture
def operator(k8s: Cluster, ns: str, tmp_path: Path) -> Iterator[Operator]:
    flags = ("--resync-seconds", "2", "--metrics-interval-seconds", "1", "--metrics-timeout-seconds", "1")
    with running_operator(k8s, ns, tmp_path, *flags) as op:
        yield op


def desired(k8s: Cluster, ns: str) -> int | None:
    return (get(k8s, ns, "pied", LOOP).get("status", {}).get("autoscaling") or {}).get("desiredReplicas")


def expansion(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/pie/expansion", trust_env=False, timeout=5).json()


def test_memory_first_then_a_replica_then_drained_back(k8s: Cluster, ns: str, operator: Operator,
                                                       fleet: EngineFleet) -> None:  # noqa: F811 -- the fixture
    # host KV for a few layers at most: the burst exhausts expansion (pie_expansion_headroom_layers 0) in seconds
    memory = deployment(LOOP, 1)["spec"]["memory"] | {"hostMemory": {"min": "0", "max": "2Mi"}}
    apply_loop(k8s, ns, operator, 1, memory=memory, autoscaling=AUTOSCALING)
    (first,) = pods(k8s, ns, LOOP)
    first_url = f"http://{first['status']['podIP']}:{PORT}"
    seen_desired: set[int] = set()
    with Router(k8s, ns, LOOP, PORT) as router, Load(lambda: router.targets, LOOP, streams=2, max_tokens=48) as light:
        with Load(lambda: router.targets, LOOP, streams=10, max_tokens=48) as burst:
            expanded = 0  # the first engine's m, at most, before a second pod existed

            def second_pod() -> bool:
                nonlocal expanded
                if len(pods(k8s, ns, LOOP)) == 1:
                    expanded = max(expanded, int(expansion(first_url)["layers_on_host"]))
                    return False
                return True

            wait_for(second_pod, "a second replica under the burst", op=operator, timeout=180, interval=0.5)
            assert expanded > 0, "the operator added a replica before the engine expanded"
            up = wait_for(lambda: [e for e in events(k8s, ns, LOOP) if e["reason"] == "ReplicaDecision"],
                          "the scale-up's Event", op=operator)
            assert "expansion exhausted on every pod: 1 -> 2 replicas" in up[0]["message"], up
            wait_for(lambda: len([p for p in pods(k8s, ns, LOOP) if p["status"].get("podIP")]) == 2
                     and len(router.targets) == 2, "both replicas routable", op=operator, timeout=120)
            seen_desired.add(desired(k8s, ns) or 0)
        # The burst ended; the light load goes on, over both replicas, and the operator drains one.
        def one_left() -> bool:
            seen_desired.add(desired(k8s, ns) or 0)
            return len(pods(k8s, ns, LOOP)) == 1 and desired(k8s, ns) == 1

        wait_for(one_left, "a drain back to one replica", op=operator, timeout=240, interval=0.5)
        before = light.completed
        wait_for(lambda: light.completed > before + 2, "the light load served by the replica left", op=operator)
    deleted = [e for e in events(k8s, ns, LOOP) if e["reason"].startswith("Deleted")]
    assert any(e["reason"] == "DeletedDrained" for e in deleted), deleted
    assert not light.errors and not burst.errors, (light.errors + burst.errors)[:5]
    assert light.completed > 0 and burst.completed > 0
    assert seen_desired <= {1, 2}, seen_desired
    print(f"first engine expanded to m = {expanded} before the scale-up; requests: {burst.completed} (burst), "
          f"{light.completed} (light), 0 failed")
    for e in events(k8s, ns, LOOP):
        if e["reason"] in ("ReplicaDecision", "DeletedDrained"):
            print(f"{e['reason']}: {e['message']}")


def test_someone_else_scaling_is_a_conflict_not_followed(k8s: Cluster, ns: str, operator: Operator,
                                                         fleet: EngineFleet) -> None:  # noqa: F811 -- the fixture
    """An HPA, a KEDA ScaledObject and `kubectl scale` all write the scale subresource (spec.replicas). With
    spec.autoscaling enabled the operator's own decision wins and AutoscalerConflict says why; disabling
    spec.autoscaling hands the count back to spec.replicas."""
    quiet = AUTOSCALING | {"scaleUp": {"windowSeconds": 600, "maxPods": 1}}  # no load: its own decision is 1
    apply_loop(k8s, ns, operator, 1, autoscaling=quiet)
    k8s.kubectl("scale", "-n", ns, f"pied/{LOOP}", "--replicas=2")  # the PUT on /scale an HPA makes
    c = wait_for(lambda: condition(get(k8s, ns, "pied", LOOP), "AutoscalerConflict").get("status") == "True"
                 and condition(get(k8s, ns, "pied", LOOP), "AutoscalerConflict"), "AutoscalerConflict=True",
                 op=operator)
    assert c["reason"] == "SpecReplicasChanged" and "spec.autoscaling" in c["message"], c
    # NOTE: the pass that observed spec.replicas = 2 would have created the second pod had it followed it.
    generation = get(k8s, ns, "pied", LOOP)["metadata"]["generation"]
    wait_for(lambda: (get(k8s, ns, "pied", LOOP).get("status") or {}).get("observedGeneration") == generation,
             "the scaled spec observed", op=operator)
    assert len(pods(k8s, ns, LOOP)) == 1 and desired(k8s, ns) == 1
    k8s.kubectl("patch", "-n", ns, "pied", LOOP, "--type=merge", "-p", '{"spec": {"autoscaling": {"enabled": false}}}')
    wait_for(lambda: len(pods(k8s, ns, LOOP)) == 2, "spec.replicas (2) followed once autoscaling is off",
             op=operator, timeout=60)
    wait_for(lambda: not condition(get(k8s, ns, "pied", LOOP), "AutoscalerConflict"),
             "AutoscalerConflict gone with autoscaling off", op=operator)
