"""``HostKVStore``: the host copies of the host-backed layers' KV, and the host memory limit they must fit.

The host copy of a host-backed layer is authoritative: its device slot is refilled from it before every use, and
every KV write of a step is written back into it. Host copies start empty and grow lazily (geometrically, up to
C blocks) with the blocks in use, so the host KV allocated never exceeds ``SwapGeometry.host_bytes(m)``, which
``check`` keeps within ``host_memory_limit``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pie_engine.pie.copy.tensors import copy_blocks
from pie_engine.pie.geometry import SwapGeometry


class HostKVStore:
    """Host KV tensors ``[2, capacity, BS, Hkv, D]``, one per host-backed layer, all of one capacity (in blocks).

    ``generation`` changes whenever a tensor is replaced: anything holding their addresses (a copy engine's step
    program) must be rebuilt then.
    """

    def __init__(self, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, block_bytes: int, *,
                 pin_memory: bool, host_memory_limit: int | None) -> None:
        self.block_shape = (block_size, num_kv_heads, head_dim)
        self.dtype, self.block_bytes = dtype, block_bytes
        self.pin_memory = pin_memory  # pinned host memory (CUDA: asynchronous copies)
        self.host_memory_limit = host_memory_limit  # bytes; None: no limit
        self._tensors: dict[int, torch.Tensor] = {}
        self.capacity = 0  # blocks every host copy holds
        # NOTE: kept as a number so a metrics scrape on another thread never iterates a dict being replaced.
        self.capacity_bytes = 0
        self.generation = 0

    def check(self, geometry: SwapGeometry, m: int) -> None:
        """Raise ValueError unless ``m`` is in range for ``geometry`` and its host KV fits the host memory limit."""
        geometry.check(m)
        if not geometry.feasible(m, self.host_memory_limit):
            raise ValueError(f"layers_on_host={m} needs {geometry.host_bytes(m)} bytes of host KV, over the "
                             f"host memory limit of {self.host_memory_limit} bytes")

    def alloc(self, capacity: int, pinned: bool = True) -> torch.Tensor:
        """A zeroed host KV tensor of ``capacity`` blocks (pinned if the store pins and ``pinned``)."""
        # NOTE: zeroed: never-written rows are read (masked) by attention, and 0 * NaN garbage would poison it.
        return torch.zeros((2, capacity, *self.block_shape), dtype=self.dtype, pin_memory=self.pin_memory and pinned)

    def tensor(self, layer: int) -> torch.Tensor:
        """The host copy of host-backed ``layer`` (KeyError before it was allocated)."""
        return self._tensors[layer]

    def get(self, layer: int) -> torch.Tensor | None:
        """The host copy of ``layer``, or None when it has none."""
        return self._tensors.get(layer)

    def tensors(self) -> dict[int, torch.Tensor]:
        """Every host copy by layer (a new dict: replacing the store's does not change it)."""
        return dict(self._tensors)

    def replace(self, tensors: dict[int, torch.Tensor], capacity: int) -> None:
        """Switch to new host copies of ``capacity`` blocks each (a re-layout). The caller has settled every copy
        that reads or writes the old ones."""
        self._tensors, self.capacity = tensors, capacity
        self.capacity_bytes = len(tensors) * capacity * self.block_bytes
        self.generation += 1

    def needs_growth(self, blocks: int) -> bool:
        return blocks > self.capacity

    def grow(self, blocks: int, max_blocks: int, layers: Iterable[int]) -> None:
        """Grow the host copies of ``layers`` to hold ``blocks`` blocks: geometrically (so growth stays rare), at
        most ``max_blocks`` (C). The caller has settled every copy that reads or writes the old ones."""
        cap = min(max_blocks, max(blocks, 2 * self.capacity))
        grown = {layer: self.alloc(cap) for layer in layers}
        for layer, old in self._tensors.items():
            copy_blocks(grown[layer], old, 0, old.shape[1])
        self.replace(grown, cap)
