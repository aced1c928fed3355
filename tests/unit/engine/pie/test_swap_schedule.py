"""swap_schedule: layer spread, slot rotation (continuous across steps), the paper's full rotation, capacity math."""

from __future__ import annotations

import pytest

from pie_engine.pie.geometry import SwapGeometry, spread_layers


@pytest.mark.parametrize("n", [1, 2, 5, 8, 12, 32])
def test_spread_layers_is_even_and_distinct(n: int) -> None:
    for count in range(n + 1):
        layers = spread_layers(n, count)
        assert len(set(layers)) == count and all(0 <= x < n for x in layers) and list(layers) == sorted(layers)
        if count >= 2:
            gaps = [layers[i + 1] - layers[i] for i in range(count - 1)] + [layers[0] + n - layers[-1]]  # incl. wrap
            assert max(gaps) - min(gaps) <= 1
    assert spread_layers(8, 3) == (1, 4, 6)
    with pytest.raises(ValueError):
        spread_layers(4, 5)


def all_cases():
    for n in (1, 2, 3, 6, 7, 12):
        for k in (1, 2, 3, 5):
            for m in range(n):
                yield n, m, k


def test_partition_and_counts() -> None:
    for n, m, k in all_cases():
        g = SwapGeometry(n, pool_blocks=n * 10, num_staging=k, layer_block_bytes=100)
        s = g.schedule(m)
        assert sorted(s.resident + s.host_backed) == list(range(n))
        k_eff = 0 if m == 0 else min(k, n - m)
        assert s.num_staging == k_eff == g.staging(m)
        assert len(s.host_backed) == (0 if m == 0 else m + k_eff) == g.num_host_backed(m)
        assert len(s.resident) == n - m - k_eff  # R = S - k
        assert s.num_slots == n - m
        assert s.first_swap_ins() == s.host_backed[:k_eff]
        for layer in s.resident:
            assert s.next_swap_in(layer) is None and s.slot(layer, 3) == s.resident.index(layer)


def test_rotation_is_continuous_across_steps() -> None:
    """Use u of a host-backed layer (counted over all steps) lands in staging slot R + u mod k, and the layer
    brought in after each one lands in the slot it frees, also when the rotation wraps into the next step."""
    for n, m, k in all_cases():
        s = SwapGeometry(n, n * 4, k).schedule(m)
        if m == 0:
            assert s.host_backed == () and s.next_phase(0) == 0
            continue
        r, h, phase, u = len(s.resident), len(s.host_backed), 0, 0
        for _ in range(k + 2):  # enough steps to see every phase
            nxt_phase = s.next_phase(phase)
            for j, layer in enumerate(s.host_backed):
                slot = s.slot(layer, phase)
                assert slot == r + u % s.num_staging
                target, wraps = s.next_swap_in(layer)
                assert wraps == (j + s.num_staging >= h)
                assert s.slot(target, nxt_phase if wraps else phase) == slot
                u += 1
            phase = nxt_phase
        assert phase == u % s.num_staging


@pytest.mark.parametrize(("n", "m"), [(8, 3), (7, 2), (6, 5), (12, 4)])
def test_full_rotation_is_the_papers_rule(n: int, m: int) -> None:
    """k = S: every layer is host-backed and after layer l, layer (l + n - m) mod n is brought in."""
    s = SwapGeometry(n, n * 4, num_staging=n - m).schedule(m)
    assert s.resident == () and s.host_backed == tuple(range(n))
    for layer in range(n):
        target, wraps = s.next_swap_in(layer)
        assert target == (layer + n - m) % n and wraps == (layer + n - m >= n)
    # Prefetch distance: the swap-in for layer l is issued right after layer l - (n - m), i.e. n - m - 1 ahead.


def test_geometry_capacity_and_host_bytes() -> None:
    g = SwapGeometry(num_layers=8, pool_blocks=8 * 100, num_staging=2, layer_block_bytes=64)
    assert [g.capacity_blocks(m) for m in (0, 4, 6, 7)] == [100, 200, 400, 800]
    assert g.expansion_ratio(4) == 2.0 and g.expansion_ratio(0) == 1.0
    assert g.host_bytes(0) == 0
    assert g.host_bytes(4) == (4 + 2) * 200 * 64
    assert g.host_bytes(7) == 8 * 800 * 64  # one slot: k clamps to 1, every layer host-backed
    assert g.device_bytes(3) == 5 * 160 * 64 <= 8 * 100 * 64
    hb = [g.host_bytes(m) for m in range(8)]
    assert hb == sorted(hb)
    assert g.max_layers_on_host(None) == 7
    assert g.max_layers_on_host(g.host_bytes(4)) == 4
    assert g.max_layers_on_host(g.host_bytes(4) - 1) == 3
    assert g.max_layers_on_host(0) == 0
    for bad in (-1, 8):
        with pytest.raises(ValueError, match="layers_on_host"):
            g.capacity_blocks(bad)


def test_geometry_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="num_staging"):
        SwapGeometry(4, 40, num_staging=0)
    with pytest.raises(ValueError, match="cannot hold"):
        SwapGeometry(4, 3)
    with pytest.raises(ValueError, match="num_layers"):
        SwapGeometry(0, 3)


@pytest.mark.parametrize(("m", "periods", "want"), [
    # n = 6, k = 2. m = 2: host-backed (0, 2, 3, 5) -> compared over layers 0..4: hb 0, 2, 3 vs resident 1, 4.
    (2, [1.5, 1.0, 1.5, 1.5, 1.0, 9.0], 4 * 0.5),
    (2, [1.0] * 6, 0.0),  # nothing extra: swapping was transparent
    (2, [1.0, 1.2, 1.0, 1.0, 1.2, 1.0], 4 * -0.2),  # noise can be negative; the controller sums a window
    (0, [1.0] * 6, None),  # nothing swapped
    (4, [1.0] * 6, None),  # S = 2 = k: every layer host-backed (full rotation), no resident reference
    (2, [1.0] * 5, None),  # an incomplete step
])
def test_excess_compares_host_backed_with_resident_layers(m: int, periods: list[float], want: float | None) -> None:
    sched = SwapGeometry(6, 60, 2).schedule(m)
    got = sched.excess_seconds(periods)
    assert got == pytest.approx(want) if want is not None else got is None
