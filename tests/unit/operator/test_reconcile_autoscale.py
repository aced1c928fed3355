"""reconcile() with spec.autoscaling against the in-memory fake of `Kube`: memory first, then a replica; scale-down
by draining (stop routing, wait for the engine to empty, then delete); status.autoscaling and its decisions; the
conflict with someone else scaling; and no write when nothing changed."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pie_operator.builders import SERVING_LABEL
from pie_operator.exporter import Exporter
from pie_operator.observe import Observations
from pie_operator.reconcile import Outcome, reconcile
from pie_operator.scaling import AUTOSCALER_CONFLICT, CONFLICT_HOLD, DRAIN_SETTLE
from pie_operator.scrape import PROBE_OK, REQUIRED, EngineMetrics, Observation
from tests.unit.operator.fake_kube import T0, FakeKube
from tests.unit.operator.test_reconcile import NAME, NS, cluster_writes, pods, spec, status

AUTO = {"enabled": True, "minReplicas": 1, "maxReplicas": 3}


def engine(waiting: int = 0, running: int = 0, headroom: int = 0, kv: float = 0.95) -> EngineMetrics:
    """An engine's metrics: by default idle, KV full (short of KV) and expansion exhausted (headroom 0)."""
    return EngineMetrics({**dict.fromkeys(REQUIRED, 0.0), "pie_expansion_ratio": 2.0, "pie_kv_cache_usage_perc": kv,
                          "pie_num_requests_waiting": waiting, "pie_num_requests_running": running,
                          "pie_expansion_headroom_layers": headroom})


class World:
    """A PieDeployment with autoscaling, converged, and its engines as the operator scrapes them; `t` is seconds."""

    def __init__(self, replicas: int = 1, gate: bool = False, **autoscaling: Any) -> None:
        """`gate`: the rollout gate asks for engine health and a served probe request (which every scrape here
        reports served)."""
        self.kube, self.store, self.t = FakeKube(), Observations(), 0.0
        self.exporter: Exporter | None = None
        self.kube.add_deployment(NS, NAME, spec(replicas=replicas, autoscaling={**AUTO, **autoscaling},
                                                **{"rollout.gate.engineHealth": gate}))
        self.settle()

    def settle(self) -> None:
        """Pods run and become Ready; passes until they are registered for scraping."""
        for _ in range(3):
            self.run(1)
            self.kube.run_pods()
        self.run(1)
        self.kube.clear()

    def run(self, dt: float = 15) -> Outcome:
        self.t += dt
        out = reconcile(self.kube, NS, NAME, now=T0 + timedelta(seconds=self.t), observations=self.store,
                        exporter=self.exporter)
        assert out is not None
        return out

    def scrape(self, default: EngineMetrics | None = None, **by_pod: EngineMetrics) -> None:
        """What a scrape round at `t` records: `by_pod[name]`, else `default` (idle)."""
        at = (T0 + timedelta(seconds=self.t)).timestamp()
        for key, _, targets in self.store.targets():
            for target in targets:
                self.store.record(key, target, Observation(at, metrics=by_pod.get(target.name, default or engine()),
                                                           probe=PROBE_OK if target.probe else ""))

    def names(self) -> list[str]:
        return sorted(p["metadata"]["name"] for p in pods(self.kube))

    @property
    def autoscaling(self) -> dict[str, Any]:
        return status(self.kube)["autoscaling"]

    def condition(self, type_: str) -> dict[str, Any] | None:
        return next((c for c in status(self.kube)["conditions"] if c["type"] == type_), None)

    def events(self, reason: str) -> list[str]:
        return [m for _, r, m in self.kube.events if r == reason]


def test_memory_first_then_a_replica_once_the_target_is_missed_over_the_window() -> None:
    w = World(scaleUp={"windowSeconds": 60})
    for _ in range(6):  # 10 waiting > 4 per replica, but the engine can still expand: memory absorbs it
        w.scrape(engine(waiting=10, headroom=2))
        w.run()
        assert w.autoscaling["desiredReplicas"] == 1 and len(w.names()) == 1
    assert "expansion can still absorb the load" in w.autoscaling["message"] and w.autoscaling["upSince"] == ""
    started, created = w.t + 15, []
    while not created and w.t < started + 120:  # expansion exhausted: the scale-up window starts and fills
        w.scrape(engine(waiting=10))
        created = w.run().created
    assert len(created) == 1 and created[0] in w.names() and w.t - started >= 60  # not before the window was full
    st = status(w.kube)
    assert (w.autoscaling["desiredReplicas"], w.autoscaling["reason"], st["ready"]) == (2, "ScaleUp", "1/2")
    decision = st["decisions"][-1]
    assert (decision["field"], decision["from"], decision["to"], decision["reason"], decision["via"]) == (
        "replicas", "1", "2", "ScaleUp", "creating pods")
    (event,) = w.events("ReplicaDecision")
    assert event.startswith("replicas 1 -> 2 (ScaleUp: queue depth 10/replica (target 4) for 60s with expansion "
                            "exhausted on every pod: 1 -> 2 replicas") and event.endswith("applied: creating pods")


def test_the_new_replica_is_created_like_any_other_and_the_policy_waits_for_it() -> None:
    w = World(scaleUp={"windowSeconds": 0})
    w.scrape(engine(waiting=10))
    assert len(w.run().created) == 1
    w.kube.clear()
    w.scrape(engine(waiting=10))
    out = w.run()  # not Ready yet: settling, nothing more is decided
    assert out.created == [] and w.autoscaling["reason"] == "Settling" and w.events("ReplicaDecision") == []


def test_an_unchanged_world_writes_nothing_even_while_a_window_runs() -> None:
    w = World(scaleUp={"windowSeconds": 600})
    w.scrape()
    w.run()  # the first scrape: status.pods[].metrics and the autoscaler's view change
    w.kube.clear()
    w.scrape()
    w.run()
    assert w.kube.writes == []
    w.scrape(engine(waiting=10))
    w.run()  # the scale-up window starts: written once
    assert w.autoscaling["upSince"] != "" and cluster_writes(w.kube) == [("patch", "status")]
    w.kube.clear()
    for _ in range(3):  # it runs on: only its message (the seconds so far) would change, which is not a write
        w.scrape(engine(waiting=10))
        w.run()
    assert w.kube.writes == []


def test_scale_down_drains_first_then_deletes() -> None:
    w = World(replicas=2, scaleDown={"windowSeconds": 0, "drainTimeoutSeconds": 600})
    busy, idle = w.names()
    w.scrape(**{busy: engine(running=3), idle: engine()})
    out = w.run()  # 2 replicas with 3 running, 0 waiting: one holds it; the emptiest is drained
    assert out.deleted == [] and w.autoscaling["desiredReplicas"] == 1
    assert [e["pod"] for e in w.autoscaling["draining"]] == [idle] and ("label", idle) in w.kube.writes
    labels = {p["metadata"]["name"]: p["metadata"]["labels"].get(SERVING_LABEL) for p in pods(w.kube)}
    assert labels == {busy: "true", idle: None}  # the Service no longer selects it
    progressing = w.condition("Progressing")
    assert progressing is not None and progressing["reason"] == "Draining" and idle in progressing["message"]
    assert status(w.kube)["phase"] == "Ready" and status(w.kube)["ready"] == "1/1"  # a scale-down is no outage
    assert [r for t, r, _ in w.kube.events if t == "Warning"] == []
    (event,) = w.events("ReplicaDecision")
    assert event.startswith("replicas 2 -> 1 (ScaleDown: queue depth 0/replica") and event.endswith(
        f"applied: draining {idle}"), event
    w.kube.clear()
    w.run(DRAIN_SETTLE / 2)  # idle at the last scrape, but that was before the label went: proves nothing
    assert w.names() == [busy, idle]
    w.scrape(**{busy: engine(running=3), idle: engine(running=1)})
    w.run(DRAIN_SETTLE)  # a request that came before the Service's endpoints dropped it: still served
    assert w.names() == [busy, idle] and w.autoscaling["reason"] == "Settling"
    w.scrape(**{busy: engine(running=4), idle: engine()})
    out = w.run()
    assert out.deleted == [idle] and w.names() == [busy] and w.autoscaling["draining"] == []
    assert any(f"pod {idle} drained" in m for m in w.events("DeletedDrained"))
    w.kube.clear()
    w.scrape(engine(running=4))
    w.run()
    assert w.names() == [busy] and w.autoscaling["desiredReplicas"] == 1  # nothing recreates it


def test_a_draining_pod_is_sent_no_probe_request() -> None:
    """The gate's probe completion goes to pods that have not passed their gate; a draining pod is leaving, not
    waiting for a gate, and a request sent to it would only keep its drain from finishing."""
    w = World(replicas=2, gate=True, scaleDown={"windowSeconds": 0})
    w.scrape()
    w.run()  # the probes answered (both pass their gate); nothing in flight: one replica holds it
    (leaving,) = [e["pod"] for e in w.autoscaling["draining"]]
    ((_, _, targets),) = w.store.targets()
    assert {t.name: t.probe for t in targets} == {name: "" for name in w.names()} and leaving in w.names()


def test_a_drain_that_does_not_finish_ends_at_the_timeout() -> None:
    w = World(replicas=2, scaleDown={"windowSeconds": 0, "drainTimeoutSeconds": 60})
    a, b = w.names()
    w.scrape(**{a: engine(running=1), b: engine(running=2)})
    w.run()
    (draining,) = [e["pod"] for e in w.autoscaling["draining"]]
    for _ in range(3):
        w.scrape(engine(running=2))
        assert w.run().deleted == []
    w.scrape(engine(running=2))
    assert w.run().deleted == [draining]
    (warning,) = [m for t, r, m in w.kube.events if (t, r) == ("Warning", "DeletedDrainTimeout")]
    assert "2 request(s) still in it" in warning


def test_someone_else_scaling_is_a_conflict_and_is_not_followed() -> None:
    w = World()
    w.scrape()
    w.run()
    assert w.condition(AUTOSCALER_CONFLICT)["status"] == "False"  # type: ignore[index]
    w.kube.set_spec(NS, NAME, spec(replicas=3, autoscaling=AUTO))  # an HPA on the scale subresource
    w.kube.clear()
    w.scrape()
    out = w.run()
    conflict = w.condition(AUTOSCALER_CONFLICT)
    assert conflict is not None and conflict["status"] == "True" and "own decision (1 replicas) wins" in \
        conflict["message"]
    assert out.created == [] and w.names() and len(w.names()) == 1 and status(w.kube)["ready"] == "1/1"
    assert ("Warning", "SpecReplicasChanged") in [(t, r) for t, r, _ in w.kube.events]
    w.kube.clear()
    w.scrape()
    w.run()
    assert w.kube.writes == []  # said once
    w.scrape()
    w.run(CONFLICT_HOLD)
    assert w.condition(AUTOSCALER_CONFLICT)["status"] == "False"  # type: ignore[index]


def test_switching_autoscaling_off_hands_the_count_back_to_spec_replicas() -> None:
    w = World()
    w.scrape()
    w.run()
    w.kube.set_spec(NS, NAME, spec(replicas=2, autoscaling={**AUTO, "enabled": False}))
    out = w.run()
    st = status(w.kube)
    assert len(out.created) == 1 and "autoscaling" not in st and w.condition(AUTOSCALER_CONFLICT) is None


def test_the_bounds_apply_at_once_when_enabled() -> None:
    w = World(replicas=1, minReplicas=2)
    assert len(w.names()) == 2 and w.autoscaling["desiredReplicas"] == 2
    assert status(w.kube)["decisions"][0]["reason"] == "Bounds"


def test_a_restarted_operator_starts_the_windows_afresh() -> None:
    """When the windows were last evaluated is in memory only: a new operator (an empty store) cannot know whether
    the condition held while nobody watched."""
    w = World(scaleUp={"windowSeconds": 60})
    w.scrape(engine(waiting=10))
    w.run()
    since = w.autoscaling["upSince"]
    w.scrape(engine(waiting=10))
    w.run()
    assert w.autoscaling["upSince"] == since
    w.store = Observations()
    w.run(1)  # the first pass after a restart: nothing scraped yet
    w.scrape(engine(waiting=10))
    w.run()
    assert w.autoscaling["upSince"] not in ("", since)


def test_a_replica_that_never_becomes_ready_is_given_back() -> None:
    """No GPU free for the new replica (never scheduled): after scaleUp.readyTimeoutSeconds it is deleted and the
    count goes back, instead of settling waiting for it for ever (and so never scaling down either)."""
    w = World(scaleUp={"windowSeconds": 0, "readyTimeoutSeconds": 120})
    w.kube.now = T0 + timedelta(seconds=w.t)  # the new pod's creationTimestamp
    w.scrape(engine(waiting=10))
    (new,) = w.run().created
    deleted: list[str] = []
    while not deleted and w.t < 200:
        w.scrape(engine(waiting=10))
        deleted = w.run().deleted
        assert w.t >= 120 or not deleted  # not before the timeout
    assert deleted == [new] and w.autoscaling["desiredReplicas"] == 1 and w.autoscaling["reason"] == "GiveBack"
    assert any("not Ready 120s after creation" in e for e in w.events("ReplicaDecision"))
