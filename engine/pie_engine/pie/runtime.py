"""Pie's ``KVRuntime``: the glue between the engine loop, the scheduler and the swapping cache. The engine calls it
through the interface only (``kv/runtime.py``), built by ``PieKVBackend`` (``pie/backend.py``):

    runtime.fill_plan(plan)                                                    # after scheduler.schedule()
    runtime.after_step(plan, iteration_seconds)                                # after scheduler.update()

Between steps it feeds the controller, and when the controller changes m it resizes both sides consistently:
shrinking C preempts (through the scheduler) every sequence holding a block id >= the new C first. It also applies
a new device KV budget live (``set_device_kv_budget``, the admin endpoint), by the same rules.
NOTE: BlockManager.set_num_blocks only changes accounting, so the cache always grows BEFORE the block count does,
and the block count shrinks (preempting) BEFORE the cache does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from pie_engine.config import EngineConfig
from pie_engine.core.plan import StepPlan, SwapPlan
from pie_engine.core.scheduler import Scheduler
from pie_engine.core.sequence import Sequence
from pie_engine.kv.cache import KVCache
from pie_engine.kv.device_cache import DeviceKVCache
from pie_engine.kv.runtime import BudgetBusyError, BudgetError, KVRuntime, NeedsRestartError
from pie_engine.pie.controller import ExpansionController
from pie_engine.pie.controller_config import ControllerConfig, IterationSample
from pie_engine.pie.metrics import SwapMetrics
from pie_engine.pie.swap_cache import LayerSwapKVCache

log = logging.getLogger(__name__)


def controller_config_from(config: EngineConfig) -> ControllerConfig:
    """The controller knobs from the engine config (raises ValueError on inconsistent values)."""
    return ControllerConfig(epsilon=config.expansion_epsilon, grow_overhead=config.expansion_grow_overhead,
                            latency_target=config.expansion_latency_target,
                            window=config.expansion_window, cooldown=config.expansion_cooldown,
                            confirm_window=max(ControllerConfig.confirm_window, config.expansion_window))


class ExpansionRuntime(KVRuntime):
    """Owns the controller decision loop; a no-op (metrics and live budget changes only) when the cache does not
    swap. Built around exactly one of ``swap`` (the swapping cache) and ``unswapped`` (expansion off)."""

    def __init__(self, scheduler: Scheduler, config: EngineConfig, device: torch.device | None = None,
                 controller_config: ControllerConfig | None = None, *, swap: LayerSwapKVCache | None = None,
                 unswapped: DeviceKVCache | None = None) -> None:
        kv: KVCache | None = swap if swap is not None else unswapped
        if kv is None or (swap is not None and unswapped is not None):
            raise ValueError("ExpansionRuntime manages exactly one cache: the swapping one or the device one")
        self.kv: KVCache = kv
        self.swap, self.unswapped = swap, unswapped
        self.scheduler = scheduler
        self.block_manager = scheduler.block_manager
        self.config = config
        self.controller: ExpansionController | None = None
        if self.swap is not None:
            swap_cache = self.swap
            self.controller = ExpansionController.from_setting(
                config.expansion, swap_cache.geometry, swap_cache.host_memory_limit,
                controller_config or controller_config_from(config),
                recompute_tokens=lambda m: scheduler.tokens_to_recompute(swap_cache.capacity_blocks(m)))
            self.apply(self.controller.m)
        # Blocks in use read at scrape time (off the engine thread: two list lengths, no mutation).
        self.metrics = SwapMetrics(kv, self.controller, device,
                                   blocks_in_use=lambda: self.block_manager.num_used_blocks, swap=swap)
        # Called with (plan, iteration_seconds) after every step, before the controller decides (benchmarks).
        self.observers: list[Callable[[StepPlan, float], None]] = []
        # What LLMEngine.step times iterations with (set it with ``set_clock``).
        self.clock: Callable[[], float] = time.perf_counter

    def set_clock(self, clock: Callable[[], float]) -> None:
        """Time iterations, and the swapping cache's per-layer periods on the CPU, with ``clock`` instead of wall
        time: a benchmark on a machine shared with other jobs uses the engine thread's CPU time plus swap stalls
        (bench/pie_common.py), so the controller sees what the benchmark reports."""
        self.clock = clock
        if self.swap is not None:
            self.swap.set_clock(clock)  # NOTE: ignored on CUDA, which times the layers on the GPU

    @property
    def collectors(self) -> list:
        """Prometheus collectors to append to ``LLMEngine.metrics_collectors``."""
        return self.metrics.collectors

    @property
    def device_kv_budget_bytes(self) -> int:
        """The device KV budget in effect: blocks per layer at m = 0, times layers, times block bytes."""
        pool = self.swap.geometry.pool_blocks if self.swap is not None else self.kv.num_layers * self.kv.num_blocks
        return pool * self.kv.block_bytes

    def state(self) -> dict:
        """GET /v1/pie/expansion."""
        return {**self.metrics.state(), "device_kv_budget_bytes": self.device_kv_budget_bytes,
                "num_device_blocks": self.block_manager.num_blocks}

    def close(self) -> None:
        """Stop the swapping cache's copy threads (the engine is done)."""
        if self.swap is not None:
            self.swap.close()

    def fill_plan(self, plan: StepPlan) -> None:
        """Tell the cache which block prefix the step may read (used or prefix-cached ids are compact)."""
        if self.swap is not None:
            plan.swap = SwapPlan(self.swap.layers_on_host, self.block_manager.max_used_block_id + 1)

    def after_step(self, plan: StepPlan, iteration_seconds: float) -> list[Sequence]:
        """Account the finished iteration; apply a new m if the controller wants one. Returns sequences preempted
        to shrink the cache (already back in the scheduler's waiting queue)."""
        self.metrics.observe_iteration(iteration_seconds)
        for observe in self.observers:
            observe(plan, iteration_seconds)
        if self.swap is None or self.controller is None:
            return []
        sched, bm = self.scheduler, self.block_manager
        waiting_blocks = sched.admissible_waiting_blocks()
        used = bm.max_used_block_id + 1
        sample = IterationSample(
            iteration_seconds=iteration_seconds, stall_seconds=self.swap.last_step_stall_seconds,
            num_tokens=plan.num_batched_tokens,
            context_tokens=self.context_tokens(plan),
            num_preempted=len(plan.preempted),
            blocks_in_use=used, blocks_wanted=used + waiting_blocks,
            excess_seconds=self.swap.last_step_excess_seconds,
            copy_seconds=self.swap.last_step_copy_seconds, copy_bytes=self.swap.last_step_copy_bytes,
            num_output_tokens=sum(1 for s in plan.scheduled if s.sample),
            num_requests=sched.num_running + sched.num_waiting)
        m = self.controller.update(sample)
        return self.apply(m) if m != self.swap.layers_on_host else []

    @staticmethod
    def context_tokens(plan: StepPlan) -> int:
        """KV tokens the finished step's attention read: after the update, each sequence's computed tokens."""
        return sum(s.seq.num_computed_tokens for s in plan.scheduled)

    def reachable_blocks(self) -> int:
        """Blocks per layer the largest allowed expansion can give one request (adaptive: at the highest m the host
        limit allows; otherwise the current capacity). Reads only integers: safe off the engine thread."""
        ctl = self.controller
        if self.swap is None or ctl is None or ctl.mode != "adaptive":
            return self.block_manager.num_blocks
        return max(self.block_manager.num_blocks, self.swap.geometry.capacity_blocks(ctl.max_layers_on_host))

    def require_blocks(self, blocks: int) -> None:
        """A request needing ``blocks`` per layer was queued (between steps): expand now if the current capacity
        cannot hold it but a larger m can, or the scheduler would end it early with "length"."""
        if self.swap is None or self.controller is None or blocks <= self.block_manager.num_blocks:
            return
        m = self.controller.required_layers_on_host(blocks)
        if m is not None and m > self.swap.layers_on_host:
            self.apply(self.controller.require(m, f"a request needs {blocks} KV blocks per layer"))

    def largest_need(self) -> int:
        """Blocks per layer the longest unfinished request needs to run to completion alone. A capacity below
        this would end it early with "length", so neither the controller nor a budget change shrinks below it."""
        return self.scheduler.largest_need_blocks()

    def apply(self, m: int) -> list[Sequence]:
        """Move the cache and the block manager to ``m`` layers on host (between steps)."""
        assert self.swap is not None and self.controller is not None
        kv = self.swap
        try:
            kv.check_layers_on_host(m)
            c_new = kv.capacity_blocks(m)
            if c_new < (need := self.largest_need()):
                # Expected while a long request runs (it may have forced this m): not a failure, so not a warning.
                log.info("expansion: staying at %d layers on host: an unfinished request needs %d blocks per layer, "
                         "more than the %d that m = %d gives", kv.layers_on_host, need, c_new, m)
                self.controller.reject(m)
                return []
            t0 = time.perf_counter()
            preempted = self._resize(c_new, lambda keep: kv.set_layers_on_host(m, keep_blocks=keep))
            self.controller.note_reconfigure(time.perf_counter() - t0)
        except (ValueError, RuntimeError) as e:
            log.warning("expansion: cannot move to %d layers on host (%s); staying at %d", m, e, kv.layers_on_host)
            self.controller.reject(m)
            return []
        log.info("expansion: %d layers on host, %d KV blocks per layer (%s)", m, c_new,
                 self.controller.last_decision)
        return preempted

    def _resize(self, c_new: int, resize_cache: Callable[[int], object]) -> list[Sequence]:
        """Resize the block manager to ``c_new`` and the cache with ``resize_cache(keep_blocks)``, in the safe
        order; on a cache failure the block manager is put back to the cache's size and the error re-raised."""
        bm = self.block_manager
        if c_new >= bm.num_blocks:
            resize_cache(bm.max_used_block_id + 1)  # NOTE: the cache first: a failed allocation changes nothing
            self.scheduler.set_num_blocks(c_new)
            return []
        preempted = self.scheduler.set_num_blocks(c_new)  # frees ids >= c_new first
        try:
            resize_cache(bm.max_used_block_id + 1)
        except (ValueError, RuntimeError):
            self.scheduler.set_num_blocks(self.kv.num_blocks)  # the preempted sequences simply recompute later
            raise
        return preempted

    def set_device_kv_budget(self, budget_bytes: int) -> dict:
        """Apply a new device KV budget live (between steps, on the engine thread): the admin endpoint.

        The budget holds ``budget_bytes // (layers * block bytes)`` blocks per layer without swapping; the current
        expansion (static: the configured ratio) is kept, lowered if its host KV would exceed the host limit.
        Shrinking preempts the sequences holding blocks beyond the new capacity (they recompute later, with the
        same output). Raises BudgetError (unusable budget), BudgetBusyError (not now: a running request needs more KV)
        or NeedsRestartError (not possible live).
        """
        kv = self.kv
        c0 = budget_bytes // (kv.num_layers * kv.block_bytes)
        if c0 < 1:
            raise BudgetError(f"a device KV budget of {budget_bytes} bytes is less than one KV block per layer "
                              f"({kv.num_layers * kv.block_bytes} bytes for {kv.num_layers} layers)")
        swap, ctrl, unswapped = self.swap, self.controller, self.unswapped
        if swap is not None and ctrl is not None:
            geometry = replace(swap.geometry, pool_blocks=kv.num_layers * c0)
            m = ctrl.layers_for_geometry(geometry)
            c_new = geometry.capacity_blocks(m)
        else:
            m, c_new = 0, c0
        need = self.largest_need()
        if c_new < need:
            raise BudgetBusyError(f"the new budget holds {c_new} KV blocks per layer, but an unfinished request "
                                    f"needs {need}: applying it live would cut that request short, it needs a "
                                    "restart (or a retry once the request finished)")
        try:
            if swap is not None and ctrl is not None:
                preempted = self._resize(c_new, lambda keep: swap.resize_pool(geometry.pool_blocks, m, keep))
                ctrl.set_geometry(geometry, m)
            else:
                assert unswapped is not None  # the constructor takes exactly one cache
                preempted = self._resize(c_new, lambda keep: unswapped.resize(c_new, keep))
        except (ValueError, RuntimeError) as e:
            raise NeedsRestartError(f"the device KV budget could not be changed live ({e}); it needs a "
                                    "restart") from e
        log.info("device KV budget now %d bytes: %d blocks per layer at m = %d (%d sequences preempted)",
                 budget_bytes, c_new, m, len(preempted))
        self.config.gpu_memory_budget = str(budget_bytes)
        return {"applied": True, "gpu_memory_budget_bytes": budget_bytes,
                "device_kv_budget_bytes": self.device_kv_budget_bytes, "num_device_blocks": c_new,
                "layers_on_host": m, "preempted": len(preempted)}
