"""Building blocks shared by the model files.

NOTE: the math mirrors HF transformers operation by operation (same dtype casts, same formula order) because the
engine must reproduce HF greedy decoding token for token in float32.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalize in float32, cast back, then scale (HF ``LlamaRMSNorm``)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, H]
        in_dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(in_dtype)


def activation(name: str) -> Any:
    """HF ``ACT2FN`` names -> functions (only the ones the supported families use)."""
    acts = {
        "silu": F.silu,
        "swish": F.silu,
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    }
    if name not in acts:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(acts)}")
    return acts[name]


class SiluAndMul(nn.Module):
    """``act(gate) * up`` over the fused gate_up projection output [T, 2 * I] -> [T, I]."""

    def __init__(self, act: str = "silu") -> None:
        super().__init__()
        self.act = activation(act)

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (float32), incl. "linear" and Llama-3 "llama3" scaling (HF formulas)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    assert scaling is not None
    factor = scaling["factor"]
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, inv_freq_llama)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r}")


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (HF ``rotate_half`` on the two halves of each head).

    The cos/sin table for every position up to ``max_positions`` is computed once per device (not per step); a
    step only gathers the rows of its positions, once for all layers (``cos_sin``).
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)  # plain attribute: not a checkpoint tensor
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            pos = torch.arange(self.max_positions, dtype=torch.float32, device="cpu")
            # HF computes inv_freq @ positions in float32: a product per element, same as this outer product.
            freqs = torch.outer(pos, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
            # HF casts cos/sin to the activation dtype before rotating; do the same once here.
            self._cache[key] = (emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype))
        return self._cache[key]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, 1, D], ready to broadcast over heads."""
        cos, sin = self._table(positions.device, dtype)
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D], cos/sin [T, 1, D] -> rotated x (HF ``apply_rotary_pos_emb`` order of operations)."""
    return (x * cos) + (rotate_half(x) * sin)
