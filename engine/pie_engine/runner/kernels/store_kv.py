"""Triton kernel: write this step's new K/V rows into a layer's paged KV tensor at ``slot_mapping``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr,  # [T, Hkv, D]: rows strided by k_stride_t, heads and dims contiguous
    v_ptr,  # [T, Hkv, D]: rows strided by v_stride_t, heads and dims contiguous
    kv_ptr,  # [2, num_blocks, block_size, Hkv, D] contiguous; slot s starts at s * HD in each half
    slot_ptr,  # [T] int64 (or int32); a negative slot means "do not store" (padding)
    k_stride_t,  # elements between consecutive tokens of k
    v_stride_t,  # elements between consecutive tokens of v
    kv_half,  # elements in one half (K or V) of the layer tensor: num_blocks * block_size * HD
    HD: tl.constexpr,  # Hkv * D: elements of one token's K (or V)
    BLOCK: tl.constexpr,  # next power of two >= HD
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = (offs < HD) & (slot >= 0)
    k = tl.load(k_ptr + t.to(tl.int64) * k_stride_t + offs, mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * v_stride_t + offs, mask=mask)
    tl.store(kv_ptr + slot * HD + offs, k, mask=mask)
    tl.store(kv_ptr + kv_half + slot * HD + offs, v, mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write k, v [T, Hkv, D] into kv_layer [2, num_blocks, block_size, Hkv, D] at slot_mapping [T] (in place)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert kv_layer.is_contiguous(), "the KV layer tensor must be contiguous"
    assert k.stride(2) == 1 and k.stride(1) == head_dim and v.stride(2) == 1 and v.stride(1) == head_dim, \
        "k/v rows must be contiguous [Hkv, D] blocks"
    assert kv_layer.shape[3:] == (num_kv_heads, head_dim) and slot_mapping.shape == (num_tokens,)
    hd = num_kv_heads * head_dim
    _store_kv_kernel[(num_tokens,)](
        k, v, kv_layer, slot_mapping, k.stride(0), v.stride(0), kv_layer[0].numel(),
        HD=hd, BLOCK=triton.next_power_of_2(hd),
    )
