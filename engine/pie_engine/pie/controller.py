"""Adaptive expansion: how many layers' KV to keep on host (m), decided between iterations (pure, no torch).

The objective is the speed users see (probe.py: output tokens per second per request in the system, measured at
each m). Under demand for KV, m grows (one layer until copies were seen to hide, then at once to the m that holds
the KV wanted, or, where the speed is measured, as a probe of at most twice the capacity), and a probe is judged
against the m it came from: undone only if that m was faster by more than epsilon with confidence and going back
pays for the recomputation it causes (speed_judge.py; where a grow goes: grow_plan.py). Guards (guards.py), each
confirmed on the evidence (evidence.py): stalls above epsilon always shrink (transparency); an explicit latency
target bounds the iteration time; otherwise a per-iteration overhead above epsilon is shed, unless it buys KV
capacity the load needs and no smaller m was measurably faster. Hysteresis: grow only below ``grow_overhead``, a
cooldown after every change, and an m left by a back-off stays forbidden for a ttl that doubles with repeated
back-offs, so the controller settles instead of oscillating. docs/pie.md has the details and the measurements.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from pie_engine.config import parse_expansion
from pie_engine.pie.controller_config import MODES, ControllerConfig, IterationSample, layers_for_ratio
from pie_engine.pie.demand import PeakDemand
from pie_engine.pie.evidence import Entry, Evidence, mean_compute, mean_iteration, peak_wanted, seconds_per_token
from pie_engine.pie.expansion_report import ExpansionReport
from pie_engine.pie.geometry import SwapGeometry
from pie_engine.pie.grow_plan import grow_target, latency_allows_growth, layers_for_blocks, link_allows_growth
from pie_engine.pie.grow_watch import GrowWatch, LinkCheck, Verdict
from pie_engine.pie.guards import guard, idle_shrink
from pie_engine.pie.link_meter import LinkMeter
from pie_engine.pie.probe import Ceiling, Probe, SpeedTable
from pie_engine.pie.speed_judge import capacity_need, judge_probe


class ExpansionController(ExpansionReport):
    """Decides m between iterations. Call ``update(sample)`` after each iteration; apply the m it returns. What it
    reports (``state()``, ``headroom_layers``, the recommendations) is ``ExpansionReport`` (expansion_report.py)."""

    def __init__(self, geometry: SwapGeometry, mode: str = "adaptive", ratio: float | None = None,
                 host_memory_limit: int | None = None, config: ControllerConfig | None = None,
                 recompute_tokens: Callable[[int], int] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "static" and (ratio is None or ratio < 1.0):
            raise ValueError(f"static mode needs a ratio >= 1, got {ratio}")
        self.geometry, self.mode, self.ratio = geometry, mode, ratio
        self.host_memory_limit = host_memory_limit
        self.config = cfg = config or ControllerConfig()
        self.max_layers_on_host = geometry.max_layers_on_host(host_memory_limit)
        self.evidence = Evidence(cfg)
        self.baseline = self.evidence.baseline
        self._idle: deque[tuple[int, bool]] = deque(maxlen=cfg.idle_window)
        self.peak = PeakDemand(cfg.peak_window)  # KV demand, blocks per layer, over the last peak_window iterations
        self._cooldown = 0
        self._iteration = 0
        self.ceiling = Ceiling(cfg.ceiling_ttl, cfg.max_ceiling_backoff)
        self.transparent_limit: int | None = None  # highest m known transparent below an overhead-causing one
        self.overhead = self.stall_fraction = 0.0
        # The last measured window left room to grow (latency, overhead and stall below their grow levels): one
        # attribute the metrics thread reads, written whole by `update`.
        self._room = True
        self.overheads: dict[str, float | None] = {"stall": 0.0, "excess": None, "baseline": None}
        self.num_grows = self.num_shrinks = 0
        self.speeds = SpeedTable(cfg.speed_batch, cfg.speed_ttl)
        # The last 16 changes (iteration, new m, why), for GET /v1/pie/expansion. NOTE: a tuple replaced whole, so a
        # scrape on another thread never iterates a container being changed.
        self.changes: tuple[tuple[int, int, str], ...] = ()
        # Tokens that moving to a given m would preempt and recompute (the runtime asks the scheduler).
        self.recompute_tokens: Callable[[int], int] = recompute_tokens or (lambda m: 0)
        self._probe: Probe | None = None
        self.link = LinkMeter(cfg.link_margin)
        self.watch = GrowWatch(cfg, self.link)  # the last grow's first iterations, and the link check
        self._changed_at = 0  # the iteration m last changed at
        self._hold_reason = "hold"  # what last_decision says when an update changes nothing
        self.last_decision = "start"
        self.m = self._target_static() if mode == "static" else 0
        self._previous_m = 0  # the m before the last change (what reject() returns to)
        self.reconfigure_seconds = 0.0  # the slowest of the last re-layouts (note_reconfigure): part of a change's cost
        self._reconfigures: deque[float] = deque(maxlen=4)

    @classmethod
    def from_setting(cls, expansion: str, geometry: SwapGeometry, host_memory_limit: int | None = None,
                     config: ControllerConfig | None = None,
                     recompute_tokens: Callable[[int], int] | None = None) -> ExpansionController:
        """From the ``--expansion`` flag (off | adaptive | ratio)."""
        mode, ratio = parse_expansion(expansion)
        return cls(geometry, mode, ratio, host_memory_limit, config, recompute_tokens)

    # -------------------------------------------------------------------------------------------- decisions
    def _target_static(self) -> int:
        assert self.ratio is not None
        return min(layers_for_ratio(self.geometry.num_layers, self.ratio), self.max_layers_on_host)

    def update(self, s: IterationSample) -> int:
        """Record one iteration (run at ``self.m``) and return m for the next one."""
        cfg = self.config
        self._iteration += 1
        cap = self.geometry.capacity_blocks(self.m)
        # NOTE: a waiting request is demand only through the KV it wants: requests queued behind max_num_seqs, or
        # ones the next step admits into free blocks, are not (expanding for them only adds swapping's cost).
        demand = s.num_preempted > 0 or s.wanted >= cfg.usage_high * cap
        self.peak.add(self._iteration, s.wanted)
        self._idle.append((s.wanted, demand))
        if self.mode != "adaptive":
            self.m = 0 if self.mode == "off" else self._target_static()
            return self.m
        # NOTE: not from a change's own iteration: it issues the next step's swap-ins but resolves only its own, and
        # read as seconds per byte that halved the link's cost (a jump the link could not carry).
        if self.m > 0 and self._iteration - self._changed_at > 1:
            self.link.observe(s)
        seen = self.watch.judge(s, self._iteration, self.m, self.geometry) if self.watch.active else None
        if seen is not None and (m := self._apply(seen)) is not None:
            return m
        if self._cooldown > 0:
            self._cooldown -= 1
            return self.m
        self.evidence.add(s, self.m, demand)
        self.speeds.add(self.m, self._iteration, s.num_output_tokens, s.iteration_seconds, s.num_requests,
                        s.context_tokens)
        if self.watch.check is not None:
            return self.m  # the link check decides the next move
        if len(self.evidence) < cfg.window:
            return self.m
        window = self.evidence.last()
        self.overhead, self.overheads, self.stall_fraction = Evidence.measure(window, self.m)
        wanted, compute = peak_wanted(window), mean_compute(window)
        link_ok = link_allows_growth(self.geometry, self.m, self.link, wanted, compute)
        self._room = (latency_allows_growth(cfg, self.overhead, mean_iteration(window))
                      and self.stall_fraction < cfg.grow_stall_fraction and link_ok)
        self._hold_reason = "hold" if link_ok else (
            f"hold: the measured link would not move m = {self.m + 1}'s copies within "
            f"{self.link.margin:.0%} of a step")
        if self.m > 0 and (guarded := guard(self.evidence, self.m, self.overhead, self.overheads, cfg,
                                            self._capacity_need, self._speed_summary)) is not None:
            if guarded.kind == "back_off":
                return self._back_off(guarded.reason)
            self._hold_reason = guarded.reason
        if self._probe is not None and (verdict := self._judge_probe(window)) is not None:
            return verdict
        demand_share = sum(d for _, _, d in window) / len(window)
        ceiling = self.ceiling.limit(self._iteration, self.geometry.num_layers)
        # NOTE: leave m = 0 only with a usable baseline whose error is known, or overhead that is not a stall would
        # go unseen.
        baseline_ready = self.m > 0 or self.baseline.error() is not None
        if (baseline_ready and self._room
                and demand_share >= cfg.demand_fraction and self.m + 1 <= self.max_layers_on_host
                and self.m + 1 < ceiling and self._probe is None):
            measured = self.speeds.estimate(self.m, self._iteration, self.evidence.conditions()) is not None
            target = grow_target(self.geometry, self.m, self.max_layers_on_host, ceiling, wanted, compute, measured,
                                 self.link, cfg.grow_headroom)
            return self._grow(target, f"demand with overhead {self.overhead:.3f}", wanted)
        if idle_shrink(self._idle, self.m, self.geometry, cfg):
            return self._change(self.m - 1, "idle: the KV fits with fewer layers on host")
        if self._probe is None:
            self.last_decision = self._hold_reason
        return self.m

    # ------------------------------------------------------------------------------------ guards and probes
    def _speed_summary(self) -> str:
        return self.speeds.summary(self.m, self._iteration, self.evidence.conditions())

    def _apply(self, v: Verdict) -> int | None:
        """Carry out the grow watch's verdict: the m to run at next, or None (go on with this update)."""
        if v.kind == "back_off":
            return self._back_off(v.reason, Probe(v.origin, self.m, v.started), whole=True)
        if v.kind == "jump":
            return self._change(v.m, v.reason, probe_origin=v.origin)
        self.last_decision = v.reason
        return None

    def _grow(self, target: int, reason: str, wanted: int) -> int:
        """Grow to ``target``. Before copies were ever seen to hide, a grow is a link check: one layer first, undone
        at once if it stalls beyond epsilon, else on to ``target`` (as far as the link allows) once its iterations
        measured the link (grow_watch.py).
        NOTE: where the link cannot keep up, m + 1 costs one layer's copies for the few iterations _grow_stalls
        takes to undo it; the jump costs all of its layers', and undoing it preempts everything admitted meanwhile
        (tiny model, PCIe-like throttle: a jump to m = 4 and back served 0.83x the tokens of --expansion off)."""
        if self.watch.copies_hid:
            return self._change(target, reason)
        why = reason if target <= self.m + 1 else f"{reason}; m = {target} once copies hide here"
        origin, m = self.m, self._change(self.m + 1, why)
        self.watch.start(origin, self._iteration, LinkCheck(target, reason, wanted))
        return m

    def _capacity_need(self) -> str | None:
        """Why an overhead above epsilon is not shed by itself (speed_judge.capacity_need); None: shed it."""
        return capacity_need(self.m, peak_wanted(self.evidence.last()), self.geometry.capacity_blocks(self.m - 1),
                             self.speeds, self._iteration, self.evidence.conditions(), self.config)

    def _judge_probe(self, window: list[Entry]) -> int | None:
        """After a grow: carry out the probe's verdict (speed_judge.judge_probe). None: keep."""
        probe = self._probe
        assert probe is not None
        v = judge_probe(probe, self.m, self.speeds, self._iteration, self.evidence.conditions(), self.config,
                        self.recompute_tokens, seconds_per_token(window), self.reconfigure_seconds)
        if v.kind == "wait":
            return None
        self._probe = None
        if v.kind == "back_off":
            return self._back_off(v.reason, probe)
        if v.kind == "keep":
            self.ceiling.kept()
        self.last_decision = v.reason
        return None

    def _back_off(self, reason: str, probe: Probe | None = None, whole: bool = False) -> int:
        """Shrink: to where a probe came from (a jump that went wrong), else by one layer. The m left stays
        forbidden for a while (probe.Ceiling): above the probe's midpoint (a jump halves its range next time), or
        with ``whole`` all of the probe's range."""
        probe = probe or self._probe
        if probe is not None and probe.target == self.m:
            target = probe.origin
            forbidden = probe.origin + 1 if whole else max(probe.origin + 1, (probe.origin + self.m) // 2 + 1)
        else:
            target, forbidden = self.m - 1, self.m
        self.ceiling.back_off(forbidden, self._iteration, strong=whole)
        self.transparent_limit = target
        return self._change(target, reason)

    def required_layers_on_host(self, blocks: int) -> int | None:
        """The smallest m whose capacity holds ``blocks`` per layer (one request running alone), within the host
        limit; None if even the largest allowed m cannot. Off and static modes can only offer their current m."""
        if self.mode != "adaptive":
            return self.m if self.geometry.capacity_blocks(self.m) >= blocks else None
        return layers_for_blocks(self.geometry, self.max_layers_on_host, blocks)

    def require(self, m: int, reason: str) -> int:
        """Adaptive mode: move up to ``m`` now, whatever the overhead: a request that fits nowhere else needs it
        (correctness before latency). No-op when already there or not adaptive. Returns the m to apply."""
        if self.mode == "adaptive" and m > self.m:
            self._change(m, reason)
            self._probe = None  # needed, not tried: neither a verdict nor a stall may undo it
            self.watch.stop()
        return self.m

    def _change(self, m: int, reason: str, probe_origin: int | None = None) -> int:
        """Move to ``m``. A grow is a probe judged against ``probe_origin`` (default: the current m)."""
        if m > self.m:
            self.num_grows += 1
        else:
            self.num_shrinks += 1
        # A grow is a probe when the speed it left is measured (nothing to compare with otherwise).
        origin = self.m if probe_origin is None else probe_origin
        measured = m > self.m and self.speeds.estimate(origin, self._iteration, self.evidence.conditions()) is not None
        self._probe = Probe(origin, m, self._iteration) if measured else None
        if m > self.m:
            self.watch.start(self.m, self._iteration)
        else:
            self.watch.stop()
        self._previous_m, self.m = self.m, m
        self.last_decision = f"m -> {m}: {reason}"
        self.changes = (*self.changes[-15:], (self._iteration, m, reason))
        self._reset_evidence()
        return m

    def _reset_evidence(self) -> None:
        """After a change of m or of the pool: the window restarts and a cooldown skips the transition."""
        self.evidence.clear()
        self._idle.clear()
        self._changed_at = self._iteration
        self.link.restart_check()
        self.speeds.break_batch()
        self._cooldown = self.config.cooldown

    def note_reconfigure(self, seconds: float) -> None:
        """The engine moved its KV to a new m in ``seconds`` (wall, no step ran meanwhile). The cost of undoing a
        probe counts the slowest of the last few: a re-layout's time varies with the KV in use."""
        self._reconfigures.append(seconds)
        self.reconfigure_seconds = max(self._reconfigures)

    def reject(self, m: int) -> int:
        """The engine could not apply ``m`` (e.g. host allocation failed) and stays where it was: a larger m is
        never asked for again. Returns the m the engine keeps using."""
        previous = self._previous_m if self.m == m else self.m
        if m > previous:
            self.max_layers_on_host = min(self.max_layers_on_host, m - 1)
        self.m, self._probe = previous, None
        self.watch.stop()
        self.last_decision = f"m = {m} rejected by the engine"
        return self.m

    def layers_for_geometry(self, geometry: SwapGeometry) -> int:
        """The m to run at after the device pool changes to ``geometry`` (a new device KV budget): the current m
        (static: the configured one), lowered if its host KV no longer fits the host limit."""
        top = geometry.max_layers_on_host(self.host_memory_limit)
        if self.mode == "static":
            assert self.ratio is not None
            return min(layers_for_ratio(geometry.num_layers, self.ratio), top)
        return min(self.m, top)

    def set_geometry(self, geometry: SwapGeometry, m: int) -> None:
        """The engine resized the device pool and now runs at ``m``. The latency baseline and what is known about
        transparency stay: both depend on m and the load, not on the budget (copies move the used prefix)."""
        self.geometry = geometry
        self.max_layers_on_host = geometry.max_layers_on_host(self.host_memory_limit)
        if m != self.m:
            self._previous_m, self.m = self.m, m
        self.last_decision = f"device pool resized to {geometry.pool_blocks} layer-blocks at m = {m}"
        self._reset_evidence()
