"""Engine configuration: one pydantic model. ``pie-engine serve`` generates its flags from these fields (cli.py):
a field's default, description and bounds are the flag's default, help and range, so they are written only here.
A bad value fails when the model is built or assigned, from the CLI or from Python alike."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import JsonDict

from pie_engine.quantity import parse_budget, parse_bytes

# json_schema_extra marker: a field for benchmarks and tests, deliberately not a `serve` flag.
NOT_A_FLAG: JsonDict = {"cli": False}


def parse_expansion(setting: str) -> tuple[str, float | None]:
    """``--expansion``: off | adaptive | a ratio >= 1 (e.g. "2.0") -> (mode, ratio)."""
    s = str(setting).strip().lower()
    if s in ("off", "adaptive"):
        return s, None
    try:
        ratio = float(s)
    except ValueError:
        raise ValueError(f"expansion must be off, adaptive or a ratio >= 1, got {setting!r}") from None
    if not ratio >= 1.0 or math.isinf(ratio):
        raise ValueError(f"an expansion ratio must be a finite number >= 1, got {setting!r}")
    return "static", ratio


class EngineConfig(BaseModel):
    """All engine knobs. vLLM names where vLLM has one."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field(description="model directory (config.json, *.safetensors, tokenizer.json)")
    served_model_name: str | None = Field(None, description="model name in the API (default: the directory name)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and KV dtype (auto: the checkpoint's torch_dtype)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda if available, else cpu")
    max_model_len: int | None = Field(None, ge=1, description="default: the model's max_position_embeddings")
    block_size: int = Field(16, ge=1, description="tokens per KV block")
    max_num_seqs: int = Field(64, ge=1, description="max sequences in a batch")
    max_num_batched_tokens: int = Field(2048, ge=1, description="max tokens per step (chunked prefill budget)")
    gpu_memory_budget: str | None = Field(None, description=(
        'device KV budget: bytes ("8Gi") or a GPU fraction ("0.9"; CUDA only). Default: 256Mi on CPU, 0.9 of the '
        "GPU minus what is already used on CUDA"))
    num_device_blocks: int | None = Field(None, ge=1,
                                          description="exact device KV blocks per layer (overrides the budget)")
    enable_prefix_caching: bool = Field(False, description="reuse KV of shared prefixes")
    max_waiting_requests: int = Field(256, ge=1, description="answer 429 beyond this many waiting requests")
    seed: int = Field(0, description="seed for requests without their own seed")
    # Pie (docs/pie.md)
    expansion: str = Field("off", description="Pie KV expansion: off | adaptive | <ratio >= 1>, e.g. 2.0")
    host_memory_limit: str | None = Field(None, description=(
        'cap on host KV memory, bytes ("16Gi"). Default: bounded only by what the model needs'))
    swap_staging_slots: int = Field(2, ge=1, description="Pie: device slots host-backed layers rotate through")
    expansion_epsilon: float = Field(0.05, ge=0.0, description="adaptive: shrink when latency overhead > this")
    expansion_latency_target: float | None = Field(None, gt=0.0, description=(
        "adaptive: per-output-token latency target in seconds (mean inter-token latency of running requests); "
        "expansion backs off where it is exceeded. Default: no worse than no swapping at the same batch by more "
        "than --expansion-epsilon"))
    expansion_grow_overhead: float = Field(0.04, ge=0.0, description="adaptive: grow only while overhead < this")
    expansion_window: int = Field(8, ge=1, description="adaptive: iterations of evidence per decision")
    expansion_cooldown: int = Field(4, ge=0, description="adaptive: iterations ignored after a change")
    # Throttle every KV copy to this link (copy_engine.LinkModel), to model PCIe vs NVLink-C2C in benchmarks.
    swap_link_bytes_per_s: float | None = Field(None, gt=0.0, json_schema_extra=NOT_A_FLAG)
    swap_link_latency_s: float = Field(0.0, ge=0.0, json_schema_extra=NOT_A_FLAG)

    @property
    def model_name(self) -> str:
        """The name clients use for this model in the API."""
        return self.served_model_name or Path(self.model).name

    @field_validator("gpu_memory_budget")
    @classmethod
    def _budget(cls, v: str | None) -> str | None:
        if v is not None:
            parse_budget(v)  # syntax and range; a fraction's bytes are known only once the device is
        return v

    @field_validator("host_memory_limit")
    @classmethod
    def _host_limit(cls, v: str | None) -> str | None:
        if v is not None:
            parse_bytes(v)
        return v

    @field_validator("expansion")
    @classmethod
    def _expansion(cls, v: str) -> str:
        parse_expansion(v)
        return v

    @model_validator(mode="after")
    def _controller(self) -> EngineConfig:
        # NOTE: the one cross-field rule of pie.controller_config.ControllerConfig that these fields can break (window
        # and cooldown have field bounds; confirm_window follows window). Checked here so a bad combination fails at
        # construction, not when the first request arrives; the config sits below pie/ and cannot build the config.
        if not 0.0 <= self.expansion_grow_overhead < self.expansion_epsilon:
            raise ValueError("expansion controller settings: need 0 <= grow_overhead < epsilon "
                             "(--expansion-grow-overhead, --expansion-epsilon), "
                             f"got {self.expansion_grow_overhead}, {self.expansion_epsilon}")
        return self
