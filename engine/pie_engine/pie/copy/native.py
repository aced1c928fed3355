"""``NativeCopyEngine``: the CPU copy engine with C worker threads that never hold the GIL (csrc/copy_worker.c).

Why: ``ThreadCopyEngine``'s Python workers need the GIL for their own code and for every torch call's return, so
each job costs the compute thread ~30 us of CPU (bench/swap_sweep.py, docs/pie.md "Benchmarks"). Here the compute
thread pays for one ctypes call per job (it keeps the GIL: the call only queues the job and signals a condvar);
the copies are plain ``memcpy`` on pthreads, and only ``wait`` (a ctypes call that releases the GIL) can block.

The library is compiled on first use (copy_worker_lib.py). CPU tensors only, contiguous (raw pointers).
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections import deque

import torch

from pie_engine.pie.copy.base import CopyEngine, CopyHandle, HostTimedCopyEngine, LinkModel, Trace
from pie_engine.pie.copy.worker_lib import load, native_available

_DIR = {"in": 0, "out": 1}
POLL_S = float(os.environ.get("PIE_CW_POLL_S", "0.002"))
NAP_S = float(os.environ.get("PIE_CW_NAP_S", "0.00002"))
_DONE_ALL = (2**64 - 1,) * 3  # counters after close: every job has completed, every fence passed


class _Shared:
    """What handles need from their engine (not the engine itself: no reference cycle engine -> handle -> engine)."""

    def __init__(self, nogil: ctypes.CDLL, cw: int) -> None:
        self.nogil, self.cw = nogil, cw
        self.counters: ctypes.Array | tuple[int, ...] = (ctypes.c_uint64 * 3).from_address(
            nogil.pie_cw_counters(cw))


class _Done:
    """``threading.Event`` look-alike: set iff the job's direction has completed ``seq`` jobs (FIFO order)."""

    __slots__ = ("_sh", "_d", "_seq")

    def __init__(self, sh: _Shared, d: int, seq: int) -> None:
        self._sh, self._d, self._seq = sh, d, seq

    def is_set(self) -> bool:
        return self._sh.counters[self._d] >= self._seq

    def wait(self) -> bool:
        if not self.is_set():
            self._sh.nogil.pie_cw_wait(self._sh.cw, self._d, self._seq)
        return True


class NativeCopyHandle(CopyHandle):
    """A job of the C worker: job ``_seq`` of direction ``_d``. Keeps the tensors it reads and writes alive until it
    is seen complete. Its result ([ns, error], written by the worker before it counts the job done) is
    ``result[off:off + 2]``: a buffer of its own, or a slice of a whole step's (``submit_step``).

    NOTE: the compute thread creates a dozen of these per step, right after a layer's matmuls when its caches are
    cold, so it sets only what it needs (no threading.Event, no CUDA events) and the hot paths read ``_d``/``_seq``.
    """

    def __init__(self, kind: str, layer: int, slot: int, nbytes: int, sh: _Shared, keep: tuple | None,
                 pre: tuple[CopyHandle, ...] = (), result: ctypes.Array | None = None, off: int = 0) -> None:
        self.kind, self.layer, self.slot, self.nbytes = kind, layer, slot, nbytes
        self.result = (ctypes.c_int64 * 2)() if result is None else result
        self.off = off
        self.keep: tuple | None = keep
        self.pre = pre
        self._sh, self._d, self._seq = sh, 0, 0  # set by the engine once the job has its sequence number

    @property
    def done(self) -> _Done:  # type: ignore[override]
        return _Done(self._sh, self._d, self._seq)

    def is_done(self) -> bool:
        return self._sh.counters[self._d] >= self._seq

    def failed(self) -> bool:
        """Done with an error, its own or a prerequisite's (the worker does not propagate them)."""
        return bool(self.result[self.off + 1]) or any(p.failed() for p in self.pre if isinstance(p, NativeCopyHandle))

    @property
    def seconds(self) -> float | None:  # type: ignore[override]
        return self.result[self.off] * 1e-9 if self.is_done() else None

    @property
    def error(self) -> BaseException | None:  # type: ignore[override]
        if not self.is_done():
            return None
        if self.result[self.off + 1]:
            return IndexError(f"a row index of this write-back is outside the KV tensors (layer {self.layer})")
        return next((p.error for p in self.pre if p is not None and p.error is not None), None)  # a prerequisite

    def wait_host(self) -> None:
        if not self.is_done():
            self.done.wait()
        self.keep = None  # the worker is done with the memory
        if self.failed():
            raise RuntimeError(f"KV {self.kind} copy of layer {self.layer} failed") from self.error


class NativeStepProgram:
    """One rotation phase's copies as the C worker's entry table, built once per cache layout (``step_program``).

    Entry i, in forward order: write back the step's rows from ``slots[i]`` into ``host_wb[i]``, then, if
    ``host_in[i]`` is not None, refill ``slots[i]`` from it (blocks [0, nb)). Holds the tensors, so the pointers
    stay valid as long as the program lives.
    """

    def __init__(self, slots: list[torch.Tensor], host_wb: list[torch.Tensor],
                 host_in: list[torch.Tensor | None]) -> None:
        self.n = len(slots)
        self.keep = (*slots, *host_wb, *(h for h in host_in if h is not None))
        self.has_target = [h is not None for h in host_in]
        rows: list[int] = []
        self.span_limit = 2**62  # blocks every swap-in may copy (the smallest tensor involved)
        for slot, wb, src in zip(slots, host_wb, host_in, strict=True):
            dp, sp, self.block_bytes, dplane, splane = _pair(wb, slot)
            self.row_bytes = self.block_bytes // slot.shape[2]
            rows += [dp, sp, dp + dplane, sp + splane, min(dplane, splane) // self.row_bytes]
            if src is None:
                rows += [0] * 5
                continue
            dp, sp, _, dplane, splane = _pair(slot, src)
            self.span_limit = min(self.span_limit, min(dplane, splane) // self.block_bytes)
            rows += [dp, sp, dp + dplane, sp + splane, 1]
        self.entries = (ctypes.c_int64 * len(rows))(*rows)


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


class NativeCopyEngine(HostTimedCopyEngine):
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
        self._sh = _Shared(nogil, cw)
        self._finalize = weakref.finalize(self, nogil.pie_cw_destroy, cw)  # drains and joins even if not closed
        self._outstanding: tuple[deque[NativeCopyHandle], deque[NativeCopyHandle]] = (deque(), deque())
        self._fences_made = self._fences_passed = 0  # compute fences (``submit_step``, ``advance``)

    def _pre(self, w: CopyHandle | None) -> tuple[int, int]:
        """A prerequisite as (direction, seq); (0, 0) when there is nothing to wait for."""
        if w is None:
            return 0, 0
        if not isinstance(w, NativeCopyHandle):
            w.wait_host()  # another engine's handle: nothing C can wait on, so settle it here
            return 0, 0
        return (0, 0) if w.is_done() else (w._d, w._seq)

    def swap_in(self, dst: torch.Tensor, src: torch.Tensor, lo: int, hi: int, *, slot_free: CopyHandle | None,
                host_ready: CopyHandle | None, layer: int, slot: int) -> CopyHandle:
        dp, sp, blk, dplane, splane = _pair(dst, src)
        if not 0 <= lo <= hi <= min(dplane, splane) // blk:
            raise ValueError(f"NativeCopyEngine: blocks [{lo}, {hi}) outside {dst.shape[1]} / {src.shape[1]}")
        n = (hi - lo) * blk
        dp, sp = dp + lo * blk, sp + lo * blk
        h = NativeCopyHandle("in", layer, slot, 2 * n, self._sh, (dst, src),
                             (slot_free, host_ready) if slot_free or host_ready else ())
        (d0, s0), (d1, s1) = self._pre(slot_free), self._pre(host_ready)
        seq = self._gil.pie_cw_submit_span(self._sh.cw, 0, dp, sp, n, dp + dplane, sp + splane, n, d0, s0, d1, s1,
                                           self._min_ns(self.link_in, h.nbytes), ctypes.addressof(h.result))
        self._stats.swap_in_bytes += h.nbytes
        return self._queued(h, 0, seq)

    def write_back(self, layer_kv: torch.Tensor, host_kv: torch.Tensor, slots_dev: torch.Tensor,
                   slots_cpu: torch.Tensor, *, layer: int, slot: int) -> CopyHandle:
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
    def step_program(self, slots: list[torch.Tensor], host_wb: list[torch.Tensor],
                     host_in: list[torch.Tensor | None]) -> NativeStepProgram:
        """A reusable step program (see ``NativeStepProgram``); rebuild it whenever a tensor in it changes."""
        return NativeStepProgram(slots, host_wb, host_in)

    def submit_step(self, prog: NativeStepProgram, nb: int, slots_cpu: torch.Tensor, layers: list[int],
                    slot_ids: list[int]) -> tuple[int, list[NativeCopyHandle], list[NativeCopyHandle | None]]:
        """Queue a whole step's copies in one call, before the step runs: write-back i waits for compute fence
        ``base + i + 1`` (``advance``), swap-in i for write-back i. Returns (base, write-backs, swap-ins)."""
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
            wb = NativeCopyHandle("out", layers[i], slot_ids[i], wb_bytes, sh, keep, (), result, 4 * i)
            wbs.append(self._track(wb, 1, out_seq + i))
            if not prog.has_target[i]:
                ins.append(None)
                continue
            h = NativeCopyHandle("in", layers[i], slot_ids[i], in_bytes, sh, keep, (wb,), result, 4 * i + 2)
            ins.append(self._track(h, 0, in_seq))
            in_seq += 1
        self._stats.swap_out_bytes += n * wb_bytes
        self._stats.swap_in_bytes += (in_seq - seqs[1]) * in_bytes
        self._unaccounted.extend(wbs)  # write-backs are accounted in the step that issued them
        return base, wbs, ins

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


def cpu_engine_from_env(link_in: LinkModel | None, link_out: LinkModel | None) -> CopyEngine | None:
    """The native engine unless ``PIE_COPY_ENGINE=threads`` or it is unavailable (None: use threads).

    ``PIE_COPY_ENGINE=native`` makes unavailability an error (RuntimeError with the reason).
    """
    choice = os.environ.get("PIE_COPY_ENGINE", "").strip().lower()
    if choice not in ("", "native", "threads"):
        raise ValueError(f"PIE_COPY_ENGINE={choice!r}: expected 'native' or 'threads'")
    if choice == "threads" or (choice == "" and not native_available()):
        return None
    return NativeCopyEngine(link_in, link_out)  # raises RuntimeError with the reason if the build failed
