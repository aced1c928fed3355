"""Re-laying out the swapping cache between steps: a new m (layers on host) and/or a new device pool size.

One function for both, because both are the same move: every layer's KV that must survive is first lifted off the
device (the old and new slot views alias one pool, so nothing may be written before everything is read), then the
new host copies are built, then the new layout is switched in and resident layers are copied back. Nothing is
changed before every allocation succeeded, so a failed allocation (pinned host memory, a bigger device pool) leaves
the cache exactly as it was. Kept apart from pipeline.py, which is the per-step copy pipeline.
"""

from __future__ import annotations

import torch

from pie_engine.pie.copy.tensors import copy_blocks
from pie_engine.pie.geometry import SwapGeometry
from pie_engine.pie.host_store import HostKVStore
from pie_engine.pie.pipeline import SwapPipeline
from pie_engine.pie.slot_layout import SlotLayout


def relayout(layout: SlotLayout, host: HostKVStore, pipeline: SwapPipeline, geometry: SwapGeometry, m: int,
             keep_blocks: int | None) -> int:
    """Move the cache made of ``layout``, ``host`` and ``pipeline`` to ``geometry`` (its pool size) with ``m``
    layers on host; returns the new C.

    Blocks ``[0, min(C_old, C_new, keep_blocks))`` of every layer keep their data; ``keep_blocks`` (one past the
    highest block id whose KV must survive) must be <= C_new: the scheduler preempts owners of higher ids first.
    """
    if pipeline.in_step:
        raise RuntimeError("the swapping cache can only be reconfigured between steps")
    host.check(geometry, m)
    c_old, c_new = layout.num_blocks, geometry.capacity_blocks(m)
    if keep_blocks is not None and keep_blocks > c_new:
        raise ValueError(f"cannot shrink to {c_new} blocks per layer: blocks up to {keep_blocks - 1} hold KV "
                         "(preempt their owners first)")
    keep = min(c_old, c_new, c_new if keep_blocks is None else keep_blocks)
    pipeline.reset()
    same_pool = geometry.pool_blocks == layout.geometry.pool_blocks
    if m == layout.layers_on_host and same_pool:
        return c_new
    old, new = layout.schedule, geometry.schedule(m)
    # Phase 1: lift every old-resident layer's blocks off the device. Old host-backed layers are already current
    # on the host (the last step's write-backs finished in reset()).
    data = host.tensors()  # where each layer's KV is now (absent: never written)
    for layer in old.resident:
        data[layer] = host.alloc(keep, pinned=False)
        copy_blocks(data[layer], layout.view(old.slot(layer)), 0, keep)
    # NOTE: a bigger pool is allocated while the old one still exists, so an out-of-memory error changes nothing.
    pool = layout.pool if same_pool else layout.alloc_pool(geometry.pool_blocks)
    # Phase 2: host copies of the new host-backed set (capacity: what was in use, at most C_new).
    cap = min(c_new, max(host.capacity, keep)) if new.host_backed else 0
    tensors: dict[int, torch.Tensor] = {}
    for layer in new.host_backed:
        src = data.get(layer)
        if src is not None and src is host.get(layer) and src.shape[1] == cap:
            tensors[layer] = src  # already host-backed at the right size: nothing to move
            continue
        tensors[layer] = host.alloc(cap)
        if src is not None:
            copy_blocks(tensors[layer], src, 0, min(keep, src.shape[1], cap))
    # Phase 3: the new layout; resident layers come back onto the device.
    host.replace(tensors, cap)
    layout.apply(geometry, pool, m)
    for layer in new.resident:
        if (src := data.get(layer)) is not None:
            copy_blocks(layout.view(new.slot(layer)), src, 0, min(keep, src.shape[1]))
    if layout.device.type == "cuda":
        torch.cuda.synchronize(layout.device)
        if not same_pool:
            torch.cuda.empty_cache()  # hand the old pool back, so the budget really shrinks
    return c_new
