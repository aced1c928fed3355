"""Executes one StepPlan: flattened varlen tokens in, float32 CPU logits of the sampling sequences out."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pie_engine.config import EngineConfig
from pie_engine.core.plan import ScheduledSeq, StepPlan
from pie_engine.kv.cache import KVCache, KVSpec
from pie_engine.kv.device_cache import DeviceKVCache
from pie_engine.models.loader import load_model, resolve_dtype
from pie_engine.models.model_config import ModelConfig
from pie_engine.runner.attention import AttentionMetadata
from pie_engine.runner.device import kv_sizing, resolve_device

log = logging.getLogger(__name__)


@dataclass
class StepInputs:
    """Device tensors for one forward pass (T tokens, B sequences)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    slot_mapping_cpu: torch.Tensor  # [T] int64, meta.slot_mapping on the CPU (the swapping cache reads it)
    sample_idx: list[int]  # token index of the last token of each sampling sequence, in plan order


class ModelRunner:
    """Owns the model and the KV cache; never decides anything (the scheduler does).

    Attributes: ``model_config``, ``device``, ``dtype``, ``num_blocks`` (device KV blocks per layer),
    ``kv_cache``, ``max_model_len``, ``block_size``, ``vocab_size``.
    """

    def __init__(self, config: EngineConfig,
                 make_kv_cache: Callable[[KVSpec], KVCache] = DeviceKVCache.from_spec) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.model_config = ModelConfig.from_pretrained(config.model)
        self.dtype = resolve_dtype(config.dtype, self.model_config)
        self.block_size = config.block_size
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        self.vocab_size = self.model_config.vocab_size
        self.max_model_len = self._max_model_len()
        self.model = load_model(config.model, self.model_config, self.dtype, self.device)
        # Sized after the weights are on the device, so a GPU-fraction budget accounts for them.
        sizing = kv_sizing(config, self.model_config, self.device, self.dtype)
        self.num_blocks = sizing.blocks
        # What a fractional budget leaves out of the KV (exported: the operator resolves fractions live with it).
        self.gpu_memory_overhead: int | None = sizing.overhead
        mc = self.model_config
        self.kv_spec = KVSpec(mc.num_hidden_layers, self.num_blocks, self.block_size, mc.num_key_value_heads,
                              mc.head_dim, self.dtype, self.device)
        self.kv_cache = make_kv_cache(self.kv_spec)
        log.info("model %s (%s, %s on %s): %d KV blocks of %d tokens per layer, max_model_len %d",
                 config.model, self.model_config.architecture, self.dtype, self.device, self.num_blocks,
                 self.block_size, self.max_model_len)

    def _max_model_len(self) -> int:
        mc, requested = self.model_config, self.config.max_model_len
        limit = mc.max_position_embeddings
        if requested is not None and requested > limit:
            raise ValueError(f"max_model_len {requested} exceeds the model's max_position_embeddings {limit}")
        length = requested or limit
        if mc.sliding_window is not None and length > mc.sliding_window:
            # Sliding-window attention is not implemented; within the window full attention is exact.
            if requested is not None:
                raise ValueError(f"max_model_len {requested} exceeds the sliding window {mc.sliding_window} "
                                 "(sliding-window attention is not implemented)")
            log.warning("capping max_model_len at the sliding window %d", mc.sliding_window)
            length = mc.sliding_window
        return length

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Run one forward pass over ``plan.scheduled``; float32 CPU logits [num_sampling_seqs, vocab] in plan
        order. Does not modify the sequences."""
        if plan.is_empty:
            return torch.empty(0, self.vocab_size, dtype=torch.float32)
        return self.forward(plan, self.prepare(plan.scheduled))

    @torch.inference_mode()
    def forward(self, plan: StepPlan, inputs: StepInputs) -> torch.Tensor:
        """The forward pass of ``execute`` on prepared inputs (the Pie benchmarks replay recorded inputs on a
        no-swap cache to measure what swapping cost at exactly the same batches)."""
        self.kv_cache.begin_step(plan, inputs.meta.slot_mapping, inputs.slot_mapping_cpu)
        try:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv_cache)
        finally:
            self.kv_cache.end_step()
        if not inputs.sample_idx:
            return torch.empty(0, self.vocab_size, dtype=torch.float32)
        idx = torch.tensor(inputs.sample_idx, dtype=torch.int64, device=self.device)
        return self.model.compute_logits(hidden[idx]).float().cpu()

    def prepare(self, scheduled: list[ScheduledSeq]) -> StepInputs:
        """Flatten the scheduled chunks into device tensors (vectorized: no per-token Python)."""
        bs = self.block_size
        query_lens = [s.num_new_tokens for s in scheduled]
        starts = [s.seq.num_computed_tokens for s in scheduled]
        seq_lens = [a + n for a, n in zip(starts, query_lens, strict=True)]
        width = -(-max(seq_lens) // bs)
        block_tables = np.zeros((len(scheduled), width), dtype=np.int32)
        input_ids: list[int] = []
        sample_idx: list[int] = []
        for i, s in enumerate(scheduled):
            seq, start, end = s.seq, starts[i], seq_lens[i]
            if s.num_new_tokens < 1 or end > seq.num_tokens:
                raise ValueError(f"sequence {seq.seq_id}: cannot compute tokens [{start}, {end}) of "
                                 f"{seq.num_tokens}")
            if end > self.max_model_len:
                raise ValueError(f"sequence {seq.seq_id}: length {end} exceeds max_model_len {self.max_model_len}")
            num_blocks = -(-end // bs)
            if len(seq.block_table) < num_blocks:
                raise ValueError(f"sequence {seq.seq_id}: {len(seq.block_table)} KV blocks allocated, "
                                 f"{num_blocks} needed for {end} tokens")
            block_tables[i, :num_blocks] = seq.block_table[:num_blocks]
            input_ids += _token_slice(seq.prompt_token_ids, seq.output_token_ids, start, end)
            if s.sample:
                sample_idx.append(len(input_ids) - 1)
        lens = np.asarray(query_lens)
        token_seq = np.repeat(np.arange(len(scheduled)), lens)
        offsets = np.cumsum(lens) - lens  # first token index of each sequence
        positions = np.arange(len(input_ids)) + np.repeat(np.asarray(starts) - offsets, lens)
        slot_mapping = block_tables[token_seq, positions // bs].astype(np.int64) * bs + positions % bs
        meta = AttentionMetadata.build(query_lens, seq_lens, block_tables, slot_mapping, bs, self.device)
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.int64).to(self.device, non_blocking=True),
            positions=torch.from_numpy(positions.astype(np.int64)).to(self.device, non_blocking=True),
            meta=meta, slot_mapping_cpu=torch.from_numpy(slot_mapping), sample_idx=sample_idx,
        )


def _token_slice(prompt: list[int], output: list[int], start: int, end: int) -> list[int]:
    """token_ids[start:end] without concatenating prompt + output (Sequence.token_ids copies both)."""
    p = len(prompt)
    if end <= p:
        return prompt[start:end]
    if start >= p:
        return output[start - p:end - p]
    return prompt[start:] + output[:end - p]
