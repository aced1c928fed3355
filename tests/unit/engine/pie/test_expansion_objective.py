"""The expansion controller's objective (pie/probe.py): measured speed under a closed-loop load, probes and their
cost. A simulated engine: R requests in the system, each wanting ``per_request`` blocks per layer; the batch is what
the capacity at m holds; an iteration costs ``base(batch) * (1 + overhead(m))``."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from pie_engine.pie.controller import ExpansionController
from pie_engine.pie.controller_config import ControllerConfig, IterationSample
from pie_engine.pie.geometry import SwapGeometry
from pie_engine.pie.probe import Ceiling, Estimate, SpeedTable, better, shrink_pays

N = 8
GEO = SwapGeometry(num_layers=N, pool_blocks=N * 100, num_staging=2, layer_block_bytes=1000)  # C: 100 .. 800


def closed_loop(ctrl: ExpansionController, iters: int, overhead: Callable[[int], float], *, requests: int = 24,
                per_request: int = 20, stall_share: float = 0.0, excess_share: float | None = 1.0,
                per_seq: float = 0.001, fixed: float = 0.01, noise: float = 0.02, seed: int = 0) -> list[int]:
    """Run ``iters`` iterations; returns m after each. Python overhead (``fixed``) makes a bigger batch faster per
    token, so capacity buys speed until the swap overhead eats it. ``excess_share``: how much of the overhead the
    in-step measurement sees (None: nothing)."""
    rng = random.Random(seed)
    hist = []
    for _ in range(iters):
        cap = GEO.capacity_blocks(ctrl.m)
        batch = max(1, min(requests, cap // per_request))
        base = (fixed + per_seq * batch) * (1 + rng.uniform(-noise, noise))
        extra = base * overhead(ctrl.m)
        excess = None if excess_share is None or ctrl.m == 0 else extra * excess_share
        ctrl.update(IterationSample(base + extra, extra * stall_share, batch,
                                    blocks_in_use=min(cap, batch * per_request),
                                    blocks_wanted=requests * per_request, excess_seconds=excess,
                                    num_output_tokens=batch, num_requests=requests))
        hist.append(ctrl.m)
    return hist


def steps_of(history: list[int]) -> list[int]:
    return [m for i, m in enumerate(history) if i == 0 or m != history[i - 1]]


def test_overhead_above_epsilon_is_kept_where_measured_speed_pays_for_it() -> None:
    """The issue's failure: a steady 8% in-step overhead at every m > 0 made the old controller shrink, preempting
    every time, although the larger batch was far faster. Measured speed now outweighs it."""
    ctrl = ExpansionController(GEO)
    hist = closed_loop(ctrl, 600, lambda m: 0.0 if m == 0 else 0.08)
    assert ctrl.num_shrinks == 0 and ctrl.m >= 4, steps_of(hist)
    assert "buys KV capacity" in ctrl.last_decision
    assert ctrl.overhead > ctrl.config.epsilon  # the reading is still there, and still reported


def test_the_same_overhead_without_a_speed_gain_is_shed() -> None:
    """Control: where the capacity buys nothing (every request already fits at m = 0 ... but is reported as demand
    through a full pool), the 8% is not paid for and the controller backs off as before."""
    ctrl = ExpansionController(GEO)
    hist = closed_loop(ctrl, 600, lambda m: 0.0 if m == 0 else 0.08, requests=4, per_request=25)
    assert ctrl.num_shrinks >= 1 and "buys" not in ctrl.last_decision, steps_of(hist)


def test_hill_climb_in_capacity_doublings_stops_at_the_fastest_m() -> None:
    """Speed rises with the batch up to m = 6 and falls at m = 7 (copies there cost 60%): after the link check at
    m = 1 the grows are probes in doublings of capacity (0 -> 4 -> 6 -> 7), and the last one is undone."""
    ctrl = ExpansionController(GEO)
    hist = closed_loop(ctrl, 800, lambda m: 0.6 if m == 7 else 0.0, requests=40, excess_share=None)
    assert steps_of(hist)[:6] == [0, 1, 4, 6, 7, 6], ctrl.last_decision
    assert ctrl.transparent_limit == 6
    # m = 7 is tried again only after the ceiling's ttl, doubled after each back-off: 500, then 1000 iterations
    assert steps_of(hist).count(7) <= 2 and hist[-1] in (6, 7)


def test_a_probe_that_would_not_pay_to_undo_is_kept() -> None:
    """The same slower top m, but undoing it would preempt far more work than the speed gained back pays for."""
    ctrl = ExpansionController(GEO, config=ControllerConfig(payback_seconds=1.0),
                               recompute_tokens=lambda m: 10**7)
    hist = closed_loop(ctrl, 800, lambda m: 0.6 if m == 7 else 0.0, requests=40, excess_share=None)
    assert steps_of(hist) == [0, 1, 4, 6, 7] and ctrl.num_shrinks == 0
    assert "would not pay" in ctrl.last_decision or ctrl.last_decision == "hold"


@pytest.mark.parametrize("relayout_seconds", [0.0, 30.0])
def test_the_time_to_re_lay_out_the_kv_counts_against_undoing_a_probe(relayout_seconds: float) -> None:
    """A slower top m with nothing to recompute: undone while re-laying the KV out is quick, kept once the engine
    measured re-layouts slower than what going back would gain over the payback horizon."""
    ctrl = ExpansionController(GEO, config=ControllerConfig(payback_seconds=10.0))
    ctrl.note_reconfigure(relayout_seconds)
    hist = closed_loop(ctrl, 800, lambda m: 0.6 if m == 7 else 0.0, requests=40, excess_share=None)
    assert 7 in hist
    if relayout_seconds:
        assert ctrl.num_shrinks == 0 and hist[-1] == 7, ctrl.changes
    else:
        assert ctrl.num_shrinks >= 1 and "probe" in ctrl.changes[-1][2], ctrl.changes


def test_stalls_send_a_jump_back_where_it_came_from_and_probes_become_rare() -> None:
    """Copies that cannot hide (a throttled link): every m > 0 stalls. A stalling grow returns to its origin in one
    step (one preemption, not one per layer) after the change's own iteration and two stalled ones, cooldown or not;
    nothing above the origin is tried for 4x the ceiling's ttl, then 8x."""
    ctrl = ExpansionController(GEO)
    hist = closed_loop(ctrl, 4000, lambda m: 0.0 if m == 0 else 0.5, stall_share=1.0)
    steps = steps_of(hist)
    assert all(b == 0 for a, b in zip(steps, steps[1:], strict=False) if b < a)  # every back-off goes to 0
    cfg = ctrl.config
    grows = [m for m in steps if m > 0]
    assert sum(1 for m in hist if m > 0) == len(grows) * (1 + cfg.probe_stall_iterations), steps
    assert len(grows) == 2 and "grow stalls" in ctrl.changes[-1][2]  # at ~20 and ~2020; the next at ~6020
    assert max(hist) == 1  # the one-layer link check caught it: the jump to the m the KV wanted was never made
    assert ctrl.state()["ceiling"] == 1


def test_a_slower_jump_is_halved_next_time() -> None:
    """A jump that is slower without stalling (overhead the speed measures) is undone, and the next probe goes at
    most to the midpoint of the range it spanned."""
    ctrl = ExpansionController(GEO)
    hist = closed_loop(ctrl, 900, lambda m: 0.0 if m == 0 else 1.5, excess_share=None, requests=8)
    grows = [m for m in steps_of(hist) if m > 0]
    assert grows[:4] == [1, 4, 2, 1] and ctrl.changes[2][2].startswith("probe: speed"), ctrl.changes


def test_an_explicit_latency_target_bounds_the_batch() -> None:
    """A target of 30 ms per output token: the batch m = 6 allows (20 sequences, 31.5 ms with the 5% overhead) is
    over it, m = 5's (13 sequences, 24 ms) within it. The controller settles at 5 (it grows only well below the
    target, and backs off above it); without a target it goes on."""
    def itl(m: int) -> float:
        return (0.01 + 0.001 * min(24, GEO.capacity_blocks(m) // 20)) * 1.05

    ctrl = ExpansionController(GEO, config=ControllerConfig(latency_target=0.03))
    closed_loop(ctrl, 800, lambda m: 0.05, excess_share=None, noise=0.0)
    assert itl(ctrl.m) <= 0.03 < itl(ctrl.m + 1), ctrl.last_decision
    free = ExpansionController(GEO)
    closed_loop(free, 800, lambda m: 0.05, excess_share=None, noise=0.0)
    assert free.m > ctrl.m


def test_speed_table_batches_consecutive_iterations_at_one_m_and_compares_like_loads() -> None:
    t = SpeedTable(batch=2, ttl=100)
    t.add(0, 1, 10, 1.0, 5)
    t.add(0, 2, 10, 1.0, 0)  # nobody in the system: the partial batch is dropped
    t.add(0, 3, 10, 1.0, 5)
    t.add(1, 4, 20, 1.0, 4)  # another m: the partial batch is dropped, this one starts the next
    assert t.estimate(0, 4) is None and t.estimate(1, 4) is None
    for it in range(5, 8):
        t.add(1, it, 20, 1.0, 4)
    est = t.estimate(1, 8)
    assert est is not None and est.n == 2 and est.mean == pytest.approx(5.0) and est.se == 0.0
    assert t.estimate(1, 8 + 100) is None  # forgotten after ttl
    assert t.estimate(1, 8, since=8) is None  # only batches closed after a given iteration
    assert t.best_below(2, 8) == (1, est) and t.best_below(1, 8) is None
    assert t.estimate(1, 8, at=(4.9, None)) == est and t.estimate(1, 8, at=(6.0, None)) is None  # 6 vs 4: unlike
    # Context per sampled token tells a young server (short contexts) from a steady one at the same request count.
    young = SpeedTable(batch=1, ttl=100)
    young.add(0, 1, 10, 1.0, 5, 500)
    young.add(0, 2, 10, 1.0, 5, 500)  # 50 tokens of context per sampled token
    assert young.estimate(0, 2, at=(5.0, 55.0)) is not None and young.estimate(0, 2, at=(5.0, 120.0)) is None


def test_better_needs_margin_and_confidence() -> None:
    a, b = Estimate(1.2, 0.01, 4), Estimate(1.0, 0.01, 4)
    assert better(a, b, margin=0.05, z=2.0)
    assert not better(a, b, margin=0.25, z=2.0)  # not by 25%
    assert not better(Estimate(1.2, 0.1, 4), b, margin=0.05, z=2.0)  # too noisy to tell


def test_shrink_pays_counts_the_recomputation() -> None:
    # 10 tok/s gained for 60 s = 600 tokens; 1000 tokens recomputed at 1 ms cost 1 s of 100 tok/s = 100 tokens.
    assert shrink_pays(100.0, 90.0, 60.0, 1000, 0.001)
    assert not shrink_pays(100.0, 90.0, 60.0, 10_000, 0.001)  # 1000 tokens lost > 600 gained
    assert not shrink_pays(100.0, 100.0, 60.0, 0, 0.001)  # nothing to gain
    assert not shrink_pays(100.0, 90.0, 60.0, 0, 0.001, reconfigure_seconds=7.0)  # 700 tokens not made > 600


def test_ceiling_ttl_doubles_with_repeated_back_offs_and_resets_when_a_probe_is_kept() -> None:
    c = Ceiling(ttl=10, max_backoff=4)
    assert c.limit(0, 8) == 8  # nothing forbidden
    c.back_off(5, iteration=0, strong=False)
    assert c.limit(9, 8) == 5 and c.limit(10, 8) == 8  # one ttl
    c.back_off(5, iteration=10, strong=False)
    assert c.limit(29, 8) == 5 and c.limit(30, 8) == 8  # the second back-off in a row: two ttl
    c.kept()
    c.back_off(3, iteration=30, strong=True)  # a grow that stalled outright starts at four ttl
    assert c.limit(69, 8) == 3 and c.limit(70, 8) == 8
    for _ in range(10):
        c.back_off(3, iteration=100, strong=False)
    assert c.limit(100 + 10 * 2**3 - 1, 8) == 3 and c.limit(100 + 10 * 2**3, 8) == 8  # capped at max_backoff


def test_config_rejects_bad_objective_settings() -> None:
    for bad in ({"latency_target": 0.0}, {"probe_batches": 1}, {"speed_batch": 0}, {"payback_seconds": -1.0}):
        with pytest.raises(ValueError):
            ControllerConfig(**bad)  # type: ignore[arg-type]
