"""A totally ordered log of copy and compute events, for the ordering tests."""

from __future__ import annotations

import threading


class Trace:
    """Totally ordered event log (for tests): ``(event, layer, slot, step)`` in the order things happened.

    Events: ``in_start/in_end`` (swap-in into a slot), ``out_start/out_end`` (write-back from a slot),
    ``compute_begin/compute_end`` (the layer got / released its KV tensor). On the CUDA backend copy events are
    recorded when issued (``in_issue/out_issue``), not when the GPU runs them, so only the thread backend gives
    completion order; the native backend records none (its copies run in C threads).
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int, int]] = []
        self.step = 0
        self._lock = threading.Lock()

    def record(self, event: str, layer: int, slot: int) -> None:
        with self._lock:
            self.events.append((event, layer, slot, self.step))
