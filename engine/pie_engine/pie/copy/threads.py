"""``ThreadCopyEngine``: the CPU copy engine with Python worker threads (see base.py for the interface).

The fallback when the C workers (native.py) cannot be built, and the backend of traced runs: its workers record
copy events in true completion order, which the ordering tests check.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence

import torch

from pie_engine.pie.copy.base import StepEntry, StepProgram
from pie_engine.pie.copy.event_handle import EventCopyHandle
from pie_engine.pie.copy.host_timed import HostTimedCopyEngine
from pie_engine.pie.copy.link import LinkModel
from pie_engine.pie.copy.per_layer import PerLayerProgram
from pie_engine.pie.copy.tensors import kv_flat, row_bytes
from pie_engine.pie.copy.trace import Trace

_Job = tuple[EventCopyHandle, Sequence[EventCopyHandle], Callable[[], None]]


class ThreadCopyEngine(HostTimedCopyEngine[EventCopyHandle]):
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
        self._outstanding: list[EventCopyHandle] = []
        self._threads = [threading.Thread(target=self._worker, args=(d,), name=f"pie-kv-{d}", daemon=True)
                         for d in self._queues]
        for t in self._threads:
            t.start()

    def swap_in(self, dst: torch.Tensor, src: torch.Tensor, lo: int, hi: int, *, slot_free: EventCopyHandle | None,
                host_ready: EventCopyHandle | None, layer: int, slot: int) -> EventCopyHandle:
        # NOTE: sizes from shapes: indexing a tensor costs microseconds on the compute thread.
        h = EventCopyHandle("in", layer, slot, (hi - lo) * dst.shape[2] * row_bytes(dst) * 2)
        waits = [w for w in (slot_free, host_ready) if w is not None]

        def run() -> None:
            # One strided copy of K and V together (CPU to CPU needs no temporary, unlike copy_blocks' CUDA case).
            dst[:, lo:hi].copy_(src[:, lo:hi])

        return self._submit("in", h, waits, run)

    def write_back(self, layer_kv: torch.Tensor, host_kv: torch.Tensor, slots_dev: torch.Tensor,
                   slots_cpu: torch.Tensor, *, layer: int, slot: int) -> EventCopyHandle:
        h = EventCopyHandle("out", layer, slot, slots_cpu.numel() * row_bytes(layer_kv) * 2)

        def run() -> None:
            kv_flat(host_kv).index_copy_(1, slots_cpu, kv_flat(layer_kv).index_select(1, slots_cpu))

        # NOTE: no prerequisite: on the CPU, end_layer is called after the layer's compute has finished.
        inline = self.link_out is None and h.nbytes <= self.inline_bytes
        return self._submit("out", h, [], run, inline)

    def step_program(self, entries: Sequence[StepEntry]) -> StepProgram[EventCopyHandle]:
        return PerLayerProgram(self, entries)  # copies are issued layer by layer, as the compute thread goes

    def _submit(self, direction: str, h: EventCopyHandle, waits: Sequence[EventCopyHandle], fn: Callable[[], None],
                inline: bool = False) -> EventCopyHandle:
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

    def _run(self, direction: str, h: EventCopyHandle, waits: Sequence[EventCopyHandle], fn: Callable[[], None],
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
