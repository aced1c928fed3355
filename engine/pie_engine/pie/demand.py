"""The KV demand the expansion controller reports on (pure, no torch): the peak over a sliding window of
iterations, and the host / device memory that peak needs at a given m (what the operator sizes pods by)."""

from __future__ import annotations

import math
from collections import deque

from pie_engine.pie.geometry import SwapGeometry


class PeakDemand:
    """The maximum of the KV blocks per layer wanted over the last ``window`` iterations (a monotonic deque)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._q: deque[tuple[int, int]] = deque()  # (iteration, wanted), wanted decreasing
        # NOTE: a plain number, so a metrics scrape on another thread never iterates the deque being changed.
        self.blocks = 0

    def add(self, iteration: int, wanted: int) -> None:
        while self._q and self._q[-1][1] <= wanted:
            self._q.pop()
        self._q.append((iteration, wanted))
        while self._q[0][0] <= iteration - self.window:
            self._q.popleft()
        self.blocks = self._q[0][1]


def host_bytes_for(geometry: SwapGeometry, m: int, peak_blocks: int, headroom: float) -> int:
    """Host KV needed at ``m`` for the peak demand: H(m) * min(D, C(m)) * block bytes, times ``headroom``."""
    need = geometry.num_host_backed(m) * min(peak_blocks, geometry.capacity_blocks(m)) * geometry.layer_block_bytes
    return math.ceil(headroom * need)


def device_bytes_for(geometry: SwapGeometry, m: int, peak_blocks: int, headroom: float) -> int:
    """The device KV budget that holds the peak demand at ``m``: (n - m) slots * D * block bytes, times
    ``headroom``."""
    return math.ceil(headroom * geometry.num_slots(m) * peak_blocks * geometry.layer_block_bytes)
