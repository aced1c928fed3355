"""Device facts and KV sizing: bytes per KV block, GPU memory totals (pynvml), and the budget -> block count."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pie_engine.config import EngineConfig
from pie_engine.kv.cache import kv_block_bytes
from pie_engine.models.model_config import ModelConfig
from pie_engine.quantity import parse_budget

CPU_DEFAULT_KV_BUDGET = "256Mi"  # device KV on CPU when no budget is given
CUDA_DEFAULT_BUDGET = "0.9"  # of total GPU memory, for everything the engine holds
_ACTIVATION_SLACK = 512 * 2**20  # CUDA context fragments, allocator caching, kernels' workspaces


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cuda" without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu or cuda")
    return device


def _nvml_index(device: torch.device) -> int | str:
    """NVML numbers GPUs physically; torch counts the CUDA_VISIBLE_DEVICES list. Map one to the other."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else index


def device_memory_info(device: torch.device) -> tuple[int, int] | None:
    """(total, used) bytes of the GPU behind ``device`` via pynvml (used counts every process); None on CPU."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            ident = _nvml_index(device)
            handle = (pynvml.nvmlDeviceGetHandleByUUID(ident) if isinstance(ident, str) and not ident.isdigit()
                      else pynvml.nvmlDeviceGetHandleByIndex(int(ident)))
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return int(info.total), int(info.used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML (containers without the driver library, MIG slices): ask the CUDA runtime
        free, total = torch.cuda.mem_get_info(device)
        return int(total), int(total - free)


def activation_reserve(config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype) -> int:
    """Rough peak of one forward pass's temporaries (bytes), kept free of KV on CUDA."""
    elem = torch.empty((), dtype=dtype).element_size()
    tokens = config.max_num_batched_tokens
    per_token = (4 * model_config.hidden_size + 3 * model_config.intermediate_size
                 + 3 * model_config.num_attention_heads * model_config.head_dim) * elem
    logits = config.max_num_seqs * model_config.vocab_size * 4 * 2
    return tokens * per_token + logits + _ACTIVATION_SLACK


@dataclass(frozen=True)
class KVSizing:
    """The device KV blocks per layer, and the GPU memory a fractional budget left out of the KV (None on CPU)."""

    blocks: int
    overhead: int | None


def kv_sizing(config: EngineConfig, model_config: ModelConfig, device: torch.device, dtype: torch.dtype) -> KVSizing:
    """Device KV blocks per layer for the configured budget; call it after the weights are on the device.

    ``num_device_blocks`` overrides everything. A byte budget ("8Gi") is the KV budget itself. A fraction ("0.9",
    CUDA only) is the share of total GPU memory the engine may hold: KV gets it minus the overhead, what is already
    used (weights, other processes) plus an activation reserve (``Budget.kv_bytes``: the operator resolves a fraction
    live with the same function and the exported overhead). Default: 256Mi on CPU, "0.9" on CUDA.
    """
    info = device_memory_info(device)
    overhead = None if info is None else info[1] + activation_reserve(config, model_config, dtype)
    if config.num_device_blocks is not None:
        return KVSizing(config.num_device_blocks, overhead)
    per_block = model_config.num_hidden_layers * kv_block_bytes(
        config.block_size, model_config.num_key_value_heads, model_config.head_dim, dtype)
    value = config.gpu_memory_budget or (CPU_DEFAULT_KV_BUDGET if info is None else CUDA_DEFAULT_BUDGET)
    budget = parse_budget(value).kv_bytes(info[0] if info else None, overhead)
    if budget is None:
        raise ValueError(f"memory budget {value!r} is a fraction of the GPU, but {device} has no known total "
                         "memory: give bytes (e.g. 2Gi)")
    blocks = budget // per_block
    if blocks < 1:
        raise ValueError(f"KV budget {value!r} leaves {max(budget, 0)} bytes for KV, less than one block "
                         f"({per_block} bytes for {model_config.num_hidden_layers} layers); raise the budget")
    return KVSizing(int(blocks), overhead)


def num_blocks_for_budget(config: EngineConfig, model_config: ModelConfig, device: torch.device,
                          dtype: torch.dtype) -> int:
    """Device KV blocks per layer for the configured budget (``kv_sizing``)."""
    return kv_sizing(config, model_config, device, dtype).blocks
