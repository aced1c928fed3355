"""The C copy worker's job handles (native.py): job ``seq`` of a direction is done once that direction's counter,
which the worker advances in FIFO order, reaches ``seq``."""

from __future__ import annotations

import ctypes

from pie_engine.pie.copy.base import CopyHandle


class WorkerShared:
    """What handles need from their engine (not the engine itself: no reference cycle engine -> handle -> engine):
    the library, the worker, and its completion counters (in, out, compute fences passed)."""

    def __init__(self, nogil: ctypes.CDLL, cw: int) -> None:
        self.nogil, self.cw = nogil, cw
        self.counters: ctypes.Array | tuple[int, ...] = (ctypes.c_uint64 * 3).from_address(
            nogil.pie_cw_counters(cw))


class NativeCopyHandle(CopyHandle):
    """A job of the C worker: job ``_seq`` of direction ``_d``. Keeps the tensors it reads and writes alive until it
    is seen complete. Its result ([ns, error], written by the worker before it counts the job done) is
    ``result[off:off + 2]``: a buffer of its own, or a slice of a whole step's (``NativeStepProgram``).

    NOTE: the compute thread creates a dozen of these per step, right after a layer's matmuls when its caches are
    cold, so it sets only what it needs (no threading.Event, no CUDA events) and the hot paths read ``_d``/``_seq``.
    """

    def __init__(self, kind: str, layer: int, slot: int, nbytes: int, sh: WorkerShared, keep: tuple | None,
                 pre: tuple[NativeCopyHandle, ...] = (), result: ctypes.Array | None = None, off: int = 0) -> None:
        self.kind, self.layer, self.slot, self.nbytes = kind, layer, slot, nbytes
        self.result = (ctypes.c_int64 * 2)() if result is None else result
        self.off = off
        self.keep: tuple | None = keep
        self.pre = pre
        self._sh, self._d, self._seq = sh, 0, 0  # set by the engine once the job has its sequence number

    def is_done(self) -> bool:
        return self._sh.counters[self._d] >= self._seq

    def join(self) -> None:
        if not self.is_done():
            self._sh.nogil.pie_cw_wait(self._sh.cw, self._d, self._seq)  # releases the GIL while it blocks

    def failed(self) -> bool:
        """Done with an error, its own or a prerequisite's (the worker does not propagate them)."""
        return bool(self.result[self.off + 1]) or any(p.failed() for p in self.pre)

    @property
    def seconds(self) -> float | None:
        return self.result[self.off] * 1e-9 if self.is_done() else None

    @property
    def error(self) -> BaseException | None:
        """Why the job failed (its own bad row, or a prerequisite's error), once it is done; else None."""
        if not self.is_done():
            return None
        if self.result[self.off + 1]:
            return IndexError(f"a row index of this write-back is outside the KV tensors (layer {self.layer})")
        return next((p.error for p in self.pre if p.error is not None), None)  # a prerequisite

    def wait_host(self) -> None:
        self.join()
        self.keep = None  # the worker is done with the memory
        if self.failed():
            raise RuntimeError(f"KV {self.kind} copy of layer {self.layer} failed") from self.error
