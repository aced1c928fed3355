"""Adaptive expansion: how many layers' KV to keep on host (m), decided between iterations (pure, no torch).

Grow m while swapping stays hidden and there is demand for more KV (by one layer, or at once to the m that holds
the KV the running and waiting requests want, so a burst is met within a window); shrink by one when the latency
overhead of swapping exceeds epsilon. Overhead over a window of iterations is the largest of three measurements:
- stalls: ``sum(stall) / sum(iteration - stall)``, exact wherever stalls are measured;
- in-step excess: ``sum(excess) / sum(iteration - excess)``, where each iteration's excess is what its host-backed
  layers took beyond its resident layers (SwapSchedule.excess_seconds): stalls plus copy issue and write-back work
  on the compute timeline, against a no-swap reference at exactly the same load;
- baseline: ``sum(iteration) / sum(no-swap prediction) - 1``, the prediction from a LatencyBaseline fitted while
  m = 0 (latency_baseline.py), used only at loads like ones it predicted at m = 0, less its own measured error
  there (held-out predictions). It catches a slowdown of all layers alike (copy threads competing with compute
  for cores or memory bandwidth), which the in-step comparison cannot see.
Hysteresis: grow only below ``grow_overhead`` (< epsilon), a full window of evidence per decision (and a second one
to confirm a shrink unless the overhead is clearly above epsilon), a cooldown after every change, and an m that
caused overhead stays forbidden for ``ceiling_ttl`` iterations, so the controller settles instead of oscillating.
docs/pie.md has the details.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

from pie_engine.config import parse_expansion
from pie_engine.pie.controller_config import (
    MODES,
    ControllerConfig,
    IterationSample,
    layers_for_ratio,
)
from pie_engine.pie.geometry import SwapGeometry
from pie_engine.pie.latency_baseline import LatencyBaseline

Entry = tuple[IterationSample, "tuple[float, float] | None", bool]


class ExpansionController:
    """Decides m between iterations. Call ``update(sample)`` after each iteration; apply the m it returns."""

    def __init__(self, geometry: SwapGeometry, mode: str = "adaptive", ratio: float | None = None,
                 host_memory_limit: int | None = None, config: ControllerConfig | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "static" and (ratio is None or ratio < 1.0):
            raise ValueError(f"static mode needs a ratio >= 1, got {ratio}")
        self.geometry, self.mode, self.ratio = geometry, mode, ratio
        self.host_memory_limit = host_memory_limit
        self.config = cfg = config or ControllerConfig()
        self.max_layers_on_host = geometry.max_layers_on_host(host_memory_limit)
        self.baseline = LatencyBaseline(cfg.baseline_decay, cfg.baseline_min_samples, cfg.baseline_extrapolation,
                                        min_held_out=cfg.baseline_min_held_out)
        # (sample, baseline reference (prediction, its error) or None, demand) since the last change, newest last;
        # decisions read the last ``window``, a shrink's confirmation all of it.
        self._recent: deque[Entry] = deque(maxlen=cfg.confirm_window)
        self._idle: deque[tuple[int, bool]] = deque(maxlen=cfg.idle_window)
        self._peak: deque[tuple[int, int]] = deque()  # (iteration, wanted), decreasing: a sliding-window max
        self.peak_blocks = 0  # observed peak KV demand, blocks per layer, over the last peak_window iterations
        self._cooldown = 0
        self._iteration = 0
        self._ceiling: tuple[int, int] | None = None  # (forbidden m and above, until iteration)
        self.transparent_limit: int | None = None  # highest m known transparent below an overhead-causing one
        self.overhead = self.stall_fraction = 0.0
        self.overheads: dict[str, float | None] = {"stall": 0.0, "excess": None, "baseline": None}
        self.num_grows = self.num_shrinks = 0
        self.last_decision = "start"
        self.m = self._target_static() if mode == "static" else 0
        self._previous_m = 0  # the m before the last change (what reject() returns to)

    @classmethod
    def from_setting(cls, expansion: str, geometry: SwapGeometry, host_memory_limit: int | None = None,
                     config: ControllerConfig | None = None) -> ExpansionController:
        """From the ``--expansion`` flag (off | adaptive | ratio)."""
        mode, ratio = parse_expansion(expansion)
        return cls(geometry, mode, ratio, host_memory_limit, config)

    # -------------------------------------------------------------------------------------------- decisions
    def _target_static(self) -> int:
        assert self.ratio is not None
        return min(layers_for_ratio(self.geometry.num_layers, self.ratio), self.max_layers_on_host)

    def update(self, s: IterationSample) -> int:
        """Record one iteration (run at ``self.m``) and return m for the next one."""
        cfg = self.config
        self._iteration += 1
        cap = self.geometry.capacity_blocks(self.m)
        demand = s.num_waiting > 0 or s.num_preempted > 0 or s.blocks_in_use >= cfg.usage_high * cap
        self._track_peak(s.wanted)
        self._idle.append((s.wanted, demand))
        if self.mode != "adaptive":
            self.m = 0 if self.mode == "off" else self._target_static()
            return self.m
        if self._cooldown > 0:
            self._cooldown -= 1
            return self.m
        if self.m == 0:
            self.baseline.add(s.iteration_seconds, s.num_tokens, s.context_tokens)
        self._recent.append((s, self._reference(s), demand))
        if len(self._recent) < cfg.window:
            return self.m
        window = list(self._recent)[-cfg.window:]
        self.overhead, self.overheads, self.stall_fraction = self._measure(window)
        if self._ceiling is not None and self._iteration >= self._ceiling[1]:
            self._ceiling = None  # load may have changed: allow probing again
        if self.m > 0 and self.overhead > cfg.epsilon and (confirmed := self._confirm_overhead()):
            self._ceiling = (self.m, self._iteration + cfg.ceiling_ttl)
            self.transparent_limit = self.m - 1
            terms = ", ".join(f"{k} {v:.3f}" for k, v in self.overheads.items() if v is not None)
            return self._change(self.m - 1,
                                f"overhead {self.overhead:.3f} > epsilon {cfg.epsilon} ({terms}; {confirmed})")
        demand_share = sum(d for _, _, d in window) / len(window)
        ceiling = self._ceiling[0] if self._ceiling is not None else self.geometry.num_layers
        # NOTE: leave m = 0 only with a usable baseline whose error is known, or overhead that is not a stall would
        # go unseen.
        baseline_ready = self.m > 0 or self.baseline.error() is not None
        if (baseline_ready and self.overhead < cfg.grow_overhead and self.stall_fraction < cfg.grow_stall_fraction
                and demand_share >= cfg.demand_fraction and self.m + 1 <= self.max_layers_on_host
                and self.m + 1 < ceiling):
            return self._change(self._grow_target(window, ceiling), f"demand with overhead {self.overhead:.3f}")
        if cfg.idle_shrink and self.m > 0 and len(self._idle) == cfg.idle_window and not any(
                d for _, d in self._idle):
            smaller = self.geometry.capacity_blocks(self.m - 1)
            if max(w for w, _ in self._idle) < cfg.idle_fraction * smaller:
                return self._change(self.m - 1, "idle: the KV fits with fewer layers on host")
        self.last_decision = "hold"
        return self.m

    def _confirm_overhead(self) -> str | None:
        """Why the window's overhead above epsilon is real: clearly above it, or confirmed over ``confirm_window``
        iterations at this m; None: wait for more evidence (or for the reading to fall back)."""
        cfg = self.config
        if self.overhead > cfg.clear_factor * cfg.epsilon:
            return "clear"
        if len(self._recent) == cfg.confirm_window and (long := self._measure(self._recent)[0]) > cfg.epsilon:
            return f"confirmed over {cfg.confirm_window} iterations: {long:.3f}"
        return None

    def _grow_target(self, window: list[Entry], ceiling: int) -> int:
        """m + 1, or the smallest m that holds ``grow_headroom`` times the window's peak KV demand when that demand
        is beyond the current capacity (never at or above ``ceiling``, never beyond the host limit)."""
        wanted = max(s.wanted for s, _, _ in window)
        target = self.m + 1
        if wanted > self.geometry.capacity_blocks(self.m):
            need = self.required_layers_on_host(math.ceil(self.config.grow_headroom * wanted))
            target = max(target, self.max_layers_on_host if need is None else need)
        return min(target, self.max_layers_on_host, ceiling - 1)

    def required_layers_on_host(self, blocks: int) -> int | None:
        """The smallest m whose capacity holds ``blocks`` per layer (one request running alone), within the host
        limit; None if even the largest allowed m cannot. Off and static modes can only offer their current m."""
        if self.mode != "adaptive":
            return self.m if self.geometry.capacity_blocks(self.m) >= blocks else None
        return next((m for m in range(self.max_layers_on_host + 1) if self.geometry.capacity_blocks(m) >= blocks),
                    None)

    def require(self, m: int, reason: str) -> int:
        """Adaptive mode: move up to ``m`` now, whatever the overhead: a request that fits nowhere else needs it
        (correctness before latency). No-op when already there or not adaptive. Returns the m to apply."""
        if self.mode == "adaptive" and m > self.m:
            return self._change(m, reason)
        return self.m

    def _track_peak(self, wanted: int) -> None:
        # NOTE: kept as a plain number so a metrics scrape on another thread never iterates a deque being changed.
        while self._peak and self._peak[-1][1] <= wanted:
            self._peak.pop()
        self._peak.append((self._iteration, wanted))
        while self._peak[0][0] <= self._iteration - self.config.peak_window:
            self._peak.popleft()
        self.peak_blocks = self._peak[0][1]

    def _reference(self, s: IterationSample) -> tuple[float, float] | None:
        """The no-swap baseline's (prediction, error) for this iteration's load, if it can judge epsilon there: a
        load like ones it predicted at m = 0, with an error below ``baseline_max_error * epsilon``."""
        if self.m == 0 or (ref := self.baseline.reference(s.num_tokens, s.context_tokens)) is None:
            return None
        return ref if ref[1] <= self.config.baseline_max_error * self.config.epsilon else None

    def _measure(self, entries: Iterable[Entry]) -> tuple[float, dict[str, float | None], float]:
        """(overhead, each term's reading, stall fraction) over ``entries`` (see module docstring)."""
        entries = list(entries)
        it = sum(s.iteration_seconds for s, _, _ in entries)
        stall = sum(s.stall_seconds for s, _, _ in entries)
        stall_fraction = stall / it if it > 0 else 0.0
        if self.m == 0:
            return 0.0, {"stall": 0.0, "excess": None, "baseline": None}, stall_fraction  # nothing is swapped
        half = (len(entries) + 1) // 2  # a term counts only with evidence from at least half the entries
        excess = [(s.iteration_seconds, s.excess_seconds) for s, _, _ in entries if s.excess_seconds is not None]
        refs = [(s.iteration_seconds, *r) for s, r, _ in entries if r is not None]
        predicted = sum(p for _, p, _ in refs)
        overheads = {
            "stall": stall / max(it - stall, 1e-12),
            "excess": sum(e for _, e in excess) / max(sum(i - e for i, e in excess), 1e-12)
            if len(excess) >= half else None,
            # less the baseline's own error at these loads (prediction-weighted)
            "baseline": (sum(i for i, _, _ in refs) - sum(p * e for _, p, e in refs)) / predicted - 1.0
            if len(refs) >= half else None}
        return max(v for v in overheads.values() if v is not None), overheads, stall_fraction

    def _change(self, m: int, reason: str) -> int:
        if m > self.m:
            self.num_grows += 1
        else:
            self.num_shrinks += 1
        self._previous_m, self.m = self.m, m
        self.last_decision = f"m -> {m}: {reason}"
        self._reset_evidence()
        return m

    def _reset_evidence(self) -> None:
        """After a change of m or of the pool: the window restarts and a cooldown skips the transition."""
        self._recent.clear()
        self._idle.clear()
        self._cooldown = self.config.cooldown

    def reject(self, m: int) -> int:
        """The engine could not apply ``m`` (e.g. host allocation failed) and stays where it was: a larger m is
        never asked for again. Returns the m the engine keeps using."""
        previous = self._previous_m if self.m == m else self.m
        if m > previous:
            self.max_layers_on_host = min(self.max_layers_on_host, m - 1)
        self.m = previous
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

    # -------------------------------------------------------------------------------------------- reporting
    @property
    def recommended_host_memory_bytes(self) -> int:
        """Host KV needed at the current (settled) m for the peak demand: H(m) * min(D, C(m)) * block bytes."""
        g, m = self.geometry, self.m
        need = g.num_host_backed(m) * min(self.peak_blocks, g.capacity_blocks(m)) * g.layer_block_bytes
        return math.ceil(self.config.headroom * need)

    @property
    def recommended_gpu_memory_bytes(self) -> int:
        """Smallest device KV budget that holds the peak demand at the largest m known to be transparent:
        (n - m_t) * D * block bytes (m_t: below the last m that caused overhead, else the current m)."""
        g = self.geometry
        m_t = self.m if self.transparent_limit is None or self.mode != "adaptive" else self.transparent_limit
        need = g.num_slots(m_t) * self.peak_blocks * g.layer_block_bytes
        return math.ceil(self.config.headroom * need)

    def state(self) -> dict:
        g, cfg = self.geometry, self.config
        return {
            "mode": self.mode, "ratio": self.ratio, "layers_on_host": self.m, "num_layers": g.num_layers,
            "max_layers_on_host": self.max_layers_on_host, "expansion_ratio": g.expansion_ratio(self.m),
            "blocks_per_layer": g.capacity_blocks(self.m), "overhead": self.overhead,
            "stall_fraction": self.stall_fraction, "overheads": dict(self.overheads), "epsilon": cfg.epsilon,
            "grow_overhead": cfg.grow_overhead,
            "last_decision": self.last_decision, "ceiling": None if self._ceiling is None else self._ceiling[0],
            "transparent_limit": self.transparent_limit, "num_grows": self.num_grows,
            "num_shrinks": self.num_shrinks, "baseline_samples": self.baseline.num_samples,
            "baseline_error": self.baseline.error(),
            "peak_blocks": self.peak_blocks, "host_memory_limit": self.host_memory_limit,
            "recommended_host_memory_bytes": self.recommended_host_memory_bytes,
            "recommended_gpu_memory_bytes": self.recommended_gpu_memory_bytes,
        }
