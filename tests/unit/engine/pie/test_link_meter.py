"""LinkMeter: the link as the controller measures it, and what an m's swap-ins cost per step against it."""

from __future__ import annotations

import pytest

from pie_engine.pie.controller_config import IterationSample
from pie_engine.pie.geometry import SwapGeometry
from pie_engine.pie.link_meter import LinkMeter

GEO = SwapGeometry(num_layers=8, pool_blocks=800, num_staging=2, layer_block_bytes=1000)


def sample(copy_seconds: float, copy_bytes: int, compute: float = 0.02) -> IterationSample:
    return IterationSample(compute, 0.0, 100, copy_seconds=copy_seconds, copy_bytes=copy_bytes)


@pytest.mark.parametrize("pattern", [(1_000_000, 100_000), (1_000_000, 0, 400_000), (300_000,)])
def test_steps_whose_seconds_and_bytes_belong_to_different_copies_read_the_true_link(pattern: tuple[int, ...]) -> None:
    """A step's seconds are the copies it resolved, its bytes the ones it issued (the next step resolves them). With
    batches that vary from step to step, each step's own ratio is far off (0.1-10x); the meter reads the link within
    10% (a decayed ratio read 0.4x or 5x)."""
    link, meter, previous = 3e-8, LinkMeter(0.8), 0
    for i in range(200):
        issued = pattern[i % len(pattern)]
        meter.observe(sample(link * previous, issued))
        previous = issued
    assert meter.seconds_per_byte == pytest.approx(link, rel=0.1)


def test_the_running_reading_starts_from_the_check() -> None:
    meter = LinkMeter(0.8)
    for _ in range(4):
        meter.add_to_check(sample(0.01, 1_000_000, compute=0.03))
    assert meter.settle_check() == pytest.approx(0.03)
    assert meter.seconds_per_byte == pytest.approx(1e-8)
    meter.observe(sample(0.0, 1_000_000))  # a step that resolved nothing yet: the check still weighs in
    assert 0.5e-8 < meter.seconds_per_byte < 1e-8


def test_an_m_fits_within_the_margin_of_a_step() -> None:
    """m = 1 swaps in 3 layers (m + 2 staging) of min(C(1) = 114, wanted) blocks of 1000 bytes."""
    meter = LinkMeter(0.8)
    assert meter.fits(GEO, 3, 10**6, 1e-9) and meter.cap(GEO, 0, 4, 150, 1e-9) == 4  # unmeasured: no limit
    meter.seconds_per_byte = 5e-8
    assert meter.copy_seconds(GEO, 1, 150) == pytest.approx(3 * 114 * 1000 * 5e-8)  # 17.1 ms
    assert not meter.fits(GEO, 1, 150, 0.020)  # within the 20 ms step, not within 0.8 of it
    assert meter.fits(GEO, 1, 100, 0.020)  # 100 blocks wanted: 15 ms
    assert meter.cap(GEO, 0, 4, 150, 0.020) == 0 and meter.cap(GEO, 0, 4, 150, 0.030) == 1
