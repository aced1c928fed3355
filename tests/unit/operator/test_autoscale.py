"""Table tests of the pure replica autoscaling policy (autoscale.py): memory first, then replicas."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from pie_operator.autoscale import (
    BOUNDS,
    GIVE_BACK,
    HOLD,
    NO_METRICS,
    SCALE_DOWN,
    SCALE_UP,
    SETTLING,
    TTFT,
    AutoscalePolicy,
    AutoscaleState,
    Decision,
    PodLoad,
    decide,
    recommend,
)

NOW = 10_000.0
# Queue depth target 4 waiting/replica; a scale-down needs the survivors at <= 2.8/replica.
P = AutoscalePolicy(min_replicas=1, max_replicas=4, target_value=4, scale_up_window=60, scale_down_window=300,
                    scale_down_headroom=0.7, max_sample_age=30)
P_TTFT = replace(P, target=TTFT, target_value=0.5)


def pod(name: str, waiting: int = 0, in_flight: int = 0, exhausted: bool = True, **kw: Any) -> PodLoad:
    """A Ready, scraped (10 s ago) pod."""
    return PodLoad(**{**dict(name=name, ready=True, waiting=waiting, in_flight=in_flight,
                             expansion_exhausted=exhausted, at=NOW - 10), **kw})


def state(up: float | None = None, down: float | None = None, at: float = NOW - 10) -> AutoscaleState:
    """Windows that began `up` / `down` seconds ago, last evaluated 10 s ago."""
    return AutoscaleState(None if up is None else NOW - up, None if down is None else NOW - down, at)


BUSY = [pod("pod-a", waiting=6), pod("pod-b", waiting=6)]  # 6/replica > 4, expansion exhausted on both
IDLE3 = [pod("pod-a", in_flight=5), pod("pod-b", in_flight=2), pod("pod-c", in_flight=2)]


@pytest.mark.parametrize(("policy", "replicas", "pods", "prev", "expected", "says"), [
    # memory first: the target is missed, but a pod can still expand -> no replica, however long it lasts
    (P, 2, [pod("pod-a", 6, exhausted=False, expansion="1.5x of max 3x"), pod("pod-b", 6)], state(up=3600),
     (2, (), HOLD, None, None), "expansion can still absorb the load: pod-a at 1.5x of max 3x"),
    (P, 2, [pod("pod-a", 6), pod("pod-b", 6, exhausted=False)], state(up=3600),
     (2, (), HOLD, None, None), "pod-b can expand further"),
    # exhausted + missed: the window starts, fills, then +1
    (P, 2, BUSY, state(), (2, (), HOLD, NOW, None), "for 0s of the 60s scale-up window"),
    (P, 2, BUSY, state(up=59), (2, (), HOLD, NOW - 59, None), "for 59s of the 60s"),
    (P, 2, BUSY, state(up=60), (3, (), SCALE_UP, None, None), "2 -> 3 replicas"),
    # a gap in evaluation (nobody watched for 40 s > max_sample_age) restarts the window
    (P, 2, BUSY, state(up=600, at=NOW - 40), (2, (), HOLD, NOW, None), "for 0s of the 60s"),
    # the size of a step: wanted ceil(2 x 20 / 4) = 10, capped by the step, then by max_replicas
    (P, 2, [pod("pod-a", 20), pod("pod-b", 20)], state(up=60), (3, (), SCALE_UP, None, None), "wanted 10, capped"),
    (replace(P, max_scale_up_step=3), 2, [pod("pod-a", 20), pod("pod-b", 20)], state(up=60),
     (4, (), SCALE_UP, None, None), "2 -> 4 replicas"),
    (replace(P, max_scale_up_step=2, max_replicas=10), 2, [pod("pod-a", 5), pod("pod-b", 6)], state(up=60),
     (3, (), SCALE_UP, None, None), "2 -> 3 replicas"),  # wanted ceil(2 x 5.5 / 4) = 3: no more than needed
    # at max: nothing to add, said so
    (P, 4, [pod(f"pod-{i}", 9) for i in "abcd"], state(up=600), (4, (), HOLD, NOW - 600, None), "at max_replicas 4"),
    # low load sustained: drain the emptiest pod (fewest in flight, ties by name)
    (P, 3, IDLE3, state(down=300), (2, ("pod-b",), SCALE_DOWN, None, None), "3 -> 2, draining pod-b"),
    (P, 3, IDLE3, state(down=299), (3, (), HOLD, None, NOW - 299), "for 299s of the 300s scale-down window"),
    (P, 3, IDLE3, state(), (3, (), HOLD, None, NOW), "for 0s of the 300s"),
    (replace(P, max_scale_down_step=2), 4, [pod("a", in_flight=3), pod("b", in_flight=1), pod("c", in_flight=4),
                                            pod("d", in_flight=1)], state(down=300),
     (2, ("b", "d"), SCALE_DOWN, None, None), "4 -> 2, draining b, d"),
    # headroom: 2 pods with 3 waiting -> 3/1 = 3 > 2.8 stays; with 2 waiting -> 2 <= 2.8 goes
    (P, 2, [pod("pod-a", 2), pod("pod-b", 1)], state(down=600), (2, (), HOLD, None, None),
     "1 replica(s) would exceed 70% of it"),
    (P, 2, [pod("pod-a", 1), pod("pod-b", 1, in_flight=1)], state(down=600), (1, ("pod-a",), SCALE_DOWN, None, None),
     "2 -> 1"),
    # never below min
    (replace(P, min_replicas=2), 2, [pod("pod-a"), pod("pod-b")], state(down=600), (2, (), HOLD, None, None),
     "target met at min_replicas 2"),
    (P, 1, [pod("pod-a")], state(down=600), (1, (), HOLD, None, None), "at min_replicas 1"),
    # settling: no decision while the last change lands
    (P, 3, [*IDLE3[:2], pod("pod-c", draining=True)], state(down=600), (3, (), SETTLING, None, None),
     "waiting for pod-c to drain"),
    (P, 2, [pod("pod-a"), pod("pod-b", ready=False)], state(down=600), (2, (), SETTLING, None, None),
     "waiting for pod-b to become Ready"),
    # a replica that never becomes Ready (no free GPU) is given back, down to min, instead of blocking for ever
    (P, 2, [pod("pod-a", 6), pod("pod-b", ready=False, created=NOW - 599)], state(), (2, (), SETTLING, None, None),
     "waiting for pod-b to become Ready"),
    (P, 2, [pod("pod-a", 6), pod("pod-b", ready=False, created=NOW - 600)], state(),
     (1, ("pod-b",), GIVE_BACK, None, None), "pod-b not Ready 600s after creation (no free GPU"),
    (P, 3, [pod("a", ready=False, created=NOW - 900), pod("b", ready=False, created=NOW - 700), pod("c", 6)],
     state(), (1, ("a", "b"), GIVE_BACK, None, None), "3 -> 1"),
    (replace(P, min_replicas=2), 2, [pod("a", ready=False, created=NOW - 900), pod("b", ready=False, created=NOW)],
     state(), (2, (), SETTLING, None, None), "waiting for a, b to become Ready"),  # min: nothing to give back
    (P, 3, BUSY, state(up=600), (3, (), SETTLING, None, None), "waiting for 1 of 3 replica(s) to be created"),
    (P, 1, BUSY, state(down=600), (1, (), SETTLING, None, None), "2 pods for 1 replica(s)"),
    # no evidence, no change: unscraped or stale pods block scale-down (and scale-up)
    (P, 3, [*IDLE3[:2], pod("pod-c", at=None)], state(down=600), (3, (), NO_METRICS, None, None),
     "pod-c (not scraped yet)"),
    (P, 2, [pod("pod-a", 6), pod("pod-b", 6, at=NOW - 31)], state(up=600), (2, (), NO_METRICS, None, None),
     "pod-b (sample 31s old)"),
    # bounds (the policy changed): at once, by draining for max
    (replace(P, min_replicas=2), 1, [pod("pod-a")], state(), (2, (), BOUNDS, None, None), "1 -> 2"),
    (replace(P, max_replicas=2), 4, [pod("a", in_flight=1), pod("b", in_flight=0), pod("c", ready=False),
                                     pod("d", in_flight=3)], state(up=600), (2, ("c", "b"), BOUNDS, None, None),
     "4 -> 2, draining c, b"),
    # latency targets: the worst pod's p95; an idle pod without a p95 meets any target, a serving one is no evidence
    (P_TTFT, 2, [pod("pod-a", ttft_p95=0.9, in_flight=3), pod("pod-b", ttft_p95=0.2, in_flight=3)], state(up=60),
     (3, (), SCALE_UP, None, None), "TTFT p95 0.9s (target 0.5s) for 60s"),
    (P_TTFT, 2, [pod("pod-a"), pod("pod-b", ttft_p95=0.1, in_flight=1)], state(down=300),
     (1, ("pod-a",), SCALE_DOWN, None, None), "2 -> 1"),
    (P_TTFT, 2, [pod("pod-a", in_flight=2), pod("pod-b", ttft_p95=0.1)], state(down=300),
     (2, (), NO_METRICS, None, None), "pod-a (no TTFT p95 while serving)"),
])
def test_decide(policy: AutoscalePolicy, replicas: int, pods: list[PodLoad], prev: AutoscaleState,
                expected: tuple[int, tuple[str, ...], str, float | None, float | None], says: str) -> None:
    d = decide(policy, replicas, pods, prev, NOW)
    assert (d.replicas, d.drain, d.reason, d.state.up_since, d.state.down_since) == expected
    assert says in d.message


IDEMPOTENT = [(P, 2, BUSY, state(up=30)), (P, 2, BUSY, state(up=60)), (P, 3, IDLE3, state(down=100)),
              (P, 3, IDLE3, state(down=300)), (P, 3, [*IDLE3[:2], pod("pod-c", at=None)], state(down=600)),
              (replace(P, max_replicas=2), 3, IDLE3, state())]


@pytest.mark.parametrize(("policy", "replicas", "pods", "prev"), IDEMPOTENT)
def test_same_input_same_decision(policy: AutoscalePolicy, replicas: int, pods: list[PodLoad],
                                  prev: AutoscaleState) -> None:
    assert decide(policy, replicas, pods, prev, NOW) == decide(policy, replicas, pods, prev, NOW)


@pytest.mark.parametrize(("replicas", "pods", "prev"), [
    (2, BUSY, state()), (2, BUSY, state(up=30)), (3, IDLE3, state(down=100)), (1, [pod("pod-a")], state()),
    (2, [pod("pod-a", 6, exhausted=False), pod("pod-b", 6)], state(up=30)),
])
def test_a_hold_is_a_fixed_point(replicas: int, pods: list[PodLoad], prev: AutoscaleState) -> None:
    """Evaluating again at the same instant with the state a hold returned changes nothing (a retried pass, or two
    triggers of one reconcile, neither extend nor restart a window)."""
    first = decide(P, replicas, pods, prev, NOW)
    assert (first.reason, first.replicas) == (HOLD, replicas)
    assert decide(P, replicas, pods, first.state, NOW) == first


def run(policy: AutoscalePolicy, replicas: int, pods: list[PodLoad], prev: AutoscaleState, t: float) -> Decision:
    return decide(policy, replicas, [replace(x, at=t - 1) for x in pods], prev, t)


def test_a_burst_is_absorbed_by_memory_first_then_a_replica() -> None:
    """One timeline, 15 s scrapes: the target is missed while pod-a still expands (no replica), then expansion runs
    out: a replica after the full window; while it comes up nothing is decided; then the windows start afresh."""
    pods, st, replicas = [pod("pod-a", 6, exhausted=False, expansion="2x of max 4x")], AutoscaleState(), 1
    for t in range(0, 120, 15):
        d = run(P, replicas, pods, st, float(t))
        assert (d.replicas, d.reason, d.state.up_since) == (1, HOLD, None), d.message
        st = d.state
    pods = [pod("pod-a", 6)]  # host memory reached its max
    decisions = []
    for t in range(120, 200, 15):
        d = run(P, replicas, pods, st, float(t))
        decisions.append((t, d.replicas, d.reason))
        st, replicas = d.state, d.replicas
        if d.reason == SCALE_UP:
            break
    assert decisions == [(120, 1, HOLD), (135, 1, HOLD), (150, 1, HOLD), (165, 1, HOLD), (180, 2, SCALE_UP)]
    assert st == AutoscaleState()
    d = run(P, replicas, [*pods, pod("pod-b", ready=False, at=None)], st, 195.0)
    assert (d.replicas, d.reason) == (2, SETTLING)
    d = run(P, replicas, [pod("pod-a", 3), pod("pod-b", 3)], d.state, 210.0)
    assert (d.replicas, d.reason, d.state) == (2, HOLD, AutoscaleState(None, None, 210.0)), d.message


@pytest.mark.parametrize(("kw", "message"), [
    (dict(min_replicas=0), "min_replicas must be >= 1 (got 0)"),
    (dict(min_replicas=3, max_replicas=2), "max_replicas (2) must be >= min_replicas (3)"),
    (dict(target="QPS"), "target must be one of QueueDepth, TTFT, TPOT (got 'QPS')"),
    (dict(target_value=0), "target_value must be a finite number > 0 (got 0)"),
    (dict(target_value=float("nan")), "target_value must be a finite number > 0 (got nan)"),
    (dict(scale_up_window=-1), "scale_up_window must be a finite number of seconds >= 0 (got -1)"),
    (dict(scale_down_window=float("inf")), "scale_down_window must be a finite number of seconds >= 0 (got inf)"),
    (dict(max_scale_up_step=0), "max_scale_up_step must be >= 1 (got 0)"),
    (dict(max_scale_down_step=-2), "max_scale_down_step must be >= 1 (got -2)"),
    (dict(scale_down_headroom=1.5), "scale_down_headroom must be in (0, 1] (got 1.5)"),
    (dict(scale_down_headroom=0), "scale_down_headroom must be in (0, 1] (got 0)"),
    (dict(max_sample_age=0), "max_sample_age must be a finite number of seconds > 0 (got 0)"),
    (dict(scale_to_zero=True), "scale_to_zero is not supported yet"),
])
def test_bad_policy_values_raise(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="invalid autoscale policy") as e:
        AutoscalePolicy(**kw)
    assert message in str(e.value)


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(ValueError) as e:
        AutoscalePolicy(min_replicas=0, max_replicas=-1, target_value=-1)
    assert str(e.value).count(";") == 2


def test_the_default_policy_keeps_one_replica_under_any_load() -> None:
    """Defaults (min = max = 1) never add a GPU by surprise: autoscaling is opted into by raising max_replicas."""
    d = decide(AutoscalePolicy(), 1, [pod("pod-a", 100)], state(up=3600), NOW)
    assert (d.replicas, d.reason) == (1, HOLD) and "at max_replicas 1" in d.message


@pytest.mark.parametrize(("policy", "replicas", "pods", "expected"), [
    (P, 2, BUSY, 3),  # ceil(2 x 6 / 4): no window, no step (the external autoscaler has its own)
    (replace(P, max_replicas=10), 2, [pod("pod-a", 20), pod("pod-b", 20)], 10),
    (P, 2, [pod("pod-a", 20), pod("pod-b", 20)], 4),  # within max
    (P, 2, [pod("pod-a", 6, exhausted=False), pod("pod-b", 6)], 2),  # memory first: a pod can still expand
    (P, 3, IDLE3, 1),  # nothing waiting: one replica holds it (no step limit)
    (replace(P, min_replicas=2), 3, IDLE3, 2),
    (P, 2, [pod("pod-a", 2), pod("pod-b", 1)], 2),  # 3 waiting on 1 replica would exceed the headroom
    (P, 3, [*IDLE3[:2], pod("pod-c", at=None)], 3),  # no evidence: where it is
    (P, 3, [*IDLE3[:2], pod("pod-c", draining=True)], 3),  # settling
    (P, 3, BUSY, 3),  # a replica not created yet
    (replace(P, max_replicas=2), 2, [pod("pod-a", 20), pod("pod-b", 20)], 2),  # bounds
    (replace(P, min_replicas=2), 1, [pod("pod-a")], 2),
])
def test_recommend_is_the_policy_at_this_instant(policy: AutoscalePolicy, replicas: int, pods: list[PodLoad],
                                                 expected: int) -> None:
    """What the operator exports for an HPA / KEDA to scale on (pie_operator_recommended_replicas)."""
    assert recommend(policy, replicas, pods, NOW) == expected
