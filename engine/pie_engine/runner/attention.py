"""Paged attention: the only code that knows KV lives in blocks.

Every step's tokens are flattened (no padding): sequence i owns tokens ``query_start_loc[i]:query_start_loc[i+1]``
at positions ``seq_lens[i] - query_len_i .. seq_lens[i] - 1``. Attention first writes the new K/V at
``slot_mapping``, then reads each sequence's whole context (cached prefix + this chunk) through its block table,
so chunked prefill (a chunk starting mid-sequence) and prefix-cached context need nothing special.

Two paths: Triton kernels on CUDA (kernels/), torch on CPU (also the reference the kernels are tested against).
Decode sequences (query_len 1) are batched into one call; prefill chunks run one SDPA each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, built once and shared by all layers (B sequences, T tokens)."""

    slot_mapping: torch.Tensor  # [T] int64 KV slot of each new token
    query_start_loc: torch.Tensor  # [B + 1] int32 token offsets of each sequence
    seq_lens: torch.Tensor  # [B] int32 context length after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] int32, covering ceil(max_seq_len / block_size) blocks
    query_lens_list: list[int]
    seq_lens_list: list[int]
    query_start_list: list[int]  # [B + 1]
    max_query_len: int
    max_seq_len: int
    block_size: int
    # Decode subset (query_len == 1), precomputed for all layers. decode_token_idx is None when every sequence
    # decodes: then token i is sequence i and the full tensors above are used as they are.
    decode_seq_idx: list[int] = field(default_factory=list)
    decode_token_idx: torch.Tensor | None = None  # [Bd] int64
    decode_block_tables: torch.Tensor | None = None  # [Bd, max_decode_blocks] int32
    decode_seq_lens: torch.Tensor | None = None  # [Bd] int32
    prefill_seq_idx: list[int] = field(default_factory=list)
    _decode_mask: torch.Tensor | None = field(default=None, repr=False)  # [Bd, 1, 1, L] additive, torch path

    @property
    def num_tokens(self) -> int:
        return self.query_start_list[-1]

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_tables: np.ndarray, slot_mapping: np.ndarray,
              block_size: int, device: torch.device) -> AttentionMetadata:
        """block_tables: int32 array [B, >= ceil(max_seq_len / block_size)]; slot_mapping: int64 array [T]."""
        qsl = [0, *np.cumsum(query_lens).tolist()]
        max_seq = max(seq_lens, default=0)
        bt = block_tables[:, : -(-max_seq // block_size)] if len(seq_lens) else block_tables
        meta = cls(
            slot_mapping=torch.from_numpy(slot_mapping).to(device, non_blocking=True),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.from_numpy(np.ascontiguousarray(bt)).to(device, non_blocking=True),
            query_lens_list=list(query_lens), seq_lens_list=list(seq_lens), query_start_list=qsl,
            max_query_len=max(query_lens, default=0), max_seq_len=max_seq, block_size=block_size,
        )
        decode = [i for i, n in enumerate(query_lens) if n == 1]
        meta.decode_seq_idx = decode
        meta.prefill_seq_idx = [i for i, n in enumerate(query_lens) if n != 1]
        if decode and len(decode) == len(query_lens):
            meta.decode_block_tables, meta.decode_seq_lens = meta.block_tables, meta.seq_lens
        elif decode:
            max_dec = max(seq_lens[i] for i in decode)
            rows = np.asarray(decode)
            meta.decode_token_idx = torch.tensor([qsl[i] for i in decode], dtype=torch.int64, device=device)
            meta.decode_block_tables = torch.from_numpy(
                np.ascontiguousarray(bt[rows, : -(-max_dec // block_size)])).to(device)
            meta.decode_seq_lens = torch.tensor([seq_lens[i] for i in decode], dtype=torch.int32, device=device)
        return meta

    def decode_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """[Bd, 1, 1, L] additive mask (0 where a decode query may attend, i.e. key index < seq_len, else -inf);
        None if nothing is masked. Built once per step (from host-side lengths: no device sync) and reused by
        every layer; additive rather than bool because SDPA would convert a bool mask again in every call."""
        assert self.decode_block_tables is not None and self.decode_seq_lens is not None
        length = self.decode_block_tables.shape[1] * self.block_size
        if all(self.seq_lens_list[i] == length for i in self.decode_seq_idx):
            return None
        if self._decode_mask is None or self._decode_mask.dtype != dtype:
            self._decode_mask = _additive_mask(self.decode_seq_lens, length, dtype)
        return self._decode_mask


def _additive_mask(seq_lens: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, 1, length]: 0 for keys < seq_lens[b], -inf after (what SDPA makes of the equivalent bool mask)."""
    keys = torch.arange(length, device=seq_lens.device)
    masked = (keys[None, :] >= seq_lens[:, None])[:, None, None, :]
    return torch.zeros(masked.shape, dtype=dtype, device=seq_lens.device).masked_fill_(masked, float("-inf"))


def store_kv_torch(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Reference KV store: k, v [T, Hkv, D] -> kv_layer [2, NB, BS, Hkv, D] rows at slot_mapping [T] (int64)."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_layer.shape
    flat = kv_layer.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k.to(kv_layer.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_layer.dtype))


def paged_decode_torch(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                       scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference decode: q [B, H, D] over each sequence's paged context -> [B, H, D].

    Gathers the padded K/V of the whole batch through the block tables (one indexing op for K and V) and runs ONE
    masked SDPA, so the cost is a few batched kernels whatever the batch size. GQA: the G query heads sharing a KV
    head are laid out as G "query rows" of that head ([B, Hkv, G, D]), which needs no K/V repeat. ``mask``
    [B, 1, 1, L] (additive, see ``AttentionMetadata.decode_mask``) is derived from seq_lens when not given.
    """
    batch, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_layer.shape
    length = block_tables.shape[1] * block_size
    # index_select of whole blocks along the leading dim of each half copies contiguous block rows (memcpy);
    # advanced indexing over the middle dim (kv_layer[:, block_tables]) computes per-element offsets: ~2.5x slower.
    blocks = block_tables.reshape(-1).long()
    k, v = (half.index_select(0, blocks).view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
            for half in kv_layer)  # [B, Hkv, L, D] each
    if mask is None and bool((seq_lens < length).any()):
        mask = _additive_mask(seq_lens, length, q.dtype)
    qg = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(batch, num_heads, head_dim)


def _use_triton(device: torch.device) -> bool:
    # PIE_ATTENTION_BACKEND: "auto" (default) = Triton on CUDA, torch on CPU; "torch" forces the reference path
    # (debugging / A-B checks on a GPU); "triton" forces the kernels, also on CPU under TRITON_INTERPRET=1 (tests).
    backend = os.environ.get("PIE_ATTENTION_BACKEND", "auto")
    return backend == "triton" or (backend == "auto" and device.type == "cuda")


class Attention(nn.Module):
    """Causal self-attention over the paged KV cache for one layer (no weights)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D], kv_layer [2, NB, BS, Hkv, D] -> out [T, H, D]."""
        triton_path = _use_triton(q.device)
        if triton_path:
            from pie_engine.runner.kernels import store_kv

            store_kv(k, v, kv_layer, meta.slot_mapping)
        else:
            store_kv_torch(k, v, kv_layer, meta.slot_mapping)
        if not meta.prefill_seq_idx:  # pure decode step: token i is sequence i
            return self._decode(q, kv_layer, meta, triton_path)
        out = torch.empty_like(q)
        if meta.decode_seq_idx:
            assert meta.decode_token_idx is not None
            out[meta.decode_token_idx] = self._decode(q[meta.decode_token_idx], kv_layer, meta, triton_path)
        for i in meta.prefill_seq_idx:
            start, end = meta.query_start_list[i], meta.query_start_list[i + 1]
            out[start:end] = self._prefill(q[start:end], k[start:end], v[start:end], kv_layer, meta, i)
        return out

    def _decode(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
                triton_path: bool) -> torch.Tensor:
        assert meta.decode_block_tables is not None and meta.decode_seq_lens is not None
        if triton_path:
            from pie_engine.runner.kernels import paged_decode_attention

            return paged_decode_attention(q, kv_layer, meta.decode_block_tables, meta.decode_seq_lens, self.scale)
        return paged_decode_torch(q, kv_layer, meta.decode_block_tables, meta.decode_seq_lens, self.scale,
                                  meta.decode_mask(q.dtype))

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                 meta: AttentionMetadata, i: int) -> torch.Tensor:
        """One sequence's chunk: q [n, H, D] at positions seq_len - n .. seq_len - 1 -> [n, H, D]."""
        n, seq_len = q.shape[0], meta.seq_lens_list[i]
        context = seq_len - n
        gqa = self.num_kv_heads != self.num_heads
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if context == 0:
            # The whole sequence is in this chunk: its fresh K/V are the context (same values the cache holds).
            out = F.scaled_dot_product_attention(qh, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                                                 is_causal=True, scale=self.scale, enable_gqa=gqa)
        else:
            num_blocks = -(-seq_len // meta.block_size)
            blocks = meta.block_tables[i, :num_blocks].long()
            kc, vc = (half.index_select(0, blocks).view(-1, self.num_kv_heads, self.head_dim)[:seq_len]
                      for half in kv_layer)
            # Bottom-right aligned causal mask: query j (position context + j) sees keys 0 .. context + j.
            keys = torch.arange(seq_len, device=q.device)
            rows = torch.arange(context, seq_len, device=q.device)
            mask = keys[None, :] <= rows[:, None]
            out = F.scaled_dot_product_attention(qh, kc.transpose(0, 1).unsqueeze(0), vc.transpose(0, 1).unsqueeze(0),
                                                 attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        return out[0].transpose(0, 1)
