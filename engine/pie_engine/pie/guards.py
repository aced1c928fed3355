"""When adaptive expansion shrinks m by itself (pure, no torch): the guards, each confirmed on the evidence
(evidence.py), and the idle shrink.

Guards: stalls above epsilon always shrink (transparency); an explicit latency target bounds the iteration time;
otherwise a per-iteration overhead above epsilon is shed, unless it buys KV capacity the load needs and no smaller m
was measurably faster (speed_judge.capacity_need). The controller (controller.py) carries out what they decide.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pie_engine.pie.controller_config import ControllerConfig
from pie_engine.pie.evidence import Evidence, Terms, max_term, mean_iteration
from pie_engine.pie.geometry import SwapGeometry


@dataclass(frozen=True)
class GuardVerdict:
    """``back_off``: a constraint is broken, shrink; ``hold``: the overhead buys capacity, m stays and speed decides
    (``reason`` is what a hold then says)."""

    kind: str  # back_off | hold
    reason: str


def guard(evidence: Evidence, m: int, overhead: float, overheads: Terms, config: ControllerConfig,
          capacity_need: Callable[[], str | None], speed_summary: Callable[[], str]) -> GuardVerdict | None:
    """Back off where a constraint is broken (confirmed) at ``m`` > 0: stalls above epsilon (swapping is no longer
    transparent), the explicit latency target, or else the ``overhead`` above epsilon unless measured speed pays
    for it (``capacity_need()``: why it is worth keeping, or None). ``speed_summary()`` is what an overhead
    back-off logs. None: hold or go on."""
    cfg = config
    stall = overheads["stall"] or 0.0
    stall_term: Callable[[Terms], float] = lambda o: o["stall"] or 0.0  # noqa: E731
    if stall > cfg.epsilon and (why := evidence.confirm(stall_term, stall, cfg.epsilon, m)):
        return GuardVerdict("back_off", f"stall {stall:.3f} > epsilon {cfg.epsilon} ({why})")
    if cfg.latency_target is not None:
        itl = mean_iteration(evidence.last())
        if itl > cfg.latency_target and (why := evidence.confirm_latency(itl, cfg.latency_target)):
            return GuardVerdict("back_off", f"iteration {itl * 1e3:.1f} ms > target "
                                f"{cfg.latency_target * 1e3:.1f} ms ({why})")
        return None
    if overhead > cfg.epsilon and (why := evidence.confirm(max_term, overhead, cfg.epsilon, m)):
        if overhead <= cfg.gross_factor * cfg.epsilon and (need := capacity_need()) is not None:
            return GuardVerdict("hold", f"hold: overhead {overhead:.3f} buys KV capacity ({need}); speed decides")
        terms = ", ".join(f"{k} {v:.3f}" for k, v in overheads.items() if v is not None)
        return GuardVerdict("back_off", f"overhead {overhead:.3f} > epsilon {cfg.epsilon} ({terms}; {why}; "
                            f"{speed_summary()})")
    return None


def idle_shrink(idle: Sequence[tuple[int, bool]], m: int, geometry: SwapGeometry, config: ControllerConfig) -> bool:
    """Shrink by one layer, idle: a full ``idle_window`` of iterations (``idle``: KV blocks wanted, demand) without
    demand, none wanting ``idle_fraction`` of the capacity at m - 1."""
    cfg = config
    if not cfg.idle_shrink or m <= 0 or len(idle) != cfg.idle_window or any(d for _, d in idle):
        return False
    # NOTE: every block in use lies below idle_fraction * C(m - 1): this shrink preempts nothing.
    return max(w for w, _ in idle) < cfg.idle_fraction * geometry.capacity_blocks(m - 1)
