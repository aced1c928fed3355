"""The pure gated-rollout state machine (rollout.py), alone and driven together with planning.plan() over a
simulated cluster: steps, gate pass/fail, pause, resume, rollback, and an operator restart mid-rollout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from itertools import count
from typing import Any

import pytest

from pie_operator.planning import is_ready, plan, revision
from pie_operator.rollout import (
    COMPLETE,
    FAIL,
    PASS,
    PAUSED,
    PENDING,
    PROGRESSING,
    ROLLED_BACK,
    RolloutState,
    Verdict,
    advance,
    gate_verdict,
    serving,
)
from pie_operator.scrape import PROBE_OK, EngineMetrics, Observation

A, B, C = "aaaaaaaaaa", "bbbbbbbbbb", "cccccccccc"
T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
TEMPLATES = {rev: {"spec": {"containers": [{"name": "engine", "image": f"pie-engine:{rev}"}]}} for rev in (A, B, C)}


def pod(name: str, rev: str, ready: bool = True, created: datetime = T0, phase: str = "Running") -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": f"uid-{name}", "labels": {"pie.io/template-hash": rev},
                         "creationTimestamp": created.strftime("%Y-%m-%dT%H:%M:%SZ")},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def verdicts(table: dict[str, str]) -> Callable[[dict[str, Any]], Verdict]:
    """Verdict by pod name (default Pass)."""
    return lambda p: Verdict(table.get(p["metadata"]["name"], PASS), "GateFailed", f"{p['metadata']['name']} bad")


def step(prev: RolloutState | None, pods: list[dict[str, Any]], spec: str = B, table: dict[str, str] | None = None,
         auto_rollback: bool = False, replicas: int = 2) -> tuple[RolloutState, Any]:
    return advance(prev, spec_revision=spec, spec_template=TEMPLATES[spec], pods=pods, replicas=replicas,
                   verdict=verdicts(table or {}), auto_rollback=auto_rollback)


COMPLETE_A = RolloutState(revision=A, phase=COMPLETE, last_good_revision=A, last_good_template=TEMPLATES[A],
                          passed=("a1", "a2"))


def test_first_rollout_completes_once_every_pod_passed() -> None:
    st, target = step(None, [], spec=A)
    assert (st.phase, target.revision, target.hold, st.last_good_revision) == (PROGRESSING, A, False, "")
    st, _ = step(st, [pod("a1", A), pod("a2", A)], spec=A, table={"a2": PENDING})
    assert (st.phase, st.passed) == (PROGRESSING, ("a1",))
    st, target = step(st, [pod("a1", A), pod("a2", A)], spec=A)
    assert (st.phase, st.passed, st.last_good_revision) == (COMPLETE, ("a1", "a2"), A)
    assert st.last_good_template == TEMPLATES[A] and target.template == TEMPLATES[A]


def test_bootstrap_adopts_ready_pods() -> None:
    """No status.rollout yet (an older operator made the pods): Ready pods count as passed."""
    st, _ = step(None, [pod("a1", A), pod("a2", A, ready=False)], spec=A, table={"a2": PENDING})
    assert st.passed == ("a1",) and st.phase == PROGRESSING


def test_new_revision_starts_a_rollout_and_gates_each_new_pod() -> None:
    st, target = step(COMPLETE_A, [pod("a1", A), pod("a2", A)])
    assert (st.phase, st.revision, target.revision, target.template) == (PROGRESSING, B, B, TEMPLATES[B])
    st, _ = step(st, [pod("a1", A), pod("b1", B)], table={"b1": PENDING})
    assert st.passed == ("a1",) and st.phase == PROGRESSING  # a2 is gone, b1 waits for its gate
    st, _ = step(st, [pod("a1", A), pod("b1", B)])
    assert st.passed == ("a1", "b1")
    st, _ = step(st, [pod("b1", B), pod("b2", B)])
    assert (st.phase, st.last_good_revision, st.passed) == (COMPLETE, B, ("b1", "b2"))


def test_failed_gate_pauses() -> None:
    st, _ = step(COMPLETE_A, [pod("a1", A), pod("a2", A)])
    st, target = step(st, [pod("a1", A), pod("b1", B)], table={"b1": FAIL})
    assert (st.phase, st.reason, target.revision, target.hold) == (PAUSED, "GateFailed", B, True)
    assert target.fill == (A, TEMPLATES[A])  # a pod that goes away while paused comes back at the last good one
    assert "b1 bad" in st.message and "rollout.autoRollback" in st.message
    st, target = step(st, [pod("a1", A), pod("b1", B)], table={"b1": FAIL})  # stays paused
    assert (st.phase, target.hold) == (PAUSED, True)
    st, target = step(st, [pod("a1", A), pod("b1", B)])  # the engine came up after all: resume
    assert (st.phase, st.reason, target.hold, st.passed) == (PROGRESSING, "Resumed", False, ("a1", "b1"))


def test_setting_auto_rollback_rolls_a_paused_rollout_back() -> None:
    st, _ = step(COMPLETE_A, [pod("a1", A), pod("a2", A)])
    st, _ = step(st, [pod("a1", A), pod("b1", B)], table={"b1": FAIL})
    assert st.phase == PAUSED
    st, target = step(st, [pod("a1", A), pod("b1", B)], table={"b1": FAIL}, auto_rollback=True)
    assert (st.phase, target.revision, target.hold) == (ROLLED_BACK, A, False)


def test_failed_gate_rolls_back_and_stays_rolled_back_until_the_spec_changes() -> None:
    st, _ = step(COMPLETE_A, [pod("a1", A), pod("a2", A)], auto_rollback=True)
    st, target = step(st, [pod("a1", A), pod("b1", B)], table={"b1": FAIL}, auto_rollback=True)
    assert (st.phase, st.failed_revision, target.revision, target.template, target.hold) == (
        ROLLED_BACK, B, A, TEMPLATES[A], False)
    assert "rolled back to" in st.message
    st, target = step(st, [pod("a1", A), pod("a3", A)], auto_rollback=True)  # converged back: still rolled back
    assert (st.phase, target.revision, st.last_good_revision) == (ROLLED_BACK, A, A)
    st, target = step(st, [pod("a1", A), pod("a3", A)], spec=C, auto_rollback=True)  # a fix: a new rollout
    assert (st.phase, target.revision, st.failed_revision) == (PROGRESSING, C, "")


def test_no_rollback_without_a_last_good_revision() -> None:
    st, target = step(None, [pod("b1", B, ready=False)], table={"b1": FAIL}, auto_rollback=True, replicas=1)
    assert (st.phase, target.hold) == (PAUSED, True)
    # Nothing ever passed: a pod that goes away is replaced at the spec's revision (the only one there is), and the
    # rollout resumes once one of its pods passes its gate.
    assert target.fill == (B, TEMPLATES[B])
    st, target = step(st, [], auto_rollback=True, replicas=1)
    assert (st.phase, target.hold, target.fill) == (PAUSED, True, (B, TEMPLATES[B]))
    st, target = step(st, [pod("b2", B)], auto_rollback=True, replicas=1)  # resumed, and complete at once
    assert (st.phase, st.last_good_revision, target.hold) == (COMPLETE, B, False)


def test_paused_rollout_does_not_resume_when_the_failing_pod_goes_away() -> None:
    """Finding 1: an old pod evicted while paused comes back at the last good revision, and the failing pod going
    away (deleted, its node lost) is no evidence that its revision works: the rollout stays paused."""
    st, _ = step(COMPLETE_A, [pod("a1", A), pod("a2", A)])
    st, _ = step(st, [pod("a1", A), pod("b1", B)], table={"b1": FAIL})
    st, target = step(st, [pod("b1", B)], table={"b1": FAIL})  # a1 evicted
    assert (st.phase, target.hold, target.fill) == (PAUSED, True, (A, TEMPLATES[A]))
    st, target = step(st, [pod("b1", B), pod("a3", A)], table={"b1": FAIL})  # its replacement passes its gate
    assert st.phase == PAUSED and "a3" in st.passed
    st, target = step(st, [pod("a3", A)])  # b1 deleted
    assert (st.phase, target.hold, target.fill) == (PAUSED, True, (A, TEMPLATES[A]))
    st, target = step(st, [pod("a3", A), pod("b2", B)])  # a pod of the paused revision passes: resume
    assert (st.phase, st.reason, target.hold) == (PROGRESSING, "Resumed", False)


def test_sim_eviction_while_paused_keeps_the_last_good_revision() -> None:
    sim = Sim(2, A, bad={B})
    for _ in range(6):
        st = sim.pass_(B)
    assert st.phase == PAUSED and sim.revisions() == [A, B]
    sim.pods, sim.disrupted = [p for p in sim.pods if revision(p) != A], True  # the last good pod is evicted
    for _ in range(4):
        st = sim.pass_(B)
    assert st.phase == PAUSED and sim.revisions() == [A, B]
    sim.pods = [p for p in sim.pods if revision(p) != B]  # and the failing one too
    for _ in range(4):
        st = sim.pass_(B)
    assert st.phase == PAUSED and sim.revisions() == [A, A]
    assert serving(RolloutState.from_status(sim.status) or COMPLETE_A, sim.pods) == {
        p["metadata"]["name"] for p in sim.pods}


def test_status_round_trip() -> None:
    st = RolloutState(revision=B, phase=ROLLED_BACK, last_good_revision=A, last_good_template=TEMPLATES[A],
                      passed=("a1",), failed_revision=B, reason="RolledBack", message="m")
    back = RolloutState.from_status(st.to_status())
    assert back == st and back is not None and back.last_good_template == TEMPLATES[A]
    assert RolloutState.from_status(None) is None and RolloutState.from_status({}) is None


OK = Observation(at=0.0, metrics=EngineMetrics({"pie_swap_stall_seconds_total": 1.0,
                                                "pie_iteration_seconds_sum": 10.0}), probe=PROBE_OK)
STALLING = Observation(at=0.0, metrics=EngineMetrics({"pie_swap_stall_seconds_total": 5.0,
                                                      "pie_iteration_seconds_sum": 10.0}), probe=PROBE_OK)
IDLE = replace(OK, probe="")  # /health and /metrics answer, but no probe request was sent
UNSERVED = replace(OK, probe="503: the engine is shutting down")
STALE = Observation(at=0.0, error="unreachable (ConnectError)")


@pytest.mark.parametrize(("ready", "age", "obs", "engine_health", "baseline", "expected"), [
    (False, 10, None, True, None, (PENDING, "")),
    (False, 700, None, True, None, (FAIL, "StepTimeout")),
    (True, 10, None, False, None, (PASS, "")),                  # gate.engineHealth off: Ready is enough
    (True, 700, None, True, None, (PENDING, "")),               # not scraped yet (operator restart): never Fail
    (True, 10, STALE, True, None, (PENDING, "")),
    (True, 700, STALE, True, None, (FAIL, "GateFailed")),
    (True, 10, OK, True, None, (PASS, "")),
    (True, 10, OK, True, 0.08, (PASS, "")),                     # 0.10 vs 0.08: within 0.05
    (True, 10, STALLING, True, 0.1, (PENDING, "")),             # 0.5 vs 0.1: a regression, not yet late
    (True, 700, STALLING, True, 0.1, (FAIL, "GateFailed")),
    (True, 10, IDLE, True, None, (PENDING, "")),                # healthy but idle: not proven to serve yet
    (True, 700, IDLE, True, None, (FAIL, "GateFailed")),
    (True, 10, UNSERVED, True, None, (PENDING, "")),
    (True, 700, UNSERVED, True, None, (FAIL, "GateFailed")),
])
def test_gate_verdict(ready: bool, age: int, obs: Observation | None, engine_health: bool, baseline: float | None,
                      expected: tuple[str, str]) -> None:
    p = pod("n", B, ready=ready, created=T0 - timedelta(seconds=age))
    v = gate_verdict(p, obs, now=T0, step_timeout=600, engine_health=engine_health, baseline_stall=baseline,
                     max_stall_regression=0.05)
    assert (v.result, v.reason) == expected
    if v.result == FAIL:
        assert "pod n" in v.message
    if obs is UNSERVED and v.result == FAIL:
        assert "probe request failed: 503: the engine is shutting down" in v.message


class Sim:
    """A cluster for the planner + state machine: pods become Ready when created; engines of `bad` revisions never
    pass their gate (stale metrics); the clock advances 60 s per pass. Counts every deletion."""

    def __init__(self, replicas: int, rev: str, bad: set[str] = frozenset(), auto_rollback: bool = False) -> None:
        self.now, self.names, self.bad, self.auto_rollback = T0, count(), bad, auto_rollback
        self.pods = [pod(f"p{next(self.names)}", rev) for _ in range(replicas)]
        self.replicas, self.deleted, self.status = replicas, 0, COMPLETE_A.to_status() | {"passed": [
            p["metadata"]["name"] for p in self.pods]}
        self.scraped = True  # False: the operator just restarted and has not scraped any engine yet
        self.disrupted = False  # True: pods were taken away behind the operator's back (no availability bound)

    def verdict(self, p: dict[str, Any]) -> Verdict:
        obs = None if not self.scraped else STALE if revision(p) in self.bad else OK
        return gate_verdict(p, obs, now=self.now, step_timeout=150, engine_health=True, baseline_stall=None,
                            max_stall_regression=0.05)

    def pass_(self, spec: str) -> RolloutState:
        st, target = advance(RolloutState.from_status(self.status), spec_revision=spec, spec_template=TEMPLATES[spec],
                             pods=self.pods, replicas=self.replicas, verdict=self.verdict,
                             auto_rollback=self.auto_rollback)
        passed = set(st.passed)
        steps = plan(self.pods, desired_revision=target.revision, replicas=self.replicas, max_surge=0,
                     max_unavailable=1, hold=target.hold,
                     gate=lambda p: is_ready(p) and p["metadata"]["name"] in passed)
        gone = {d.name for d in steps.delete}
        self.deleted += len(gone)
        self.pods = [p for p in self.pods if p["metadata"]["name"] not in gone]
        rev, _ = target.creates()
        self.pods += [pod(f"p{next(self.names)}", rev, created=self.now) for _ in range(steps.create)]
        available = sum(1 for p in self.pods if is_ready(p) and p["metadata"]["name"] in passed)
        assert self.disrupted or available >= self.replicas - 1  # maxUnavailable 1, every step
        self.status = st.to_status()  # what the operator writes; a restart reads it back (RolloutState.from_status)
        self.now += timedelta(seconds=60)
        return st

    def revisions(self) -> list[str]:
        return sorted(revision(p) for p in self.pods)


def test_simulated_rollout_replaces_one_pod_per_gated_step() -> None:
    sim = Sim(3, A)
    phases = [sim.pass_(B).phase for _ in range(12)]
    assert sim.revisions() == [B, B, B] and phases[-1] == COMPLETE and sim.deleted == 3


def test_simulated_restart_mid_rollout_deletes_nothing_extra() -> None:
    sim = Sim(3, A)
    for _ in range(3):
        sim.pass_(B)
    assert A in sim.revisions() and B in sim.revisions()
    # A restart: only the written status and the pods' labels survive (Sim keeps nothing else between passes), and
    # the new operator has scraped no engine yet: the new pods' gates are Pending, nothing more is deleted.
    sim.scraped, before = False, sim.deleted
    for _ in range(5):
        sim.pass_(B)
    assert sim.deleted == before and len(sim.pods) == 3  # a missing replacement is created, nothing is deleted
    sim.scraped = True
    for _ in range(10):
        sim.pass_(B)
    assert sim.revisions() == [B, B, B] and sim.deleted == 3


def test_simulated_bad_revision_pauses_then_rolls_back() -> None:
    sim = Sim(3, A, bad={B})
    for _ in range(6):
        st = sim.pass_(B)
    assert st.phase == PAUSED and sim.revisions() == [A, A, B]  # one step taken, then held
    deleted = sim.deleted
    for _ in range(3):
        sim.pass_(B)
    assert sim.deleted == deleted  # paused: nothing more is replaced

    sim = Sim(3, A, bad={B}, auto_rollback=True)
    for _ in range(10):
        st = sim.pass_(B)
    assert st.phase == ROLLED_BACK and sim.revisions() == [A, A, A] and st.failed_revision == B


def test_unchanged_spec_after_completion_is_stable() -> None:
    st, target = step(replace(COMPLETE_A, passed=("a1", "a2")), [pod("a1", A), pod("a2", A)], spec=A)
    assert (st.phase, target.revision, target.hold) == (COMPLETE, A, False)
    assert st.to_status() == COMPLETE_A.to_status()
