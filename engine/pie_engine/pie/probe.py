"""What the expansion controller optimises, measured (pure, no torch): the speed users see at each m, and whether
a change pays for itself.

Speed is output tokens per second per request in the system (running + waiting): by Little's law the inverse of
the per-output-token latency a user sees end to end, queueing and recomputation included. Under a closed loop (a
fixed number of clients) it is throughput over a constant; under open-loop arrivals it also rewards the shorter
queue. It is measured, never extrapolated: in batches of consecutive iterations at one m, and compared between
neighbouring m only at a like load (mean requests in the system within ``LOAD_MATCH`` of each other: fewer requests
batch less, and a light-load reading would flatter any m), with a confidence bound from the batches' own spread.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

LOAD_MATCH = 1.25  # batches measured at a mean load within this factor of each other are comparable
# (mean requests in the system, mean context tokens per sampled token or None): the conditions a speed is measured
# at. Context tells phases apart that the request count cannot: a server that just started runs young sequences
# with short contexts and no preemption, and its speed then flatters m = 0 (measured: 40 against a steady 32).
Conditions = tuple[float, "float | None"]


@dataclass(frozen=True)
class Estimate:
    """Mean of ``n`` batch means and its standard error."""

    mean: float
    se: float
    n: int


def better(a: Estimate, b: Estimate, margin: float, z: float) -> bool:
    """Is ``a`` above ``b * (1 + margin)`` with confidence ``z`` (standard errors of the difference)?"""
    scale = 1.0 + margin
    return a.mean - scale * b.mean > z * math.hypot(a.se, scale * b.se)


@dataclass(frozen=True)
class Probe:
    """A grow under judgement: from ``origin`` to ``target``, at iteration ``started``."""

    origin: int
    target: int
    started: int


class SpeedTable:
    """Speed batches per m: each batch is ``batch`` consecutive iterations at one m with requests in the system.
    Batches older than ``ttl`` iterations are forgotten (the load they were measured at may be gone); at most
    ``keep`` per m."""

    def __init__(self, batch: int, ttl: int, keep: int = 32) -> None:
        if batch < 1 or ttl < 1:
            raise ValueError(f"batch and ttl must be >= 1, got {batch}, {ttl}")
        self.batch, self.ttl, self.keep = batch, ttl, keep
        # m -> (iteration, speed, conditions), oldest first
        self._batches: dict[int, deque[tuple[int, float, Conditions]]] = {}
        # the batch being filled: (output tokens, seconds, requests, context tokens)
        self._open: list[tuple[int, float, int, int]] = []
        self._open_m: int | None = None

    def add(self, m: int, iteration: int, output_tokens: int, seconds: float, requests: int,
            context_tokens: int = 0) -> None:
        """One iteration at ``m``. An iteration without requests, or at another m, drops the partial batch: a batch
        is always consecutive iterations under the same conditions."""
        if requests <= 0 or m != self._open_m:
            self._open, self._open_m = [], (m if requests > 0 else None)
            if self._open_m is None:
                return
        self._open.append((output_tokens, seconds, requests, context_tokens))
        if len(self._open) < self.batch:
            return
        tokens = sum(t for t, _, _, _ in self._open)
        secs = sum(s for _, s, _, _ in self._open)
        load = sum(r for _, _, r, _ in self._open) / len(self._open)
        context = sum(c for _, _, _, c in self._open)
        self._open = []
        if secs > 0:
            at = (load, context / tokens if tokens and context else None)
            self._batches.setdefault(m, deque(maxlen=self.keep)).append((iteration, tokens / secs / load, at))

    def break_batch(self) -> None:
        """Drop the partial batch (m or the pool changed under it)."""
        self._open, self._open_m = [], None

    def estimate(self, m: int, now: int, at: Conditions | None = None, since: int = 0) -> Estimate | None:
        """Speed at ``m`` from batches closed after ``since``, within ``ttl`` of ``now`` and (given ``at``) measured
        under like conditions (each known figure within ``LOAD_MATCH``); None below 2 batches."""
        values = [v for it, v, c in self._batches.get(m, ()) if it > since and it > now - self.ttl
                  and (at is None or _alike(c, at))]
        if len(values) < 2:
            return None
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
        return Estimate(mean, math.sqrt(var / len(values)), len(values))

    def best_below(self, m: int, now: int, at: Conditions | None = None, min_batches: int = 2
                   ) -> tuple[int, Estimate] | None:
        """The m' < m measured in at least ``min_batches`` batches (under conditions like ``at``) with the highest
        speed, if any."""
        found = [(k, e) for k in self._batches if k < m and (e := self.estimate(k, now, at)) is not None
                 and e.n >= min_batches]
        return max(found, key=lambda ke: ke[1].mean, default=None)


    def summary(self, m: int, now: int, at: Conditions | None) -> str:
        """The speeds behind a decision at ``m``, for its log line."""
        here, below = self.estimate(m, now, at), self.best_below(m, now, at)
        text = "speed here " + ("unmeasured" if here is None else f"{here.mean:.3g} ({here.n} batches)")
        return text + ("" if below is None else f", at m = {below[0]} {below[1].mean:.3g} ({below[1].n} batches)")


def _alike(a: Conditions, b: Conditions) -> bool:
    return all(x is None or y is None or 1 / LOAD_MATCH <= x / y <= LOAD_MATCH for x, y in zip(a, b, strict=True))


class Ceiling:
    """The m at and above which nothing is tried, for a while, after a back-off: ``ttl`` iterations, doubled with
    every back-off since the last kept probe up to ``max_backoff`` times, so the controller settles instead of
    oscillating; expired, it lets the controller probe again (the load may have changed)."""

    def __init__(self, ttl: int, max_backoff: int) -> None:
        self.ttl, self.max_backoff = ttl, max_backoff
        self.value: int | None = None  # forbidden m and above; None: nothing forbidden
        self._until = 0
        self._backoffs = 0

    def limit(self, iteration: int, default: int) -> int:
        """The lowest forbidden m now (``default`` when none)."""
        if self.value is not None and iteration >= self._until:
            self.value = None
        return default if self.value is None else self.value

    def peek(self, iteration: int, default: int) -> int:
        """``limit`` without forgetting an expired value: for readers on another thread (the metrics)."""
        return default if self.value is None or iteration >= self._until else self.value

    def back_off(self, forbidden: int, iteration: int, strong: bool) -> None:
        """Forbid ``forbidden`` and above. ``strong`` evidence (a grow that stalled outright) starts at 4 ttl."""
        self._backoffs = min(max(self._backoffs + 1, 3 if strong else 0), self.max_backoff)
        self.value, self._until = forbidden, iteration + self.ttl * 2 ** (self._backoffs - 1)

    def kept(self) -> None:
        """A probe was kept: the next back-off starts from one ttl again."""
        self._backoffs = 0


def shrink_pays(faster: float, slower: float, horizon_seconds: float, recompute_tokens: int,
                seconds_per_token: float, reconfigure_seconds: float = 0.0) -> bool:
    """Does moving from the ``slower`` m back to the ``faster`` one gain more output than it costs? The gain is
    ``(faster - slower) * horizon`` (speeds in output tokens per second, at the same load); the cost is the output
    lost while the preempted sequences' ``recompute_tokens`` are computed again at ``seconds_per_token``, and while
    the engine re-lays its KV out (``reconfigure_seconds``, measured on the last changes: no step runs meanwhile)."""
    lost_seconds = recompute_tokens * seconds_per_token + reconfigure_seconds
    return (faster - slower) * horizon_seconds > lost_seconds * faster
