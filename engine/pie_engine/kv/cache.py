"""Where each layer's KV lives during a forward pass.

The model calls ``begin_layer(l)`` right before layer l's attention and ``end_layer(l)`` right after it. With
expansion off, every layer owns a device tensor and both calls are trivial. With Pie swapping
(``pie/swap_cache.py``), the same two calls are where the forward pass waits for a prefetched layer and where a
finished layer is written back and its slot refilled, so the model code never knows whether KV is swapped. Models
see only those two calls (``kv/layer.py``); the step calls take the core's ``StepPlan``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import astuple, dataclass

import torch

from pie_engine.core.plan import StepPlan
from pie_engine.kv.layer import LayerKV


def kv_block_bytes(block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block of one layer, K and V: the one place this arithmetic lives."""
    return 2 * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class KVSpec:
    """The geometry of a paged KV cache, known once the model is loaded and the device budget is sized."""

    num_layers: int
    num_blocks: int  # per layer, what the device budget holds without swapping
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    def args(self) -> tuple:
        """The positional arguments of every ``KVCache`` constructor."""
        return astuple(self)


class KVCache(LayerKV, ABC):
    """Per-layer paged KV storage.

    Layer tensor layout: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (0 = K, 1 = V); slot
    ``s`` is block ``s // block_size``, offset ``s % block_size``.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer (K and V)."""
        return kv_block_bytes(self.block_size, self.num_kv_heads, self.head_dim, self.dtype)

    @abstractmethod
    def begin_step(self, plan: StepPlan, slot_mapping: torch.Tensor,
                   slot_mapping_cpu: torch.Tensor | None = None) -> None:
        """Called once before the forward pass. ``slot_mapping`` [num_tokens]: where this step writes new KV (on
        the device); ``slot_mapping_cpu``: the same on the CPU, if the caller has it (saves a device sync)."""

    @abstractmethod
    def end_step(self) -> None:
        """Called once after the forward pass (e.g. to settle outstanding copies)."""

