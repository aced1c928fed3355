"""Asynchronous KV copies between a layer's device slot and its host copy, in two directions.

One small interface (``CopyEngine``) with two backends:
- ``ThreadCopyEngine`` (CPU device): one worker thread per direction (torch copies release the GIL), ordered by
  ``threading.Event`` prerequisites. Stall = wall time the compute thread blocks in ``wait``.
- ``CudaCopyEngine`` (copy_engine_cuda.py): one CUDA stream per direction, pinned host memory, CUDA events; the
  compute stream waits on an event, and stall is measured on the GPU with timing events.

A ``LinkModel`` throttles copies (every copy takes at least ``latency + bytes / bandwidth``) so tests and the
bench can model a slow link (PCIe) against a fast one (NVLink-C2C) on any machine.
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
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
        if not handle.done.is_set():
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
            elif not h.done.is_set():
                rest.append(h)
        self._unaccounted = rest
        marks, self._marks = self._marks, []
        self._stats.periods = [b - a for a, b in zip(marks, marks[1:], strict=False)]
        return self._take_stats()


_Job = tuple[CopyHandle, Sequence[CopyHandle], Callable[[], None]]


class ThreadCopyEngine(HostTimedCopyEngine):
    """CPU backend: copies run on two worker threads (in, out), each a FIFO, so ordering and stalls are real.

    Every torch call a worker makes re-takes the GIL when it returns, and the compute thread then waits for it
    (measured on the 2-vCPU bench machine: ~10 us of compute-thread CPU per re-take, ~18 us per job handed over).
    So a swap-in is one strided copy, and a write-back of at most ``inline_bytes`` (a decode step writes a few rows
    per layer) runs on the calling thread, which costs less than handing it over, unless a link model throttles it.
    Running it at once is safe: it has no prerequisite (see ``write_back``) and nothing in flight touches its rows.
    """

    def __init__(self, link_in: LinkModel | None = None, link_out: LinkModel | None = None,
                 trace: Trace | None = None, inline_bytes: int = 256 * 1024) -> None:
        super().__init__(link_in, link_out, trace)
        self.inline_bytes = inline_bytes
        self._queues: dict[str, queue.SimpleQueue[_Job | None]] = {"in": queue.SimpleQueue(),
                                                                    "out": queue.SimpleQueue()}
        self._outstanding: list[CopyHandle] = []
        self._threads = [threading.Thread(target=self._worker, args=(d,), name=f"pie-kv-{d}", daemon=True)
                         for d in self._queues]
        for t in self._threads:
            t.start()

    def swap_in(self, dst: torch.Tensor, src: torch.Tensor, lo: int, hi: int, *, slot_free: CopyHandle | None,
                host_ready: CopyHandle | None, layer: int, slot: int) -> CopyHandle:
        # NOTE: sizes from shapes: indexing a tensor costs microseconds on the compute thread.
        h = CopyHandle("in", layer, slot, (hi - lo) * dst.shape[2] * _row_bytes(dst) * 2)
        waits = [w for w in (slot_free, host_ready) if w is not None]
        # One strided copy of K and V together (CPU to CPU needs no temporary, unlike copy_blocks' CUDA case).
        return self._submit("in", h, waits, lambda: dst[:, lo:hi].copy_(src[:, lo:hi]))

    def write_back(self, layer_kv: torch.Tensor, host_kv: torch.Tensor, slots_dev: torch.Tensor,
                   slots_cpu: torch.Tensor, *, layer: int, slot: int) -> CopyHandle:
        h = CopyHandle("out", layer, slot, slots_cpu.numel() * _row_bytes(layer_kv) * 2)

        def run() -> None:
            kv_flat(host_kv).index_copy_(1, slots_cpu, kv_flat(layer_kv).index_select(1, slots_cpu))

        # NOTE: no prerequisite: on the CPU, end_layer is called after the layer's compute has finished.
        inline = self.link_out is None and h.nbytes <= self.inline_bytes
        return self._submit("out", h, [], run, inline)

    def _submit(self, direction: str, h: CopyHandle, waits: Sequence[CopyHandle], fn: Callable[[], None],
                inline: bool = False) -> CopyHandle:
        if direction == "in":
            self._stats.swap_in_bytes += h.nbytes
        else:
            self._stats.swap_out_bytes += h.nbytes
            self._unaccounted.append(h)  # write-backs are accounted in the step that issued them
        if inline:
            self._run(direction, h, waits, fn, None)
            return h
        self._outstanding = [o for o in self._outstanding if not o.done.is_set()]
        self._outstanding.append(h)
        self._queues[direction].put((h, waits, fn))
        return h

    @torch.inference_mode()
    def _worker(self, direction: str) -> None:
        # NOTE: inference mode is thread-local; the engine runs in it, so the host copies it allocates are
        # inference tensors, which may only be updated in place inside inference mode.
        link = self.link_in if direction == "in" else self.link_out
        q = self._queues[direction]
        while (job := q.get()) is not None:
            self._run(direction, *job, link)

    def _run(self, direction: str, h: CopyHandle, waits: Sequence[CopyHandle], fn: Callable[[], None],
             link: LinkModel | None) -> None:
        """One copy job: its prerequisites, the copy, the link model's delay; a failure goes to the handle."""
        try:
            for w in waits:
                w.wait_host()
            if self.trace is not None:
                self.trace.record(f"{direction}_start", h.layer, h.slot)
            t0 = time.perf_counter()
            fn()
            if link is not None and (rest := link.seconds(h.nbytes) - (time.perf_counter() - t0)) > 0:
                time.sleep(rest)
            h.seconds = time.perf_counter() - t0
            # NOTE: logged before `done` is set, so whoever waited on it logs strictly later.
            if self.trace is not None:
                self.trace.record(f"{direction}_end", h.layer, h.slot)
        except BaseException as e:  # surfaced to the waiter by wait_host()
            h.error = e
        finally:
            h.done.set()

    def synchronize(self) -> None:
        for h in self._outstanding:
            h.wait_host()
        self._outstanding = []

    def close(self) -> None:
        for q in self._queues.values():
            q.put(None)
        for t in self._threads:
            t.join()


def _row_bytes(kv: torch.Tensor) -> int:
    """Bytes of one token's K (or V) in a [2, NB, BS, Hkv, D] tensor."""
    return kv.shape[-2] * kv.shape[-1] * kv.element_size()


def make_copy_engine(device: torch.device, link_in: LinkModel | None = None, link_out: LinkModel | None = None,
                     trace: Trace | None = None) -> CopyEngine:
    """The backend for ``device``: CUDA streams on a GPU; on the CPU the GIL-free C workers (copy_engine_native.py)
    when they build, else worker threads. ``PIE_COPY_ENGINE=native|threads`` forces one (native unavailable:
    RuntimeError). A traced run always uses threads: only they record copy events in true completion order."""
    if device.type == "cuda":
        from pie_engine.copy_engine_cuda import CudaCopyEngine

        return CudaCopyEngine(device, link_in, link_out, trace)
    if trace is None:
        from pie_engine.copy_engine_native import cpu_engine_from_env

        if (engine := cpu_engine_from_env(link_in, link_out)) is not None:
            return engine
    return ThreadCopyEngine(link_in, link_out, trace)
