"""Continuous batching (vLLM v1 style): each step, running sequences first, then waiting ones, under a token budget.

There is no separate prefill/decode phase: a sequence simply has ``num_tokens - num_computed_tokens`` tokens left
to compute (the whole prompt at first, 1 while decoding), and a step gives it as many as the budget allows (chunked
prefill). When KV blocks run out, the latest-arrived running sequence is preempted by recompute: its blocks are
freed, ``num_computed_tokens`` drops to 0, and it returns to the front of the waiting queue. Its prompt and
generated tokens are kept, so it later recomputes them and continues exactly where it stopped.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from itertools import islice

from pie_engine.config import EngineConfig
from pie_engine.core.block_manager import BlockManager
from pie_engine.core.plan import ScheduledSeq, StepPlan
from pie_engine.core.sequence import Sequence, SequenceStatus


def _arrival(seq: Sequence) -> tuple[float, int]:
    return (seq.arrival_time, seq.seq_id)


class Scheduler:
    """Decides, each step, which sequences compute how many tokens; applies the sampled tokens afterwards."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager, *, eos_token_ids: Iterable[int] = (),
                 max_model_len: int | None = None) -> None:
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len or config.max_model_len
        self.waiting: deque[Sequence] = deque()
        # NOTE: kept sorted by arrival, so running[-1] is always the preemption victim and older requests get
        # the token budget first.
        self.running: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}
        # Sequences finished by schedule() itself (too long for the KV capacity); the engine reports and clears them.
        self.finished_early: list[Sequence] = []
        # Counters for metrics (monotonic).
        self.num_preemptions_total = 0
        self.num_prompt_tokens_total = 0  # prompt tokens of requests that produced their first token
        self.num_generation_tokens_total = 0

    # ------------------------------------------------------------------------------------------------ requests
    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._by_id:
            raise ValueError(f"duplicate request id {seq.request_id!r}")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._by_id[seq.request_id] = seq

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a request now (finish_reason "abort") and free its blocks; None if unknown or already done."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return None
        self.finish(seq, "abort")
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark ``seq`` finished, free its KV blocks and forget it."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._by_id.pop(seq.request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------------------------------------ schedule
    def schedule(self) -> StepPlan:
        """Pick this step's work and allocate its KV blocks. ``plan.swap`` stays None (the Pie cache fills it)."""
        bm = self.block_manager
        budget = self.config.max_num_batched_tokens
        plan = StepPlan()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.can_allocate(seq, n):
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:
                    # Alone and still out of blocks (capacity shrank below its length): it can never fit.
                    self.finish(seq, "length")
                    self.finished_early.append(seq)
                    break
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is seq:
                    break
            else:
                bm.allocate(seq, n)
                plan.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens + n == seq.num_tokens))
                budget -= n
                i += 1
                continue
            break  # seq itself left the running list: everything after it was already preempted
        # NOTE: no admissions in a step that had to preempt: the cache is full, a new sequence would thrash.
        while self.waiting and budget > 0 and not plan.preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            computed = bm.get_computed_blocks(seq) if seq.num_computed_tokens == 0 else []
            num_cached = len(computed) * bm.block_size
            n = min(seq.num_tokens - seq.num_computed_tokens - num_cached, budget)
            if not bm.can_allocate(seq, n, computed):
                if not self.running and bm.blocks_needed(seq.num_tokens) > bm.num_blocks:
                    self.finish(seq, "length")  # can never fit, not even alone: do not block the queue
                    self.finished_early.append(seq)
                    continue
                break
            bm.allocate(seq, n, computed)
            seq.num_computed_tokens += num_cached
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_arrival)
            plan.scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens + n == seq.num_tokens))
            budget -= n
        return plan

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(seq)

    # -------------------------------------------------------------------------------------------------- update
    def update(self, plan: StepPlan, sampled_token_ids: Seq[int],
               logprobs: Seq[dict[int, float] | None] | None = None) -> list[Sequence]:
        """Apply a finished step: advance progress, append the sampled tokens (one per ``sample`` entry, in plan
        order), run stop checks. Returns the sequences that got a new token (finished ones included)."""
        bm = self.block_manager
        out: list[Sequence] = []
        j = 0
        for s in plan.scheduled:
            seq = s.seq
            if seq.is_finished:  # aborted while the step ran
                j += s.sample
                continue
            seq.num_computed_tokens += s.num_new_tokens
            bm.cache_full_blocks(seq)
            if not s.sample:
                continue
            token = int(sampled_token_ids[j])
            top = logprobs[j] if logprobs is not None else None
            if top is not None:
                seq.output_logprobs.append(top)
            j += 1
            if not seq.output_token_ids:
                self.num_prompt_tokens_total += seq.num_prompt_tokens
            seq.output_token_ids.append(token)
            self.num_generation_tokens_total += 1
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.finish(seq, reason)
            out.append(seq)
        return out

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if len(seq.output_token_ids) >= p.max_tokens:
            return "length"
        if self.max_model_len is not None and seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    # ------------------------------------------------------------------------------------------------ capacity
    def admissible_waiting_blocks(self) -> int:
        """KV blocks per layer the waiting requests that could join the batch next need now (up to
        ``max_num_seqs``): the demand a capacity controller sees. Reads only the first few waiting requests."""
        room = max(0, self.config.max_num_seqs - self.num_running)
        return sum(self.block_manager.blocks_needed(s.num_tokens) for s in islice(self.waiting, room))

    def largest_need_blocks(self) -> int:
        """KV blocks per layer the longest unfinished request needs to run to completion alone: a capacity below
        this would end it early with "length"."""
        longest = max((len(s.prompt_token_ids) + s.params.max_tokens for s in [*self.running, *self.waiting]),
                      default=0)
        if self.max_model_len is not None:
            longest = min(longest, self.max_model_len)
        return self.block_manager.blocks_needed(longest)

    def tokens_to_recompute(self, n: int) -> int:
        """Computed tokens that a pool of ``n`` blocks per layer would preempt (``set_num_blocks(n)``), and that
        must then be computed again: what shrinking the pool costs."""
        return sum(s.num_computed_tokens for s in self.running if any(b >= n for b in s.block_table))

    def set_num_blocks(self, n: int) -> list[Sequence]:
        """Resize the device KV pool at runtime; first preempt (latest arrival first) every sequence holding a
        block id >= n. Returns the preempted sequences."""
        preempted: list[Sequence] = []
        for seq in sorted(self.running, key=_arrival, reverse=True):
            if any(b >= n for b in seq.block_table):
                self._preempt(seq)
                preempted.append(seq)
        self.block_manager.set_num_blocks(n)
        return preempted
