"""Adaptive expansion: how many layers' KV to keep on host (m), decided between iterations (pure, no torch).

Grow m while swapping stays hidden and there is demand for more KV (by one layer, or at once to the m that holds
the KV the running and waiting requests want, so a burst is met within a window); shrink by one when the latency
overhead of swapping exceeds epsilon. Overhead over a window of iterations is the largest of three measurements:
- stalls: ``sum(stall) / sum(iteration - stall)``, exact wherever stalls are measured;
- in-step excess: ``sum(excess) / sum(iteration - excess)``, where each iteration's excess is what its host-backed
  layers took beyond its resident layers (SwapSchedule.excess_seconds): stalls plus copy issue and write-back work
  on the compute timeline, against a no-swap reference at exactly the same load;
- baseline: ``sum(iteration) / sum(no-swap prediction) - 1``, the prediction from a LatencyBaseline fitted while
  m = 0 (latency_baseline.py), used only near the loads it was fitted on, less the baseline's own measured error
  (held-out predictions at m = 0). It catches a slowdown of all layers alike (copy threads competing with compute
  for cores or memory bandwidth), which the in-step comparison cannot see.
Hysteresis: grow only below ``grow_overhead`` (< epsilon), a full window of evidence per decision, a cooldown after
every change, and an m that caused overhead stays forbidden for ``ceiling_ttl`` iterations, so the controller
settles instead of oscillating. docs/pie.md has the details.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from pie_engine.latency_baseline import LatencyBaseline
from pie_engine.swap_schedule import SwapGeometry

MODES = ("off", "adaptive", "static")


@dataclass(frozen=True)
class IterationSample:
    """What one engine iteration reports to the controller."""

    iteration_seconds: float
    stall_seconds: float  # compute waiting for swap-ins (LayerSwapKVCache.last_step_stall_seconds)
    num_tokens: int  # tokens computed in the step
    context_tokens: int = 0  # KV tokens the step's attention read (sum of context lengths); 0 if unknown
    num_waiting: int = 0  # requests waiting for admission
    num_preempted: int = 0  # preemptions this step
    blocks_in_use: int = 0  # per layer: max used block id + 1 (in use or prefix-cached)
    blocks_wanted: int | None = None  # blocks_in_use plus what the waiting queue needs; None: blocks_in_use
    excess_seconds: float | None = None  # swapping's cost measured inside the step (kv_swap.py); None: unknown


@dataclass(frozen=True)
class ControllerConfig:
    epsilon: float = 0.05  # shrink when the overhead exceeds this
    # Grow only while the overhead is below this (the band up to epsilon: hold). 0.8 epsilon, not less: swapping
    # has a fixed cost at any m (hooks, copy threads), and a lower bar would forbid every m where all are < epsilon.
    grow_overhead: float = 0.04
    grow_stall_fraction: float = 0.01  # ... and stall / iteration time is below this
    window: int = 8  # iterations of evidence per decision (patience)
    cooldown: int = 4  # iterations ignored after a change (pipeline refill, migration)
    demand_fraction: float = 0.5  # share of the window's iterations that must show demand to grow
    # A grow goes at once to the smallest m whose capacity holds this times the KV wanted in the window (when that
    # is beyond the current capacity), not one layer per window: the controller settles during warm-up.
    grow_headroom: float = 1.2
    usage_high: float = 0.9  # blocks_in_use >= this * C counts as demand
    ceiling_ttl: int = 500  # iterations an m that caused overhead stays forbidden
    idle_shrink: bool = True  # give layers back when the KV would fit comfortably with one fewer on host
    idle_fraction: float = 0.5
    idle_window: int = 64
    baseline_decay: float = 0.99
    baseline_min_samples: int = 8
    baseline_min_held_out: int = 4  # held-out predictions at m = 0 before the baseline's error is known
    baseline_max_error: float = 0.5  # a baseline that misses by more than this times epsilon cannot judge it
    # Trust the baseline up to this factor beyond the loads it saw at m = 0. 1: only within them. Measured on the
    # bench workload (context grows every step): 1.25x out it read 9-13% where the truth was ~3%. A 5% epsilon needs
    # a reference better than 5%; beyond its range the in-step excess covers the rest.
    baseline_extrapolation: float = 1.0
    peak_window: int = 2048  # iterations over which the peak KV demand is taken (recommendations)
    headroom: float = 1.1  # multiplier on the recommendations

    def __post_init__(self) -> None:
        if not 0.0 <= self.grow_overhead < self.epsilon:
            raise ValueError(f"need 0 <= grow_overhead < epsilon, got {self.grow_overhead}, {self.epsilon}")
        if self.window < 1 or self.cooldown < 0 or self.idle_window < 1 or self.peak_window < 1:
            raise ValueError("window, idle_window and peak_window must be >= 1 and cooldown >= 0")
        if self.headroom < 1.0 or self.grow_headroom < 1.0:
            raise ValueError(f"headroom and grow_headroom must be >= 1, got {self.headroom}, {self.grow_headroom}")


def parse_expansion(setting: str) -> tuple[str, float | None]:
    """``--expansion``: off | adaptive | a ratio >= 1 (e.g. "2.0") -> (mode, ratio)."""
    s = str(setting).strip().lower()
    if s in ("off", "adaptive"):
        return s, None
    try:
        ratio = float(s)
    except ValueError:
        raise ValueError(f"expansion must be off, adaptive or a ratio >= 1, got {setting!r}") from None
    if not ratio >= 1.0 or math.isinf(ratio):
        raise ValueError(f"an expansion ratio must be a finite number >= 1, got {setting!r}")
    return "static", ratio


def layers_for_ratio(num_layers: int, ratio: float) -> int:
    """Static mode: m = round(n - n / ratio), clamped to [0, n - 1]."""
    return max(0, min(num_layers - 1, round(num_layers - num_layers / ratio)))


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
        self.baseline = LatencyBaseline(cfg.baseline_decay, cfg.baseline_min_samples, cfg.baseline_extrapolation)
        self._window: deque[tuple[IterationSample, float | None, bool]] = deque(maxlen=cfg.window)
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
        wanted = s.blocks_wanted if s.blocks_wanted is not None else s.blocks_in_use
        self._track_peak(wanted)
        self._idle.append((wanted, demand))
        if self.mode != "adaptive":
            self.m = 0 if self.mode == "off" else self._target_static()
            return self.m
        if self._cooldown > 0:
            self._cooldown -= 1
            return self.m
        if self.m == 0:
            self.baseline.add(s.iteration_seconds, s.num_tokens, s.context_tokens)
        pred = None if self.m == 0 else self.baseline.predict(s.num_tokens, s.context_tokens)
        self._window.append((s, pred, demand))
        if len(self._window) < cfg.window:
            return self.m
        self._measure()
        if self._ceiling is not None and self._iteration >= self._ceiling[1]:
            self._ceiling = None  # load may have changed: allow probing again
        if self.m > 0 and self.overhead > cfg.epsilon:
            self._ceiling = (self.m, self._iteration + cfg.ceiling_ttl)
            self.transparent_limit = self.m - 1
            terms = ", ".join(f"{k} {v:.3f}" for k, v in self.overheads.items() if v is not None)
            return self._change(self.m - 1, f"overhead {self.overhead:.3f} > epsilon {cfg.epsilon} ({terms})")
        demand_share = sum(d for _, _, d in self._window) / len(self._window)
        ceiling = self._ceiling[0] if self._ceiling is not None else self.geometry.num_layers
        # NOTE: leave m = 0 only with a usable baseline whose error is known, or overhead that is not a stall would
        # go unseen.
        baseline_ready = self.m > 0 or self.baseline.error(cfg.baseline_min_held_out) is not None
        if (baseline_ready and self.overhead < cfg.grow_overhead and self.stall_fraction < cfg.grow_stall_fraction
                and demand_share >= cfg.demand_fraction and self.m + 1 <= self.max_layers_on_host
                and self.m + 1 < ceiling):
            return self._change(self._grow_target(ceiling), f"demand with overhead {self.overhead:.3f}")
        if cfg.idle_shrink and self.m > 0 and len(self._idle) == cfg.idle_window and not any(
                d for _, d in self._idle):
            smaller = self.geometry.capacity_blocks(self.m - 1)
            if max(w for w, _ in self._idle) < cfg.idle_fraction * smaller:
                return self._change(self.m - 1, "idle: the KV fits with fewer layers on host")
        self.last_decision = "hold"
        return self.m

    def _grow_target(self, ceiling: int) -> int:
        """m + 1, or the smallest m that holds ``grow_headroom`` times the window's peak KV demand when that demand
        is beyond the current capacity (never at or above ``ceiling``, never beyond the host limit)."""
        wanted = max(s.blocks_in_use if s.blocks_wanted is None else s.blocks_wanted for s, _, _ in self._window)
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

    def _measure(self) -> None:
        """Overhead and stall fraction over the window (see module docstring)."""
        it = sum(s.iteration_seconds for s, _, _ in self._window)
        stall = sum(s.stall_seconds for s, _, _ in self._window)
        self.stall_fraction = stall / it if it > 0 else 0.0
        if self.m == 0:
            self.overhead = 0.0  # nothing is swapped
            self.overheads = {"stall": 0.0, "excess": None, "baseline": None}
            return
        half = (len(self._window) + 1) // 2  # a term counts only with evidence from at least half the window
        excess = [(s.iteration_seconds, s.excess_seconds) for s, _, _ in self._window if s.excess_seconds is not None]
        predicted = [(s.iteration_seconds, p) for s, p, _ in self._window if p is not None]
        self.overheads = {
            "stall": stall / max(it - stall, 1e-12),
            "excess": sum(e for _, e in excess) / max(sum(i - e for i, e in excess), 1e-12)
            if len(excess) >= half else None,
            "baseline": sum(i for i, _ in predicted) / sum(p for _, p in predicted) - 1.0 - err
            if len(predicted) >= half and (err := self._baseline_error()) is not None else None}
        self.overhead = max(v for v in self.overheads.values() if v is not None)

    def _baseline_error(self) -> float | None:
        """What the baseline term is discounted by: the baseline's measured held-out error. None (the term is not
        used) while that error is unknown, or too large to judge epsilon: above ``baseline_max_error * epsilon``."""
        err = self.baseline.error(self.config.baseline_min_held_out)
        return None if err is None or err > self.config.baseline_max_error * self.config.epsilon else err

    def _change(self, m: int, reason: str) -> int:
        if m > self.m:
            self.num_grows += 1
        else:
            self.num_shrinks += 1
        self._previous_m, self.m = self.m, m
        self.last_decision = f"m -> {m}: {reason}"
        self._window.clear()
        self._idle.clear()
        self._cooldown = self.config.cooldown
        return m

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
        self._window.clear()
        self._idle.clear()
        self._cooldown = self.config.cooldown

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
            "baseline_error": self.baseline.error(cfg.baseline_min_held_out),
            "peak_blocks": self.peak_blocks, "host_memory_limit": self.host_memory_limit,
            "recommended_host_memory_bytes": self.recommended_host_memory_bytes,
            "recommended_gpu_memory_bytes": self.recommended_gpu_memory_bytes,
        }
