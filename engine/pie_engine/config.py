"""Engine configuration: one dataclass, filled from the CLI (`pie-engine serve`) or by tests."""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(value: str | int) -> int:
    """Parse a byte quantity: 1073741824, "8Gi", "512Mi", "2G" (Kubernetes quantity suffixes)."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?)?\s*", str(value))
    if not m:
        raise ValueError(f"not a byte quantity: {value!r} (use e.g. 1073741824, 8Gi, 512Mi)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def parse_budget(value: str | int | float, total: int | None) -> int:
    """A memory budget is bytes ("8Gi") or a fraction of ``total`` ("0.9"). Fractions need a known total."""
    if isinstance(value, float) or (isinstance(value, str) and re.fullmatch(r"\s*0?\.\d+\s*|\s*1(\.0*)?\s*", value)):
        frac = float(value)
        if not 0.0 < frac <= 1.0:
            raise ValueError(f"a memory fraction must be in (0, 1], got {value}")
        if total is None:
            raise ValueError(f"memory budget {value!r} is a fraction, but no device total is known (CPU): use bytes")
        return int(frac * total)
    return parse_bytes(value)


@dataclass
class EngineConfig:
    """All engine knobs. vLLM names where vLLM has one."""

    model: str  # directory with config.json, *.safetensors, tokenizer.json
    served_model_name: str | None = None  # default: the model directory's name
    dtype: str = "auto"  # auto (checkpoint's torch_dtype) | float32 | bfloat16 | float16
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # Device KV budget: bytes ("8Gi") or a GPU fraction ("0.9"); on CPU it must be bytes. None: a small default
    # on CPU, 0.9 of free GPU memory minus weights on CUDA.
    gpu_memory_budget: str | None = None
    num_device_blocks: int | None = None  # test override: exact number of KV blocks per layer on the device
    enable_prefix_caching: bool = False
    max_waiting_requests: int = 256  # the server answers 429 beyond this
    seed: int = 0
    # Pie (kv_swap.py / expansion.py)
    expansion: str = "off"  # off | adaptive | <ratio>, e.g. 2.0
    host_memory_limit: str | None = None  # bytes cap on host KV; None: unlimited (bounded by what the model needs)
    swap_staging_slots: int = 2  # k: device slots the host-backed layers rotate through (docs/pie.md)
    expansion_epsilon: float = 0.05  # adaptive: shrink m when the swapping latency overhead exceeds this
    expansion_grow_overhead: float = 0.04  # adaptive: grow m only while the overhead is below this
    expansion_window: int = 8  # adaptive: iterations of evidence per decision
    expansion_cooldown: int = 4  # adaptive: iterations ignored after a change
    # Benchmarks/tests only: throttle every KV copy to this link (copy_engine.LinkModel), to model PCIe vs NVLink-C2C.
    swap_link_bytes_per_s: float | None = None
    swap_link_latency_s: float = 0.0

    @property
    def model_name(self) -> str:
        from pathlib import Path

        return self.served_model_name or Path(self.model).name
