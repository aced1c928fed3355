"""A request as the engine tracks it: tokens, progress, and the KV blocks it owns."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from pie_engine.core.sampling_params import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not yet scheduled, or preempted (its KV was dropped; it recomputes from the start)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One generation request.

    NOTE: ``num_computed_tokens`` counts tokens whose KV is in the cache; the tokens still to compute are
    ``token_ids[num_computed_tokens:]``. Preemption resets it to 0 and frees ``block_table`` (recompute), so a
    preempted sequence later recomputes prompt + generated tokens and continues exactly where it was.
    """

    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)  # per output token, if params.logprobs
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_preemptions: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
