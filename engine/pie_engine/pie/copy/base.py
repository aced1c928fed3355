"""The copy engine interface: asynchronous KV copies between a layer's device slot and its host copy.

Every backend implements all of it:
- ``NativeCopyEngine`` (native.py, CPU device, the default there): C worker threads that never hold the GIL; it
  queues a whole step's copies at once (``step_program``).
- ``ThreadCopyEngine`` (threads.py, CPU device): the same with Python worker threads; the fallback without a C
  compiler, and the traced backend of the ordering tests.
- ``CudaCopyEngine`` (cuda.py): one CUDA stream per direction, pinned host memory, CUDA events; the compute stream
  waits on an event, and stall is measured on the GPU with timing events.
``make_copy_engine`` (factory.py) picks one for a device.

Two ways to issue copies, both through this interface: one copy at a time (``swap_in``, ``write_back``), and a
step's write-backs and refills of the staging slots as a ``StepProgram`` compiled once per cache layout. The
swapping cache always uses programs for the refills; the backend decides how one runs (per layer from Python,
or queued in one call ahead of the compute thread).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from pie_engine.pie.copy.link import LinkModel
from pie_engine.pie.copy.trace import Trace


class CopyHandle(ABC):
    """One submitted copy: ``kind`` ("in": swap-in, "out": write-back) of ``layer`` into / out of ``slot``.

    A handle only means something to the engine that made it (the engine's type parameter says which).
    """

    kind: str
    layer: int
    slot: int
    nbytes: int

    @abstractmethod
    def is_done(self) -> bool:
        """Host-side work finished (each backend says what that is), without blocking."""

    @abstractmethod
    def join(self) -> None:
        """Block until ``is_done()``; does not check for failure (``wait_host`` does)."""

    @abstractmethod
    def wait_host(self) -> None:
        """Block until host-side completion; re-raise a copy failure here rather than hang or corrupt silently."""

    @property
    @abstractmethod
    def seconds(self) -> float | None:
        """The copy's duration once known (CPU backends: wall time on the worker; CUDA: GPU time), else None."""


H = TypeVar("H", bound=CopyHandle)


@dataclass
class StepCopyStats:
    stall_seconds: float = 0.0  # compute waited for swap-ins
    copy_seconds: float = 0.0  # summed durations of copies resolved this step (both directions)
    swap_in_bytes: int = 0
    swap_out_bytes: int = 0
    periods: list[float] = field(default_factory=list)  # seconds between consecutive ``mark()``s of the step


@dataclass(frozen=True)
class StepEntry:
    """One host-backed layer of a step program, in forward order: after the layer ran, write the step's rows of
    ``slot_kv`` back into ``host_kv``, then (if ``refill`` is not None) refill the slot from ``refill_kv``."""

    layer: int
    slot: int
    slot_kv: torch.Tensor  # the staging slot's device view [2, C, BS, Hkv, D]
    host_kv: torch.Tensor  # the layer's host copy
    refill: int | None  # the layer that takes the slot next (this step or the next one); None: none
    refill_kv: torch.Tensor | None  # its host copy


class StepCopies(ABC, Generic[H]):
    """The copies of one submitted step program; the compute thread reports each entry's layer as it finishes."""

    @abstractmethod
    def layer_done(self, i: int) -> tuple[H, H | None]:
        """Entry ``i``'s layer finished its compute: its write-back may start, then its refill.

        Returns (write-back, refill swap-in or None). NOTE: call it for entries in order, once each.
        """

    @abstractmethod
    def release(self) -> None:
        """The step ends early (or the cache closes): let every copy queued for a layer that will not run go ahead,
        so nothing waits forever. They move only rows of this step's new tokens, which nothing reads before a step
        writes them again, and refills that the caller then forgets."""


class StepProgram(ABC, Generic[H]):
    """One rotation phase's write-backs and refills, compiled by ``CopyEngine.step_program`` once per cache layout.
    NOTE: it refers to the entries' tensors: rebuild it whenever one of them is replaced."""

    @abstractmethod
    def submit(self, nb: int, slots_dev: torch.Tensor, slots_cpu: torch.Tensor,
               host_ready: Callable[[int], H | None]) -> StepCopies[H]:
        """Start a step: refills copy blocks ``[0, nb)``, write-backs the rows ``slots`` (the step's slot_mapping,
        int64 [T], on the device / on the CPU). ``host_ready(layer)``: that layer's latest write-back when a refill
        is issued (its host copy must be current before it is read), None when there is none."""


class CopyEngine(ABC, Generic[H]):
    """Issues swap-ins (host copy -> device slot) and write-backs (changed slots -> host copy).

    All methods are called from the compute thread, in program order.
    """

    def __init__(self, link_in: LinkModel | None, link_out: LinkModel | None, trace: Trace | None) -> None:
        self.link_in, self.link_out, self.trace = link_in, link_out, trace
        # Host time: the CPU backends' timeline (``mark``), and what the cache times host-side work it leaves out
        # of the timeline with (growing host copies). Wall time unless ``set_clock`` replaces it.
        self.clock: Callable[[], float] = time.perf_counter
        self._stats = StepCopyStats()

    @abstractmethod
    def swap_in(self, dst: torch.Tensor, src: torch.Tensor, lo: int, hi: int, *, slot_free: H | None,
                host_ready: H | None, layer: int, slot: int) -> H:
        """Copy blocks ``[lo, hi)`` of host ``src`` into device ``dst`` (both [2, NB, BS, Hkv, D]).

        Starts only after ``slot_free`` (the write-back of the slot's previous occupant: the slot may be
        overwritten) and ``host_ready`` (this layer's last write-back: the host copy is current).
        """

    @abstractmethod
    def write_back(self, layer_kv: torch.Tensor, host_kv: torch.Tensor, slots_dev: torch.Tensor,
                   slots_cpu: torch.Tensor, *, layer: int, slot: int) -> H:
        """Copy the rows ``slots`` (the step's slot_mapping) of ``layer_kv`` into ``host_kv``, after the layer's
        compute so far. ``slots_dev``/``slots_cpu``: the same int64 [T] indices on the device / on the CPU."""

    @abstractmethod
    def step_program(self, entries: Sequence[StepEntry]) -> StepProgram[H]:
        """Compile one rotation phase's write-backs and refills (``entries`` in forward order)."""

    @abstractmethod
    def wait(self, handle: H) -> None:
        """Make the compute that follows wait for swap-in ``handle``; accounts the stall."""

    @abstractmethod
    def mark(self) -> None:
        """A boundary on the compute timeline (called by the cache at step start, after begin_step, at each
        layer's begin_layer and at step end). ``end_step`` returns the intervals between consecutive marks, stalls
        included, as ``StepCopyStats.periods``: comparing host-backed layers' periods with resident ones' measures
        what swapping costs at exactly this step's load (pie/pipeline.py)."""

    @abstractmethod
    def set_clock(self, clock: Callable[[], float]) -> None:
        """Read the timeline with ``clock`` instead of wall time (a benchmark's critical path). A backend that
        times on the device ignores it."""

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
