"""The closed loop against real engines: the operator (a subprocess) reads real `pie-engine serve` processes that
play the pods' containers on their loopback pod IPs (tests/e2e/engines.py), sizes memory from their metrics and runs
gated rollouts. Timers are shortened through the spec (memory.tuning, rollout.stepTimeoutSeconds) and operator flags.

Each test has its own namespace, operator, engines and PieDeployment `loop` (fixtures `loop1`, `loop2`; the cluster
has 2 GPUs: 2 pods), so any one passes alone or in any order.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pie_operator.quantity import parse_bytes
from tests.cluster.cluster import Cluster
from tests.e2e.engines import EngineFleet, Load
from tests.e2e.helpers import Operator, condition, events, get, running_operator, wait_for

pytestmark = pytest.mark.e2e
# NOTE: every local cluster hands out the same pod IPs (127.0.<node+1>.x): a random port keeps these engines apart
# from those of other test sessions on this machine.
PORT = random.randint(20000, 29999)
ADMIN_PORT = PORT + 20000  # the engines' admin port (--admin-port) on the same shared pod IPs
LOOP = "loop"
Mi = 2**20


def deployment(name: str, replicas: int, **spec: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "pie.io/v1alpha1", "kind": "PieDeployment", "metadata": {"name": name},
        "spec": {
            "replicas": replicas, "model": {"path": "/models/tiny"},
            "engine": {"image": "pie-engine:v1", "port": PORT, "adminPort": ADMIN_PORT},
            # A small device budget (16 KV blocks per layer) so a few concurrent requests need KV in host memory:
            # adaptive expansion with its default thresholds grows under the load (a few MiB of host KV) and the
            # operator follows what the engine measures (pie_host_kv_used_bytes, the recommendations).
            "memory": {"gpuMemoryBudget": "1Mi", "base": "4Mi", "headroom": "0",
                       "hostMemory": {"min": "0", "max": "256Mi"}, "expansion": {"mode": "adaptive"},
                       "tuning": {"windowSeconds": 8, "minSamples": 3, "cooldownSeconds": 6,
                                  "changeThresholdPercent": 10}},
            "rollout": {"stepTimeoutSeconds": 30},
        },
    }
    doc["spec"].update(spec)
    return doc


@pytest.fixture
def operator(k8s: Cluster, ns: str, tmp_path: Path) -> Iterator[Operator]:
    flags = ("--resync-seconds", "2", "--metrics-interval-seconds", "1", "--metrics-timeout-seconds", "1")
    with running_operator(k8s, ns, tmp_path, *flags) as op:
        yield op


@pytest.fixture
def fleet(k8s: Cluster, ns: str, model: Path, tmp_path: Path) -> Iterator[EngineFleet]:
    with EngineFleet(k8s, ns, LOOP, model, tmp_path / "engines") as f:
        yield f
        print(f"--- engine logs ---\n{f.logs()}")


def pods(k8s: Cluster, ns: str, name: str) -> list[dict[str, Any]]:
    return [p for p in get(k8s, ns, "pods", "-l", f"pie.io/deployment={name}")["items"]
            if not p["metadata"].get("deletionTimestamp")]


def request_of(pod: dict[str, Any]) -> str:
    return pod["spec"]["containers"][0]["resources"]["requests"]["memory"]


def ready(k8s: Cluster, ns: str, name: str, replicas: int) -> dict[str, Any] | None:
    """The PieDeployment once Ready: `replicas` pods of the update revision, each past its gate (engine healthy)."""
    pied = get(k8s, ns, "pied", name)
    st = pied.get("status", {})
    ok = (st.get("observedGeneration") == pied["metadata"]["generation"] and st.get("phase") == "Ready"
          and len(st.get("pods", [])) == replicas and len(pods(k8s, ns, name)) == replicas
          and all(p["gatePassed"] and p["metrics"] == "ok" for p in st["pods"]))
    return pied if ok else None


def patch(k8s: Cluster, ns: str, name: str, spec: dict[str, Any]) -> None:
    k8s.kubectl("patch", "-n", ns, "pied", name, "--type=merge", "-p", json.dumps({"spec": spec}))


def apply_loop(k8s: Cluster, ns: str, operator: Operator, replicas: int, **spec: Any) -> dict[str, Any]:
    k8s.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(deployment(LOOP, replicas, **spec)))
    return wait_for(lambda: ready(k8s, ns, LOOP, replicas), f"loop Ready with {replicas} healthy engine(s)",
                    timeout=90, op=operator)


@pytest.fixture
def loop1(k8s: Cluster, ns: str, operator: Operator, fleet: EngineFleet) -> dict[str, Any]:
    """`loop` with one pod, Ready behind a healthy engine."""
    return apply_loop(k8s, ns, operator, 1)


@pytest.fixture
def loop1_static(k8s: Cluster, ns: str, operator: Operator, fleet: EngineFleet) -> dict[str, Any]:
    """`loop` with one pod at a fixed expansion ratio (4): the engine's GPU budget recommendation then depends on
    the budget and the load only. Under adaptive it also moves with m, which a budget change can itself move, so a
    test comparing the operator's decision with the engine's recommendation read afterwards would race."""
    memory = deployment(LOOP, 1)["spec"]["memory"] | {"expansion": {"mode": "static", "ratio": 4.0}}
    return apply_loop(k8s, ns, operator, 1, memory=memory)


@pytest.fixture
def loop2(k8s: Cluster, ns: str, operator: Operator, fleet: EngineFleet) -> dict[str, Any]:
    """`loop` with two pods (both GPUs), Ready behind healthy engines."""
    return apply_loop(k8s, ns, operator, 2)


@pytest.fixture
def grown(k8s: Cluster, ns: str, operator: Operator, loop1: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(loop's pod before, the same pod after): load on its engine made the operator raise its memory request, in
    place; the load has stopped since."""
    (pod,) = pods(k8s, ns, LOOP)
    initial = request_of(pod)
    assert initial == "4Mi" and loop1["status"]["memory"]["hostMemoryRequest"] == "4Mi"
    with Load(f"http://{pod['status']['podIP']}:{PORT}", LOOP) as load:
        def raised() -> dict[str, Any] | None:
            (p,) = pods(k8s, ns, LOOP)
            return p if request_of(p) != initial else None

        after = wait_for(raised, "the memory request to follow the engine's host KV", timeout=90, op=operator)
        # The request follows the KV of running requests; on a busy machine none may have finished yet.
        wait_for(lambda: load.completed > 0 or len(load.errors) > 3, "a completed request", timeout=90)
        assert load.completed > 0, load.errors[:3]
    return pod, after


def test_stale_metrics_cause_no_change(k8s: Cluster, ns: str, model: Path, operator: Operator,
                                       tmp_path: Path) -> None:
    """One pod serves garbage on /metrics, the other serves nothing: a clear condition and Events, no decision."""
    doc = deployment("junk", 2, rollout={"gate": {"engineHealth": False}})
    doc["spec"]["memory"]["tuning"].update(cooldownSeconds=0, minSamples=1)
    behaviours: dict[str, str] = {}

    def behaviour(pod: dict[str, Any]) -> str:  # the first pod seen serves garbage, the other one nothing
        return behaviours.setdefault(pod["metadata"]["name"], "none" if behaviours else "garbage")

    with EngineFleet(k8s, ns, "junk", model, tmp_path / "junk", behaviour) as junk:
        k8s.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc))

        def stale() -> dict[str, Any] | None:
            pied = get(k8s, ns, "pied", "junk")
            msg = condition(pied, "MetricsStale").get("message", "")
            return pied if "garbage metrics" in msg and "unreachable" in msg else None

        pied = wait_for(stale, "MetricsStale naming the garbage and the silent pod", timeout=60, op=operator)
        assert condition(pied, "MetricsStale")["status"] == "True" and len(junk.started) == 2
        before = {p["metadata"]["name"]: request_of(p) for p in pods(k8s, ns, "junk")}
        wait_for(lambda: len([e for e in events(k8s, ns, "junk") if e["reason"] == "MetricsStale"]) >= 2,
                 "a MetricsStale Event per pod", op=operator)
        time.sleep(5)  # several scrape rounds and reconciles (1 s apart): still nothing may change
        pied = get(k8s, ns, "pied", "junk")
        assert pied["status"]["decisions"] == [] and pied["status"]["phase"] == "Ready"
        assert {p["metadata"]["name"]: request_of(p) for p in pods(k8s, ns, "junk")} == before
        assert {p["metrics"].split(" ")[0] for p in pied["status"]["pods"]} == {"garbage", "unreachable"}


def test_memory_grows_with_the_load_in_place(k8s: Cluster, ns: str,
                                             grown: tuple[dict[str, Any], dict[str, Any]]) -> None:
    pod, grew = grown
    name = pod["metadata"]["name"]
    assert grew["metadata"]["name"] == name  # resized in place: same pod, no restart, KV kept
    pied = get(k8s, ns, "pied", LOOP)
    raised = request_of(grew)
    decision = pied["status"]["decisions"][-1]
    assert (decision["pod"], decision["field"], decision["from"], decision["reason"], decision["via"]) == (
        name, "memory", "4Mi", "Metrics", "InPlace")
    assert pied["status"]["memory"]["hostMemoryRequest"] == decision["to"] == raised
    header, row = k8s.kubectl("get", "-n", ns, "pied", LOOP).stdout.splitlines()
    assert header.split()[:6] == ["NAME", "READY", "EXPANSION", "HOST-MEM", "GPU-BUDGET", "STATUS"]
    cols = row.split()
    assert (cols[0], cols[3], cols[4]) == (LOOP, raised, "1Mi")
    assert float(cols[2]) > 1.0  # the measured expansion ratio: adaptive expanded under the load
    assert any(e["reason"] == "MemoryDecision" and name in e["message"] for e in events(k8s, ns, LOOP))


def test_memory_comes_back_down_when_the_load_stops(k8s: Cluster, ns: str, operator: Operator,
                                                    grown: tuple[dict[str, Any], dict[str, Any]]) -> None:
    _, pod = grown
    assert request_of(pod) != "4Mi"  # raised under load; the load has stopped since
    # After the window (8 s) and the cooldown (6 s) the request comes back to the minimum, in place.
    back = wait_for(lambda: (p := pods(k8s, ns, LOOP)) and request_of(p[0]) == "4Mi" and p[0],
                    "the request to come back down after the cooldown", timeout=40, op=operator)
    assert back["metadata"]["name"] == pod["metadata"]["name"]
    assert get(k8s, ns, "pied", LOOP)["status"]["decisions"][-1]["to"] == "4Mi"


def test_gpu_budget_follows_the_engine_live(k8s: Cluster, ns: str, operator: Operator,
                                            loop1_static: dict[str, Any]) -> None:
    """GPU tuning: the budget is applied through the engine's admin endpoint, without a restart -- raised to a new
    minimum (Bounds), then down to the engine's own recommendation (Metrics), then to a plain spec value (Spec)."""
    (pod,) = pods(k8s, ns, LOOP)
    name, url = pod["metadata"]["name"], f"http://{pod['status']['podIP']}:{PORT}/v1/pie/expansion"

    def live(reason: str, to: str | None = None) -> Callable[[], dict[str, Any] | None]:
        def check() -> dict[str, Any] | None:
            pied = get(k8s, ns, "pied", LOOP)
            # (the latest GPU decision: the load below may make memory decisions too)
            d = next((e for e in reversed(pied["status"].get("decisions") or [])
                      if e.get("field") == "gpuMemoryBudget"), {})
            ok = (d.get("reason") == reason and to in (None, d.get("to"))
                  and pied["status"]["pods"][0]["gpuMemoryBudget"] == d.get("to"))
            return d if ok else None
        return check

    def engine(key: str) -> int:
        return int(httpx.get(url, trust_env=False).json()[key])

    def engine_budget() -> int:
        return engine("device_kv_budget_bytes")

    # An engine recommends a GPU budget only once it has seen KV demand (until then: no evidence, decisions.py).
    with Load(f"http://{pod['status']['podIP']}:{PORT}", LOOP, streams=2):
        wait_for(lambda: engine("recommended_gpu_memory_bytes") > 0, "a GPU budget recommendation", op=operator)

    patch(k8s, ns, LOOP, {"memory": {"gpuMemoryBudget": "4Mi", "tuning": {"gpuMemoryBudgetMin": "3Mi"}}})
    d = wait_for(live("Bounds", "3Mi"), "the budget raised to the new minimum, live", timeout=60, op=operator)
    assert (d["from"], d["via"], engine_budget()) == ("1Mi", "live (engine admin endpoint)", 3 * Mi)

    patch(k8s, ns, LOOP, {"memory": {"tuning": {"gpuMemoryBudgetMin": "256Ki"}}})
    d = wait_for(live("Metrics"), "the budget to follow pie_recommended_gpu_memory_bytes", timeout=60, op=operator)
    recommended = engine("recommended_gpu_memory_bytes")
    assert d["from"] == "3Mi" and parse_bytes(d["to"]) == max(-(-recommended // Mi) * Mi, 256 * 1024)
    assert engine_budget() == parse_bytes(d["to"])

    patch(k8s, ns, LOOP, {"memory": {"gpuMemoryBudget": "3Mi", "tuning": {"gpuMemoryBudgetMin": None}}})
    wait_for(live("Spec", "3Mi"), "the spec's budget, live", timeout=30, op=operator)
    assert engine_budget() == 3 * Mi and [p["metadata"]["name"] for p in pods(k8s, ns, LOOP)] == [name]
    assert get(k8s, ns, "pied", LOOP)["status"]["pods"][0]["gpuBudgetLive"] is True


def snapshot(k8s: Cluster, ns: str) -> list[tuple[str, str, bool]]:
    return [(p["name"], p["revision"], p["gatePassed"]) for p in get(k8s, ns, "pied", LOOP)["status"]["pods"]]


def test_image_change_rolls_out_one_gated_pod_at_a_time(k8s: Cluster, ns: str, operator: Operator,
                                                        fleet: EngineFleet, loop2: dict[str, Any]) -> None:
    old = {p["metadata"]["name"] for p in pods(k8s, ns, LOOP)}
    patch(k8s, ns, LOOP, {"engine": {"image": "pie-engine:v2", "port": PORT}})
    seen: list[list[tuple[str, str, bool]]] = []

    def done() -> dict[str, Any] | None:
        seen.append(snapshot(k8s, ns))
        pied = ready(k8s, ns, LOOP, 2)
        return pied if pied and not old & {p["metadata"]["name"] for p in pods(k8s, ns, LOOP)} else None

    pied = wait_for(done, "the image rollout to finish", timeout=120, op=operator, interval=0.2)
    # One step at a time: never fewer than replicas - maxUnavailable = 1 pod past its gate.
    assert all(sum(passed for _, _, passed in s) >= 1 for s in seen), seen
    new = fleet.seen - old
    assert len(new) == 2 and all(fleet.started[n] == "engine" for n in new)
    reasons = [e["reason"] for e in events(k8s, ns, LOOP)]
    assert reasons.count("DeletedOutdated") >= 2
    assert pied["status"]["rollout"]["phase"] == "Complete"
    assert pied["status"]["rollout"]["lastGoodRevision"] == pied["status"]["updateRevision"]


def test_failed_gate_pauses_then_rolls_back(k8s: Cluster, ns: str, operator: Operator,
                                            loop2: dict[str, Any]) -> None:
    good = loop2["status"]["updateRevision"]
    patch(k8s, ns, LOOP, {"engine": {"image": "pie-engine:v2", "port": PORT, "args": ["--max-num-seqs=0"]}})

    def paused() -> dict[str, Any] | None:
        pied = get(k8s, ns, "pied", LOOP)
        return pied if pied["status"].get("rollout", {}).get("phase") == "Paused" else None

    pied = wait_for(paused, "the rollout to pause on the failed gate", timeout=90, op=operator)
    degraded = condition(pied, "Degraded")
    assert (pied["status"]["phase"], degraded["status"], degraded["reason"]) == ("Degraded", "True", "GateFailed")
    assert "engine unhealthy: unreachable" in degraded["message"]
    assert condition(pied, "Progressing")["reason"] == "ProgressDeadlineExceeded"
    revisions = sorted(p["metadata"]["labels"]["pie.io/template-hash"] for p in pods(k8s, ns, LOOP))
    assert len(revisions) == 2 and good in revisions  # paused after one step: the other pod still serves

    patch(k8s, ns, LOOP, {"rollout": {"stepTimeoutSeconds": 30, "autoRollback": True}})

    def rolled_back() -> dict[str, Any] | None:
        pied = get(k8s, ns, "pied", LOOP)
        st = pied["status"]
        ok = (st.get("rollout", {}).get("phase") == "RolledBack" and len(st["pods"]) == 2
              and all(p["revision"] == good and p["gatePassed"] for p in st["pods"]))
        return pied if ok else None

    pied = wait_for(rolled_back, "the rollback to the last good revision", timeout=90, op=operator)
    assert condition(pied, "Degraded")["reason"] == "RolledBack"
    assert pied["status"]["rollout"]["failedRevision"] != good
    patch(k8s, ns, LOOP, {"engine": {"image": "pie-engine:v1", "port": PORT, "args": []}})  # the good revision
    wait_for(lambda: ready(k8s, ns, LOOP, 2), "the spec back on the good revision", timeout=60, op=operator)


def test_operator_restart_mid_rollout_finishes_without_extra_deletions(
        k8s: Cluster, ns: str, operator: Operator, fleet: EngineFleet, loop2: dict[str, Any]) -> None:
    before = {p["metadata"]["name"] for p in pods(k8s, ns, LOOP)}
    seen_before = set(fleet.seen)
    patch(k8s, ns, LOOP, {"engine": {"image": "pie-engine:v3", "port": PORT, "args": []}})
    rev = wait_for(lambda: (r := get(k8s, ns, "pied", LOOP)["status"].get("rollout", {}).get("revision")) and
                   r != get(k8s, ns, "pied", LOOP)["status"]["rollout"].get("lastGoodRevision") and r,
                   "the new rollout to start", op=operator)
    wait_for(lambda: any(p["metadata"]["labels"]["pie.io/template-hash"] == rev for p in pods(k8s, ns, LOOP)),
             "the first new pod", op=operator, interval=0.1)
    operator.kill()  # mid-rollout: one old pod replaced, its replacement not yet past its gate
    operator.start()
    pied = wait_for(lambda: (p := ready(k8s, ns, LOOP, 2)) and p["status"]["updateRevision"] == rev and p,
                    "the rollout to finish after the restart", timeout=120, op=operator)
    new = fleet.seen - seen_before
    assert len(new) == 2, f"pods created: {sorted(new)} (a restart must not replace a pod twice)"
    assert not before & {p["metadata"]["name"] for p in pods(k8s, ns, LOOP)}
    assert pied["status"]["rollout"]["phase"] == "Complete"
