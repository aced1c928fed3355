"""guards: the constraints that shrink m, and the idle shrink (table tests)."""

from __future__ import annotations

import pytest

from pie_engine.pie.controller_config import ControllerConfig, IterationSample
from pie_engine.pie.evidence import Evidence, Terms
from pie_engine.pie.geometry import SwapGeometry
from pie_engine.pie.guards import guard, idle_shrink

GEO = SwapGeometry(num_layers=8, pool_blocks=800, num_staging=2, layer_block_bytes=1000)  # C(1) = 114


def terms(stall: float, excess: float | None = None) -> Terms:
    return {"stall": stall, "excess": excess, "baseline": None}


@pytest.mark.parametrize("latency_target, overhead, overheads, need, want", [
    (None, 0.0, terms(0.0), None, None),
    (None, 0.03, terms(0.03), None, None),  # within epsilon
    (None, 0.2, terms(0.2), None, ("back_off", "stall 0.200 > epsilon 0.05 (clear)")),
    (None, 0.2, terms(0.0, 0.2), "more KV", ("hold", "hold: overhead 0.200 buys KV capacity (more KV); speed "
                                                     "decides")),
    (None, 0.2, terms(0.0, 0.2), None, ("back_off", "overhead 0.200 > epsilon 0.05 (stall 0.000, excess 0.200; "
                                                    "clear; speeds)")),
    (None, 0.5, terms(0.0, 0.5), "more KV", ("back_off", "overhead 0.500 > epsilon 0.05 (stall 0.000, excess "
                                                         "0.500; clear; speeds)")),  # above gross_factor x epsilon
    (0.05, 0.5, terms(0.0, 0.5), None, None),  # a latency target replaces the epsilon rule (iterations of 10 ms)
    (0.004, 0.0, terms(0.0), None, ("back_off", "iteration 10.0 ms > target 4.0 ms (clear)")),
])
def test_guard(latency_target: float | None, overhead: float, overheads: Terms, need: str | None,
               want: tuple[str, str] | None) -> None:
    cfg = ControllerConfig(latency_target=latency_target)
    evidence = Evidence(cfg)
    for _ in range(cfg.window):
        evidence.add(IterationSample(0.01, 0.0, 100), 2, True)
    v = guard(evidence, 2, overhead, overheads, cfg, lambda: need, lambda: "speeds")
    assert (v if v is None else (v.kind, v.reason)) == want


@pytest.mark.parametrize("idle, m, enabled, want", [
    ([(50, False)] * 3, 2, True, True),  # below half of C(1) = 114 on every iteration
    ([(50, False)] * 3, 2, False, False),  # idle shrink off
    ([(50, False)] * 3, 0, True, False),  # nothing on host
    ([(50, False)] * 2, 2, True, False),  # the idle window is not full
    ([(50, False), (50, True), (50, False)], 2, True, False),  # demand
    ([(50, False), (57, False), (50, False)], 2, True, False),  # 57 blocks would fill C(1) past half
])
def test_idle_shrink(idle: list[tuple[int, bool]], m: int, enabled: bool, want: bool) -> None:
    cfg = ControllerConfig(idle_window=3, idle_fraction=0.5, idle_shrink=enabled)
    assert idle_shrink(idle, m, GEO, cfg) is want
