"""p95 latencies from the engines' Prometheus histograms, pure: what the TTFT and TPOT autoscaling targets compare.

An engine exports cumulative histograms since it started (pie_time_to_first_token_seconds,
pie_inter_token_latency_seconds: scrape.LATENCY_HISTOGRAMS). What the replicas must hold is the latency users see
NOW, so the operator keeps each pod's scrapes of the last WINDOW seconds (observe.py) and takes the quantile of the
increase between the oldest and the newest, as PromQL's `histogram_quantile(0.95, increase(x_bucket[1m]))` would.
TPOT is read from the inter-token latency histogram (the time between two output tokens of a request): its p95 is
the p95 time per output token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Buckets = tuple[tuple[float, float], ...]  # (upper bound `le`, cumulative count), ascending, the last one +Inf
WINDOW = 60.0  # seconds of scrapes the p95 is taken over
Q = 0.95


def reset(new: Buckets, old: Buckets) -> bool:
    """The counts went down (the engine restarted under the same pod) or the layout changed: `old` is no baseline."""
    return [le for le, _ in new] != [le for le, _ in old] or any(n < o for (_, n), (_, o) in zip(new, old,
                                                                                               strict=True))


def increase(new: Buckets, old: Buckets) -> Buckets:
    """The observations made between two scrapes of one histogram (`reset` must be False)."""
    return tuple((le, n - o) for (le, n), (_, o) in zip(new, old, strict=True))


def quantile(q: float, buckets: Buckets) -> float | None:
    """`histogram_quantile`: the bucket the q-th observation falls in, interpolated linearly inside it (from 0 for the
    first). None without observations; the highest finite bound when it falls in the +Inf bucket (nothing is known
    above it)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank, lower, below = q * buckets[-1][1], 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / (count - below) if count > below else le
        lower, below = le, count
    return lower


def p95(history: Sequence[Buckets]) -> float | None:
    """The p95 of what one histogram observed over `history` (its scrapes, oldest first, no reset among them); None
    with fewer than two scrapes or nothing observed in between."""
    if len(history) < 2:
        return None
    return quantile(Q, increase(history[-1], history[0]))
