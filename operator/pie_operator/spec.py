"""Pydantic models of the PieDeployment spec, plus quantity helpers.

The CRD (crds/piedeployments.pie.io.yaml) validates at admission; these models re-validate in the operator and carry
the SAME defaults (tests/unit/operator/test_crd.py checks that the CRD's defaulting and these defaults agree), so
the operator behaves identically whether or not the apiserver applied the defaults (e.g. a spec read from an older
object).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pie_operator.quantity import (  # noqa: F401 -- re-exported: callers import the helpers from here
    BUDGET_RE,
    DURATION_MAX_LENGTH,
    DURATION_RE,
    PERCENT_RE,
    QUANTITY_OR_PERCENT_RE,
    QUANTITY_RE,
    format_bytes,
    is_percent,
    parse_budget,
    parse_bytes,
    parse_duration,
    resolve_int_or_percent,
)
from pie_operator.spec_autoscaling import AutoscalingSpec
from pie_operator.spec_model import SpecModel as _Model

GROUP, VERSION, PLURAL, KIND = "pie.io", "v1alpha1", "piedeployments", "PieDeployment"
API_VERSION = f"{GROUP}/{VERSION}"

# Flags the operator renders itself; extra args must not repeat them (the engine would see them twice).
OWNED_FLAGS = ("model", "host", "port", "served-model-name", "dtype", "max-model-len", "gpu-memory-budget",
               "expansion", "expansion-latency-target", "host-memory-limit", "admin-token-file", "admin-port")
OWNED_FLAGS_RE = r"^--(" + "|".join(OWNED_FLAGS) + r")(=.*)?$"
GH200_PRODUCT = "NVIDIA-GH200-480GB"
# The same words as the CRD's CEL rule (tests/unit/operator/test_crd.py), so kubectl and the operator agree.
ADMIN_PORT_MESSAGE = ("engine.adminPort must differ from engine.port: the admin endpoint gets a port of its own, "
                      "which the Service does not expose")
LATENCY_TARGET_MODE_MESSAGE = ("memory.expansion.latencyTarget is only allowed with memory.expansion.mode adaptive "
                               "(static and off do not adapt the expansion to latency)")


class PVCSource(_Model):
    claim_name: str = Field(min_length=1)
    sub_path: str | None = None


class HostPathSource(_Model):
    path: str = Field(pattern=r"^/")


class ImageSource(_Model):
    pass


class ModelSource(_Model):
    pvc: PVCSource | None = None
    host_path: HostPathSource | None = None
    image: ImageSource | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        if sum(x is not None for x in (self.pvc, self.host_path, self.image)) != 1:
            raise ValueError("model.source must set exactly one of pvc, hostPath, image")
        return self


class ModelSpec(_Model):
    path: str = Field(pattern=r"^/", max_length=1024)
    source: ModelSource = Field(default_factory=lambda: ModelSource(image=ImageSource()))
    served_model_name: str | None = Field(default=None, max_length=253)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = Field(default=None, ge=1)


class EnvVar(_Model):
    name: str = Field(min_length=1)
    value: str | None = None
    value_from: dict | None = None


class Resources(_Model):
    requests: dict[str, int | str] = Field(default_factory=dict)
    limits: dict[str, int | str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _no_owned_resources(self) -> Resources:
        for kind, values in (("requests", self.requests), ("limits", self.limits)):
            for key in ("memory", "nvidia.com/gpu"):
                if key in values:
                    raise ValueError(f"engine.resources.{kind} must not set {key}: the operator sets it "
                                     "(memory from spec.memory, GPUs from spec.gpu.count)")
        return self


class EngineSpec(_Model):
    image: str = Field(min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    args: list[str] = Field(default_factory=list)
    env: list[EnvVar] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    port: int = Field(default=8000, ge=1, le=65535)
    admin_port: int = Field(default=8001, ge=1, le=65535)

    @model_validator(mode="after")
    def _own_admin_port(self) -> EngineSpec:
        if self.admin_port == self.port:
            raise ValueError(ADMIN_PORT_MESSAGE)
        return self

    @field_validator("args")
    @classmethod
    def _no_owned_flags(cls, args: list[str]) -> list[str]:
        for a in args:
            if re.fullmatch(OWNED_FLAGS_RE, a):
                raise ValueError(f"engine.args must not set {a.split('=')[0]}: the operator renders it from the spec")
        return args


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


def _default_tolerations() -> list[Toleration]:
    return [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]


class GPUSpec(_Model):
    count: int = Field(default=1, ge=1, le=8)
    node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.product": GH200_PRODUCT})
    tolerations: list[Toleration] = Field(default_factory=_default_tolerations)


class HostMemory(_Model):
    min: int | str = "0"
    max: int | str | None = None

    @field_validator("min", "max")
    @classmethod
    def _quantity(cls, v: int | str | None) -> int | str | None:
        if v is not None:
            parse_bytes(v)
        return v

    @model_validator(mode="after")
    def _ordered(self) -> HostMemory:
        if self.max is not None and parse_bytes(self.min) > parse_bytes(self.max):
            raise ValueError(f"memory.hostMemory.min ({self.min}) must be <= memory.hostMemory.max ({self.max})")
        return self


class Expansion(_Model):
    mode: Literal["adaptive", "static", "off"] = "adaptive"
    ratio: float | None = Field(default=None, ge=1.0, le=64.0)
    # Kept as written ("50ms"): the ConfigMap shows the user's value; builders render the seconds the engine takes.
    latency_target: str | None = Field(default=None, max_length=DURATION_MAX_LENGTH)

    @field_validator("latency_target")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is not None:
            parse_duration(v)
        return v

    @model_validator(mode="after")
    def _per_mode_fields(self) -> Expansion:
        if self.mode == "static" and self.ratio is None:
            raise ValueError("memory.expansion.ratio is required when memory.expansion.mode is static")
        if self.mode != "static" and self.ratio is not None:
            raise ValueError("memory.expansion.ratio is only allowed with memory.expansion.mode: static")
        # Only the adaptive controller reads the target; with a fixed ratio (or none) it would be silently ignored.
        if self.mode != "adaptive" and self.latency_target is not None:
            raise ValueError(LATENCY_TARGET_MODE_MESSAGE)
        return self

    @property
    def latency_target_seconds(self) -> float | None:
        """--expansion-latency-target: the latency target in seconds; None when unset."""
        return None if self.latency_target is None else parse_duration(self.latency_target)


class TuningSpec(_Model):
    """How each pod's memory request and GPU budget follow its engine's metrics (memory.tuning)."""

    source: Literal["Used", "Recommended"] = "Used"
    percentile: int = Field(default=95, ge=1, le=100)
    window_seconds: int = Field(default=1800, ge=1)
    min_samples: int = Field(default=5, ge=1)
    change_threshold_percent: int = Field(default=10, ge=0, le=100)
    cooldown_seconds: int = Field(default=300, ge=0)
    gpu_memory_budget_min: str | None = None

    @field_validator("gpu_memory_budget_min")
    @classmethod
    def _budget(cls, v: str | None) -> str | None:
        if v is not None:
            parse_budget(v)
        return v


class MemorySpec(_Model):
    gpu_memory_budget: str = "0.9"
    host_memory: HostMemory = Field(default_factory=HostMemory)
    expansion: Expansion = Field(default_factory=Expansion)
    base: int | str = "16Gi"
    headroom: int | str = "10%"
    apply: Literal["InPlace", "Rolling", "Off"] = "InPlace"
    tuning: TuningSpec = Field(default_factory=TuningSpec)

    @field_validator("gpu_memory_budget")
    @classmethod
    def _budget(cls, v: str) -> str:
        parse_budget(v)
        return v

    @field_validator("base")
    @classmethod
    def _base(cls, v: int | str) -> int | str:
        parse_bytes(v)
        return v

    @field_validator("headroom")
    @classmethod
    def _headroom(cls, v: int | str) -> int | str:
        if not is_percent(v):
            parse_bytes(v)
        return v


class GateSpec(_Model):
    """What a new pod must show before the rollout takes its next step (rollout.gate)."""

    engine_health: bool = True
    max_stall_regression: float = Field(default=0.05, ge=0.0, le=1.0)


class RolloutSpec(_Model):
    max_unavailable: int | str = 1
    max_surge: int | str = 0
    step_timeout_seconds: int = Field(default=600, ge=1)
    auto_rollback: bool = False
    gate: GateSpec = Field(default_factory=GateSpec)

    @field_validator("max_unavailable", "max_surge")
    @classmethod
    def _int_or_percent(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0 or isinstance(v, str) and not is_percent(v):
            raise ValueError(f"{v!r} must be an integer >= 0 or a percentage like 25%")
        return v

    @model_validator(mode="after")
    def _can_progress(self) -> RolloutSpec:
        if str(self.max_surge) in ("0", "0%") and str(self.max_unavailable) in ("0", "0%"):
            raise ValueError("rollout.maxSurge and rollout.maxUnavailable must not both be 0")
        return self

    def bounds(self, replicas: int) -> tuple[int, int]:
        """(maxSurge, maxUnavailable) in pods; like a Deployment, never both 0 (then 1 pod may be unavailable)."""
        surge = resolve_int_or_percent(self.max_surge, replicas, round_up=True)
        unavailable = resolve_int_or_percent(self.max_unavailable, replicas, round_up=False)
        if surge == 0 and unavailable == 0:
            unavailable = 1
        return surge, unavailable


class ServiceSpec(_Model):
    port: int = Field(default=8000, ge=1, le=65535)
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"


class PieDeploymentSpec(_Model):
    """The whole `spec` of a PieDeployment."""

    model: ModelSpec
    replicas: int = Field(default=1, ge=0)
    engine: EngineSpec
    gpu: GPUSpec = Field(default_factory=GPUSpec)
    memory: MemorySpec = Field(default_factory=MemorySpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
