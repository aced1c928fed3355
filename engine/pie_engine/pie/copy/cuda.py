"""CUDA backend of the copy engine: a stream per direction, pinned host memory, events (see base.py).

- swap-in: on the in-stream, after the event that says the slot's previous occupant was gathered out; the
  compute stream then waits on the swap-in's end event (``current_stream().wait_event``): no host sync.
- write-back: on the out-stream, after the layer's compute: gather the step's slots into a device buffer, D2H
  into a pinned buffer, then a host thread scatters that buffer into the layer's host copy once the copy event
  completes. The slot may be refilled as soon as the gather ran (``device_ev``); the host copy is current once
  the scatter ran (``done``), which the next swap-in of the same layer needs.
- stall: a timing event recorded on the compute stream where the layer starts waiting ("reach"), and the swap-in's
  end event: stall = max(0, end - reach), read at end_step after the compute stream is synchronized.
- throttle (LinkModel): a spin kernel on a side stream that starts with the copy; the copy's end event waits for
  it, so a copy takes max(real copy, modeled time).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence

import torch

from pie_engine.pie.copy.base import CopyEngine, StepCopyStats, StepEntry, StepProgram
from pie_engine.pie.copy.event_handle import EventCopyHandle
from pie_engine.pie.copy.link import LinkModel
from pie_engine.pie.copy.per_layer import PerLayerProgram
from pie_engine.pie.copy.tensors import copy_blocks, kv_flat
from pie_engine.pie.copy.trace import Trace


def _timing_event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


class CudaCopyHandle(EventCopyHandle):
    """``done``: a swap-in was issued (its GPU-side end is ``end_ev``); a write-back's host copy is current.
    ``seconds`` stays None: GPU time is read from the timing events at ``end_step``."""

    def __init__(self, kind: str, layer: int, slot: int, nbytes: int) -> None:
        super().__init__(kind, layer, slot, nbytes)
        self.start_ev, self.end_ev = _timing_event(), _timing_event()
        self.device_ev: torch.cuda.Event | None = None  # write-backs: after it, the slot may be reused


_ScatterJob = tuple[CudaCopyHandle, torch.Tensor, torch.Tensor, torch.Tensor]


class CudaCopyEngine(CopyEngine[CudaCopyHandle]):
    def __init__(self, device: torch.device, link_in: LinkModel | None = None, link_out: LinkModel | None = None,
                 trace: Trace | None = None) -> None:
        super().__init__(link_in, link_out, trace)
        self.device = device
        self._in = torch.cuda.Stream(device)
        self._out = torch.cuda.Stream(device)
        self._spin = {"in": torch.cuda.Stream(device), "out": torch.cuda.Stream(device)}
        self._cycles_per_s: float | None = None
        self._stall_records: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._marks: list[torch.cuda.Event] = []  # timing events on the compute stream (``mark``)
        self._unaccounted: list[CudaCopyHandle] = []
        self._write_backs: list[CudaCopyHandle] = []
        self.issue_wait_seconds_total = 0.0  # host time spent waiting for a host copy to become current
        self._scatter_q: queue.SimpleQueue[_ScatterJob | None] = queue.SimpleQueue()
        self._scatter = threading.Thread(target=self._scatter_loop, name="pie-kv-scatter", daemon=True)
        self._scatter.start()

    # ---------------------------------------------------------------------------------------------- copies
    def swap_in(self, dst: torch.Tensor, src: torch.Tensor, lo: int, hi: int, *, slot_free: CudaCopyHandle | None,
                host_ready: CudaCopyHandle | None, layer: int, slot: int) -> CudaCopyHandle:
        h = CudaCopyHandle("in", layer, slot, (hi - lo) * dst[0, 0].numel() * 2 * dst.element_size())
        if host_ready is not None and not host_ready.is_done():
            # The H2D reads the host copy when the GPU runs it, so the scatter into it must have happened already.
            # NOTE: not a stall: the GPU still has the queued layers to run while the host waits here (the
            # next-step prefetch waits for a write-back of this same step). A GPU left idle shows in the
            # iteration time, which the controller compares with its baseline.
            t0 = time.perf_counter()
            host_ready.wait_host()
            self.issue_wait_seconds_total += time.perf_counter() - t0
        with torch.cuda.device(self.device), torch.cuda.stream(self._in):
            if slot_free is not None:
                assert slot_free.device_ev is not None
                self._in.wait_event(slot_free.device_ev)
            h.start_ev.record(self._in)
            copy_blocks(dst, src, lo, hi, non_blocking=True)
            self._throttle("in", h, self._in)
            h.end_ev.record(self._in)
        h.done.set()  # issued: the GPU-side completion is end_ev
        self._stats.swap_in_bytes += h.nbytes
        if self.trace is not None:
            self.trace.record("in_issue", layer, slot)
        return h

    def write_back(self, layer_kv: torch.Tensor, host_kv: torch.Tensor, slots_dev: torch.Tensor,
                   slots_cpu: torch.Tensor, *, layer: int, slot: int) -> CudaCopyHandle:
        h = CudaCopyHandle("out", layer, slot,
                           slots_cpu.numel() * layer_kv[0, 0, 0].numel() * 2 * layer_kv.element_size())
        h.device_ev = torch.cuda.Event()
        with torch.cuda.device(self.device):
            compute_done = torch.cuda.Event()
            compute_done.record()  # the caller's (compute) stream, right after this layer's kernels
            with torch.cuda.stream(self._out):
                self._out.wait_event(compute_done)
                h.start_ev.record(self._out)
                gathered = kv_flat(layer_kv).index_select(1, slots_dev)  # [2, T, Hkv, D]
                h.device_ev.record(self._out)
                pinned = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
                pinned.copy_(gathered, non_blocking=True)
                self._throttle("out", h, self._out)
                h.end_ev.record(self._out)
            # slots_dev was allocated on the compute stream; keep its memory until the out-stream used it.
            slots_dev.record_stream(self._out)
        self._stats.swap_out_bytes += h.nbytes
        self._unaccounted.append(h)
        self._write_backs = [w for w in self._write_backs if not w.is_done()]
        self._write_backs.append(h)
        self._scatter_q.put((h, pinned, host_kv, slots_cpu))
        if self.trace is not None:
            self.trace.record("out_issue", layer, slot)
        return h

    def step_program(self, entries: Sequence[StepEntry]) -> StepProgram[CudaCopyHandle]:
        return PerLayerProgram(self, entries)  # copies are issued layer by layer, behind the compute stream

    @torch.inference_mode()  # see ThreadCopyEngine._worker
    def _scatter_loop(self) -> None:
        while (job := self._scatter_q.get()) is not None:
            h, pinned, host_kv, slots = job
            try:
                h.end_ev.synchronize()
                kv_flat(host_kv).index_copy_(1, slots, pinned)
            except BaseException as e:  # surfaced by wait_host()
                h.error = e
            finally:
                h.done.set()

    def _throttle(self, direction: str, h: CudaCopyHandle, stream: torch.cuda.Stream) -> None:
        link = self.link_in if direction == "in" else self.link_out
        if link is None or (secs := link.seconds(h.nbytes)) <= 0:
            return
        spin = self._spin[direction]
        spin.wait_event(h.start_ev)
        with torch.cuda.stream(spin):
            torch.cuda._sleep(max(1, int(secs * self._cycles())))
        done = torch.cuda.Event()
        done.record(spin)
        stream.wait_event(done)

    def _cycles(self) -> float:
        """GPU clock cycles per second of torch.cuda._sleep, measured once."""
        if self._cycles_per_s is None:
            s, e, n = _timing_event(), _timing_event(), 20_000_000
            with torch.cuda.stream(self._spin["in"]):
                s.record()
                torch.cuda._sleep(n)
                e.record()
            e.synchronize()
            self._cycles_per_s = n / max(s.elapsed_time(e) / 1e3, 1e-9)
        return self._cycles_per_s

    # ---------------------------------------------------------------------------------------------- compute
    def wait(self, handle: CudaCopyHandle) -> None:
        handle.wait_host()
        reach = _timing_event()
        stream = torch.cuda.current_stream(self.device)
        reach.record(stream)
        stream.wait_event(handle.end_ev)
        self._stall_records.append((reach, handle.end_ev))
        self._unaccounted.append(handle)

    def set_clock(self, clock: Callable[[], float]) -> None:
        pass  # NOTE: the timeline is GPU time (timing events on the compute stream), whatever the host clock

    def mark(self) -> None:
        ev = _timing_event()
        ev.record(torch.cuda.current_stream(self.device))
        self._marks.append(ev)

    def end_step(self) -> StepCopyStats:
        # NOTE: the runner copies the logits to the host right after, so this sync costs no GPU time.
        torch.cuda.current_stream(self.device).synchronize()
        marks, self._marks = self._marks, []
        self._stats.periods = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:], strict=False)]
        for reach, end in self._stall_records:
            self._stats.stall_seconds += max(0.0, reach.elapsed_time(end)) / 1e3
        self._stall_records = []
        rest = []
        for h in self._unaccounted:
            if h.end_ev.query():
                self._stats.copy_seconds += h.start_ev.elapsed_time(h.end_ev) / 1e3
            else:
                rest.append(h)
        self._unaccounted = rest
        return self._take_stats()

    def synchronize(self) -> None:
        self._in.synchronize()
        self._out.synchronize()
        for h in self._write_backs:
            h.wait_host()
        self._write_backs = []

    def close(self) -> None:
        self._scatter_q.put(None)
        self._scatter.join()
