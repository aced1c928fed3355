"""spec.autoscaling: the replica autoscaler's knobs (issue 20), and the pure policy they make (autoscale.py).

Off by default. Enabled, the operator decides the replica count itself (status.autoscaling.desiredReplicas) within
[minReplicas, maxReplicas]; spec.replicas is only where it starts. The CRD's CEL rules say the same as the
validators here, in the same words (tests/unit/operator/test_crd.py), so kubectl and the operator agree.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from pie_operator.autoscale import QUEUE_DEPTH, AutoscalePolicy
from pie_operator.quantity import DURATION_MAX_LENGTH, DURATION_RE, POSITIVE_DECIMAL, parse_duration
from pie_operator.spec_model import SpecModel

# target.value: a positive number (QueueDepth: waiting requests per replica) or a duration (TTFT, TPOT p95:
# DURATION_RE). The CRD's pattern admits both forms; its CEL rule (and `_value_fits_type`) ties the form to the type.
QUEUE_DEPTH_RE = rf"^{POSITIVE_DECIMAL}$"
TARGET_VALUE_RE = rf"^{POSITIVE_DECIMAL}(ms|s)?$"
# The same words as the CRD's CEL rules.
MAX_REQUIRED_MESSAGE = "autoscaling.maxReplicas is required when autoscaling.enabled is true"
MIN_MAX_MESSAGE = "autoscaling.minReplicas must be less than or equal to autoscaling.maxReplicas"
SCALE_TO_ZERO_MESSAGE = ("autoscaling.scaleToZero is not supported yet: with no replica left nothing measures the load "
                         "that would bring one back (minReplicas is at least 1)")
TARGET_VALUE_MESSAGE = ("autoscaling.target.value must be a positive number of waiting requests per replica for "
                        "QueueDepth (e.g. 4 or \"2.5\") and a duration for TTFT and TPOT (e.g. 500ms or 2s)")
# How old the latest scrape of a pod may be and still count as evidence: four scrapes at the operator's default
# --metrics-interval-seconds (15), so one slow or failed scrape does not stop the windows.
MAX_SAMPLE_AGE = 60.0


class AutoscaleTarget(SpecModel):
    """What the replicas must hold: QueueDepth (waiting requests per replica), TTFT or TPOT (the worst pod's p95)."""

    type: Literal["QueueDepth", "TTFT", "TPOT"]
    value: int | str

    @model_validator(mode="after")
    def _value_fits_type(self) -> AutoscaleTarget:
        v = self.value
        if isinstance(v, int):
            ok = self.type == QUEUE_DEPTH and v > 0
        else:
            ok = len(v) <= DURATION_MAX_LENGTH and re.fullmatch(
                QUEUE_DEPTH_RE if self.type == QUEUE_DEPTH else DURATION_RE, v) is not None
        if not ok:
            raise ValueError(TARGET_VALUE_MESSAGE)
        return self

    @property
    def number(self) -> float:
        """The target in the policy's units: waiting requests per replica, or seconds."""
        return float(self.value) if self.type == QUEUE_DEPTH else parse_duration(str(self.value))


def _default_target() -> AutoscaleTarget:
    return AutoscaleTarget(type="QueueDepth", value=4)


class ScaleUp(SpecModel):
    window_seconds: int = Field(default=60, ge=0)
    max_pods: int = Field(default=1, ge=1)
    ready_timeout_seconds: int = Field(default=600, ge=1)


class ScaleDown(SpecModel):
    window_seconds: int = Field(default=300, ge=0)
    max_pods: int = Field(default=1, ge=1)
    headroom_percent: int = Field(default=70, ge=1, le=100)
    drain_timeout_seconds: int = Field(default=600, ge=0)


class AutoscalingSpec(SpecModel):
    """spec.autoscaling."""

    enabled: bool = False
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int | None = Field(default=None, ge=1)
    target: AutoscaleTarget = Field(default_factory=_default_target)
    scale_up: ScaleUp = Field(default_factory=ScaleUp)
    scale_down: ScaleDown = Field(default_factory=ScaleDown)
    scale_to_zero: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> AutoscalingSpec:
        if self.enabled and self.max_replicas is None:
            raise ValueError(MAX_REQUIRED_MESSAGE)
        if self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(MIN_MAX_MESSAGE)
        if self.scale_to_zero:
            raise ValueError(SCALE_TO_ZERO_MESSAGE)
        return self

    def policy(self) -> AutoscalePolicy:
        """The pure policy these knobs make (autoscale.decide)."""
        return AutoscalePolicy(
            min_replicas=self.min_replicas, max_replicas=self.max_replicas or self.min_replicas,
            target=self.target.type, target_value=self.target.number,
            scale_up_window=float(self.scale_up.window_seconds),
            scale_down_window=float(self.scale_down.window_seconds),
            max_scale_up_step=self.scale_up.max_pods, max_scale_down_step=self.scale_down.max_pods,
            ready_timeout=float(self.scale_up.ready_timeout_seconds),
            scale_down_headroom=self.scale_down.headroom_percent / 100.0, max_sample_age=MAX_SAMPLE_AGE)
