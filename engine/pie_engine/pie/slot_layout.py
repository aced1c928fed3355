"""``SlotLayout``: the device side of the swapping cache: one pool tensor carved into layer slots, and which layer
sits in which slot.

The pool holds the whole device KV budget (``pool_blocks`` layer-blocks). With ``m`` layers on host it is carved
into ``S = n - m`` slots of ``C = pool_blocks // S`` blocks each (geometry.py); every layer addresses block ids
``[0, C)``. Resident layers keep their slot; host-backed layers rotate through the staging slots, so their slot
depends on the step's rotation phase (``SwapSchedule.slot``).
"""

from __future__ import annotations

import torch

from pie_engine.pie.geometry import SwapGeometry, SwapSchedule


class SlotLayout:
    """Slot views ``[2, C, BS, Hkv, D]`` of the pool. NOTE: the views alias the pool and change with the layout;
    ``generation`` changes with them, so anything holding their addresses must be rebuilt then."""

    def __init__(self, geometry: SwapGeometry, m: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.block_shape = (block_size, num_kv_heads, head_dim)
        self.block_elems = 2 * block_size * num_kv_heads * head_dim
        self.dtype, self.device = dtype, device
        self.generation = 0
        self.apply(geometry, self.alloc_pool(geometry.pool_blocks), m)

    def alloc_pool(self, pool_blocks: int) -> torch.Tensor:
        """A zeroed device pool of ``pool_blocks`` layer-blocks."""
        return torch.zeros(pool_blocks * self.block_elems, dtype=self.dtype, device=self.device)

    def apply(self, geometry: SwapGeometry, pool: torch.Tensor, m: int) -> None:
        """Lay ``pool`` (of ``geometry.pool_blocks`` layer-blocks) out for ``m`` layers on host."""
        self.geometry, self.pool = geometry, pool
        self.schedule: SwapSchedule = geometry.schedule(m)
        self.num_blocks = geometry.capacity_blocks(m)  # C
        slot_elems = self.num_blocks * self.block_elems
        shape = (2, self.num_blocks, *self.block_shape)
        self._views = [pool[i * slot_elems:(i + 1) * slot_elems].view(shape) for i in range(self.schedule.num_slots)]
        self._slot_of: dict[int, list[int]] = {}  # rotation phase -> per layer: its slot
        self._layer_views: dict[int, list[torch.Tensor]] = {}  # rotation phase -> per layer: its slot's view
        self.generation += 1

    @property
    def layers_on_host(self) -> int:
        return self.schedule.layers_on_host

    def view(self, slot: int) -> torch.Tensor:
        """Slot ``slot``'s KV tensor, valid until the next ``apply``."""
        return self._views[slot]

    def slots(self, phase: int) -> list[int]:
        """Per layer, its slot in a step of rotation phase ``phase`` (computed once per phase and layout)."""
        if (slot_of := self._slot_of.get(phase)) is None:
            slot_of = self._slot_of[phase] = [self.schedule.slot(i, phase) for i in range(self.geometry.num_layers)]
        return slot_of

    def layer_views(self, phase: int) -> list[torch.Tensor]:
        """Per layer, its slot's view in a step of rotation phase ``phase`` (valid until the next ``apply``)."""
        if (views := self._layer_views.get(phase)) is None:
            views = self._layer_views[phase] = [self._views[s] for s in self.slots(phase)]
        return views
