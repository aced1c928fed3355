"""A toy "model" that drives a KVCache through many steps of a changing workload, against a DeviceKVCache reference.

Per layer it does what attention does: write new KV at ``slot_mapping`` into the tensor from ``begin_layer``,
then read the whole context of every scheduled sequence, which must equal the reference's exactly. Sequences
arrive, prefill in chunks, decode, finish and get preempted, so block usage grows and shrinks between steps.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from pie_engine.core.block_manager import BlockManager
from pie_engine.core.plan import ScheduledSeq, StepPlan, SwapPlan
from pie_engine.core.sampling_params import SamplingParams
from pie_engine.core.sequence import Sequence
from pie_engine.kv.device_cache import DeviceKVCache
from pie_engine.pie.copy.tensors import kv_flat
from pie_engine.pie.swap_cache import LayerSwapKVCache


class ToyDriver:
    def __init__(self, cache: LayerSwapKVCache, seed: int = 0, max_seqs: int = 4, chunk: int = 5,
                 max_prompt: int = 14, max_output: int = 12, schedule_prob: float = 1.0,
                 swap_plan: bool = True) -> None:
        """``schedule_prob``: chance a live sequence is scheduled in a step (others wait, as under a token budget).
        ``swap_plan``: fill ``plan.swap``; without it the cache derives the prefix from the scheduled block tables
        only, so a sequence skipped last step can read blocks beyond what a wrapped prefetch copied."""
        self.cache = cache
        self.ref = DeviceKVCache(cache.num_layers, cache.geometry.pool_blocks, cache.block_size, cache.num_kv_heads,
                                 cache.head_dim, cache.dtype, cache.device)
        self.bm = BlockManager(cache.num_blocks, cache.block_size)
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.max_seqs, self.chunk, self.max_prompt, self.max_output = max_seqs, chunk, max_prompt, max_output
        self.schedule_prob, self.swap_plan = schedule_prob, swap_plan
        self.live: list[Sequence] = []
        self.reads = 0  # context rows compared against the reference
        self.steps = 0

    def _drop(self, seq: Sequence) -> None:
        self.bm.free(seq)
        self.live.remove(seq)

    def step(self, compute: Callable[[int], None] | None = None) -> None:
        """One engine step; ``compute(layer)`` runs between begin_layer and the KV write (e.g. a sleep)."""
        while len(self.live) < self.max_seqs and self.rng.random() < 0.6:
            n = self.rng.randint(2, self.max_prompt)
            self.live.append(Sequence(prompt_token_ids=[1] * n, params=SamplingParams(max_tokens=self.max_output)))
        scheduled: list[ScheduledSeq] = []
        for seq in list(self.live):
            if seq.num_computed_tokens and self.rng.random() >= self.schedule_prob:
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, self.chunk)
            if not self.bm.can_allocate(seq, n):
                self._drop(seq)  # preempted: its KV is forgotten
                continue
            self.bm.allocate(seq, n)
            scheduled.append(ScheduledSeq(seq, n, seq.num_computed_tokens + n == seq.num_tokens))
        if not scheduled:
            return
        bs = self.cache.block_size
        slots = [s.seq.block_table[p // bs] * bs + p % bs for s in scheduled
                 for p in range(s.seq.num_computed_tokens, s.seq.num_computed_tokens + s.num_new_tokens)]
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=self.cache.device)
        contexts = [torch.tensor([s.seq.block_table[p // bs] * bs + p % bs
                                  for p in range(s.seq.num_computed_tokens + s.num_new_tokens)],
                                 dtype=torch.int64, device=self.cache.device) for s in scheduled]
        swap = SwapPlan(self.cache.layers_on_host, self.bm.max_used_block_id + 1) if self.swap_plan else None
        plan = StepPlan(scheduled, swap=swap)
        self.cache.begin_step(plan, slot_mapping)
        self.ref.begin_step(plan, slot_mapping)
        shape = (2, len(slots), self.cache.num_kv_heads, self.cache.head_dim)
        for layer in range(self.cache.num_layers):
            kv, ref = self.cache.begin_layer(layer), self.ref.begin_layer(layer)
            if compute is not None:
                compute(layer)
            new = torch.randn(shape, generator=self.gen).to(self.cache.device, self.cache.dtype)
            kv_flat(kv).index_copy_(1, slot_mapping, new)
            kv_flat(ref).index_copy_(1, slot_mapping, new)
            for ctx in contexts:
                got, want = kv_flat(kv)[:, ctx], kv_flat(ref)[:, ctx]
                assert torch.equal(got, want), f"step {self.steps} layer {layer}: KV differs from the reference"
                self.reads += ctx.numel()
            self.cache.end_layer(layer)
        self.cache.end_step()
        self.steps += 1
        for s in scheduled:
            seq = s.seq
            seq.num_computed_tokens += s.num_new_tokens
            if s.sample:
                seq.output_token_ids.append(1)
                if len(seq.output_token_ids) >= seq.params.max_tokens or self.rng.random() < 0.05:
                    self._drop(seq)

    def reconfigure(self, m: int) -> None:
        """What the scheduler does: preempt owners of ids >= C_new before shrinking, then resize both sides."""
        c_new = self.cache.capacity_blocks(m)
        if c_new < self.bm.num_blocks:
            for seq in list(self.live):
                if any(b >= c_new for b in seq.block_table):
                    self._drop(seq)
            self.bm.set_num_blocks(c_new)
            self.cache.set_layers_on_host(m, keep_blocks=self.bm.max_used_block_id + 1)
        else:
            self.cache.set_layers_on_host(m, keep_blocks=self.bm.max_used_block_id + 1)
            self.bm.set_num_blocks(c_new)
        assert self.cache.num_blocks == c_new == self.bm.num_blocks
