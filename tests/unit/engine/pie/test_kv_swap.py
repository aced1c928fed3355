"""LayerSwapKVCache: exact data vs a DeviceKVCache reference, copy ordering, stalls, reconfiguration, host limit.

All of it runs the real copy pipeline: on the CPU the copies happen on worker threads, so ordering and stalls
are real; the CUDA variant (streams, events, pinned memory) skips without a GPU.
"""

from __future__ import annotations

import time
from collections import defaultdict

import pytest
import torch

from pie_engine.core.plan import ScheduledSeq, StepPlan, SwapPlan
from pie_engine.core.sampling_params import SamplingParams
from pie_engine.core.sequence import Sequence
from pie_engine.pie.copy.link import LinkModel
from pie_engine.pie.copy.tensors import kv_flat
from pie_engine.pie.copy.threads import ThreadCopyEngine
from pie_engine.pie.copy.trace import Trace
from pie_engine.pie.swap_cache import LayerSwapKVCache
from tests.unit.engine.pie.kv_swap_driver import ToyDriver

LAYERS, BLOCKS, BS, HEADS, DIM = 6, 12, 4, 2, 4
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (streams, events, pinned memory)")


def make_cache(m: int = 0, k: int = 2, device: str = "cpu", **kw) -> LayerSwapKVCache:
    return LayerSwapKVCache(LAYERS, BLOCKS, BS, HEADS, DIM, torch.float32, torch.device(device),
                            layers_on_host=m, num_staging=k, **kw)


@pytest.fixture
def caches():
    made: list[LayerSwapKVCache] = []

    def factory(*args, **kw) -> LayerSwapKVCache:
        made.append(make_cache(*args, **kw))
        return made[-1]

    yield factory
    for c in made:
        c.close()


@pytest.mark.parametrize(("m", "k"), [(0, 2), (1, 1), (1, 2), (2, 2), (3, 3), (4, 2), (5, 1), (5, 2), (2, 4)])
def test_data_matches_reference(caches, m: int, k: int) -> None:
    """Includes m = n - 1 (one slot) and k = S (full rotation: (2, 4) has S = 4)."""
    cache = caches(m, k)
    driver = ToyDriver(cache, seed=m * 10 + k)
    for _ in range(30):
        driver.step()
    assert driver.steps >= 20 and driver.reads > 0
    if m > 0:
        assert cache.swap_in_bytes_total > 0 and cache.swap_out_bytes_total > 0
    else:
        assert cache.swap_in_bytes_total == cache.swap_out_bytes_total == 0
    assert cache.num_blocks == BLOCKS * LAYERS // (LAYERS - m)


def test_steps_at_m0_never_touch_the_copy_engine(caches) -> None:
    """Adaptive expansion idles at m = 0 whenever the KV fits: those steps must cost what the device cache's cost,
    so the copy engine (timeline marks, step accounting) is not called at all -- until m > 0, when it is."""
    cache = caches(0, 2)
    calls: list[str] = []
    engine = cache.engine
    for name in ("mark", "end_step", "wait", "swap_in", "step_program", "synchronize"):
        real = getattr(engine, name)
        setattr(engine, name, lambda *a, _n=name, _f=real, **k: (calls.append(_n), _f(*a, **k))[1])
    driver = ToyDriver(cache, seed=3)
    for _ in range(12):
        driver.step()
    assert driver.reads > 0 and calls == [] and cache.last_step_excess_seconds is None
    driver.reconfigure(2)
    driver.step()
    assert "mark" in calls and "end_step" in calls


@pytest.mark.parametrize("prefetch_next_step", [True, False])
@pytest.mark.parametrize("swap_plan", [True, False])
def test_prefetch_across_steps_with_changing_block_usage(caches, prefetch_next_step: bool, swap_plan: bool) -> None:
    """Sequences skip steps and come and go: the next step's prefix often exceeds what a wrapped prefetch copied
    (without plan.swap the prefix covers only the scheduled sequences), so the top-up path must work."""
    cache = caches(3, 2, prefetch_next_step=prefetch_next_step)
    driver = ToyDriver(cache, seed=7, max_seqs=6, chunk=7, schedule_prob=0.5, swap_plan=swap_plan)
    for _ in range(60):
        driver.step()
    assert driver.steps >= 40


def test_swap_in_copies_only_blocks_in_use(caches) -> None:
    cache = caches(2, 2)
    seq = Sequence(prompt_token_ids=[1] * 5, params=SamplingParams())
    seq.block_table = [0, 1]
    plan = StepPlan([ScheduledSeq(seq, 5, True)], swap=SwapPlan(2, 2))
    for _ in range(3):
        cache.begin_step(plan, torch.arange(5))
        for layer in range(LAYERS):
            cache.begin_layer(layer)
            cache.end_layer(layer)
        cache.end_step()
    cache.engine.synchronize()
    h = cache.geometry.num_host_backed(2)
    # Each step: every host-backed layer brings in 2 blocks and writes back 5 slots; the last step also
    # prefetched the next step's first k layers.
    assert cache.swap_in_bytes_total == (3 * h + cache.schedule.num_staging) * 2 * cache.block_bytes
    assert cache.swap_out_bytes_total == 3 * h * 5 * (cache.block_bytes // BS)


def check_order(events: list[tuple[str, int, int, int]], host_backed: set[int]) -> int:
    """Replay the trace slot by slot; returns how many swap-ins it checked."""
    occupant: dict[int, int] = {}
    inflight: dict[int, int] = defaultdict(int)
    dirty: dict[int, int | None] = defaultdict(lambda: None)  # slot -> layer whose write-back is pending
    computing: dict[int, int | None] = defaultdict(lambda: None)
    swap_ins = 0
    for event, layer, slot, step in events:
        if event == "in_start":
            swap_ins += 1
            assert dirty[slot] is None, f"step {step}: slot {slot} refilled with layer {layer} before layer " \
                                        f"{dirty[slot]}'s write-back finished"
            assert computing[slot] is None, f"step {step}: slot {slot} overwritten while layer computes"
            inflight[slot] += 1
        elif event == "in_end":
            inflight[slot] -= 1
            occupant[slot] = layer
        elif event == "compute_begin" and layer in host_backed:
            assert occupant.get(slot) == layer and inflight[slot] == 0, \
                f"step {step}: layer {layer} read before its swap-in completed"
            computing[slot] = layer
        elif event == "compute_end" and layer in host_backed:
            computing[slot] = None
            dirty[slot] = layer
        elif event == "out_end":
            assert dirty[slot] == layer
            dirty[slot] = None
    return swap_ins


@pytest.mark.parametrize(("m", "k"), [(2, 2), (4, 2), (5, 1), (2, 4)])
def test_copy_ordering_with_slow_links(caches, m: int, k: int) -> None:
    """Slow write-backs would let a missing prerequisite show up as a refill before the write-back ended."""
    trace = Trace()
    cache = caches(m, k, trace=trace, link_in=LinkModel(latency_s=0.002), link_out=LinkModel(latency_s=0.004))
    driver = ToyDriver(cache, seed=3)
    for _ in range(8):
        driver.step()
    cache.engine.synchronize()
    assert check_order(trace.events, set(cache.schedule.host_backed)) >= driver.steps * (m + cache.schedule.num_staging)


def test_slow_copies_stall_and_fast_copies_with_compute_hide(caches) -> None:
    slow = caches(3, 2, link_in=LinkModel(bandwidth_bytes_per_s=1e5, latency_s=0.01))
    drv = ToyDriver(slow, seed=1)
    for _ in range(4):
        drv.step()
    assert slow.swap_stall_seconds_total > 0 and slow.last_step_copy_seconds > 0

    fast = caches(3, 2)
    drv = ToyDriver(fast, seed=1)
    for _ in range(4):
        drv.step(compute=lambda layer: time.sleep(0.002))
    # Same workload: the hidden copies stall (much) less than the throttled ones.
    assert 0 <= fast.swap_stall_seconds_total < slow.swap_stall_seconds_total


def test_excess_is_measured_inside_the_step(caches) -> None:
    """Per-layer periods on the cache's timeline: host-backed layers that take 0.5 longer than resident ones give
    an excess of H * 0.5 per step (a fake clock makes it exact)."""
    cache = caches(2, 2)
    now = [0.0]
    cache.set_clock(lambda: now[0])
    hb = set(cache.schedule.host_backed)

    def compute(layer: int) -> None:
        now[0] += 1.5 if layer in hb else 1.0

    drv = ToyDriver(cache, seed=3)
    for _ in range(5):
        drv.step(compute=compute)
        assert cache.last_step_excess_seconds == pytest.approx(0.5 * len(hb))
    assert cache.stats().last_step_excess_seconds == pytest.approx(0.5 * len(hb))
    resident = caches(0, 2)
    ToyDriver(resident).step()
    assert resident.last_step_excess_seconds is None  # nothing swapped, nothing to compare


def test_stalls_show_up_as_excess(caches) -> None:
    """Wall clock: a throttled swap-in makes host-backed layers wait, which the in-step excess sees."""
    cache = caches(3, 2, link_in=LinkModel(latency_s=0.02))
    drv = ToyDriver(cache, seed=1)
    excess = stall = 0.0
    for _ in range(4):
        drv.step(compute=lambda layer: time.sleep(0.001))
        excess += cache.last_step_excess_seconds or 0.0
        stall += cache.last_step_stall_seconds
    assert stall > 0.02 and excess > 0.5 * stall


def test_reconfiguration_preserves_data(caches) -> None:
    cache = caches(0, 2)
    driver = ToyDriver(cache, seed=11, max_seqs=3, max_output=40)
    for m in [0, 2, 5, 1, 3, 0, 4]:
        driver.reconfigure(m)
        assert cache.layers_on_host == m
        for _ in range(6):
            driver.step()
    assert driver.steps >= 35


def test_steps_in_inference_mode_and_reconfiguration_outside(caches) -> None:
    """The runner executes under torch.inference_mode (thread-local); the scheduler reconfigures outside it."""
    cache = caches(2, 2)
    driver = ToyDriver(cache, seed=13, max_seqs=3, max_output=30)
    for m in [2, 4, 0, 3]:
        driver.reconfigure(m)
        for _ in range(5):
            with torch.inference_mode():
                driver.step()
    assert driver.steps >= 15


def test_reconfiguration_refuses_used_blocks_beyond_new_capacity(caches) -> None:
    cache = caches(3, 2)
    with pytest.raises(ValueError, match="preempt"):
        cache.set_layers_on_host(0, keep_blocks=BLOCKS + 1)
    assert cache.layers_on_host == 3


def test_host_memory_limit(caches) -> None:
    g = make_cache(0).geometry
    limit = g.host_bytes(2)
    cache = caches(2, 2, host_memory_limit=limit)
    with pytest.raises(ValueError, match="host memory limit"):
        cache.set_layers_on_host(3)
    with pytest.raises(ValueError, match="host memory limit"):
        make_cache(3, host_memory_limit=limit)
    driver = ToyDriver(cache, seed=5, max_seqs=6)
    for _ in range(20):
        driver.step()
    assert 0 < cache.stats().host_kv_capacity_bytes <= limit


def test_host_pool_grows_lazily(caches) -> None:
    cache = caches(2, 2)
    assert cache.stats().host_kv_capacity_bytes == 0
    seq = Sequence(prompt_token_ids=[1] * 4, params=SamplingParams())
    h = cache.geometry.num_host_backed(2)
    for nb in (1, 3, 15):  # C = 18 at m = 2
        seq.block_table = list(range(nb))
        cache.begin_step(StepPlan([ScheduledSeq(seq, 4, True)]), torch.arange(4))
        for layer in range(LAYERS):
            cache.begin_layer(layer)
            cache.end_layer(layer)
        cache.end_step()
        st = cache.stats()
        assert nb * cache.block_bytes * h <= st.host_kv_capacity_bytes <= cache.geometry.host_bytes(2)
        assert st.host_kv_used_bytes == nb * cache.block_bytes * h
    assert cache.stats().host_kv_capacity_bytes < cache.geometry.host_bytes(2)


def test_bad_input_is_rejected(caches) -> None:
    cache = caches(2, 2)
    seq = Sequence(prompt_token_ids=[1] * 4, params=SamplingParams())
    seq.block_table = [0]
    with pytest.raises(ValueError, match="beyond"):
        cache.begin_step(StepPlan([ScheduledSeq(seq, 4, True)]), torch.tensor([0, 1, 2, 9]))
    with pytest.raises(ValueError, match="layers on host"):
        cache.begin_step(StepPlan([ScheduledSeq(seq, 4, True)], swap=SwapPlan(1, 1)), torch.arange(4))
    with pytest.raises(ValueError, match="num_blocks_in_use"):
        seq.block_table = [0, 3]
        cache.begin_step(StepPlan([ScheduledSeq(seq, 4, True)], swap=SwapPlan(2, 2)), torch.arange(4))
    with pytest.raises(ValueError, match="layers_on_host"):
        cache.set_layers_on_host(LAYERS)
    cache.begin_step(StepPlan([ScheduledSeq(seq, 4, True)]), torch.arange(4))
    with pytest.raises(RuntimeError, match="out of order"):
        cache.begin_layer(1)


def test_aborted_step_recovers(caches) -> None:
    cache = caches(3, 2)
    driver = ToyDriver(cache, seed=2)
    driver.step()
    seq = Sequence(prompt_token_ids=[1] * 4, params=SamplingParams())
    seq.block_table = [0]
    cache.begin_step(StepPlan([ScheduledSeq(seq, 4, True)]), torch.arange(4))
    cache.begin_layer(0)
    cache.end_step()  # the forward pass failed after layer 0
    for _ in range(5):
        driver.step()


@CUDA
@pytest.mark.parametrize(("m", "k"), [(0, 2), (2, 2), (5, 1), (2, 4)])
def test_cuda_data_matches_reference(caches, m: int, k: int) -> None:
    cache = caches(m, k, device="cuda")
    assert cache.pin_memory
    driver = ToyDriver(cache, seed=m)
    for _ in range(20):
        driver.step()
    driver.reconfigure(3)
    for _ in range(10):
        driver.step()


@CUDA
def test_cuda_throttled_copies_stall(caches) -> None:
    cache = caches(3, 2, device="cuda", link_in=LinkModel(bandwidth_bytes_per_s=1e6, latency_s=0.005))
    driver = ToyDriver(cache, seed=1)
    for _ in range(4):
        driver.step()
    assert cache.swap_stall_seconds_total > 0 and cache.last_step_copy_seconds > 0


def test_thread_engine_honours_host_ready_and_surfaces_errors() -> None:
    """A swap-in that must read a layer's host copy starts only after that layer's write-back ended, even when
    nothing else orders them; a failing copy raises at the waiter instead of hanging."""
    trace = Trace()
    engine = ThreadCopyEngine(link_out=LinkModel(latency_s=0.03), trace=trace)
    try:
        dev = torch.randn(2, 3, BS, HEADS, DIM)
        host = torch.zeros_like(dev)
        slots = torch.tensor([1, 5, 6])
        wb = engine.write_back(dev, host, slots, slots, layer=0, slot=0)
        back = torch.zeros_like(dev)
        h = engine.swap_in(back, host, 0, 3, slot_free=None, host_ready=wb, layer=0, slot=1)
        engine.wait(h)
        kinds = [e[0] for e in trace.events]
        assert kinds.index("out_end") < kinds.index("in_start")
        assert torch.equal(kv_flat(back)[:, slots], kv_flat(dev)[:, slots])
        assert kv_flat(back)[:, 0].abs().sum() == 0  # only the written rows went back
        bad = engine.write_back(dev, host, torch.tensor([99]), torch.tensor([99]), layer=1, slot=0)
        with pytest.raises(RuntimeError, match="layer 1 failed"):
            engine.wait(bad)
        assert engine.end_step().swap_out_bytes > 0
    finally:
        engine.close()


def test_thread_engine_runs_small_write_backs_inline() -> None:
    """Without a link model a small write-back runs on the calling thread (done on return); a bigger one, or any
    one on a modeled link, goes to the worker. Both copy the same rows, and a failure still surfaces at the waiter."""
    dev = torch.randn(2, 3, BS, HEADS, DIM)
    slots = torch.tensor([0, 7, 11])
    for inline_bytes, link in ((1 << 20, None), (0, None), (1 << 20, LinkModel(latency_s=0.01))):
        engine = ThreadCopyEngine(link_out=link, inline_bytes=inline_bytes)
        try:
            host = torch.zeros_like(dev)
            wb = engine.write_back(dev, host, slots, slots, layer=0, slot=0)
            if link is not None or inline_bytes > 0:  # (a worker may finish a tiny copy before this line)
                assert wb.is_done() == (link is None)  # the modeled link holds the worker for 10 ms
            engine.synchronize()
            assert torch.equal(kv_flat(host)[:, slots], kv_flat(dev)[:, slots])
            assert kv_flat(host)[:, 1].abs().sum() == 0
            bad = engine.write_back(dev, host, torch.tensor([99]), torch.tensor([99]), layer=1, slot=0)
            with pytest.raises(RuntimeError, match="layer 1 failed"):
                engine.wait(bad)
        finally:
            engine.close()
