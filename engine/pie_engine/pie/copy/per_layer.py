"""The step program of backends that issue copies one at a time from Python (threads.py, cuda.py).

Each entry's write-back and refill are issued when the compute thread reports the entry's layer done, so a step
that ends early has nothing queued for the layers that did not run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pie_engine.pie.copy.base import CopyEngine, H, StepCopies, StepEntry, StepProgram


class PerLayerProgram(StepProgram[H]):
    def __init__(self, engine: CopyEngine[H], entries: Sequence[StepEntry]) -> None:
        self.engine, self.entries = engine, tuple(entries)

    def submit(self, nb: int, slots_dev: torch.Tensor, slots_cpu: torch.Tensor,
               host_ready: Callable[[int], H | None]) -> StepCopies[H]:
        return PerLayerCopies(self, nb, slots_dev, slots_cpu, host_ready)


class PerLayerCopies(StepCopies[H]):
    def __init__(self, program: PerLayerProgram[H], nb: int, slots_dev: torch.Tensor, slots_cpu: torch.Tensor,
                 host_ready: Callable[[int], H | None]) -> None:
        self.engine, self.entries = program.engine, program.entries
        self.nb, self.slots_dev, self.slots_cpu, self.host_ready = nb, slots_dev, slots_cpu, host_ready

    def layer_done(self, i: int) -> tuple[H, H | None]:
        e = self.entries[i]
        wb = self.engine.write_back(e.slot_kv, e.host_kv, self.slots_dev, self.slots_cpu, layer=e.layer,
                                    slot=e.slot)
        if e.refill is None or e.refill_kv is None:
            return wb, None
        # NOTE: the refill starts after this write-back (the slot is free) and after the refilled layer's own last
        # write-back (its host copy is current); the rotation never refills a slot with the layer it held.
        refill = self.engine.swap_in(e.slot_kv, e.refill_kv, 0, self.nb, slot_free=wb,
                                     host_ready=self.host_ready(e.refill), layer=e.refill, slot=e.slot)
        return wb, refill

    def release(self) -> None:
        pass  # nothing was queued ahead of the compute thread
