"""Pie's performance-transparent layer-wise KV swapping: a KVCache whose host-backed layers rotate through a few
device staging slots while the other layers compute (docs/pie.md has the design and the reasoning).

``LayerSwapKVCache`` is what the model sees; it composes the three parts of the mechanism:
- ``SlotLayout`` (slot_layout.py): the device pool carved into ``S = n - m`` layer slots of ``C`` blocks;
- ``HostKVStore`` (host_store.py): the host copies of the host-backed layers, within the host memory limit;
- ``SwapPipeline`` (pipeline.py): each step's swap-ins, write-backs and refills on a copy engine (copy/), and the
  stall and in-step excess accounting;
and ``relayout`` (relayout.py) moves all three to a new m or pool size between steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from pie_engine.core.plan import StepPlan
from pie_engine.kv.cache import KVCache
from pie_engine.pie.copy.factory import make_copy_engine
from pie_engine.pie.copy.link import LinkModel
from pie_engine.pie.copy.trace import Trace
from pie_engine.pie.geometry import SwapGeometry, SwapSchedule
from pie_engine.pie.host_store import HostKVStore
from pie_engine.pie.pipeline import SwapPipeline
from pie_engine.pie.relayout import relayout
from pie_engine.pie.slot_layout import SlotLayout


@dataclass
class SwapStats:
    """Counters and gauges of the swapping cache (read by metrics.py)."""

    layers_on_host: int
    num_staging: int
    num_blocks: int  # C: blocks per layer
    expansion_ratio: float
    device_kv_capacity_bytes: int  # device bytes laid out as KV slots (S * C * block_bytes)
    host_kv_capacity_bytes: int  # host KV allocated
    host_kv_used_bytes: int  # blocks in use * block_bytes * host-backed layers
    swap_in_bytes_total: int
    swap_out_bytes_total: int
    swap_stall_seconds_total: float
    last_step_stall_seconds: float
    last_step_copy_seconds: float
    last_step_excess_seconds: float | None


class LayerSwapKVCache(KVCache):
    """KVCache with m layers' KV off the device. ``num_blocks`` (C) changes with m: read it after reconfiguring.

    ``num_blocks`` at construction is the per-layer capacity at m = 0; the device pool is ``num_layers *
    num_blocks`` layer-blocks until ``resize_pool``. NOTE: layer tensors returned by ``begin_layer`` are views of
    the pool that are valid for the current step only (the slot is refilled afterwards, C changes on
    reconfiguration).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, *, layers_on_host: int = 0, num_staging: int = 2,
                 host_memory_limit: int | None = None, prefetch_next_step: bool = True,
                 link_in: LinkModel | None = None, link_out: LinkModel | None = None, trace: Trace | None = None,
                 pin_memory: bool | None = None) -> None:
        super().__init__(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, torch.device(device))
        geometry = SwapGeometry(num_layers, num_layers * num_blocks, num_staging, self.block_bytes)
        self.host = HostKVStore(block_size, num_kv_heads, head_dim, dtype, self.block_bytes,
                                pin_memory=self.device.type == "cuda" if pin_memory is None else pin_memory,
                                host_memory_limit=host_memory_limit)
        self.host.check(geometry, layers_on_host)  # NOTE: before anything starts threads or allocates the pool
        self.layout = SlotLayout(geometry, layers_on_host, block_size, num_kv_heads, head_dim, dtype, self.device)
        self.engine = make_copy_engine(self.device, link_in, link_out, trace)
        self.pipeline = SwapPipeline(self.engine, self.layout, self.host, prefetch_next_step=prefetch_next_step,
                                     trace=trace)
        self.num_blocks = self.layout.num_blocks
        # Per layer, its KV in a step at m = 0, served without the pipeline (None in a step that swaps).
        self._resident: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------------ geometry
    @property
    def geometry(self) -> SwapGeometry:
        return self.layout.geometry

    @property
    def schedule(self) -> SwapSchedule:
        return self.layout.schedule

    @property
    def layers_on_host(self) -> int:
        return self.layout.layers_on_host

    @property
    def host_memory_limit(self) -> int | None:
        return self.host.host_memory_limit

    @property
    def pin_memory(self) -> bool:
        return self.host.pin_memory

    def capacity_blocks(self, m: int) -> int:
        """C at ``m`` layers on host (what the block manager should be resized to)."""
        return self.geometry.capacity_blocks(m)

    def check_layers_on_host(self, m: int) -> None:
        """Raise ValueError unless ``m`` is in range and its host KV fits ``host_memory_limit``."""
        self.host.check(self.geometry, m)

    # ------------------------------------------------------------------------------------------ step hooks
    def begin_step(self, plan: StepPlan, slot_mapping: torch.Tensor,
                   slot_mapping_cpu: torch.Tensor | None = None) -> None:
        if self.layers_on_host == 0:
            # NOTE: nothing swaps, so nothing is checked, copied or timed: adaptive expansion idles at m = 0
            # whenever the KV fits, and such a step must cost what DeviceKVCache's costs.
            self._check_plan_layers(plan)
            self.pipeline.begin_resident_step()
            self._resident = self.layout.layer_views(0)
            return
        self._resident = None
        self.pipeline.open_step()
        nb = self._blocks_in_use(plan)
        sm = slot_mapping.reshape(-1).to(torch.int64)
        # NOTE: the runner passes the CPU copy too: reading a device tensor here would cost a sync.
        cpu = sm.cpu() if slot_mapping_cpu is None else slot_mapping_cpu.reshape(-1).to(torch.int64)
        rows = cpu.numpy()  # checks in numpy: a few torch ops here cost more than a decode step's copies
        if rows.size and rows.min() < 0:  # padding slots (-1) store nothing
            cpu = sm = cpu[cpu >= 0]
            rows = cpu.numpy()
        if rows.size and rows.max() >= nb * self.block_size:
            raise ValueError(f"slot_mapping writes slot {int(rows.max())}, beyond the {nb} blocks in use")
        self.pipeline.begin_step(nb, cpu, sm if sm.device == self.device else cpu.to(self.device))

    def _check_plan_layers(self, plan: StepPlan) -> None:
        if plan.swap is not None and plan.swap.layers_on_host != self.layers_on_host:
            raise ValueError(f"plan expects {plan.swap.layers_on_host} layers on host, the cache has "
                             f"{self.layers_on_host}: call set_layers_on_host between steps")

    def _blocks_in_use(self, plan: StepPlan) -> int:
        self._check_plan_layers(plan)
        if (needed := plan.blocks_in_use()) > self.num_blocks:
            raise ValueError(f"the step uses {needed} blocks, the cache holds {self.num_blocks} per layer")
        return needed

    def begin_layer(self, layer: int) -> torch.Tensor:
        if self._resident is not None:
            return self._resident[layer]
        return self.layout.view(self.pipeline.begin_layer(layer))

    def end_layer(self, layer: int) -> None:
        if self._resident is None:
            self.pipeline.end_layer(layer)

    def end_step(self) -> None:
        self._resident = None
        self.pipeline.end_step()

    # ------------------------------------------------------------------------------------------ reconfigure
    def set_layers_on_host(self, m: int, keep_blocks: int | None = None) -> int:
        """Between steps: move to ``m`` layers on host; returns the new C (``num_blocks``).

        Blocks ``[0, min(C_old, C_new, keep_blocks))`` of every layer keep their data. ``keep_blocks``: one past
        the highest block id whose KV must survive (in use or prefix-cached), i.e. ``max_used_block_id + 1``;
        it must be <= C_new (the scheduler preempts owners of higher ids first). Default: keep everything.
        """
        return self._relayout(self.geometry, m, keep_blocks)

    def resize_pool(self, pool_blocks: int, m: int, keep_blocks: int | None = None) -> int:
        """Between steps: a new device KV budget of ``pool_blocks`` layer-blocks, with ``m`` layers on host;
        returns the new C. Same data rules as ``set_layers_on_host``; a failed allocation changes nothing."""
        return self._relayout(replace(self.geometry, pool_blocks=pool_blocks), m, keep_blocks)

    def _relayout(self, geometry: SwapGeometry, m: int, keep_blocks: int | None) -> int:
        try:
            return relayout(self.layout, self.host, self.pipeline, geometry, m, keep_blocks)
        finally:
            self.num_blocks = self.layout.num_blocks  # NOTE: the KVCache field the block manager is sized by

    # ------------------------------------------------------------------------------------------ state
    @property
    def swap_in_bytes_total(self) -> int:
        return self.pipeline.swap_in_bytes_total

    @property
    def swap_out_bytes_total(self) -> int:
        return self.pipeline.swap_out_bytes_total

    @property
    def swap_stall_seconds_total(self) -> float:
        return self.pipeline.swap_stall_seconds_total

    @property
    def last_step_stall_seconds(self) -> float:
        return self.pipeline.last_step_stall_seconds

    @property
    def last_step_copy_seconds(self) -> float:
        return self.pipeline.last_step_copy_seconds

    @property
    def last_step_copy_bytes(self) -> int:
        return self.pipeline.last_step_copy_bytes

    @property
    def last_step_excess_seconds(self) -> float | None:
        """What swapping added to the last step, measured within it; None: unknown (pipeline.py)."""
        return self.pipeline.last_step_excess_seconds

    def stats(self) -> SwapStats:
        g, m, p = self.geometry, self.layers_on_host, self.pipeline
        return SwapStats(
            layers_on_host=m, num_staging=self.schedule.num_staging, num_blocks=self.num_blocks,
            expansion_ratio=g.expansion_ratio(m), device_kv_capacity_bytes=g.device_bytes(m),
            host_kv_capacity_bytes=self.host.capacity_bytes,
            host_kv_used_bytes=p.blocks_in_use * self.block_bytes * g.num_host_backed(m),
            swap_in_bytes_total=p.swap_in_bytes_total, swap_out_bytes_total=p.swap_out_bytes_total,
            swap_stall_seconds_total=p.swap_stall_seconds_total, last_step_stall_seconds=p.last_step_stall_seconds,
            last_step_copy_seconds=p.last_step_copy_seconds, last_step_excess_seconds=p.last_step_excess_seconds)

    def set_clock(self, clock: Callable[[], float]) -> None:
        """Read the per-layer timeline (the in-step excess) with ``clock`` where it is host time (the CPU)."""
        self.engine.set_clock(clock)

    def close(self) -> None:
        """Settle copies and stop the copy engine's threads (also after a failed copy)."""
        self.pipeline.close()
