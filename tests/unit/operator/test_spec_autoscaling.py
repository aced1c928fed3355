"""spec.autoscaling: what the model accepts, what it refuses (in the CRD's words), and the policy it makes."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from pie_operator.autoscale import QUEUE_DEPTH, TPOT, TTFT, AutoscalePolicy
from pie_operator.spec import PieDeploymentSpec
from pie_operator.spec_autoscaling import (
    MAX_REQUIRED_MESSAGE,
    MIN_MAX_MESSAGE,
    SCALE_TO_ZERO_MESSAGE,
    TARGET_VALUE_MESSAGE,
    AutoscalingSpec,
)
from tests.unit.operator.test_spec import spec_with


def autoscaling(**kw: Any) -> AutoscalingSpec:
    return PieDeploymentSpec.model_validate(spec_with(autoscaling=kw)).autoscaling


def test_off_by_default_and_the_default_never_adds_a_gpu() -> None:
    a = PieDeploymentSpec.model_validate(spec_with()).autoscaling
    assert not a.enabled and a.max_replicas is None
    assert a.policy() == AutoscalePolicy(min_replicas=1, max_replicas=1, target=QUEUE_DEPTH, target_value=4.0,
                                         scale_up_window=60.0, scale_down_window=300.0, scale_down_headroom=0.7)


@pytest.mark.parametrize(("target", "kind", "value"), [
    ({"type": "QueueDepth", "value": 8}, QUEUE_DEPTH, 8.0),
    ({"type": "QueueDepth", "value": "2.5"}, QUEUE_DEPTH, 2.5),
    ({"type": "TTFT", "value": "500ms"}, TTFT, 0.5),
    ({"type": "TPOT", "value": "0.05s"}, TPOT, 0.05),
    ({"type": "TTFT", "value": "2s"}, TTFT, 2.0),
])
def test_targets_in_the_policys_units(target: dict[str, Any], kind: str, value: float) -> None:
    p = autoscaling(enabled=True, minReplicas=2, maxReplicas=5, target=target,
                    scaleUp={"windowSeconds": 30, "maxPods": 2},
                    scaleDown={"windowSeconds": 600, "maxPods": 3, "headroomPercent": 50}).policy()
    assert (p.target, p.target_value) == (kind, value)
    assert (p.min_replicas, p.max_replicas, p.scale_up_window, p.max_scale_up_step) == (2, 5, 30.0, 2)
    assert (p.scale_down_window, p.max_scale_down_step, p.scale_down_headroom) == (600.0, 3, 0.5)


@pytest.mark.parametrize(("kw", "message"), [
    (dict(enabled=True), MAX_REQUIRED_MESSAGE),
    (dict(minReplicas=3, maxReplicas=2), MIN_MAX_MESSAGE),
    (dict(enabled=True, minReplicas=3, maxReplicas=2), MIN_MAX_MESSAGE),
    (dict(scaleToZero=True), SCALE_TO_ZERO_MESSAGE),
    (dict(target={"type": "TTFT", "value": 1}), TARGET_VALUE_MESSAGE),  # a latency needs a unit
    (dict(target={"type": "TPOT", "value": "50"}), TARGET_VALUE_MESSAGE),
    (dict(target={"type": "QueueDepth", "value": "4s"}), TARGET_VALUE_MESSAGE),
    (dict(target={"type": "QueueDepth", "value": 0}), TARGET_VALUE_MESSAGE),
    (dict(target={"type": "QueueDepth", "value": "-1"}), TARGET_VALUE_MESSAGE),
    (dict(target={"type": "TTFT", "value": "0ms"}), TARGET_VALUE_MESSAGE),
    (dict(target={"type": "TTFT", "value": "1" * 40 + "ms"}), TARGET_VALUE_MESSAGE),
    (dict(target={"type": "QPS", "value": 4}), "Input should be 'QueueDepth', 'TTFT' or 'TPOT'"),
    (dict(target={"type": "TTFT"}), "Field required"),
    (dict(minReplicas=0), "greater than or equal to 1"),
    (dict(scaleDown={"headroomPercent": 101}), "less than or equal to 100"),
    (dict(scaleUp={"maxPods": 0}), "greater than or equal to 1"),
])
def test_bad_values_are_refused_in_the_crds_words(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as e:
        autoscaling(**kw)
    assert message in str(e.value)


def test_knobs_may_be_set_while_disabled() -> None:
    """Off, nothing needs maxReplicas: the knobs can be written first and the autoscaler switched on later."""
    a = autoscaling(minReplicas=2, target={"type": "TTFT", "value": "1s"})
    assert not a.enabled and a.policy().max_replicas == 2
