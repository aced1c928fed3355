"""The first iterations after a grow (pure, no torch): undo one whose copies stall at once, and the link check.

A grow whose first ``probe_stall_iterations`` iterations (after the change's own, which migrates KV) all stall
beyond twice the clear level is undone at once, cooldown or not: with copies that cannot hide (a slow link) every
such iteration costs a multiple of one without swapping, and a window of evidence would cost more than the grow
could ever win. Until copies were once seen to hide, a grow is a link check (one layer, stall within epsilon), which
measures the link over ``link_check_iterations`` iterations and then goes on to the jump it stood in for, as far as
the link moves within a step (link_meter.py), or backs off when its own copies would not fit once its capacity fills.
"""

from __future__ import annotations

from dataclasses import dataclass

from pie_engine.pie.controller_config import ControllerConfig, IterationSample
from pie_engine.pie.geometry import SwapGeometry
from pie_engine.pie.link_meter import LinkMeter


@dataclass(frozen=True)
class LinkCheck:
    """A first grow, one layer, standing in for a jump to ``target`` (why, and the KV wanted then)."""

    target: int
    why: str
    wanted: int


@dataclass(frozen=True)
class Verdict:
    """What the watch decided. ``back_off``: undo the grow to ``origin`` (its whole range stays forbidden);
    ``jump``: on to ``m``, a probe judged against ``origin``; ``note``: only say ``reason`` (nothing changes)."""

    kind: str  # back_off | jump | note
    reason: str
    origin: int
    started: int
    m: int = 0


class GrowWatch:
    """Watches the grow last made (``start``) until it hides, is undone, or its link check ends."""

    def __init__(self, config: ControllerConfig, link: LinkMeter) -> None:
        self.config, self.link = config, link
        self.copies_hid = False  # an iteration at some m > 0 after a grow did not stall: the link can keep up
        self.check: LinkCheck | None = None
        self._grown: tuple[int, int, int] | None = None  # (origin, iteration of the grow, stalled iterations since)

    @property
    def active(self) -> bool:
        return self._grown is not None

    def start(self, origin: int, iteration: int, check: LinkCheck | None = None) -> None:
        self._grown, self.check = (origin, iteration, 0), check
        self.link.restart_check()

    def stop(self) -> None:
        self._grown = self.check = None

    def judge(self, s: IterationSample, iteration: int, m: int, geometry: SwapGeometry) -> Verdict | None:
        """After an iteration at ``m``: a verdict, or None (nothing to do; the controller's window goes on)."""
        cfg = self.config
        assert self._grown is not None
        origin, started, stalled = self._grown
        if iteration - started <= 1:
            return None
        # NOTE: a link check must show copies that hide (stall within epsilon): it decides whether expansion is worth
        # trying on this link at all, and a jump after a check that stalled 15% went on stalling (throttled tiny).
        limit = cfg.epsilon if self.check is not None else 2 * cfg.clear_factor * cfg.epsilon
        if s.stall_seconds <= limit * max(s.iteration_seconds - s.stall_seconds, 1e-12):
            if (check := self.check) is None:
                self._grown, self.copies_hid = None, True  # it hides: the window's guards judge it from here
                return None
            self.link.add_to_check(s)  # the link is judged over ``link_check_iterations`` iterations
            if iteration - started <= cfg.link_check_iterations:
                return None
            self.stop()
            self.copies_hid = True
            return self._settle(check, origin, started, m, geometry)
        stalled += 1
        self._grown = (origin, started, stalled)
        if stalled < cfg.probe_stall_iterations:
            return None
        # Nothing above the origin for a while: copies that slow stall at any m the controller would try next.
        self.stop()
        return Verdict("back_off", f"grow stalls: {s.stall_seconds / s.iteration_seconds:.2f} of iteration "
                       f"{stalled} at m = {m}", origin, started)

    def _settle(self, check: LinkCheck, origin: int, started: int, m: int, geometry: SwapGeometry) -> Verdict | None:
        """The link check's iterations hid: back off if its own copies would not fit once its capacity fills (they
        hid on a prefix still filling), else jump as far as the measured link allows."""
        compute = self.link.settle_check()
        if not self.link.fits(geometry, m, check.wanted, compute):
            here = self.link.copy_seconds(geometry, m, check.wanted)
            return Verdict("back_off", f"link check: m = {m}'s copies would take {here * 1e3:.0f} ms, over "
                           f"{self.link.margin:.0%} of a {compute * 1e3:.0f} ms step", origin, started)
        if check.target <= m:
            return None
        if (fits := self.link.cap(geometry, m, check.target, check.wanted, compute)) > m:
            return Verdict("jump", f"{check.why} (copies hid at m = {m})", origin, started, fits)
        return Verdict("note", f"link check: copies hide at m = {m}, but the link would not move m = {m + 1}'s "
                       "within a step", origin, started)
