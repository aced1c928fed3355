"""``NativeCopyEngine``: the CPU copy engine with C worker threads that never hold the GIL (csrc/copy_worker.c).

Why: ``ThreadCopyEngine``'s Python workers need the GIL for their own code and for every torch call's return, so
each job costs the compute thread ~30 us of CPU (bench/swap_sweep.py, docs/pie.md "Benchmarks"). Here the compute
thread pays for one ctypes call per job (it keeps the GIL: the call only queues the job and signals a condvar);
the copies are plain ``memcpy`` on pthreads, and only ``wait`` (a ctypes call that releases the GIL) can block.
A step program (``NativeStepProgram``) queues a whole step's write-backs and refills in ONE call, each write-back
behind a compute fence that ``layer_done`` passes: per layer the compute thread pays one short call.

The library is compiled on first use (worker_lib.py). CPU tensors only, contiguous (raw pointers).
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections import deque
from collections.abc import Callable, Sequence

import torch

from pie_engine.pie.copy.base import StepCopies, StepEntry, StepProgram
from pie_engine.pie.copy.host_timed import HostTimedCopyEngine
from pie_engine.pie.copy.link import LinkModel
from pie_engine.pie.copy.native_handle import NativeCopyHandle, WorkerShared
from pie_engine.pie.copy.trace import Trace
from pie_engine.pie.copy.worker_lib import load, native_available

_DIR = {"in": 0, "out": 1}
POLL_S = float(os.environ.get("PIE_CW_POLL_S", "0.002"))
NAP_S = float(os.environ.get("PIE_CW_NAP_S", "0.00002"))
_DONE_ALL = (2**64 - 1,) * 3  # counters after close: every job has completed, every fence passed


class NativeStepProgram(StepProgram[NativeCopyHandle]):
    """One rotation phase's copies as the C worker's entry table, built once per cache layout (``step_program``).

    Entry i, in forward order: write back the step's rows from its slot into its host copy, then, if it has a
    refill, refill the slot from that layer's host copy (blocks [0, nb)). Holds the tensors, so the pointers stay
    valid as long as the program lives.
    """

    def __init__(self, engine: NativeCopyEngine, entries: Sequence[StepEntry]) -> None:
        self.engine = engine
        self.n = len(entries)
        self.layers = [e.layer for e in entries]
        self.slot_ids = [e.slot for e in entries]
        self.refills = [e.refill if e.refill_kv is not None else None for e in entries]
        self.keep = (*(e.slot_kv for e in entries), *(e.host_kv for e in entries),
                     *(e.refill_kv for e in entries if e.refill_kv is not None))
        rows: list[int] = []
        self.span_limit = 2**62  # blocks every swap-in may copy (the smallest tensor involved)
        for e in entries:
            dp, sp, self.block_bytes, dplane, splane = _pair(e.host_kv, e.slot_kv)
            self.row_bytes = self.block_bytes // e.slot_kv.shape[2]
            rows += [dp, sp, dp + dplane, sp + splane, min(dplane, splane) // self.row_bytes]
            if e.refill_kv is None:
                rows += [0] * 5
                continue
            dp, sp, _, dplane, splane = _pair(e.slot_kv, e.refill_kv)
            self.span_limit = min(self.span_limit, min(dplane, splane) // self.block_bytes)
            rows += [dp, sp, dp + dplane, sp + splane, 1]
        self.entries = (ctypes.c_int64 * len(rows))(*rows)

    def submit(self, nb: int, slots_dev: torch.Tensor, slots_cpu: torch.Tensor,
               host_ready: Callable[[int], NativeCopyHandle | None]) -> NativeStepCopies:
        # NOTE: host_ready is not needed: a refill waits for its slot's write-back, and the out queue runs in
        # order, so every earlier write-back (the refilled layer's own last one included) has finished too.
        return self.engine.submit_step(self, nb, slots_cpu)


class NativeStepCopies(StepCopies[NativeCopyHandle]):
    """A submitted step: ``write_backs[i]`` waits in C for compute fence ``base + i + 1``, ``swap_ins[i]`` (None:
    no refill) for ``write_backs[i]``."""

    def __init__(self, engine: NativeCopyEngine, base: int, write_backs: list[NativeCopyHandle],
                 swap_ins: list[NativeCopyHandle | None]) -> None:
        self.engine, self.base, self.write_backs, self.swap_ins = engine, base, write_backs, swap_ins

    def layer_done(self, i: int) -> tuple[NativeCopyHandle, NativeCopyHandle | None]:
        self.engine.advance(self.base + i + 1)
        return self.write_backs[i], self.swap_ins[i]

    def release(self) -> None:
        self.engine.release_fences()


def _pair(dst: torch.Tensor, src: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(dst address, src address, bytes per block, dst plane bytes, src plane bytes) of two contiguous
    [2, NB, BS, Hkv, D] CPU tensors of one dtype and token layout. NOTE: few torch calls: each costs ~0.1-0.3 us
    of the compute thread, which is what this engine saves."""
    ds, ss = dst.shape, src.shape
    for t, sh, name in ((dst, ds, "destination"), (src, ss, "source")):
        if not t.is_cpu or len(sh) != 5 or sh[0] != 2 or not t.is_contiguous():
            raise ValueError(f"NativeCopyEngine: the {name} must be a contiguous [2, NB, BS, Hkv, D] CPU tensor "
                             f"(got {tuple(sh)}, strides {t.stride()}, {t.device})")
    if dst.dtype != src.dtype or ds[2:] != ss[2:]:
        raise ValueError(f"NativeCopyEngine: KV tensors differ: {tuple(ds)} {dst.dtype} vs {tuple(ss)} {src.dtype}")
    blk = ds[2] * ds[3] * ds[4] * dst.element_size()
    return dst.data_ptr(), src.data_ptr(), blk, ds[1] * blk, ss[1] * blk


class NativeCopyEngine(HostTimedCopyEngine[NativeCopyHandle]):
    """CPU backend with C workers (one FIFO per direction); same semantics as ``ThreadCopyEngine``.

    Prerequisites are (direction, seq) pairs resolved in C. Every write-back goes to the out worker: a submit costs
    the compute thread ~6 us, an inline index copy ~13 us (measured, 8 rows). An idle worker polls every ``nap_s``
    for ``poll_s`` before parking, so a submit during a step needs no futex wake-up (measured: ~11 vs ~21 us of
    compute-thread CPU per job incl. cache effects). Records no ``Trace`` (its events would happen in C threads,
    unordered with Python's compute events): ``make_copy_engine`` uses threads for traced runs.
    """

    def __init__(self, link_in: LinkModel | None = None, link_out: LinkModel | None = None,
                 trace: Trace | None = None, poll_s: float = POLL_S, nap_s: float = NAP_S) -> None:
        if trace is not None:
            raise ValueError("NativeCopyEngine records no Trace; use ThreadCopyEngine for traced runs")
        super().__init__(link_in, link_out, trace)
        nogil, self._gil = load()
        cw = nogil.pie_cw_create(int(poll_s * 1e9), int(nap_s * 1e9))
        if not cw:
            raise RuntimeError("pie_cw_create failed (out of memory or threads)")
        self._sh = WorkerShared(nogil, cw)
        self._finalize = weakref.finalize(self, nogil.pie_cw_destroy, cw)  # drains and joins even if not closed
        self._outstanding: tuple[deque[NativeCopyHandle], deque[NativeCopyHandle]] = (deque(), deque())
        self._fences_made = self._fences_passed = 0  # compute fences (``submit_step``, ``advance``)

    @staticmethod
    def _pre(w: NativeCopyHandle | None) -> tuple[int, int]:
        """A prerequisite as (direction, seq); (0, 0) when there is nothing to wait for."""
        return (0, 0) if w is None or w.is_done() else (w._d, w._seq)

    def swap_in(self, dst: torch.Tensor, src: torch.Tensor, lo: int, hi: int, *, slot_free: NativeCopyHandle | None,
                host_ready: NativeCopyHandle | None, layer: int, slot: int) -> NativeCopyHandle:
        dp, sp, blk, dplane, splane = _pair(dst, src)
        if not 0 <= lo <= hi <= min(dplane, splane) // blk:
            raise ValueError(f"NativeCopyEngine: blocks [{lo}, {hi}) outside {dst.shape[1]} / {src.shape[1]}")
        n = (hi - lo) * blk
        dp, sp = dp + lo * blk, sp + lo * blk
        h = NativeCopyHandle("in", layer, slot, 2 * n, self._sh, (dst, src),
                             tuple(p for p in (slot_free, host_ready) if p is not None))
        (d0, s0), (d1, s1) = self._pre(slot_free), self._pre(host_ready)
        seq = self._gil.pie_cw_submit_span(self._sh.cw, 0, dp, sp, n, dp + dplane, sp + splane, n, d0, s0, d1, s1,
                                           self._min_ns(self.link_in, h.nbytes), ctypes.addressof(h.result))
        self._stats.swap_in_bytes += h.nbytes
        return self._queued(h, 0, seq)

    def write_back(self, layer_kv: torch.Tensor, host_kv: torch.Tensor, slots_dev: torch.Tensor,
                   slots_cpu: torch.Tensor, *, layer: int, slot: int) -> NativeCopyHandle:
        dp, sp, blk, dplane, splane = _pair(host_kv, layer_kv)
        if slots_cpu.dtype != torch.int64 or not slots_cpu.is_cpu or not slots_cpu.is_contiguous():
            raise ValueError("NativeCopyEngine: slots_cpu must be a contiguous int64 CPU tensor")
        bs = layer_kv.shape[2]
        row = blk // bs  # one token's K (or V)
        n = slots_cpu.numel()
        h = NativeCopyHandle("out", layer, slot, 2 * n * row, self._sh, (layer_kv, host_kv))
        limit = min(dplane, splane) // row
        # NOTE: no prerequisite: on the CPU, end_layer is called after the layer's compute has finished. The
        # indices are copied by the submit call, so slots_cpu may be reused at once.
        seq = self._gil.pie_cw_submit_rows(self._sh.cw, 1, dp, sp, dp + dplane, sp + splane, row,
                                           slots_cpu.data_ptr(), n, limit,
                                           0, 0, 0, 0, self._min_ns(self.link_out, h.nbytes),
                                           ctypes.addressof(h.result))
        self._stats.swap_out_bytes += h.nbytes
        self._unaccounted.append(h)  # write-backs are accounted in the step that issued them
        return self._queued(h, 1, seq)

    # ------------------------------------------------------------------------------------- whole-step programs
    def step_program(self, entries: Sequence[StepEntry]) -> NativeStepProgram:
        return NativeStepProgram(self, entries)

    def submit_step(self, prog: NativeStepProgram, nb: int, slots_cpu: torch.Tensor) -> NativeStepCopies:
        """Queue a whole step's copies in one call, before the step runs: write-back i waits for compute fence
        ``base + i + 1`` (``advance``), swap-in i for write-back i."""
        if not 0 <= nb <= prog.span_limit:
            raise ValueError(f"NativeCopyEngine: {nb} blocks exceed the program's tensors ({prog.span_limit})")
        if slots_cpu.dtype != torch.int64 or not slots_cpu.is_cpu or not slots_cpu.is_contiguous():
            raise ValueError("NativeCopyEngine: slots_cpu must be a contiguous int64 CPU tensor")
        n, rows, span = prog.n, slots_cpu.numel(), nb * prog.block_bytes
        wb_bytes, in_bytes = 2 * rows * prog.row_bytes, 2 * span
        base = self._fences_made
        result, seqs = (ctypes.c_int64 * (4 * n))(), (ctypes.c_uint64 * 2)()
        if not self._gil.pie_cw_submit_step(self._sh.cw, prog.entries, n, prog.row_bytes, span,
                                            slots_cpu.data_ptr(), rows, base,
                                            self._min_ns(self.link_out, wb_bytes),
                                            self._min_ns(self.link_in, in_bytes), result, seqs):
            raise MemoryError("NativeCopyEngine: could not allocate a step's copy jobs")
        self._fences_made += n
        sh, keep = self._sh, prog.keep
        out_seq, in_seq = seqs[0], seqs[1]
        wbs: list[NativeCopyHandle] = []
        ins: list[NativeCopyHandle | None] = []
        for i in range(n):
            layer, slot, refill = prog.layers[i], prog.slot_ids[i], prog.refills[i]
            wb = NativeCopyHandle("out", layer, slot, wb_bytes, sh, keep, (), result, 4 * i)
            wbs.append(self._track(wb, 1, out_seq + i))
            if refill is None:
                ins.append(None)
                continue
            h = NativeCopyHandle("in", refill, slot, in_bytes, sh, keep, (wb,), result, 4 * i + 2)
            ins.append(self._track(h, 0, in_seq))
            in_seq += 1
        self._stats.swap_out_bytes += n * wb_bytes
        self._stats.swap_in_bytes += (in_seq - seqs[1]) * in_bytes
        self._unaccounted.extend(wbs)  # write-backs are accounted in the step that issued them
        return NativeStepCopies(self, base, wbs, ins)

    def advance(self, fence: int) -> None:
        """The compute thread passed fence ``fence`` (and every earlier one): its write-back may start."""
        if fence > self._fences_passed and self._finalize.alive:
            self._fences_passed = fence
            self._gil.pie_cw_advance(self._sh.cw, fence)

    def release_fences(self) -> None:
        """Pass every fence made so far (a step that ended early, or closing): nothing queued may wait forever."""
        self.advance(self._fences_made)

    @staticmethod
    def _min_ns(link: LinkModel | None, nbytes: int) -> int:
        return int(link.seconds(nbytes) * 1e9) if link is not None else 0

    def _queued(self, h: NativeCopyHandle, d: int, seq: int) -> NativeCopyHandle:
        if not seq:
            raise MemoryError("NativeCopyEngine: could not allocate a copy job")
        return self._track(h, d, seq)

    def _track(self, h: NativeCopyHandle, d: int, seq: int) -> NativeCopyHandle:
        h._d, h._seq = d, seq
        q = self._outstanding[d]
        done = self._sh.counters[d]
        while q and q[0]._seq <= done:  # FIFO: release the memory of jobs known complete
            q.popleft().keep = None
        q.append(h)
        return h

    def copy_seconds_total(self, direction: str) -> float:
        """Seconds the ``direction`` ("in"/"out") worker has spent on copies (link-model sleeps included)."""
        return self._sh.nogil.pie_cw_copy_ns(self._sh.cw, _DIR[direction]) * 1e-9 if self._finalize.alive else 0.0

    def synchronize(self) -> None:
        if self._fences_passed < self._fences_made:
            raise RuntimeError("synchronize() would wait forever: a queued write-back waits for a compute fence "
                               "not yet passed (advance or release_fences first)")
        for q in self._outstanding:
            while q:
                q[0].wait_host()  # raises a failed copy, as ThreadCopyEngine's does
                q.popleft()

    def close(self) -> None:
        if self._finalize.alive:
            self.release_fences()  # NOTE: or the drain in destroy would wait forever
            self._finalize()  # drains both queues, then joins the workers
            self._sh.counters = _DONE_ALL  # the C memory is gone; every job has completed
            for q in self._outstanding:
                for h in q:
                    h.keep = None
                q.clear()


def cpu_engine_from_env(link_in: LinkModel | None, link_out: LinkModel | None) -> NativeCopyEngine | None:
    """The native engine unless ``PIE_COPY_ENGINE=threads`` or it is unavailable (None: use threads).

    ``PIE_COPY_ENGINE=native`` makes unavailability an error (RuntimeError with the reason).
    """
    choice = os.environ.get("PIE_COPY_ENGINE", "").strip().lower()
    if choice not in ("", "native", "threads"):
        raise ValueError(f"PIE_COPY_ENGINE={choice!r}: expected 'native' or 'threads'")
    if choice == "threads" or (choice == "" and not native_available()):
        return None
    return NativeCopyEngine(link_in, link_out)  # raises RuntimeError with the reason if the build failed
