"""Judging an m by the speed users see (pure, no torch): the verdict on a probe (a grow under judgement) once its
batches are measured, and whether an overhead above epsilon buys KV capacity worth keeping.

Both read speeds measured at each m (probe.py) and return what the controller should do; the controller
(controller.py) carries it out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pie_engine.pie.controller_config import ControllerConfig
from pie_engine.pie.probe import Conditions, Probe, SpeedTable, better, shrink_pays


@dataclass(frozen=True)
class ProbeVerdict:
    """What a probe's judgement decided. ``wait``: not measured enough yet (nothing changes); ``keep``: kept, faster
    or no slower (a later back-off starts from one ttl again); ``end``: no longer judged, m stays; ``back_off``:
    undo it to the m it came from. ``reason`` says why (the decision's log line)."""

    kind: str  # wait | keep | end | back_off
    reason: str = ""


def judge_probe(probe: Probe, m: int, speeds: SpeedTable, now: int, at: Conditions | None, config: ControllerConfig,
                recompute_tokens: Callable[[int], int], seconds_per_token: float,
                reconfigure_seconds: float) -> ProbeVerdict:
    """After a grow to ``m``: once ``probe_batches`` batches are measured there (since the probe started, at the
    window's conditions ``at``), undo it if the m it came from was faster by more than epsilon (with confidence) and
    going back pays for its recomputation (``recompute_tokens(probe.origin)`` tokens at ``seconds_per_token``, plus
    ``reconfigure_seconds`` to re-lay out)."""
    cfg = config
    here = speeds.estimate(m, now, at, since=probe.started)
    if here is None or here.n < cfg.probe_batches:
        if now - probe.started > cfg.cooldown + 4 * cfg.probe_batches * cfg.speed_batch:
            # the demand to measure it by is gone: nothing says it is worse
            return ProbeVerdict("end", f"probe of m = {m} kept: no demand to measure it by")
        return ProbeVerdict("wait")
    origin = speeds.estimate(probe.origin, now, at)
    if origin is None or not better(origin, here, cfg.epsilon, cfg.probe_z):
        ratio = "" if origin is None else f": speed {here.mean / origin.mean:.2f}x that of m = {probe.origin}"
        return ProbeVerdict("keep", f"probe of m = {m} kept{ratio}")
    tokens = recompute_tokens(probe.origin)
    if not shrink_pays(origin.mean, here.mean, cfg.payback_seconds, tokens, seconds_per_token, reconfigure_seconds):
        return ProbeVerdict("end", f"probe of m = {m} slower, but undoing it would not pay ({tokens} tokens, "
                            f"{reconfigure_seconds * 1e3:.0f} ms to re-lay out)")
    return ProbeVerdict("back_off", f"probe: speed {here.mean / origin.mean:.2f}x that of m = {probe.origin}")


def capacity_need(m: int, wanted: int, smaller: int, speeds: SpeedTable, now: int, at: Conditions | None,
                  config: ControllerConfig) -> str | None:
    """Why an overhead above epsilon at ``m`` is not shed by itself: the KV ``wanted`` over the window does not fit
    at m - 1 (``smaller`` blocks: a shrink would preempt and queue requests), and the speed at this m is measured,
    so probes judge it by what users get. NOTE: the overhead reading compares iterations at the same
    batch; the batch is what expansion buys. Measured through the server on this CPU, m = 4-6 cost 5-12% per
    iteration at the same batch and gave 1.3-1.4x the throughput of m = 0 when KV bound (bench/results/summary.md).
    Not where a smaller m was measurably faster at this load (the window's conditions ``at``), nor above
    ``gross_factor`` x epsilon (the caller's rule). None: shed it."""
    cfg = config
    here = speeds.estimate(m, now)
    if wanted <= smaller or here is None:
        return None
    # NOTE: a reference of a few batches is mostly the transient after the change it followed.
    below = speeds.best_below(m, now, at, min_batches=cfg.probe_batches)
    here_now = speeds.estimate(m, now, at)
    if below is not None and here_now is not None and better(below[1], here_now, cfg.epsilon, cfg.probe_z):
        return None  # a smaller m was measurably faster at this load: the capacity is not worth its overhead
    return f"{wanted} blocks wanted > {smaller} at m = {m - 1}"
