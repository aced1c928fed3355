"""From sequences that got a token this step to per-request outputs (text deltas, stop strings, logprobs)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pie_engine.core.sequence import Sequence
from pie_engine.text.detokenizer import Decoder, IncrementalDetokenizer


@dataclass
class RequestOutput:
    """One request's progress after a step.

    ``text`` / ``token_ids`` are cumulative; the ``delta_*`` fields are what this step added (stream those).
    NOTE: ``token_ids`` is the sequence's own list (not copied, to keep steps O(batch)): it is complete once
    ``finished`` and must not be mutated.
    """

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    delta_text: str
    delta_token_ids: list[int]
    delta_logprobs: list[dict[int, float]] = field(default_factory=list)  # per delta token, when requested
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    arrival_time: float = 0.0
    first_token_time: float | None = None
    num_preemptions: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)


class OutputProcessor:
    """Keeps one IncrementalDetokenizer per live request."""

    def __init__(self, tokenizer: Decoder) -> None:
        self.tokenizer = tokenizer
        self._detok: dict[str, IncrementalDetokenizer] = {}

    def add(self, seq: Sequence) -> None:
        self._detok[seq.request_id] = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, seq.params.stop)

    def remove(self, request_id: str) -> None:
        self._detok.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._detok)

    def process(self, seqs: list[Sequence], finish: Callable[[Sequence, str], None]) -> list[RequestOutput]:
        """Outputs for ``seqs`` (each got exactly one new token, or was finished without one).

        ``finish(seq, reason)`` ends a sequence whose text hit a stop string.
        """
        now = time.monotonic()
        outputs = []
        for seq in seqs:
            det = self._detok[seq.request_id]
            new_tokens: list[int] = []
            if seq.output_token_ids and len(seq.output_token_ids) > det.num_output_tokens:
                new_tokens = seq.output_token_ids[-1:]
                if seq.first_token_time is None:
                    seq.first_token_time = now
                if det.add_token(new_tokens[0], final=seq.is_finished):
                    # The stop string wins over a length/eos finish on the same token.
                    if seq.is_finished:
                        seq.finish_reason = "stop"
                    else:
                        finish(seq, "stop")
            outputs.append(RequestOutput(
                request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids, text=det.text,
                token_ids=seq.output_token_ids, delta_text=det.take_delta(seq.is_finished),
                delta_token_ids=new_tokens,
                delta_logprobs=seq.output_logprobs[-1:] if new_tokens and seq.params.logprobs is not None else [],
                finished=seq.is_finished, finish_reason=seq.finish_reason, arrival_time=seq.arrival_time,
                first_token_time=seq.first_token_time, num_preemptions=seq.num_preemptions))
            if seq.is_finished:
                self.remove(seq.request_id)
        return outputs

