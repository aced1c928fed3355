"""``EventCopyHandle``: a copy handle completed by a Python thread (a ``threading.Event``), for the thread and CUDA
backends. What "done" means is the backend's: ThreadCopyEngine sets it when the copy ran, CudaCopyEngine when the
swap-in was issued or the write-back's host copy is current."""

from __future__ import annotations

import threading

from pie_engine.pie.copy.base import CopyHandle


class EventCopyHandle(CopyHandle):
    def __init__(self, kind: str, layer: int, slot: int, nbytes: int) -> None:
        self.kind, self.layer, self.slot, self.nbytes = kind, layer, slot, nbytes
        self.done = threading.Event()
        self.error: BaseException | None = None  # set by the worker before ``done`` when the copy failed
        self._seconds: float | None = None

    @property
    def seconds(self) -> float | None:
        return self._seconds

    @seconds.setter
    def seconds(self, value: float | None) -> None:
        self._seconds = value

    def is_done(self) -> bool:
        return self.done.is_set()

    def join(self) -> None:
        self.done.wait()

    def wait_host(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise RuntimeError(f"KV {self.kind} copy of layer {self.layer} failed") from self.error
