"""Where each layer's KV lives during a forward pass.

The model calls ``begin_layer(l)`` right before layer l's attention and ``end_layer(l)`` right after it. With
expansion off, every layer owns a device tensor and both calls are trivial. With Pie swapping (kv_swap.py), the
same two calls are where the forward pass waits for a prefetched layer and where a finished layer is written back
and its slot refilled, so the model code never knows whether KV is swapped.
"""

from __future__ import annotations

import torch

from pie_engine.plan import StepPlan


class KVCache:
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
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * elem

    def begin_step(self, plan: StepPlan, slot_mapping: torch.Tensor,
                   slot_mapping_cpu: torch.Tensor | None = None) -> None:
        """Called once before the forward pass. ``slot_mapping`` [num_tokens]: where this step writes new KV (on
        the device); ``slot_mapping_cpu``: the same on the CPU, if the caller has it (saves a device sync)."""

    def begin_layer(self, layer: int) -> torch.Tensor:
        """Return layer ``layer``'s KV tensor, ready to read and write (may wait for a swap-in)."""
        raise NotImplementedError

    def end_layer(self, layer: int) -> None:
        """Layer ``layer`` finished reading/writing its KV this step."""

    def end_step(self) -> None:
        """Called once after the forward pass (e.g. to settle outstanding copies)."""


class DeviceKVCache(KVCache):
    """Expansion off: every layer's KV stays on the device."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        shape = (2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.layers = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]

    def begin_layer(self, layer: int) -> torch.Tensor:
        return self.layers[layer]

    def resize(self, num_blocks: int, keep_blocks: int) -> None:
        """Between steps: change the blocks per layer (a live device KV budget change). Blocks
        ``[0, min(old, new, keep_blocks))`` keep their KV; the caller preempts owners of ids >= ``num_blocks``
        first. NOTE: the old tensors live until every new one exists, so a failed allocation (out of device
        memory while growing) leaves the cache as it was."""
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if keep_blocks > num_blocks:
            raise ValueError(f"cannot shrink to {num_blocks} blocks: blocks up to {keep_blocks - 1} hold KV "
                             "(preempt their owners first)")
        keep = min(self.num_blocks, keep_blocks)
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

        def moved(old: torch.Tensor) -> torch.Tensor:
            new = torch.zeros(shape, dtype=self.dtype, device=self.device)
            new[:, :keep].copy_(old[:, :keep])
            return new

        self.layers, self.num_blocks = [moved(t) for t in self.layers], num_blocks
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the old tensors back, so a smaller budget really frees memory
