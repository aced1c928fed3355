"""speed_judge: a probe's verdict, and whether an overhead buys KV capacity worth keeping (table tests)."""

from __future__ import annotations

import pytest

from pie_engine.pie.controller_config import ControllerConfig
from pie_engine.pie.probe import Probe, SpeedTable
from pie_engine.pie.speed_judge import capacity_need, judge_probe

CFG = ControllerConfig()  # probe_batches 4; a probe unmeasured after 4 + 4 * 4 * 4 = 68 iterations is let be
PROBE = Probe(origin=0, target=2, started=10)


def table(speeds: dict[int, list[tuple[int, float]]]) -> SpeedTable:
    """Batches of one iteration each: m -> [(iteration, speed)] (one request in the system, one second)."""
    t = SpeedTable(batch=1, ttl=1000)
    for m, batches in speeds.items():
        for it, speed in batches:
            t.add(m, it, round(speed), 1.0, 1)
    return t


def here(speed: float) -> list[tuple[int, float]]:
    return [(PROBE.started + 1 + i, speed) for i in range(4)]


@pytest.mark.parametrize("speeds, now, tokens, kind, reason", [
    ({}, 20, 0, "wait", ""),
    ({2: here(10)[:3]}, 20, 0, "wait", ""),  # 3 batches: not yet
    ({}, 79, 0, "end", "probe of m = 2 kept: no demand to measure it by"),
    ({2: here(10)}, 20, 0, "keep", "probe of m = 2 kept"),  # nothing to compare with
    ({0: [(1, 8), (2, 8)], 2: here(10)}, 20, 0, "keep", "probe of m = 2 kept: speed 1.25x that of m = 0"),
    ({0: [(1, 12), (2, 12)], 2: here(10)}, 20, 0, "back_off", "probe: speed 0.83x that of m = 0"),
    ({0: [(1, 12), (2, 12)], 2: here(10)}, 20, 10**6, "end",
     "probe of m = 2 slower, but undoing it would not pay (1000000 tokens, 0 ms to re-lay out)"),
])
def test_judge_probe(speeds: dict[int, list[tuple[int, float]]], now: int, tokens: int, kind: str,
                     reason: str) -> None:
    v = judge_probe(PROBE, 2, table(speeds), now, None, CFG, lambda m: tokens, 0.001, 0.0)
    assert (v.kind, v.reason) == (kind, reason)


@pytest.mark.parametrize("wanted, speeds, want", [
    (114, {2: [(1, 10), (2, 10)]}, None),  # fits at m = 1: shed it
    (150, {}, None),  # the speed here is unmeasured
    (150, {2: [(1, 10), (2, 10)]}, "150 blocks wanted > 114 at m = 1"),
    (150, {1: [(i, 20) for i in range(1, 5)], 2: [(5, 10), (6, 10)]}, None),  # m = 1 was faster
    (150, {1: [(1, 20), (2, 20)], 2: [(5, 10), (6, 10)]}, "150 blocks wanted > 114 at m = 1"),  # too few batches
])
def test_capacity_need(wanted: int, speeds: dict[int, list[tuple[int, float]]], want: str | None) -> None:
    assert capacity_need(2, wanted, 114, table(speeds), 10, None, CFG) == want
