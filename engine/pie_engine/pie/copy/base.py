"""Asynchronous KV copies between a layer's device slot and its host copy, in two directions.

One small interface (``CopyEngine``) with three backends:
- ``NativeCopyEngine`` (copy_engine_native.py, CPU device, the default there): C worker threads that never hold
  the GIL. Stall = wall time the compute thread blocks in ``wait``.
- ``ThreadCopyEngine`` (copy_engine_threads.py, CPU device): the same with Python worker threads; the fallback
  without a C compiler, and the traced backend of the ordering tests.
- ``CudaCopyEngine`` (copy_engine_cuda.py): one CUDA stream per direction, pinned host memory, CUDA events; the
  compute stream waits on an event, and stall is measured on the GPU with timing events.

A ``LinkModel`` throttles copies (every copy takes at least ``latency + bytes / bandwidth``) so tests and the
bench can model a slow link (PCIe) against a fast one (NVLink-C2C) on any machine.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LinkModel:
    """A modeled host<->device link: a copy of N bytes takes at least ``latency_s + N / bandwidth_bytes_per_s``."""

    bandwidth_bytes_per_s: float | None = None  # None: no bandwidth limit
    latency_s: float = 0.0

    def seconds(self, nbytes: int) -> float:
        bw = self.bandwidth_bytes_per_s
        return self.latency_s + (nbytes / bw if bw else 0.0)


class Trace:
    """Totally ordered event log (for tests): ``(event, layer, slot, step)`` in the order things happened.

    Events: ``in_start/in_end`` (swap-in into a slot), ``out_start/out_end`` (write-back from a slot),
    ``compute_begin/compute_end`` (the layer got / released its KV tensor). On the CUDA backend copy events are
    recorded when issued, not when the GPU runs them, so only the thread backend gives completion order.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int, int]] = []
        self.step = 0
        self._lock = threading.Lock()

    def record(self, event: str, layer: int, slot: int) -> None:
        with self._lock:
            self.events.append((event, layer, slot, self.step))


class CopyHandle:
    """One submitted copy. ``done`` is set once its host-side work finished (see each backend for what that is)."""

    def __init__(self, kind: str, layer: int, slot: int, nbytes: int) -> None:
        self.kind, self.layer, self.slot, self.nbytes = kind, layer, slot, nbytes
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.seconds: float | None = None  # copy duration once known (thread backend: wall; CUDA: GPU time)
        # CUDA backend only: start/end timing events and (write-back) the event after which the slot may be reused.
        self.start_ev: torch.cuda.Event | None = None
        self.end_ev: torch.cuda.Event | None = None
        self.device_ev: torch.cuda.Event | None = None

    def is_done(self) -> bool:
        """Host-side work finished (``done`` is set), without blocking."""
        return self.done.is_set()

    def wait_host(self) -> None:
        """Block until host-side completion; re-raise a copy failure here rather than hang or corrupt silently."""
        self.done.wait()
        if self.error is not None:
            raise RuntimeError(f"KV {self.kind} copy of layer {self.layer} failed") from self.error


@dataclass
class StepCopyStats:
    stall_seconds: float = 0.0  # compute waited for swap-ins
    copy_seconds: float = 0.0  # summed durations of copies resolved this step (both directions)
    swap_in_bytes: int = 0
    swap_out_bytes: int = 0
    periods: list[float] = field(default_factory=list)  # seconds between consecutive ``mark()``s of the step


def kv_flat(kv: torch.Tensor) -> torch.Tensor:
    """[2, NB, BS, Hkv, D] -> [2, NB * BS, Hkv, D] (a view: slot s is row s)."""
    return kv.view(2, -1, kv.shape[-2], kv.shape[-1])


def row_bytes(kv: torch.Tensor) -> int:
    """Bytes of one token's K (or V) in a [2, NB, BS, Hkv, D] tensor."""
    return kv.shape[-2] * kv.shape[-1] * kv.element_size()


def copy_blocks(dst: torch.Tensor, src: torch.Tensor, lo: int, hi: int, non_blocking: bool = False) -> None:
    """dst[:, lo:hi] = src[:, lo:hi] for [2, NB, ...] tensors, as two contiguous copies.

    NOTE: one strided copy of ``[:, lo:hi]`` would not be dense (a gap between K and V), and a cross-device copy
    of a non-dense tensor goes through a temporary, which is synchronous and unpinned.
    """
    for i in range(2):
        dst[i, lo:hi].copy_(src[i, lo:hi], non_blocking=non_blocking)


class CopyEngine(ABC):
    """Issues swap-ins (host copy -> device slot) and write-backs (changed slots -> host copy).

    All methods are called from the compute thread, in program order.
    """

    def __init__(self, link_in: LinkModel | None, link_out: LinkModel | None, trace: Trace | None) -> None:
        self.link_in, self.link_out, self.trace = link_in, link_out, trace
        self._stats = StepCopyStats()

    @abstractmethod
    def swap_in(self, dst: torch.Tensor, src: torch.Tensor, lo: int, hi: int, *, slot_free: CopyHandle | None,
                host_ready: CopyHandle | None, layer: int, slot: int) -> CopyHandle:
        """Copy blocks ``[lo, hi)`` of host ``src`` into device ``dst`` (both [2, NB, BS, Hkv, D]).

        Starts only after ``slot_free`` (the write-back of the slot's previous occupant: the slot may be
        overwritten) and ``host_ready`` (this layer's last write-back: the host copy is current).
        """

    @abstractmethod
    def write_back(self, layer_kv: torch.Tensor, host_kv: torch.Tensor, slots_dev: torch.Tensor,
                   slots_cpu: torch.Tensor, *, layer: int, slot: int) -> CopyHandle:
        """Copy the rows ``slots`` (the step's slot_mapping) of ``layer_kv`` into ``host_kv``, after the layer's
        compute so far. ``slots_dev``/``slots_cpu``: the same int64 [T] indices on the device / on the CPU."""

    @abstractmethod
    def wait(self, handle: CopyHandle) -> None:
        """Make the compute that follows wait for swap-in ``handle``; accounts the stall."""

    @abstractmethod
    def mark(self) -> None:
        """A boundary on the compute timeline (called by the cache at step start, after begin_step, at each
        layer's begin_layer and at step end). ``end_step`` returns the intervals between consecutive marks, stalls
        included, as ``StepCopyStats.periods``: comparing host-backed layers' periods with resident ones' measures
        what swapping costs at exactly this step's load (kv_swap.py)."""

    @abstractmethod
    def end_step(self) -> StepCopyStats:
        """Close the step's accounting (copies still in flight are accounted in a later step)."""

    @abstractmethod
    def synchronize(self) -> None:
        """Wait until every submitted copy finished (host side included)."""

    @abstractmethod
    def close(self) -> None:
        """Stop worker threads."""

    def _take_stats(self) -> StepCopyStats:
        stats, self._stats = self._stats, StepCopyStats()
        return stats


class HostTimedCopyEngine(CopyEngine):
    """The CPU backends' shared accounting: the compute thread blocks in ``wait`` (the stall, wall time), the
    timeline is read with ``clock``, and a copy's duration is known on its handle once it finished."""

    def __init__(self, link_in: LinkModel | None, link_out: LinkModel | None, trace: Trace | None) -> None:
        super().__init__(link_in, link_out, trace)
        # The timeline clock for ``mark``: wall time; a benchmark may substitute the critical path (CPU time of the
        # compute thread plus ``stall_seconds_total``, which grows live inside ``wait``).
        self.clock: Callable[[], float] = time.perf_counter
        self.stall_seconds_total = 0.0
        self._marks: list[float] = []
        self._unaccounted: list[CopyHandle] = []

    def wait(self, handle: CopyHandle) -> None:
        if not handle.is_done():
            t0 = time.perf_counter()
            handle.done.wait()
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


def make_copy_engine(device: torch.device, link_in: LinkModel | None = None, link_out: LinkModel | None = None,
                     trace: Trace | None = None) -> CopyEngine:
    """The backend for ``device``: CUDA streams on a GPU; on the CPU the GIL-free C workers (copy_engine_native.py)
    when they build, else worker threads. ``PIE_COPY_ENGINE=native|threads`` forces one (native unavailable:
    RuntimeError). A traced run always uses threads: only they record copy events in true completion order."""
    if device.type == "cuda":
        from pie_engine.pie.copy.cuda import CudaCopyEngine

        return CudaCopyEngine(device, link_in, link_out, trace)
    from pie_engine.pie.copy.threads import ThreadCopyEngine

    if trace is None:
        from pie_engine.pie.copy.native import cpu_engine_from_env

        if (engine := cpu_engine_from_env(link_in, link_out)) is not None:
            return engine
    return ThreadCopyEngine(link_in, link_out, trace)
