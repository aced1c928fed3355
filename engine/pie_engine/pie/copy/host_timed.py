"""``HostTimedCopyEngine``: the accounting the CPU backends share (native.py, threads.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

from pie_engine.pie.copy.base import CopyEngine, H, StepCopyStats
from pie_engine.pie.copy.link import LinkModel
from pie_engine.pie.copy.trace import Trace


class HostTimedCopyEngine(CopyEngine[H]):
    """The compute thread blocks in ``wait`` (the stall, wall time), the timeline is read with ``clock``, and a
    copy's duration is known on its handle once it finished."""

    def __init__(self, link_in: LinkModel | None, link_out: LinkModel | None, trace: Trace | None) -> None:
        super().__init__(link_in, link_out, trace)
        # Grows live inside ``wait``: a benchmark's critical-path clock adds it to the compute thread's CPU time.
        self.stall_seconds_total = 0.0
        self._marks: list[float] = []
        self._unaccounted: list[H] = []

    def set_clock(self, clock: Callable[[], float]) -> None:
        self.clock = clock

    def wait(self, handle: H) -> None:
        if not handle.is_done():
            t0 = time.perf_counter()
            handle.join()
            stall = time.perf_counter() - t0
            self._stats.stall_seconds += stall
            self.stall_seconds_total += stall
        handle.wait_host()
        self._unaccounted.append(handle)  # swap-ins are accounted in the step that consumed them

    def mark(self) -> None:
        self._marks.append(self.clock())

    def end_step(self) -> StepCopyStats:
        rest = []
        for h in self._unaccounted:
            if (seconds := h.seconds) is not None:
                self._stats.copy_seconds += seconds
            elif not h.is_done():
                rest.append(h)
        self._unaccounted = rest
        marks, self._marks = self._marks, []
        self._stats.periods = [b - a for a, b in zip(marks, marks[1:], strict=False)]
        return self._take_stats()
