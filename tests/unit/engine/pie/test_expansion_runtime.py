"""ExpansionRuntime: the real Scheduler + BlockManager + LayerSwapKVCache + controller in one loop.

The toy model writes, for layer l, sequence s, position p, the value f(l, s, p) and reads back each scheduled
sequence's whole context, which must hold exactly f(l, s, 0..len-1): that holds across preemption (recompute writes
the same values) and across every reconfiguration the controller makes.
"""

from __future__ import annotations

import time

import pytest
import torch

from pie_engine.config import EngineConfig
from pie_engine.core.block_manager import BlockManager
from pie_engine.core.plan import StepPlan
from pie_engine.core.sampling_params import SamplingParams
from pie_engine.core.scheduler import Scheduler
from pie_engine.core.sequence import Sequence
from pie_engine.kv.cache import KVCache, KVSpec
from pie_engine.kv.device_cache import DeviceKVCache
from pie_engine.pie.backend import PieKVBackend
from pie_engine.pie.controller_config import ControllerConfig
from pie_engine.pie.copy.tensors import kv_flat
from pie_engine.pie.runtime import ExpansionRuntime, controller_config_from
from pie_engine.pie.swap_cache import LayerSwapKVCache

LAYERS, BLOCKS, BS, HEADS, DIM = 6, 8, 4, 1, 2


def value(layer: int, seq_id: int, pos: torch.Tensor) -> torch.Tensor:
    """[T] positions -> [2, T, HEADS, DIM] deterministic KV for (layer, sequence, position)."""
    base = (layer * 1000 + seq_id * 7919 + pos.double() * 31) % 10007
    return base.float().view(1, -1, 1, 1).expand(2, -1, HEADS, DIM) + torch.tensor([0.0, 0.5]).view(2, 1, 1, 1)


def run_step(kv: KVCache, sched: Scheduler, pie: ExpansionRuntime, seconds: float | None) -> StepPlan:
    """One engine step on the toy model; the controller is told ``seconds`` (None: the step's real time)."""
    t0 = time.perf_counter()
    plan = sched.schedule()
    if plan.is_empty:
        return plan
    pie.fill_plan(plan)
    slots, who, ctx = [], [], []
    for s in plan.scheduled:
        seq, start = s.seq, s.seq.num_computed_tokens
        end = start + s.num_new_tokens
        pos = torch.arange(start, end)
        slots.append(torch.tensor([seq.block_table[p // BS] * BS + p % BS for p in range(start, end)]))
        who.append((seq.seq_id, pos))
        ctx.append((seq.seq_id, torch.tensor([seq.block_table[p // BS] * BS + p % BS for p in range(end)])))
    slot_mapping = torch.cat(slots)
    kv.begin_step(plan, slot_mapping)
    for layer in range(LAYERS):
        t = kv_flat(kv.begin_layer(layer))
        t.index_copy_(1, slot_mapping, torch.cat([value(layer, sid, pos) for sid, pos in who], dim=1))
        for sid, c in ctx:
            assert torch.equal(t[:, c], value(layer, sid, torch.arange(len(c)))), f"layer {layer} seq {sid}"
        kv.end_layer(layer)
    kv.end_step()
    sched.update(plan, [1] * sum(s.sample for s in plan.scheduled))
    pie.after_step(plan, time.perf_counter() - t0 if seconds is None else seconds)
    return plan


def setup(expansion: str, cfg: ControllerConfig | None = None, **kw):
    config = EngineConfig(**{"model": "unused", "expansion": expansion, "max_num_seqs": 6,
                             "max_num_batched_tokens": 24, "block_size": BS, **kw})
    backend = PieKVBackend(config, cfg)
    kv = backend.make_cache(KVSpec(LAYERS, BLOCKS, BS, HEADS, DIM, torch.float32, torch.device("cpu")))
    sched = Scheduler(config, BlockManager(kv.num_blocks, BS), max_model_len=200)
    return kv, sched, backend.make_runtime(kv, sched, torch.device("cpu"))


def add_requests(sched: Scheduler, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        sched.add(Sequence(prompt_token_ids=[1] * (5 + i % 7), params=SamplingParams(max_tokens=10 + i % 5,
                                                                                    ignore_eos=True),
                           request_id=f"r{i}"))


def test_off_uses_the_device_cache() -> None:
    kv, sched, pie = setup("off")
    assert isinstance(kv, DeviceKVCache) and pie.controller is None
    add_requests(sched, 3)
    while sched.has_unfinished():
        run_step(kv, sched, pie, 0.01)
    assert pie.state()["expansion_ratio"] == 1.0


def test_static_ratio_is_applied_at_start() -> None:
    kv, sched, pie = setup("2.0")
    assert isinstance(kv, LayerSwapKVCache) and kv.layers_on_host == 3
    assert sched.block_manager.num_blocks == kv.num_blocks == 2 * BLOCKS
    add_requests(sched, 8)
    while sched.has_unfinished():
        run_step(kv, sched, pie, 0.01)
    kv.close()


def test_adaptive_grows_under_load_then_backs_off_with_correct_kv() -> None:
    """Growth with a waiting queue, at once (after a one-layer link check) to the m its KV needs; simulated
    overhead at m >= 3 makes it shrink one layer at a time to 2 (C shrinks: preemption)."""
    # The simulated overhead slows every layer alike, so only the m = 0 baseline can see it. It judges only loads it
    # was tested on at m = 0: give it the history of a long-running server, every load this test runs (10 s each).
    cfg = ControllerConfig(window=2, cooldown=1, ceiling_ttl=10_000, idle_shrink=False, baseline_min_samples=4)
    kv, sched, pie = setup("adaptive", cfg)
    assert isinstance(kv, LayerSwapKVCache) and kv.layers_on_host == 0 and pie.controller is not None
    for _ in range(2):
        for tokens in (1, 2, 4, 8, 16, 32, 64, 128):
            for context in (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192):
                pie.controller.baseline.add(10.0, tokens, context)
    add_requests(sched, 1)
    history = []
    for _ in range(3):
        run_step(kv, sched, pie, 10.0)
        history.append(kv.layers_on_host)
    add_requests(sched, 29, start=1)
    while sched.has_unfinished():
        # Simulated iteration times, long enough that the real (tiny) stalls of the toy copies are noise. The
        # overhead appears only at m >= 3, as a stall-free slowdown, which the m = 0 baseline catches.
        run_step(kv, sched, pie, 10.0 * (1.3 if kv.layers_on_host >= 3 else 1.0))
        history.append(kv.layers_on_host)
        assert sched.block_manager.num_blocks == kv.num_blocks
    top = max(history)
    assert top > 3 and history[-1] == 2, history
    # the jump follows a one-layer link check (copies hid at m = 1)
    assert [m for i, m in enumerate(history) if i == 0 or m != history[i - 1]] == [0, 1, *range(top, 1, -1)], history
    assert pie.controller is not None and pie.controller.num_grows == 2 and pie.controller.num_shrinks == top - 2
    assert pie.state()["recommended_gpu_memory_bytes"] > 0
    assert pie.controller.reconfigure_seconds > 0  # every move was timed: undoing a probe counts it
    kv.close()


def test_a_queue_behind_max_num_seqs_is_not_kv_demand() -> None:
    """Requests waiting for a batch slot (max_num_seqs), not for KV, never make adaptive expand: more KV would not
    run them sooner, and swapping would only cost. The same controller grows at once when the queue wants KV."""
    cfg = ControllerConfig(window=2, cooldown=1, baseline_min_samples=4)

    def short(sched: Scheduler, n: int) -> None:  # 2 blocks each: one at a time always fits in 8
        for i in range(n):
            sched.add(Sequence(prompt_token_ids=[1] * 5, params=SamplingParams(max_tokens=3, ignore_eos=True),
                               request_id=f"s{i}"))

    for max_num_seqs, grows in ((1, False), (6, True)):
        kv, sched, pie = setup("adaptive", cfg, max_num_seqs=max_num_seqs)
        assert pie.controller is not None
        for _ in range(2):  # a warm baseline, so only demand decides whether it grows
            for tokens in (1, 2, 4, 8, 16, 32):
                for context in (0, 4, 8, 16, 32, 64, 128):
                    pie.controller.baseline.add(1.0, tokens, context)
        short(sched, 40)
        while sched.has_unfinished():
            run_step(kv, sched, pie, 1.0)
        assert (pie.controller.num_grows > 0) is grows, pie.controller.changes
        kv.close()


def test_the_controller_measures_speed_from_real_steps() -> None:
    """Every step reports the tokens it sampled and the requests in the system, so the controller's speed table
    fills from the engine loop itself; and it asks the scheduler what a shrink would make it recompute."""
    kv, sched, pie = setup("adaptive", ControllerConfig(window=2, cooldown=1, speed_batch=2, idle_shrink=False))
    ctrl = pie.controller
    assert ctrl is not None
    add_requests(sched, 6)
    for _ in range(8):
        run_step(kv, sched, pie, 0.01)
    est = ctrl.speeds.estimate(ctrl.m, ctrl.iterations)
    assert est is not None and est.mean > 0
    # 0.01 s per step, at most one token per running sequence per step, 6 requests in the system
    assert est.mean <= sched.config.max_num_seqs / 0.01 / 6
    assert ctrl.recompute_tokens(ctrl.m) == 0  # nothing lies beyond the current capacity
    assert ctrl.recompute_tokens(0) == sched.tokens_to_recompute(kv.capacity_blocks(0))
    kv.close()


def test_copies_that_cannot_hide_send_adaptive_back_to_no_swap() -> None:
    """Safety: every KV copy throttled to a link far too slow to hide behind compute (the benchmarks' PCIe-like
    throttle, scaled down to the toy model). Adaptive probes once under the load, sees the probe stall, goes back
    to m = 0 in one step with the KV intact, and does not probe again within the ceiling's ttl."""
    kv, sched, pie = setup("adaptive", ControllerConfig(window=2, cooldown=1, speed_batch=2, idle_shrink=False,
                                                        baseline_min_samples=2, baseline_min_held_out=1),
                           swap_link_bytes_per_s=2e5)
    ctrl = pie.controller
    assert ctrl is not None
    add_requests(sched, 30)
    history = []
    while sched.has_unfinished():
        run_step(kv, sched, pie, None)
        history.append(kv.layers_on_host)
        assert sched.block_manager.num_blocks == kv.num_blocks
    assert history[-1] == 0 and ctrl.num_grows == 1 and ctrl.num_shrinks == 1, ctrl.changes
    assert "stall" in ctrl.changes[-1][2]
    assert sum(1 for m in history if m > 0) <= ctrl.config.cooldown + ctrl.config.probe_stall_iterations + 1
    kv.close()


def test_rejected_move_leaves_both_sides_consistent() -> None:
    kv, sched, pie = setup("adaptive", host_memory_limit="1")  # no host KV allowed at all
    assert pie.controller is not None and pie.controller.max_layers_on_host == 0
    assert pie.apply(2) == [] and kv.layers_on_host == 0 and sched.block_manager.num_blocks == kv.num_blocks
    kv.close()


@pytest.mark.parametrize("bad", ["sometimes", "0.5"])
def test_bad_expansion_setting(bad: str) -> None:
    with pytest.raises(ValueError, match="expansion"):
        setup(bad)


@pytest.mark.parametrize("window", [1, 8, 64, 200])
def test_any_valid_window_gives_a_valid_controller_config(window: int) -> None:
    """``--expansion-window`` beyond the 64-iteration shrink confirmation widens the confirmation with it."""
    cfg = controller_config_from(EngineConfig(model="x", expansion_window=window))
    assert cfg.window == window and cfg.confirm_window == max(64, window)
