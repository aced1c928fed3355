"""The gated rollout as a pure state machine: (status.rollout, pods, gate verdicts) -> (status.rollout, target).

Pods are replaced a step at a time by planning.py; this module decides WHICH revision pods converge to and whether
the rollout may go on. A pod counts as available only once it passed its gate (`passed`): Ready and -- with
rollout.gate.engineHealth -- its engine answering /health with parseable metrics and no stall regression against
the other revisions' pods, and having served a probe request the operator sent it (scrape.probe: an engine that
answers /health but cannot complete a request never takes traffic). A gate that has not passed within
rollout.stepTimeoutSeconds of the pod's creation fails the rollout: it pauses (Degraded, nothing more is replaced)
or, with rollout.autoRollback, rolls back to the last revision that completed (its pod template is kept in
status.rollout).

While paused, the last good revision keeps serving: a pod that goes away (evicted, its node lost, Failed) is
created again from the last good template (`Target.fill`), never from the revision that failed; with no last good
revision (the first rollout failed) from the spec's, the only one there is. Traffic follows the gate: `serving()`
names the pods the Service may route to (the operator labels them, builders.SERVING_LABEL): passed their gate, and
not of a revision that failed (paused on, or rolled back from).

Phases: Progressing -> Complete; Progressing/Complete -> Paused (a gate failed; resumes by itself once every pod of
the paused revision passes its gate, e.g. a slow engine came up -- the failing pod merely going away proves nothing;
rolls back once autoRollback is set) or RolledBack (sticky until the spec changes). A new spec revision always
starts a new rollout. Everything lives in status.rollout and the pods' template-hash labels, so a restarted operator
continues exactly where it was: a gate it cannot judge yet (no scrape since it started) is Pending, never Fail.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from pie_operator.planning import Pod, is_finished, is_ready, is_terminating, revision
from pie_operator.scrape import PROBE_OK, Observation

PROGRESSING, COMPLETE, PAUSED, ROLLED_BACK = "Progressing", "Complete", "Paused", "RolledBack"
PASS, PENDING, FAIL = "Pass", "Pending", "Fail"


@dataclass(frozen=True)
class Verdict:
    result: str  # Pass | Pending | Fail
    reason: str = ""  # for Fail: StepTimeout (never Ready) | GateFailed (the engine is not healthy)
    message: str = ""


@dataclass(frozen=True)
class RolloutState:
    """status.rollout."""

    revision: str = ""  # the spec's revision (what is being, or was, rolled out)
    phase: str = PROGRESSING
    last_good_revision: str = ""
    last_good_template: dict[str, Any] | None = field(default=None, compare=False)
    passed: tuple[str, ...] = ()  # names of pods that passed their gate
    failed_revision: str = ""
    reason: str = ""
    message: str = ""

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"revision": self.revision, "phase": self.phase, "passed": list(self.passed),
                               "reason": self.reason, "message": self.message}
        if self.last_good_revision:
            out["lastGoodRevision"] = self.last_good_revision
            out["lastGoodTemplate"] = self.last_good_template
        if self.failed_revision:
            out["failedRevision"] = self.failed_revision
        return out

    @classmethod
    def from_status(cls, st: dict[str, Any] | None) -> RolloutState | None:
        if not st or not st.get("revision"):
            return None
        return cls(revision=st["revision"], phase=st.get("phase", PROGRESSING),
                   last_good_revision=st.get("lastGoodRevision", ""), last_good_template=st.get("lastGoodTemplate"),
                   passed=tuple(st.get("passed") or ()), failed_revision=st.get("failedRevision", ""),
                   reason=st.get("reason", ""), message=st.get("message", ""))


@dataclass(frozen=True)
class Target:
    """What pods converge to: `revision` created from `template`; `hold`: paused, replace nothing, and create the
    pods that went away as `fill` (revision, template): the last good revision's (the spec's when there is none)."""

    revision: str
    template: dict[str, Any]
    hold: bool
    fill: tuple[str, dict[str, Any]] | None = None

    def creates(self) -> tuple[str, dict[str, Any]]:
        """(revision, template) of the pods this pass creates."""
        return self.fill if self.hold and self.fill is not None else (self.revision, self.template)


def _age(pod: Pod, now: datetime) -> float:
    created = pod.get("metadata", {}).get("creationTimestamp")
    if not created:
        return 0.0
    return (now - datetime.fromisoformat(created.replace("Z", "+00:00"))).total_seconds()


def gate_verdict(pod: Pod, obs: Observation | None, *, now: datetime, step_timeout: float, engine_health: bool,
                 baseline_stall: float | None, max_stall_regression: float) -> Verdict:
    """Has `pod` passed its gate? `obs`: this operator's latest scrape of it (None: not scraped yet);
    `baseline_stall`: the mean stall fraction of the other revisions' healthy pods (None: nothing to compare)."""
    name, age = pod["metadata"]["name"], _age(pod, now)
    late = age > step_timeout
    if not is_ready(pod):
        return Verdict(FAIL, "StepTimeout", f"pod {name} not Ready after rollout.stepTimeoutSeconds="
                                            f"{step_timeout:g}s") if late else Verdict(PENDING)
    if not engine_health:
        return Verdict(PASS)
    if obs is None:
        return Verdict(PENDING)  # no evidence yet (e.g. the operator just restarted): never fail on none
    if obs.metrics is None:
        problem = f"engine unhealthy: {obs.error}"
    elif baseline_stall is not None and obs.metrics.stall_fraction - baseline_stall > max_stall_regression:
        problem = (f"swap stall fraction {obs.metrics.stall_fraction:.3f} vs {baseline_stall:.3f} on the previous "
                   f"revision (rollout.gate.maxStallRegression={max_stall_regression:g})")
    elif obs.probe != PROBE_OK:
        problem = f"probe request failed: {obs.probe}" if obs.probe else "no probe request served yet"
    else:
        return Verdict(PASS)
    if late:
        return Verdict(FAIL, "GateFailed", f"pod {name} failed its gate within {step_timeout:g}s: {problem}")
    return Verdict(PENDING, message=problem)


def advance(prev: RolloutState | None, *, spec_revision: str, spec_template: dict[str, Any], pods: list[Pod],
            replicas: int, verdict: Callable[[Pod], Verdict], auto_rollback: bool) -> tuple[RolloutState, Target]:
    """One step of the state machine (see the module docstring)."""
    live = [p for p in pods if not is_terminating(p) and not is_finished(p)]
    names = {p["metadata"]["name"] for p in live}
    if prev is None:  # first pass ever (or status lost): what serves already has proven itself
        st = RolloutState(revision=spec_revision, passed=tuple(sorted(
            p["metadata"]["name"] for p in live if is_ready(p))), reason="NewRevision")
    else:
        st = replace(prev, passed=tuple(n for n in prev.passed if n in names))
    if st.revision != spec_revision:
        st = replace(st, revision=spec_revision, phase=PROGRESSING, failed_revision="", reason="NewRevision",
                     message=f"rolling out revision {spec_revision}")

    target = st.last_good_revision if st.phase == ROLLED_BACK else st.revision
    passed, failures = set(st.passed), []
    for p in live:
        # (pods of the last good revision created during a pause must pass too, to take traffic; they fail nothing)
        if revision(p) not in (target, st.last_good_revision) or p["metadata"]["name"] in passed:
            continue
        v = verdict(p)
        if v.result == PASS:
            passed.add(p["metadata"]["name"])
        elif v.result == FAIL and revision(p) == target:
            failures.append(v)
    st = replace(st, passed=tuple(sorted(passed)))

    can_roll_back = bool(auto_rollback and st.last_good_revision and st.last_good_revision != st.revision
                         and st.last_good_template is not None)
    if failures and (st.phase in (PROGRESSING, COMPLETE) or st.phase == PAUSED and can_roll_back):
        # (a paused rollout rolls back as soon as rollout.autoRollback is set, as its message suggests)
        why = "; ".join(v.message for v in failures)
        if can_roll_back:
            st = replace(st, phase=ROLLED_BACK, failed_revision=st.revision, reason="RolledBack",
                         message=f"revision {st.revision} failed: {why}; rolled back to {st.last_good_revision}")
            target = st.last_good_revision
        else:
            hint = "" if auto_rollback else " (set rollout.autoRollback to roll back automatically)"
            st = replace(st, phase=PAUSED, reason=failures[0].reason,
                         message=f"rollout of revision {st.revision} paused: {why}{hint}")
    elif failures and st.phase == ROLLED_BACK:
        st = replace(st, phase=PAUSED, reason=failures[0].reason, message=(
            f"rollback to revision {target} failed too: {'; '.join(v.message for v in failures)}"))
        target = st.revision
    elif st.phase == PAUSED and not failures and (mine := [p for p in live if revision(p) == target]) and all(
            p["metadata"]["name"] in passed for p in mine):
        st = replace(st, phase=PROGRESSING, reason="Resumed", message="every pod passes its gate again")

    converged = (len(live) == replicas and all(revision(p) == target for p in live)
                 and all(p["metadata"]["name"] in passed for p in live))
    if st.phase == PROGRESSING and converged:
        st = replace(st, phase=COMPLETE, last_good_revision=target, last_good_template=spec_template,
                     reason="RolloutComplete", message=f"revision {target} serves on {replicas} pod(s)")
    template = spec_template if target == spec_revision or st.last_good_template is None else st.last_good_template
    fill = (st.last_good_revision, st.last_good_template) if st.last_good_revision and \
        st.last_good_template is not None else (target, template)
    return st, Target(revision=target, template=template, hold=st.phase == PAUSED, fill=fill)


def serving(state: RolloutState, pods: list[Pod]) -> set[str]:
    """The pods that may take traffic: live, passed their gate, and not of a revision that failed its gate (the one
    paused on, while a last good revision exists; the one rolled back from). Readiness is left to the endpoints."""
    suspect = ""
    if state.phase == ROLLED_BACK:
        suspect = state.failed_revision
    elif state.phase == PAUSED and state.last_good_revision and state.last_good_revision != state.revision:
        suspect = state.revision
    passed = set(state.passed)
    return {p["metadata"]["name"] for p in pods if not is_terminating(p) and not is_finished(p)
            and p["metadata"]["name"] in passed and not (suspect and revision(p) == suspect)}


def baseline_stall(pods: list[Pod], observations: Mapping[str, Observation | None], target: str) -> float | None:
    """Mean stall fraction of healthy pods of other revisions (what a new revision must not regress against)."""
    fractions = [m.stall_fraction for p in pods if revision(p) != target
                 and (o := observations.get(p["metadata"]["name"])) is not None and (m := o.metrics) is not None]
    return sum(fractions) / len(fractions) if fractions else None
