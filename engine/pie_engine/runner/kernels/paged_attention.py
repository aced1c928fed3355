"""Triton kernel: decode attention (one query token per sequence) over a paged KV cache, with GQA.

One program per (sequence, query head). It walks the sequence's context BLOCK_N tokens at a time (a tile may span
several KV blocks: each token's block id comes from the block table) with an online softmax in float32, so
context lengths need not be block multiples and the block size need not be a power of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    out_ptr,  # [B, H, D] output, same dtype as q
    q_ptr,  # [B, H, D] query (strided rows; D contiguous)
    kv_ptr,  # [2, num_blocks, block_size, Hkv, D] contiguous layer KV tensor
    block_tables_ptr,  # [B, max_blocks] int32 block ids (entries past a sequence's blocks are ignored)
    seq_lens_ptr,  # [B] int32 context length of each sequence, including this step's token
    scale,  # softmax scale, usually D ** -0.5
    q_stride_b, q_stride_h,  # q strides (elements)
    o_stride_b, o_stride_h,  # out strides (elements)
    bt_stride_b,  # block_tables row stride (elements)
    kv_half,  # elements in one half (K or V) of the layer tensor
    kv_stride_blk, kv_stride_tok, kv_stride_head,  # layer tensor strides of one half (elements)
    GROUP: tl.constexpr,  # H // Hkv query heads per KV head
    BLOCK_SIZE: tl.constexpr,  # tokens per KV block
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # next power of two >= D
    BLOCK_N: tl.constexpr,  # context tokens per tile (power of two)
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    kv_head = h // GROUP
    seq_len = tl.load(seq_lens_ptr + b)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * q_stride_b + h * q_stride_h + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    q = q * scale
    # Scalars carried through the loop, made as reductions so their type is a float32 tensor from the start.
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * bt_stride_b
    # A while loop, not range(0, seq_len, BLOCK_N): the Triton interpreter (used by the CPU tests) cannot take a
    # loaded value as a range bound under numpy >= 2.3; compiled Triton lowers both the same way.
    start = seq_len * 0  # a tensor of seq_len's type, so the loop-carried value has one type
    while start < seq_len:
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seq_len
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        tok = blk * kv_stride_blk + (offs_n % BLOCK_SIZE) * kv_stride_tok + kv_head * kv_stride_head  # [BLOCK_N]
        ptrs = tok[:, None] + offs_d[None, :]
        tile_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(kv_ptr + ptrs, mask=tile_mask, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
        s = tl.sum(q[None, :] * k, axis=1)  # [BLOCK_N]
        s = tl.where(n_mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v = tl.load(kv_ptr + kv_half + ptrs, mask=tile_mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
        start += BLOCK_N
    out = acc / l_i
    tl.store(out_ptr + b * o_stride_b + h * o_stride_h + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def paged_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, block_n: int = 64) -> torch.Tensor:
    """q [B, H, D], kv_layer [2, num_blocks, block_size, Hkv, D], block_tables [B, max_blocks] int32,
    seq_lens [B] int32 (>= 1) -> out [B, H, D] in q's dtype."""
    batch, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, kv_dim = kv_layer.shape
    assert kv_dim == head_dim and num_heads % num_kv_heads == 0, "q and KV head shapes disagree"
    assert q.stride(2) == 1 and kv_layer.is_contiguous()
    assert block_tables.shape[0] == batch and seq_lens.shape == (batch,)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    k_half = kv_layer[0]
    _paged_decode_kernel[(batch, num_heads)](
        out, q, kv_layer, block_tables, seq_lens, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_half.numel(), k_half.stride(0), k_half.stride(1), k_half.stride(2),
        GROUP=num_heads // num_kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=block_n,
    )
    return out
