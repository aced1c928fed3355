"""The plain KV cache: every layer's KV stays on the device (expansion off)."""

from __future__ import annotations

import torch

from pie_engine.core.plan import StepPlan
from pie_engine.kv.cache import KVCache, KVSpec


class DeviceKVCache(KVCache):
    """Expansion off: every layer's KV stays on the device."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        shape = (2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.layers = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]

    @classmethod
    def from_spec(cls, spec: KVSpec) -> DeviceKVCache:
        return cls(*spec.args())

    def begin_step(self, plan: StepPlan, slot_mapping: torch.Tensor,
                   slot_mapping_cpu: torch.Tensor | None = None) -> None:
        pass  # nothing to prefetch: every layer is resident

    def begin_layer(self, layer: int) -> torch.Tensor:
        return self.layers[layer]

    def end_layer(self, layer: int) -> None:
        pass

    def end_step(self) -> None:
        pass

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
