"""Views and copies of paged KV tensors (``[2, num_blocks, block_size, num_kv_heads, head_dim]``, 0 = K, 1 = V)."""

from __future__ import annotations

import torch


def kv_flat(kv: torch.Tensor) -> torch.Tensor:
    """[2, NB, BS, Hkv, D] -> [2, NB * BS, Hkv, D] (a view: slot s is row s)."""
    return kv.view(2, -1, kv.shape[-2], kv.shape[-1])


def row_bytes(kv: torch.Tensor) -> int:
    """Bytes of one token's K (or V) in a [2, NB, BS, Hkv, D] tensor."""
    return kv.shape[-2] * kv.shape[-1] * kv.element_size()


def copy_blocks(dst: torch.Tensor, src: torch.Tensor, lo: int, hi: int, non_blocking: bool = False) -> None:
    """dst[:, lo:hi] = src[:, lo:hi] for [2, NB, ...] tensors, as two contiguous copies.

    NOTE: one strided copy of ``[:, lo:hi]`` would not be dense (a gap between K and V), and a cross-device copy
    of a non-dense tensor goes through a temporary, which is synchronous and unpinned.
    """
    for i in range(2):
        dst[i, lo:hi].copy_(src[i, lo:hi], non_blocking=non_blocking)
