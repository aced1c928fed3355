"""grow_plan: where a grow under demand goes, and whether latency and the link leave room to grow (table tests)."""

from __future__ import annotations

import pytest

from pie_engine.pie.controller_config import ControllerConfig
from pie_engine.pie.geometry import SwapGeometry
from pie_engine.pie.grow_plan import grow_target, latency_allows_growth, layers_for_blocks, link_allows_growth
from pie_engine.pie.link_meter import LinkMeter

# capacity per layer C(m) for m = 0..7: 100, 114, 133, 160, 200, 266, 400, 800 blocks
GEO = SwapGeometry(num_layers=8, pool_blocks=800, num_staging=2, layer_block_bytes=1000)


def meter(seconds_per_byte: float | None) -> LinkMeter:
    link = LinkMeter(0.8)
    link.seconds_per_byte = seconds_per_byte
    return link


@pytest.mark.parametrize("top, blocks, want", [
    (7, 100, 0), (7, 101, 1), (7, 160, 3), (7, 161, 4), (7, 800, 7), (7, 801, None), (3, 200, None), (0, 50, 0),
])
def test_layers_for_blocks(top: int, blocks: int, want: int | None) -> None:
    assert layers_for_blocks(GEO, top, blocks) == want


@pytest.mark.parametrize("m, top, ceiling, wanted, measured, seconds_per_byte, want", [
    (0, 7, 8, 100, False, None, 1),  # demand within capacity: one layer
    (0, 7, 8, 150, False, None, 4),  # 1.2 x 150 = 180 blocks: m = 4 holds 200
    (0, 7, 8, 300, False, None, 6),  # 360 blocks: m = 6
    (0, 7, 8, 300, True, None, 4),  # a probe climbs at most to twice the capacity (200 blocks: m = 4)
    (0, 7, 3, 300, False, None, 2),  # never at or above the ceiling
    (0, 5, 8, 700, False, None, 5),  # more than any m holds: the host limit
    (0, 7, 8, 300, False, 1e-8, 4),  # the link moves m = 4's copies within 0.8 of a 20 ms step, not m = 5's
    (0, 7, 8, 300, False, 1e-6, 1),  # a link too slow for any: one layer (it gets measured)
    (2, 7, 8, 300, True, None, 5),  # from m = 2: twice 133 blocks is m = 5
])
def test_grow_target(m: int, top: int, ceiling: int, wanted: int, measured: bool, seconds_per_byte: float | None,
                     want: int) -> None:
    assert grow_target(GEO, m, top, ceiling, wanted, 0.02, measured, meter(seconds_per_byte), 1.2) == want


@pytest.mark.parametrize("latency_target, overhead, mean_iteration, want", [
    (None, 0.03, 1.0, True), (None, 0.04, 0.0, False),
    (0.1, 1.0, 0.07, True), (0.1, 0.0, 0.09, False),  # a target: iterations below 0.04 / 0.05 of it
])
def test_latency_allows_growth(latency_target: float | None, overhead: float, mean_iteration: float,
                               want: bool) -> None:
    cfg = ControllerConfig(latency_target=latency_target)
    assert latency_allows_growth(cfg, overhead, mean_iteration) is want


@pytest.mark.parametrize("m, seconds_per_byte, want", [
    (0, None, True),  # unmeasured: always
    (0, 1e-8, True),  # m = 1's 3.4 ms of copies within 0.8 of 20 ms
    (0, 1e-6, False),
    (7, 1e-6, True),  # no m + 1 at all: not the link's call
])
def test_link_allows_growth(m: int, seconds_per_byte: float | None, want: bool) -> None:
    assert link_allows_growth(GEO, m, meter(seconds_per_byte), 300, 0.02) is want
