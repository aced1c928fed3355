"""The typed plan the scheduler hands the model runner each step. The runner executes it and never decides."""

from __future__ import annotations

from dataclasses import dataclass, field

from pie_engine.core.sequence import Sequence


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: compute ``num_new_tokens`` tokens starting at ``seq.num_computed_tokens``."""

    seq: Sequence
    num_new_tokens: int
    # True when this step reaches the end of the sequence's known tokens, so its last logits yield a new token.
    # False for a non-final chunk of a chunked prefill.
    sample: bool


@dataclass
class SwapPlan:
    """Layer-wise KV swap schedule for one step (the Pie mechanism; see kv_swap.py).

    Empty/None when expansion is off. The scheduler fills it; the runner's KV cache executes it.
    """

    layers_on_host: int = 0  # m: layers whose KV is not on the device at any instant
    # Device block ids (range [0, num_blocks_in_use)) whose KV the step reads; copies cover only this prefix.
    num_blocks_in_use: int = 0


@dataclass
class StepPlan:
    """Everything the runner needs for one forward pass.

    NOTE: KV blocks for all ``num_new_tokens`` of every scheduled sequence are already allocated in its
    ``block_table`` when the plan is handed over.
    """

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # informational: dropped to WAITING this step
    swap: SwapPlan | None = None

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def blocks_in_use(self) -> int:
        """The device block prefix ``[0, n)`` the step reads: the swap plan's, checked against the block tables
        (ValueError if a scheduled block lies beyond it), or the highest scheduled block id + 1 without one."""
        needed = max((max(s.seq.block_table) + 1 for s in self.scheduled if s.seq.block_table), default=0)
        if self.swap is None:
            return needed
        if self.swap.num_blocks_in_use < needed:
            raise ValueError(f"plan.swap.num_blocks_in_use={self.swap.num_blocks_in_use} but block id "
                             f"{needed - 1} is scheduled")
        return self.swap.num_blocks_in_use
