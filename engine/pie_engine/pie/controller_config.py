"""What the expansion controller is configured with and fed (pure data, no torch): the ``--expansion`` setting,
the controller's thresholds, and the per-iteration sample the engine reports. The controller is controller.py."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("off", "adaptive", "static")


@dataclass(frozen=True)
class IterationSample:
    """What one engine iteration reports to the controller."""

    iteration_seconds: float
    stall_seconds: float  # compute waiting for swap-ins (LayerSwapKVCache.last_step_stall_seconds)
    num_tokens: int  # tokens computed in the step
    context_tokens: int = 0  # KV tokens the step's attention read (sum of context lengths); 0 if unknown
    num_preempted: int = 0  # preemptions this step
    blocks_in_use: int = 0  # per layer: max used block id + 1 (in use or prefix-cached)
    # blocks_in_use plus what the waiting requests the batch has room for need; None: blocks_in_use
    blocks_wanted: int | None = None
    excess_seconds: float | None = None  # swapping's cost measured inside the step (pipeline.py); None: unknown
    copy_seconds: float = 0.0  # summed durations of the KV copies resolved in the step (link time)
    copy_bytes: int = 0  # bytes the step's KV copies move (both directions, as issued)
    num_output_tokens: int = 0  # tokens sampled in the step (one per sequence that reached its end); 0: unknown
    num_requests: int = 0  # requests in the system after the step (running + waiting): the speed's denominator

    @property
    def wanted(self) -> int:
        """KV blocks per layer the step's requests want: ``blocks_wanted``, else ``blocks_in_use``."""
        return self.blocks_in_use if self.blocks_wanted is None else self.blocks_wanted


@dataclass(frozen=True)
class ControllerConfig:
    epsilon: float = 0.05  # shrink when the overhead exceeds this (unless measured speed pays for it: probe.py)
    # Explicit per-output-token latency target (seconds, mean iteration time of the running requests): replaces the
    # epsilon rule for latency; stalls above epsilon still shrink (transparency).
    latency_target: float | None = None
    # Grow only while the overhead is below this (the band up to epsilon: hold). 0.8 epsilon, not less: swapping
    # has a fixed cost at any m (hooks, copy threads), and a lower bar would forbid every m where all are < epsilon.
    grow_overhead: float = 0.04
    grow_stall_fraction: float = 0.01  # ... and stall / iteration time is below this
    window: int = 8  # iterations of evidence per decision (patience)
    # A shrink on a window reading above epsilon but below ``clear_factor`` * epsilon must be confirmed over the last
    # ``confirm_window`` iterations at this m. One 8-iteration window on a 2-vCPU machine jitters by +-1-2 points,
    # and it is read every iteration: a true 4% reads 5.0% now and then (bench: one such window cost a whole run
    # its expansion). 64 iterations have a quarter of that noise; a clear overhead does not wait.
    confirm_window: int = 64
    clear_factor: float = 2.0
    # Overhead that buys KV capacity the load needs is left to the speed to judge (probes), up to this times epsilon.
    gross_factor: float = 8.0
    cooldown: int = 4  # iterations ignored after a change (pipeline refill, migration)
    demand_fraction: float = 0.5  # share of the window's iterations that must show demand to grow
    # A grow goes at once to the smallest m whose capacity holds this times the KV wanted in the window (when that
    # is beyond the current capacity), not one layer per window: the controller settles during warm-up.
    grow_headroom: float = 1.2
    usage_high: float = 0.9  # KV wanted (in use + admissible waiting requests) >= this * C counts as demand
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
    # The objective (probe.py): speed measured in batches of this many iterations under demand; a grow is a probe,
    # judged after ``probe_batches`` batches at the new m against the m it came from, with ``probe_z`` standard
    # errors of confidence. Undone only if the speed it lost over ``payback_seconds`` exceeds what the shrink costs
    # (the preempted sequences' recomputation).
    speed_batch: int = 4
    probe_batches: int = 4
    probe_z: float = 2.0
    probe_stall_iterations: int = 2  # a probe stalling beyond 2 clear_factor epsilon this long is undone at once
    # A first grow (the link check) measures the link over this many iterations after the change's own before the
    # jump it stands in for (capped at what that link moves within a step: LinkMeter.cap).
    link_check_iterations: int = 4
    # An m's per-step swap-ins must fit this share of a step's compute: layers' copies hide only behind the layers
    # the prefetch runs ahead of (link_meter.py; measured: stall = copies - 0.83-1.0 x compute).
    link_margin: float = 0.8
    speed_ttl: int = 1000  # iterations a speed measurement stays comparable (the load may have changed since)
    payback_seconds: float = 60.0
    max_ceiling_backoff: int = 8  # repeated back-offs lengthen the ceiling's ttl up to this factor
    peak_window: int = 2048  # iterations over which the peak KV demand is taken (recommendations)
    headroom: float = 1.1  # multiplier on the recommendations

    def __post_init__(self) -> None:
        if not 0.0 <= self.grow_overhead < self.epsilon:
            raise ValueError(f"need 0 <= grow_overhead < epsilon, got {self.grow_overhead}, {self.epsilon}")
        if self.confirm_window < self.window or self.clear_factor < 1.0 or self.gross_factor < 1.0:
            raise ValueError(f"need confirm_window >= window and clear_factor, gross_factor >= 1, got "
                             f"{self.confirm_window}, {self.clear_factor}, {self.gross_factor}")
        if self.window < 1 or self.cooldown < 0 or self.idle_window < 1 or self.peak_window < 1:
            raise ValueError("window, idle_window and peak_window must be >= 1 and cooldown >= 0")
        if self.latency_target is not None and not self.latency_target > 0:
            raise ValueError(f"latency_target must be > 0 seconds, got {self.latency_target}")
        if (self.speed_batch < 1 or self.probe_batches < 2 or self.probe_stall_iterations < 1 or self.speed_ttl < 1
                or self.link_check_iterations < 1
                or self.max_ceiling_backoff < 1):
            raise ValueError("need speed_batch >= 1, probe_batches >= 2, probe_stall_iterations >= 1, "
                             "link_check_iterations >= 1, speed_ttl >= 1, "
                             "max_ceiling_backoff >= 1")
        if self.payback_seconds < 0 or self.probe_z < 0:
            raise ValueError(f"need payback_seconds >= 0 and probe_z >= 0, got {self.payback_seconds}, "
                             f"{self.probe_z}")
        if not 0.0 < self.link_margin <= 1.0:
            raise ValueError(f"link_margin must be in (0, 1], got {self.link_margin}")
        if self.headroom < 1.0 or self.grow_headroom < 1.0:
            raise ValueError(f"headroom and grow_headroom must be >= 1, got {self.headroom}, {self.grow_headroom}")


def layers_for_ratio(num_layers: int, ratio: float) -> int:
    """Static mode: m = round(n - n / ratio), clamped to [0, n - 1]."""
    return max(0, min(num_layers - 1, round(num_layers - num_layers / ratio)))
