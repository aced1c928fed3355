"""The evidence the expansion controller decides on (pure, no torch): every iteration since the last change of m,
with its no-swap reference, and the per-iteration latency overhead of swapping read from it.

Overhead over a window of iterations is the largest of three measurements (docs/pie.md, "Overhead"):
- stalls: ``sum(stall) / sum(iteration - stall)``, exact wherever stalls are measured;
- in-step excess: ``sum(excess) / sum(iteration - excess)``, where each iteration's excess is what its host-backed
  layers took beyond its resident layers (SwapSchedule.excess_seconds): stalls plus copy issue and write-back work
  on the compute timeline, against a no-swap reference at exactly the same batch;
- baseline: ``sum(iteration) / sum(no-swap prediction) - 1``, the prediction from a LatencyBaseline fitted while
  m = 0 (latency_baseline.py), used only at loads like ones it predicted at m = 0, less its own measured error
  there. It catches a slowdown of all layers alike (copy threads competing for cores or memory bandwidth).
A reading above a limit counts when it is clearly above it, or confirmed over the longer ``confirm_window``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from pie_engine.pie.controller_config import ControllerConfig, IterationSample
from pie_engine.pie.latency_baseline import LatencyBaseline
from pie_engine.pie.probe import Conditions

# (sample, baseline reference (prediction, its error) or None, demand)
Entry = tuple[IterationSample, "tuple[float, float] | None", bool]
Terms = dict[str, "float | None"]


class Evidence:
    """Iterations since the last change of m, newest last: decisions read the last ``window``, a confirmation all
    of them (up to ``confirm_window``). The no-swap baseline learns from every iteration at m = 0."""

    def __init__(self, config: ControllerConfig) -> None:
        self.config = cfg = config
        self.baseline = LatencyBaseline(cfg.baseline_decay, cfg.baseline_min_samples, cfg.baseline_extrapolation,
                                        min_held_out=cfg.baseline_min_held_out)
        self.entries: deque[Entry] = deque(maxlen=cfg.confirm_window)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, s: IterationSample, m: int, demand: bool) -> None:
        if m == 0:
            self.baseline.add(s.iteration_seconds, s.num_tokens, s.context_tokens)
        self.entries.append((s, self._reference(s, m), demand))

    def clear(self) -> None:
        self.entries.clear()

    def last(self, n: int | None = None) -> list[Entry]:
        """The newest ``n`` entries (default: a decision window)."""
        return list(self.entries)[-(n or self.config.window):]

    def _reference(self, s: IterationSample, m: int) -> tuple[float, float] | None:
        """The no-swap baseline's (prediction, error) for this iteration's load, if it can judge epsilon there: a
        load like ones it predicted at m = 0, with an error below ``baseline_max_error * epsilon``."""
        if m == 0 or (ref := self.baseline.reference(s.num_tokens, s.context_tokens)) is None:
            return None
        return ref if ref[1] <= self.config.baseline_max_error * self.config.epsilon else None

    @staticmethod
    def measure(entries: Iterable[Entry], m: int) -> tuple[float, Terms, float]:
        """(overhead, each term's reading, stall fraction) over ``entries`` at ``m`` (see module docstring)."""
        entries = list(entries)
        it = sum(s.iteration_seconds for s, _, _ in entries)
        stall = sum(s.stall_seconds for s, _, _ in entries)
        stall_fraction = stall / it if it > 0 else 0.0
        if m == 0:
            return 0.0, {"stall": 0.0, "excess": None, "baseline": None}, stall_fraction  # nothing is swapped
        half = (len(entries) + 1) // 2  # a term counts only with evidence from at least half the entries
        excess = [(s.iteration_seconds, s.excess_seconds) for s, _, _ in entries if s.excess_seconds is not None]
        refs = [(s.iteration_seconds, *r) for s, r, _ in entries if r is not None]
        predicted = sum(p for _, p, _ in refs)
        overheads: Terms = {
            "stall": stall / max(it - stall, 1e-12),
            "excess": sum(e for _, e in excess) / max(sum(i - e for i, e in excess), 1e-12)
            if len(excess) >= half else None,
            # less the baseline's own error at these loads (prediction-weighted)
            "baseline": (sum(i for i, _, _ in refs) - sum(p * e for _, p, e in refs)) / predicted - 1.0
            if len(refs) >= half else None}
        return max_term(overheads), overheads, stall_fraction

    def confirm(self, term: Callable[[Terms], float], reading: float, limit: float, m: int) -> str | None:
        """Why a window reading above ``limit`` is real: clearly above (``clear_factor`` x), or confirmed over
        ``confirm_window`` iterations at this m; None: wait for more evidence (or for the reading to fall back)."""
        cfg = self.config
        if reading > cfg.clear_factor * limit:
            return "clear"
        if len(self.entries) == cfg.confirm_window and (long := term(self.measure(self.entries, m)[1])) > limit:
            return f"confirmed over {cfg.confirm_window} iterations: {long:.3f}"
        return None

    def confirm_latency(self, itl: float, target: float) -> str | None:
        """``confirm`` for an explicit latency target (mean iteration seconds)."""
        cfg = self.config
        if itl > cfg.clear_factor * target:
            return "clear"
        if len(self.entries) == cfg.confirm_window and (long := mean_iteration(self.entries)) > target:
            return f"confirmed over {cfg.confirm_window} iterations: {long * 1e3:.1f} ms"
        return None

    def conditions(self) -> Conditions | None:
        """What speeds are compared at, over the window: (mean requests in the system, mean context tokens per
        sampled token); None when not reported."""
        window = [s for s, _, _ in self.last() if s.num_requests > 0]
        if not window:
            return None
        tokens = sum(s.num_output_tokens for s in window)
        return (sum(s.num_requests for s in window) / len(window),
                sum(s.context_tokens for s in window) / tokens if tokens else None)


def mean_iteration(entries: Iterable[Entry]) -> float:
    """Mean iteration time: the inter-token latency of the running requests."""
    times = [s.iteration_seconds for s, _, _ in entries]
    return sum(times) / max(1, len(times))


def peak_wanted(entries: Iterable[Entry]) -> int:
    """The most KV blocks per layer any of the iterations wanted."""
    return max(s.wanted for s, _, _ in entries)


def mean_compute(entries: Iterable[Entry]) -> float:
    """Mean compute seconds per iteration (its time less its stall): what a step's copies have to hide behind."""
    entries = list(entries)
    return sum(s.iteration_seconds - s.stall_seconds for s, _, _ in entries) / len(entries)


def seconds_per_token(entries: Iterable[Entry]) -> float:
    """Mean seconds per computed token: what recomputing a preempted sequence's tokens costs."""
    entries = list(entries)
    return sum(s.iteration_seconds for s, _, _ in entries) / max(1, sum(s.num_tokens for s, _, _ in entries))


def max_term(overheads: Terms) -> float:
    return max(v for v in overheads.values() if v is not None)
