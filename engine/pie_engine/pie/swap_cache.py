"""Pie's performance-transparent layer-wise KV swapping: a KVCache whose host-backed layers rotate through a few
device staging slots while the other layers compute (docs/pie.md has the design and the reasoning).

One device pool tensor (the device KV budget) is carved into ``S = n - m`` layer slots of ``C`` blocks
(swap_schedule.py). Per step:
- ``begin_step``: the first k host-backed layers get their swap-in (or a top-up, if it was prefetched at the end
  of the previous step and this step uses more blocks);
- ``begin_layer(l)``: a host-backed layer waits for its swap-in (the stall);
- after host-backed layer l: its slot writes back only the rows this step wrote (``slot_mapping``), then is refilled
  with host-backed layer j + k (mod H: the first ones of the next step), after that write-back.
The access order is fixed, so on the C copy engine ``begin_step`` queues all of that in one call, each write-back
behind a compute fence that ``end_layer(l)`` passes: per layer the compute thread then pays one short call instead
of two submissions from Python (docs/pie.md, "Benchmarks"). Other engines issue them in ``end_layer``.
Swap-ins copy only the block prefix ``[0, num_blocks_in_use)``: the block manager hands out the lowest ids first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pie_engine.core.plan import StepPlan
from pie_engine.kv.cache import KVCache
from pie_engine.pie.copy.base import CopyHandle, LinkModel, Trace, copy_blocks, make_copy_engine
from pie_engine.pie.geometry import SwapGeometry, SwapSchedule
from pie_engine.pie.relayout import check_feasible, relayout


@dataclass
class SwapStats:
    """Counters and gauges of the swapping cache (read by swap_metrics.py)."""

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
    num_blocks`` layer-blocks and never changes. NOTE: layer tensors returned by ``begin_layer`` are views of the
    pool that are valid for the current step only (the slot is refilled afterwards, C changes on reconfiguration).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, *, layers_on_host: int = 0, num_staging: int = 2,
                 host_memory_limit: int | None = None, prefetch_next_step: bool = True,
                 link_in: LinkModel | None = None, link_out: LinkModel | None = None, trace: Trace | None = None,
                 pin_memory: bool | None = None) -> None:
        super().__init__(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, torch.device(device))
        self.geometry = SwapGeometry(num_layers, num_layers * num_blocks, num_staging, self.block_bytes)
        self.host_memory_limit = host_memory_limit
        self.prefetch_next_step = prefetch_next_step
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.trace = trace
        self._block_elems = 2 * block_size * num_kv_heads * head_dim
        self.pool = self._alloc_pool(self.geometry.pool_blocks)
        self.engine = make_copy_engine(self.device, link_in, link_out, trace)
        self._host: dict[int, torch.Tensor] = {}  # host-backed layer -> [2, cap, BS, Hkv, D]
        self._host_cap = 0  # blocks each host copy holds (grown lazily up to C)
        self.host_kv_capacity_bytes = 0
        self._last_wb: dict[int, CopyHandle] = {}  # layer -> its latest write-back
        self._slot_wb: dict[int, CopyHandle] = {}  # staging slot -> latest write-back out of it
        self._pending: dict[int, tuple[CopyHandle, int]] = {}  # layer -> (swap-in, blocks it covers) this step
        self._prefetched: dict[int, tuple[CopyHandle, int]] = {}  # the same, issued for the next step
        # Whole-step programs (engines with ``submit_step``): per rotation phase, rebuilt when a tensor changes.
        self._whole_step = hasattr(self.engine, "submit_step")
        self._programs: dict[int, tuple] = {}
        self._fence_of: dict[int, int] = {}  # host-backed layer -> the compute fence its end_layer passes
        self._in_step, self._next_layer = False, 0
        self._growth_seconds = 0.0  # spent growing host copies in this step's begin_step (engine clock)
        self._phase = 0  # rotation phase of the current step (SwapSchedule.slot)
        self._slot_of: list[int] = []  # per layer: its slot this step
        self._nb = 0  # blocks in use this step
        self._slots_cpu = self._slots_dev = torch.empty(0, dtype=torch.int64)
        self.swap_in_bytes_total = self.swap_out_bytes_total = 0
        self.swap_stall_seconds_total = self.last_step_stall_seconds = self.last_step_copy_seconds = 0.0
        # What swapping added to the last step, measured within it (SwapSchedule.excess_seconds); None: unknown.
        self.last_step_excess_seconds: float | None = None
        self.check_layers_on_host(layers_on_host)
        self._layout(layers_on_host)

    # ------------------------------------------------------------------------------------------ geometry
    @property
    def layers_on_host(self) -> int:
        return self.schedule.layers_on_host

    def capacity_blocks(self, m: int) -> int:
        """C at ``m`` layers on host (what the block manager should be resized to)."""
        return self.geometry.capacity_blocks(m)

    def check_layers_on_host(self, m: int) -> None:
        """Raise ValueError unless ``m`` is in range and its host KV fits ``host_memory_limit``."""
        check_feasible(self, self.geometry, m)

    def _layout(self, m: int) -> None:
        self.schedule: SwapSchedule = self.geometry.schedule(m)
        self.num_blocks = self.geometry.capacity_blocks(m)
        self._programs = {}  # NOTE: they point into the old slot views
        self._slot_cache: dict[int, list[int]] = {}  # rotation phase -> per layer: its slot
        slot_elems = self.num_blocks * self._block_elems
        shape = (2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self._views = [self.pool[i * slot_elems:(i + 1) * slot_elems].view(shape)
                       for i in range(self.schedule.num_slots)]

    def _alloc_host(self, cap: int, pinned: bool = True) -> torch.Tensor:
        # Zeroed: never-written rows are read (masked) by attention, and 0 * NaN garbage would poison it.
        return torch.zeros((2, cap, self.block_size, self.num_kv_heads, self.head_dim), dtype=self.dtype,
                           pin_memory=self.pin_memory and pinned)

    def _set_host(self, host: dict[int, torch.Tensor], cap: int) -> None:
        self._host, self._host_cap, self._programs = host, cap, {}  # NOTE: programs point into the old tensors
        # Kept as a number so a metrics scrape on another thread never iterates a dict being replaced.
        self.host_kv_capacity_bytes = len(host) * cap * self.block_bytes

    def _ensure_host_capacity(self, nb: int) -> None:
        """Grow every host copy to hold ``nb`` blocks (geometrically, capped at C)."""
        if nb <= self._host_cap:
            return
        cap = min(self.num_blocks, max(nb, 2 * self._host_cap))
        clock = getattr(self.engine, "clock", None)
        t0 = clock() if clock is not None else 0.0
        self.engine.synchronize()  # NOTE: no copy may still read or write the old host tensors
        host = {layer: self._alloc_host(cap) for layer in self.schedule.host_backed}
        for layer, old in self._host.items():
            copy_blocks(host[layer], old, 0, old.shape[1])
        self._set_host(host, cap)
        if clock is not None:
            self._growth_seconds += clock() - t0

    # ------------------------------------------------------------------------------------------ step hooks
    def begin_step(self, plan: StepPlan, slot_mapping: torch.Tensor,
                   slot_mapping_cpu: torch.Tensor | None = None) -> None:
        if self._in_step:  # the last step never ended
            self.end_step()
        self.engine.mark()
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
        self._slots_cpu, self._slots_dev = cpu, sm if sm.device == self.device else cpu.to(self.device)
        self._nb = nb
        self._in_step, self._next_layer = True, 0
        if (slot_of := self._slot_cache.get(self._phase)) is None:
            slot_of = [self.schedule.slot(i, self._phase) for i in range(self.num_layers)]
            self._slot_cache[self._phase] = slot_of
        self._slot_of = slot_of
        if self.trace is not None:
            self.trace.step += 1
        self._growth_seconds = 0.0
        if self.layers_on_host > 0:
            self._issue_first_swap_ins(nb)
            if self._whole_step:
                self._submit_step(nb)
        self.engine.mark()

    def _issue_first_swap_ins(self, nb: int) -> None:
        self._ensure_host_capacity(nb)
        for layer in self.schedule.first_swap_ins():
            pending = self._pending.get(layer)
            slot = self._slot_of[layer]
            if pending is None:
                h = self._swap_in(layer, slot, 0, nb, self._slot_wb.get(slot), self._last_wb.get(layer))
                self._pending[layer] = (h, nb)
            elif nb > pending[1]:
                # Prefetched at the end of the last step with fewer blocks: top up the new ones. Same FIFO
                # queue/stream as the prefetch, so this handle completes after it.
                self._pending[layer] = (self._swap_in(layer, slot, pending[1], nb, None, None), nb)

    def _submit_step(self, nb: int) -> None:
        """Queue this step's write-backs and refills at once (what ``end_layer`` would issue one by one)."""
        if (cached := self._programs.get(self._phase)) is None:
            hb = self.schedule.host_backed
            slots = [self._slot_of[layer] for layer in hb]
            targets = [self._refill_target(layer) for layer in hb]
            prog = self.engine.step_program([self._views[s] for s in slots], [self._host[layer] for layer in hb],
                                            [None if t is None else self._host[t[0]] for t in targets])
            cached = self._programs[self._phase] = (prog, list(hb), slots, targets)
        prog, layers, slots, targets = cached
        base, wbs, ins = self.engine.submit_step(prog, nb, self._slots_cpu, layers, slots)
        for i, layer in enumerate(layers):
            self._fence_of[layer] = base + i + 1
            self._last_wb[layer] = self._slot_wb[slots[i]] = wbs[i]
            if (t := targets[i]) is not None:
                self._expect(t, ins[i], nb)

    def _refill_target(self, host_backed_layer: int) -> tuple[int, bool] | None:
        """(layer that refills its slot after its write-back, whether for the next step); None when that would be
        a next-step prefetch and those are switched off."""
        target, wraps = self.schedule.next_swap_in(host_backed_layer)  # type: ignore[misc]  # never None here
        return None if wraps and not self.prefetch_next_step else (target, wraps)

    def _expect(self, target: tuple[int, bool], swap_in: CopyHandle, nb: int) -> None:
        """Record the swap-in that ``begin_layer`` of ``target`` waits for, this step or the next."""
        (self._prefetched if target[1] else self._pending)[target[0]] = (swap_in, nb)

    def _blocks_in_use(self, plan: StepPlan) -> int:
        if plan.swap is not None and plan.swap.layers_on_host != self.layers_on_host:
            raise ValueError(f"plan expects {plan.swap.layers_on_host} layers on host, the cache has "
                             f"{self.layers_on_host}: call set_layers_on_host between steps")
        if (needed := plan.blocks_in_use()) > self.num_blocks:
            raise ValueError(f"the step uses {needed} blocks, the cache holds {self.num_blocks} per layer")
        return needed

    def begin_layer(self, layer: int) -> torch.Tensor:
        if not self._in_step or layer != self._next_layer:
            raise RuntimeError(f"begin_layer({layer}) out of order (expected layer {self._next_layer} inside a step)")
        self.engine.mark()
        slot = self._slot_of[layer]
        if layer in self.schedule.host_backed_set:
            pending = self._pending.pop(layer, None)
            if pending is None:
                raise RuntimeError(f"no swap-in was issued for host-backed layer {layer}")
            self.engine.wait(pending[0])
        if self.trace is not None:
            self.trace.record("compute_begin", layer, slot)
        return self._views[slot]

    def end_layer(self, layer: int) -> None:
        if not self._in_step or layer != self._next_layer:
            raise RuntimeError(f"end_layer({layer}) out of order (expected layer {self._next_layer})")
        self._next_layer = layer + 1
        if (fence := self._fence_of.pop(layer, None)) is not None:
            self.engine.advance(fence)  # its copies were queued in begin_step (no Trace on that engine)
            return
        slot = self._slot_of[layer]
        if self.trace is not None:
            self.trace.record("compute_end", layer, slot)
        if layer not in self.schedule.host_backed_set:
            return
        wb = self.engine.write_back(self._views[slot], self._host[layer], self._slots_dev, self._slots_cpu,
                                    layer=layer, slot=slot)
        self._last_wb[layer] = self._slot_wb[slot] = wb
        if (t := self._refill_target(layer)) is not None:
            # NOTE: a next-step prefetch guesses the next step needs this step's prefix; begin_step tops it up if
            # not. The rotation continues into the next step, so the target lands in this same slot there.
            self._expect(t, self._swap_in(t[0], slot, 0, self._nb, wb, self._last_wb.get(t[0])), self._nb)

    def end_step(self) -> None:
        if not self._in_step:
            return
        self.engine.mark()
        complete = self._next_layer == self.num_layers
        if complete:
            self._phase = self.schedule.next_phase(self._phase)
            self._pending, self._prefetched = self._prefetched, {}
        else:  # the forward pass failed midway: settle, forget prefetches (host copies hold what was written)
            self._release_fences()
            self.engine.synchronize()
            self._pending.clear()
            self._prefetched.clear()
            self._phase = 0  # nothing in flight any more: any slot assignment is safe
        self._in_step = False
        stats = self.engine.end_step()
        self.swap_in_bytes_total += stats.swap_in_bytes
        self.swap_out_bytes_total += stats.swap_out_bytes
        self.swap_stall_seconds_total += stats.stall_seconds
        self.last_step_stall_seconds, self.last_step_copy_seconds = stats.stall_seconds, stats.copy_seconds
        # periods: [begin_step, embedding + layer 0's projections, layer 0, ..., layer n - 1]; begin_step's own
        # work (swap-in issue) is swapping cost too, except growing the host copies: that is paid once as demand
        # grows, not every step at this m, so it must not make the controller judge m as not transparent.
        p = stats.periods
        excess = self.schedule.excess_seconds(p[2:]) if complete and len(p) == self.num_layers + 2 else None
        self.last_step_excess_seconds = None if excess is None else excess + max(0.0, p[0] - self._growth_seconds)

    def _release_fences(self) -> None:
        """Pass the fences of layers that never ran, so their queued copies can finish: they move only rows of
        this step's new tokens (nothing reads those before a step writes them again) and prefetches."""
        if self._fence_of:
            self._fence_of.clear()
            self.engine.release_fences()

    def _swap_in(self, layer: int, slot: int, lo: int, hi: int, slot_free: CopyHandle | None,
                 host_ready: CopyHandle | None) -> CopyHandle:
        return self.engine.swap_in(self._views[slot], self._host[layer], lo, hi, slot_free=slot_free,
                                   host_ready=host_ready, layer=layer, slot=slot)

    # ------------------------------------------------------------------------------------------ reconfigure
    def set_layers_on_host(self, m: int, keep_blocks: int | None = None) -> int:
        """Between steps: move to ``m`` layers on host; returns the new C (``num_blocks``).

        Blocks ``[0, min(C_old, C_new, keep_blocks))`` of every layer keep their data. ``keep_blocks``: one past
        the highest block id whose KV must survive (in use or prefix-cached), i.e. ``max_used_block_id + 1``;
        it must be <= C_new (the scheduler preempts owners of higher ids first). Default: keep everything.
        """
        return relayout(self, self.geometry, m, keep_blocks)

    def resize_pool(self, pool_blocks: int, m: int, keep_blocks: int | None = None) -> int:
        """Between steps: a new device KV budget of ``pool_blocks`` layer-blocks, with ``m`` layers on host;
        returns the new C. Same data rules as ``set_layers_on_host``; a failed allocation changes nothing."""
        return relayout(self, replace(self.geometry, pool_blocks=pool_blocks), m, keep_blocks)

    def _alloc_pool(self, pool_blocks: int) -> torch.Tensor:
        return torch.zeros(pool_blocks * self._block_elems, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------------------------------ state
    def stats(self) -> SwapStats:
        g, m = self.geometry, self.layers_on_host
        return SwapStats(
            layers_on_host=m, num_staging=self.schedule.num_staging, num_blocks=self.num_blocks,
            expansion_ratio=g.expansion_ratio(m), device_kv_capacity_bytes=g.device_bytes(m),
            host_kv_capacity_bytes=self.host_kv_capacity_bytes,
            host_kv_used_bytes=self._nb * self.block_bytes * g.num_host_backed(m),
            swap_in_bytes_total=self.swap_in_bytes_total, swap_out_bytes_total=self.swap_out_bytes_total,
            swap_stall_seconds_total=self.swap_stall_seconds_total,
            last_step_stall_seconds=self.last_step_stall_seconds,
            last_step_copy_seconds=self.last_step_copy_seconds,
            last_step_excess_seconds=self.last_step_excess_seconds)

    def close(self) -> None:
        """Settle copies and stop the copy engine's threads (also after a failed copy)."""
        try:
            self._release_fences()  # closed mid-step: the queued copies must still finish
            self.engine.synchronize()
        finally:
            self.engine.close()
