"""How far adaptive expansion grows m (pure, no torch): the smallest m whose capacity holds a KV demand, where a
grow under demand goes, and whether the latency and the measured link leave room to grow at all.

The controller (controller.py) decides *whether* to grow; these functions say *to which m*, from explicit
arguments: the geometry, the current m, the host limit, the back-off ceiling, the window's peak KV demand and mean
compute, and the link as measured (link_meter.py).
"""

from __future__ import annotations

import math

from pie_engine.pie.controller_config import ControllerConfig
from pie_engine.pie.geometry import SwapGeometry
from pie_engine.pie.link_meter import LinkMeter


def layers_for_blocks(geometry: SwapGeometry, max_layers_on_host: int, blocks: int) -> int | None:
    """The smallest m in [0, ``max_layers_on_host``] whose capacity holds ``blocks`` per layer; None if none does."""
    return next((m for m in range(max_layers_on_host + 1) if geometry.capacity_blocks(m) >= blocks), None)


def grow_target(geometry: SwapGeometry, m: int, max_layers_on_host: int, ceiling: int, wanted: int,
                compute_seconds: float, speed_measured: bool, link: LinkMeter, grow_headroom: float) -> int:
    """m + 1, or the smallest m that holds ``grow_headroom`` times the window's peak KV demand (``wanted``) when that
    demand is beyond the current capacity (never at or above ``ceiling``, never beyond the host limit, never beyond
    what the measured link moves within a step of ``compute_seconds``: ``LinkMeter.cap``). Where the speed
    at m is measured (``speed_measured``) the grow is a probe and climbs at most to twice the capacity: copies grow
    with m, so the speed has a peak below the m that holds everything, and a hill-climb in doublings finds it in few
    probes."""
    g, top = geometry, max_layers_on_host
    target = m + 1
    if wanted > g.capacity_blocks(m):
        need = layers_for_blocks(g, top, math.ceil(grow_headroom * wanted))
        target = max(target, top if need is None else need)
        if speed_measured:
            double = layers_for_blocks(g, top, 2 * g.capacity_blocks(m))
            target = min(target, max(m + 1, top if double is None else double))
        target = max(m + 1, link.cap(g, m, target, wanted, compute_seconds))  # one layer: measured
    return min(target, top, ceiling - 1)


def latency_allows_growth(config: ControllerConfig, overhead: float, mean_iteration_seconds: float) -> bool:
    """Grow only with room below the latency bound: ``overhead`` below ``grow_overhead``, or with an explicit target
    iterations (``mean_iteration_seconds``) below ``grow_overhead / epsilon`` of it."""
    cfg = config
    if cfg.latency_target is not None:
        return mean_iteration_seconds < cfg.latency_target * cfg.grow_overhead / cfg.epsilon
    return overhead < cfg.grow_overhead


def link_allows_growth(geometry: SwapGeometry, m: int, link: LinkMeter, wanted: int, compute_seconds: float) -> bool:
    """m + 1's swap-ins fit the window's compute on the measured link (always, while it is unmeasured).
    NOTE: also for a one-layer grow once the link is measured: on served tiny at a PCIe-like throttle, a check
    that hid while admission work lengthened the first steps was followed, after its jump was undone, by m = 1
    retried and stalling 11-15% twice (run 6)."""
    if m + 1 >= geometry.num_layers:
        return True  # no m + 1 at all: the host limit's rule says so, not the link
    return link.fits(geometry, m + 1, wanted, compute_seconds)
