"""Re-laying out a LayerSwapKVCache between steps: a new m (layers on host) and/or a new device pool size.

One function for both, because both are the same move: every layer's KV that must survive is first lifted off the
device (the old and new slot views alias one pool, so nothing may be written before everything is read), then the
new host copies are built, then the new layout is switched in and resident layers are copied back. Nothing is
changed before every allocation succeeded, so a failed allocation (pinned host memory, a bigger device pool) leaves
the cache exactly as it was. Kept apart from kv_swap.py, which is the per-step copy pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pie_engine.pie.copy.base import copy_blocks
from pie_engine.pie.geometry import SwapGeometry

if TYPE_CHECKING:
    from pie_engine.pie.swap_cache import LayerSwapKVCache


def check_feasible(cache: LayerSwapKVCache, geometry: SwapGeometry, m: int) -> None:
    """Raise ValueError unless ``m`` is in range for ``geometry`` and its host KV fits the cache's host limit."""
    geometry.check(m)
    if not geometry.feasible(m, cache.host_memory_limit):
        raise ValueError(f"layers_on_host={m} needs {geometry.host_bytes(m)} bytes of host KV, over the "
                         f"host memory limit of {cache.host_memory_limit} bytes")


def relayout(cache: LayerSwapKVCache, geometry: SwapGeometry, m: int, keep_blocks: int | None) -> int:
    """Move ``cache`` to ``geometry`` (its pool size) with ``m`` layers on host; returns the new C.

    Blocks ``[0, min(C_old, C_new, keep_blocks))`` of every layer keep their data; ``keep_blocks`` (one past the
    highest block id whose KV must survive) must be <= C_new: the scheduler preempts owners of higher ids first.
    """
    if cache._in_step:
        raise RuntimeError("the swapping cache can only be reconfigured between steps")
    check_feasible(cache, geometry, m)
    c_old, c_new = cache.num_blocks, geometry.capacity_blocks(m)
    if keep_blocks is not None and keep_blocks > c_new:
        raise ValueError(f"cannot shrink to {c_new} blocks per layer: blocks up to {keep_blocks - 1} hold KV "
                         "(preempt their owners first)")
    keep = min(c_old, c_new, c_new if keep_blocks is None else keep_blocks)
    cache.engine.synchronize()
    cache._pending.clear()
    cache._prefetched.clear()
    cache._last_wb.clear()
    cache._slot_wb.clear()
    cache._phase = 0
    same_pool = geometry.pool_blocks == cache.geometry.pool_blocks
    if m == cache.layers_on_host and same_pool:
        return c_new
    old, new = cache.schedule, geometry.schedule(m)
    # Phase 1: lift every old-resident layer's blocks off the device. Old host-backed layers are already current
    # on the host (the last step's write-backs finished in synchronize()).
    data: dict[int, torch.Tensor] = dict(cache._host)  # where each layer's KV is now (absent: never written)
    for layer in old.resident:
        data[layer] = cache._alloc_host(keep, pinned=False)
        copy_blocks(data[layer], cache._views[old.slot(layer)], 0, keep)
    # NOTE: a bigger pool is allocated while the old one still exists, so an out-of-memory error changes nothing.
    pool = cache.pool if same_pool else cache._alloc_pool(geometry.pool_blocks)
    # Phase 2: host copies of the new host-backed set (capacity: what was in use, at most C_new).
    cap = min(c_new, max(cache._host_cap, keep)) if new.host_backed else 0
    host: dict[int, torch.Tensor] = {}
    for layer in new.host_backed:
        src = data.get(layer)
        if src is not None and src is cache._host.get(layer) and src.shape[1] == cap:
            host[layer] = src  # already host-backed at the right size: nothing to move
            continue
        host[layer] = cache._alloc_host(cap)
        if src is not None:
            copy_blocks(host[layer], src, 0, min(keep, src.shape[1], cap))
    # Phase 3: the new layout; resident layers come back onto the device.
    cache.geometry, cache.pool = geometry, pool
    cache._set_host(host, cap)
    cache._layout(m)
    for layer in new.resident:
        if (src := data.get(layer)) is not None:
            copy_blocks(cache._views[new.slot(layer)], src, 0, min(keep, src.shape[1]))
    if cache.device.type == "cuda":
        torch.cuda.synchronize(cache.device)
        if not same_pool:
            torch.cuda.empty_cache()  # hand the old pool back, so the budget really shrinks
    return c_new
