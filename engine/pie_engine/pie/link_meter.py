"""The host link as adaptive expansion sees it (pure, no torch): seconds per byte of KV copies, measured at m > 0,
and what that says a given m's swap-ins cost per step.

A step at m swaps in its host-backed layers (m + staging), each the blocks in use. Those copies hide only if they
fit the step's compute; the controller never grows to an m whose copies would not (``cap``), and a link check (the
first grow, one layer) backs off when its own would not once its capacity fills (``fits``).

NOTE: fitting the step's total is necessary, not sufficient: each layer's copy must hide behind the compute of the
layers the prefetch runs ahead of, and a step's compute includes work no copy overlaps (embedding, sampling). Hence
``margin``: measured in process on the tiny model at a PCIe-like throttle, the stall at m = 2-3 was the copies minus
0.83-1.0 times the compute, so copies are budgeted 0.8 of it (docs/pie.md).
"""

from __future__ import annotations

from pie_engine.pie.controller_config import IterationSample
from pie_engine.pie.geometry import SwapGeometry


class LinkMeter:
    """Seconds per byte of the host link: a moving average over steps at m > 0, or, for a link check, the sum of
    its iterations' copies (one step's accounting mixes the copies it resolved with the ones it issued, and read a
    third of the link's true cost)."""

    def __init__(self, margin: float) -> None:
        self.margin = margin
        self.seconds_per_byte: float | None = None  # None: never measured
        self._seconds = self._bytes = 0.0  # decayed sums of steps' copy seconds and bytes (observe)
        self._check_seconds, self._check_bytes, self._check_compute, self._check_n = 0.0, 0, 0.0, 0

    def observe(self, s: IterationSample) -> None:
        """A step at m > 0, not a change's own (it issues the next step's swap-ins but resolves only its own).
        NOTE: a ratio of decayed sums, not a decayed ratio: a step's seconds (copies resolved) and bytes (copies
        issued) belong to different copies, and averaging their ratios read the link at a fraction of its cost
        after a check had measured it right (served, tiny, throttled: a grow to m = 2 then stalled 38%)."""
        if s.copy_seconds <= 0 and s.copy_bytes <= 0:
            return
        if self._bytes == 0 and self.seconds_per_byte is not None:  # start from the check's reading (one step's)
            self._seconds, self._bytes = self.seconds_per_byte * s.copy_bytes, float(s.copy_bytes)
        # ~20 steps of memory: the link does not change, the batch does (a shorter one read a batch that
        # alternates by 10x at 0.83x the link)
        self._seconds = 0.95 * self._seconds + 0.05 * s.copy_seconds
        self._bytes = 0.95 * self._bytes + 0.05 * s.copy_bytes
        if self._seconds > 0 and self._bytes > 0:
            self.seconds_per_byte = self._seconds / self._bytes

    def add_to_check(self, s: IterationSample) -> None:
        self._check_seconds += s.copy_seconds
        self._check_bytes += s.copy_bytes
        self._check_compute += s.iteration_seconds - s.stall_seconds
        self._check_n += 1

    def settle_check(self) -> float:
        """The check's iterations are in: the link is what they moved, summed. Returns their mean compute seconds
        (one iteration's is noisy: on the served path the HTTP server's work lands in some and not others)."""
        if self._check_bytes > 0 and self._check_seconds > 0:
            self.seconds_per_byte = self._check_seconds / self._check_bytes
            self._seconds = self._bytes = 0.0  # the running sums restart from this reading
        compute = self._check_compute / max(1, self._check_n)
        self.restart_check()
        return compute

    def restart_check(self) -> None:
        self._check_seconds, self._check_bytes, self._check_compute, self._check_n = 0.0, 0, 0.0, 0

    def copy_seconds(self, g: SwapGeometry, m: int, wanted: int) -> float:
        """Link seconds of one step's swap-ins at ``m`` (its host-backed layers, each the blocks in use: at most its
        capacity and the KV wanted); 0 while unmeasured."""
        blocks = min(g.capacity_blocks(m), wanted)
        return (self.seconds_per_byte or 0.0) * g.num_host_backed(m) * blocks * g.layer_block_bytes

    def fits(self, g: SwapGeometry, m: int, wanted: int, compute_seconds: float) -> bool:
        """``m``'s swap-ins fit ``margin`` of a step's compute (always true while unmeasured)."""
        return self.copy_seconds(g, m, wanted) <= self.margin * compute_seconds

    def cap(self, g: SwapGeometry, m: int, target: int, wanted: int, compute_seconds: float) -> int:
        """The largest m' in [m, target] whose swap-ins fit (``fits``); ``target`` while the link is unmeasured.
        NOTE: on a link too slow for a jump, every step of it stalls until the stall rule undoes it, and the undo
        preempts everything admitted meanwhile."""
        if self.seconds_per_byte is None:
            return target
        return max((k for k in range(m + 1, target + 1) if self.fits(g, k, wanted, compute_seconds)), default=m)
