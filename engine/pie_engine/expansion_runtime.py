"""The glue between the engine loop, the scheduler and the Pie swapping cache, so the engine needs a few lines:

    kv_cache = make_kv_cache(config, num_layers, num_blocks, ...)            # ModelRunner._make_kv_cache
    pie = ExpansionRuntime(runner.kv_cache, scheduler, config, runner.device)  # LLMEngine.__init__
    pie.fill_plan(plan)                                                        # after scheduler.schedule()
    pie.after_step(plan, iteration_seconds)                                    # after scheduler.update()

Between steps it feeds the controller, and when the controller changes m it resizes both sides consistently:
shrinking C preempts (through the scheduler) every sequence holding a block id >= the new C first.
"""

from __future__ import annotations

import logging

import torch

from pie_engine.config import EngineConfig, parse_bytes
from pie_engine.expansion import ControllerConfig, ExpansionController, IterationSample, parse_expansion
from pie_engine.kv_cache import DeviceKVCache, KVCache
from pie_engine.kv_swap import LayerSwapKVCache
from pie_engine.plan import StepPlan, SwapPlan
from pie_engine.scheduler import Scheduler
from pie_engine.sequence import Sequence
from pie_engine.swap_metrics import SwapMetrics

log = logging.getLogger(__name__)


def make_kv_cache(config: EngineConfig, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                  head_dim: int, dtype: torch.dtype, device: torch.device) -> KVCache:
    """DeviceKVCache with expansion off, else the swapping cache (at m = 0; ExpansionRuntime sets m).

    ``num_blocks``: blocks per layer the device budget holds without swapping.
    """
    args = (num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
    if parse_expansion(config.expansion)[0] == "off":
        return DeviceKVCache(*args)
    limit = None if config.host_memory_limit is None else parse_bytes(config.host_memory_limit)
    return LayerSwapKVCache(*args, host_memory_limit=limit)


class ExpansionRuntime:
    """Owns the controller decision loop; a no-op (metrics only) when the cache does not swap."""

    def __init__(self, kv_cache: KVCache, scheduler: Scheduler, config: EngineConfig,
                 device: torch.device | None = None, controller_config: ControllerConfig | None = None) -> None:
        self.kv = kv_cache
        self.scheduler = scheduler
        self.block_manager = scheduler.block_manager
        self.config = config
        self.controller: ExpansionController | None = None
        self.swap: LayerSwapKVCache | None = kv_cache if isinstance(kv_cache, LayerSwapKVCache) else None
        if self.swap is not None:
            self.controller = ExpansionController.from_setting(config.expansion, self.swap.geometry,
                                                               self.swap.host_memory_limit, controller_config)
            self.apply(self.controller.m)
        self.metrics = SwapMetrics(kv_cache, self.controller, device)

    @property
    def collectors(self) -> list:
        """Prometheus collectors to append to ``LLMEngine.metrics_collectors``."""
        return self.metrics.collectors

    def state(self) -> dict:
        """GET /v1/pie/expansion."""
        return self.metrics.state()

    def fill_plan(self, plan: StepPlan) -> None:
        """Tell the cache which block prefix the step may read (used or prefix-cached ids are compact)."""
        if self.swap is not None:
            plan.swap = SwapPlan(self.swap.layers_on_host, self.block_manager.max_used_block_id + 1)

    def after_step(self, plan: StepPlan, iteration_seconds: float) -> list[Sequence]:
        """Account the finished iteration; apply a new m if the controller wants one. Returns sequences preempted
        to shrink the cache (already back in the scheduler's waiting queue)."""
        self.metrics.observe_iteration(iteration_seconds)
        if self.swap is None or self.controller is None:
            return []
        sched, bm = self.scheduler, self.block_manager
        room = max(0, self.config.max_num_seqs - sched.num_running)
        waiting_blocks = sum(bm.blocks_needed(s.num_tokens) for s in list(sched.waiting)[:room])
        sample = IterationSample(
            iteration_seconds=iteration_seconds, stall_seconds=self.swap.last_step_stall_seconds,
            num_tokens=plan.num_batched_tokens,
            context_tokens=sum(s.seq.num_computed_tokens for s in plan.scheduled) + plan.num_batched_tokens,
            num_waiting=sched.num_waiting, num_preempted=len(plan.preempted),
            blocks_in_use=bm.max_used_block_id + 1, blocks_wanted=bm.max_used_block_id + 1 + waiting_blocks)
        m = self.controller.update(sample)
        return self.apply(m) if m != self.swap.layers_on_host else []

    def apply(self, m: int) -> list[Sequence]:
        """Move the cache and the block manager to ``m`` layers on host (between steps)."""
        assert self.swap is not None and self.controller is not None
        kv, bm = self.swap, self.block_manager
        try:
            kv.check_layers_on_host(m)
            c_new = kv.capacity_blocks(m)
            preempted: list[Sequence] = []
            if c_new < bm.num_blocks:
                preempted = self.scheduler.set_num_blocks(c_new)  # frees ids >= c_new first
                kv.set_layers_on_host(m, keep_blocks=bm.max_used_block_id + 1)
            else:
                # NOTE: the cache first: if its host allocation fails, nothing has changed yet.
                kv.set_layers_on_host(m, keep_blocks=bm.max_used_block_id + 1)
                self.scheduler.set_num_blocks(c_new)
        except (ValueError, RuntimeError) as e:
            log.warning("expansion: cannot move to %d layers on host (%s); staying at %d", m, e, kv.layers_on_host)
            if bm.num_blocks != kv.num_blocks:  # shrunk the block manager, then the cache failed: undo
                self.scheduler.set_num_blocks(kv.num_blocks)
            self.controller.reject(m)
            return []
        log.info("expansion: %d layers on host, %d KV blocks per layer (%s)", m, c_new,
                 self.controller.last_decision)
        return preempted
