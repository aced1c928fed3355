"""Pie swapping is exact: greedy outputs with expansion on (static ratios, full rotation, adaptive, live budget
changes) equal expansion off and HF transformers, token for token, on tiny llama / qwen2 / opt checkpoints (fp32).

Geometry (n = 6 layers, block_size 4): the longest request needs (40 + 64) / 4 = 26 blocks per layer, all five
together ~95. The device budget holds C0 = 30 blocks per layer without swapping, so expansion off preempts, and
m layers on host give C = 6 * 30 / (6 - m) blocks: m = 5 -> 180 (no preemption), m = 3 -> 60, m = 2 -> 45.
At m = n - 1 there is one slot, so the default k = 2 staging slots clamp to k = S = 1 (full rotation); m = 3 is
run with the default k = 2 (one resident layer) and with k = S = 3 (the paper's full rotation).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from pie_engine.config import EngineConfig
from pie_engine.core.engine import LLMEngine
from pie_engine.core.sampling_params import SamplingParams
from pie_engine.factory import create_engine
from pie_engine.pie.swap_cache import LayerSwapKVCache
from tests import hf_reference

LAYERS, C0, BS, NEW_TOKENS = 6, 30, 4, 64
PROMPT_LENS = [3, 17, 40, 9, 28]
ARCHS = ["llama", "qwen2", "opt"]
# name: (EngineConfig overrides, expected m, expected staging slots)
STATIC = {
    "m=n-1": ({"expansion": "6.0"}, 5, 1),
    "m=3,k=2": ({"expansion": "2.0"}, 3, 2),
    "m=3,k=S": ({"expansion": "2.0", "swap_staging_slots": 3}, 3, 3),
    "middle,m=2": ({"expansion": "1.5"}, 2, 2),
}


def prompts() -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in PROMPT_LENS]


def hf_greedy(path: Path) -> list[list[int]]:
    return hf_reference.hf_greedy(path, prompts(), NEW_TOKENS)


def make_engine(path: Path, **cfg) -> LLMEngine:
    base = {"num_device_blocks": C0}
    return create_engine(EngineConfig(model=str(path), device="cpu", dtype="float32", block_size=BS, **{**base, **cfg}))


def run(engine: LLMEngine, on_step=None) -> list[list[int]]:
    """Greedy-generate the prompts, calling ``on_step(engine, step_index)`` between steps."""
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ids = [engine.add_request(None, p, params).request_id for p in prompts()]
    final: dict[str, list[int]] = {}
    i = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.finish_reason == "length"
                final[out.request_id] = out.token_ids
        if on_step is not None:
            on_step(engine, i)
        i += 1
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # everything freed
    engine.kv_runtime.close()
    return [final[r] for r in ids]


_off: dict[str, tuple[list[list[int]], int]] = {}


def reference(path: Path) -> list[list[int]]:
    """Expansion off at the same budget (checked against HF once); it must preempt, or the budget is too big."""
    if str(path) not in _off:
        engine = make_engine(path)
        out = run(engine)
        assert engine.scheduler.num_preemptions_total > 0
        assert out == hf_greedy(path)
        _off[str(path)] = (out, engine.scheduler.num_preemptions_total)
    return _off[str(path)][0]


@pytest.mark.parametrize("case", list(STATIC))
@pytest.mark.parametrize("arch", ARCHS)
def test_static_expansion_is_exact(tiny_model, arch: str, case: str) -> None:
    path = tiny_model(arch, layers=LAYERS)
    ref = reference(path)
    overrides, m, k = STATIC[case]
    engine = make_engine(path, **overrides)
    kv = engine.runner.kv_cache
    assert isinstance(kv, LayerSwapKVCache) and kv.layers_on_host == m and kv.schedule.num_staging == k
    assert engine.block_manager.num_blocks == kv.num_blocks == LAYERS * C0 // (LAYERS - m)
    out = run(engine)
    assert out == ref
    stats = kv.stats()
    assert stats.swap_in_bytes_total > 0 and stats.swap_out_bytes_total > 0  # KV really went through the host
    # More KV capacity: fewer preemptions than expansion off at the same device budget.
    assert engine.scheduler.num_preemptions_total < _off[str(path)][1]


@pytest.mark.parametrize("arch", ARCHS)
def test_adaptive_expansion_is_exact(tiny_model, arch: str) -> None:
    path = tiny_model(arch, layers=LAYERS)
    ref = reference(path)
    engine = make_engine(path, expansion="adaptive", expansion_window=2, expansion_cooldown=1)
    ctrl = engine.kv_runtime.controller
    assert ctrl is not None
    # Timing on a shared CPU is noise at this size: thresholds this loose let the controller grow under demand
    # whatever the load, so the run really reconfigures while it generates. How many grows it takes, and when,
    # depend on the timing: the test asserts only that the KV moved to the host mid-run and the output is exact.
    ctrl.config = dataclasses.replace(ctrl.config, epsilon=100.0, grow_overhead=50.0, grow_stall_fraction=1.0)
    seen: list[int] = []
    out = run(engine, on_step=lambda e, i: seen.append(e.runner.kv_cache.layers_on_host))
    assert out == ref
    assert seen[0] == 0 and max(seen) > 0, seen  # started unexpanded, expanded with requests in flight
    assert engine.runner.kv_cache.stats().swap_in_bytes_total > 0


@pytest.mark.parametrize("expansion", ["off", "6.0", "adaptive"])
@pytest.mark.parametrize("arch", ARCHS)
def test_live_budget_shrink_and_grow_is_exact(tiny_model, arch: str, expansion: str) -> None:
    """The admin path: the device KV budget shrinks mid-generation (preempting), then grows back."""
    path = tiny_model(arch, layers=LAYERS)
    ref = reference(path)
    block_bytes = make_engine(path, num_device_blocks=1).runner.kv_cache.block_bytes * LAYERS
    # off: 100 -> 27 blocks (the longest request needs 26); 6.0 (m = 5): C = 6 * C0: 60 -> 30 blocks. Adaptive
    # starts at m = 0 and grows as timing allows: C0 40 -> 27 holds the longest request whatever m is then.
    start, small = {"off": (100, 27), "6.0": (10, 5), "adaptive": (40, 27)}[expansion]
    engine = make_engine(path, num_device_blocks=start, expansion=expansion)
    applied = []

    def on_step(e: LLMEngine, i: int) -> None:
        if i == 12:
            applied.append(e.kv_runtime.set_device_kv_budget(small * block_bytes))
        elif i == 60:
            applied.append(e.kv_runtime.set_device_kv_budget(start * block_bytes))

    out = run(engine, on_step)
    assert out == ref
    assert len(applied) == 2 and (applied[0]["preempted"] > 0 or expansion == "adaptive"), applied
    assert engine.block_manager.num_blocks == engine.runner.kv_cache.num_blocks
    if expansion != "adaptive":  # the controller may move m after the budget change
        assert applied[1]["num_device_blocks"] == engine.block_manager.num_blocks
    assert engine.kv_runtime.device_kv_budget_bytes == start * block_bytes


def test_a_request_beyond_the_unexpanded_capacity_is_served_exactly(tiny_model) -> None:
    """The longest request needs 26 blocks per layer and the device budget holds 20 without swapping. Adaptive
    expansion accepts it (C(2) = 6 * 20 / 4 = 30) and grows before the scheduler could end it early; the outputs
    still equal expansion off with room for all. Expansion off, or a host limit that allows only m = 1
    (C(1) = 24), rejects it up front with the capacity in the message."""
    path = tiny_model("llama", layers=LAYERS)
    ref = reference(path)
    engine = make_engine(path, num_device_blocks=20, expansion="adaptive")
    seen: list[int] = []
    out = run(engine, on_step=lambda e, i: seen.append(e.runner.kv_cache.layers_on_host))
    assert out == ref
    assert seen[0] >= 2, seen  # grown before the first step
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    longest = prompts()[PROMPT_LENS.index(40)]
    block_bytes = engine.runner.kv_cache.block_bytes
    for cfg, reach in (({"expansion": "off"}, 20),
                       ({"expansion": "adaptive", "host_memory_limit": str(3 * 24 * block_bytes)}, 24)):
        other = make_engine(path, num_device_blocks=20, **cfg)
        with pytest.raises(ValueError, match=f"needs 26 KV blocks .* holds at most {reach}"):
            other.add_request(None, longest, params)
        assert not other.has_unfinished_requests()  # nothing was queued
        other.kv_runtime.close()
