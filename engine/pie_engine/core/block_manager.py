"""Paged KV block allocation (pure Python, no torch).

Each sequence owns ``seq.block_table``: the device block ids holding its KV, in token order. Free ids are handed out
lowest first (a heap) so the ids in use stay a compact prefix ``[0, max_used_block_id + 1)``: the Pie swapping
cache copies only that prefix.

Optional prefix caching: a full block is identified by (its parent block's key, its tokens). Blocks of finished or
preempted sequences keep their KV and key while unreferenced; a later sequence with the same prefix takes them
back instead of recomputing. Unreferenced cached blocks still count as free and are evicted least recently used
when plain free ids run out.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

from pie_engine.core.sequence import Sequence

# Key of a full block: (parent block's key hash, the block's tokens). The tuple is kept and compared on lookup,
# so a hash collision can never hand out the wrong KV.
BlockKey = tuple[int, tuple[int, ...]]


def _tokens(seq: Sequence, start: int, end: int) -> tuple[int, ...]:
    """``seq.token_ids[start:end]`` without concatenating the whole prompt and output (O(end - start))."""
    p = seq.prompt_token_ids
    if end <= len(p):
        return tuple(p[start:end])
    o, n = seq.output_token_ids, len(p)
    return tuple(p[start:end]) + tuple(o[max(start - n, 0):end - n])


class BlockManager:
    """Hands out KV block ids and tracks who holds them."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: list[int] = list(range(num_blocks))  # a heap: the lowest free id comes first
        self._ref = [0] * num_blocks
        # Prefix caching state.
        self._key: dict[int, BlockKey] = {}  # block id -> key, for blocks whose KV is a registered full block
        self._cached: dict[BlockKey, int] = {}  # key -> block id
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with ref 0, least recently used first
        self._seq_keys: dict[int, list[BlockKey]] = {}  # seq_id -> keys of its registered full blocks
        self._max_used = -1
        self.num_cache_hit_tokens = 0  # counters for metrics
        self.num_cache_query_tokens = 0

    # ----------------------------------------------------------------------------------------------- capacity
    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take (plain free ones plus unreferenced cached ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by sequences, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    @property
    def max_used_block_id(self) -> int:
        """Highest block id whose KV must be kept (referenced, or cached for reuse); -1 when none."""
        # NOTE: lazily lowered here rather than on every free: freeing is hot, reading it is once per step.
        while self._max_used >= 0 and self._ref[self._max_used] == 0 and self._max_used not in self._key:
            self._max_used -= 1
        return self._max_used

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ----------------------------------------------------------------------------------------- prefix caching
    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Cached block ids covering the longest cached prefix of a not-yet-computed sequence (no refs taken).

        At most ``(num_tokens - 1) // block_size`` blocks: the last token is always recomputed so the step
        yields logits to sample from.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return []
        blocks: list[int] = []
        parent = 0
        for i in range((seq.num_tokens - 1) // self.block_size):
            key = (parent, _tokens(seq, i * self.block_size, (i + 1) * self.block_size))
            bid = self._cached.get(key)
            if bid is None:
                break
            blocks.append(bid)
            parent = hash(key)
        self.num_cache_query_tokens += seq.num_tokens
        self.num_cache_hit_tokens += len(blocks) * self.block_size
        return blocks

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the sequence's blocks that became full of computed KV (call after num_computed_tokens grows)."""
        if not self.enable_prefix_caching:
            return
        keys = self._seq_keys.setdefault(seq.seq_id, [])
        bs = self.block_size
        for i in range(len(keys), seq.num_computed_tokens // bs):
            parent = hash(keys[-1]) if keys else 0
            key = (parent, _tokens(seq, i * bs, (i + 1) * bs))
            keys.append(key)
            bid = seq.block_table[i]
            if key not in self._cached and bid not in self._key:
                self._cached[key] = bid
                self._key[bid] = key

    def _uncache(self, bid: int) -> None:
        key = self._key.pop(bid, None)
        if key is not None and self._cached.get(key) == bid:
            del self._cached[key]

    # --------------------------------------------------------------------------------------------- allocation
    def can_allocate(self, seq: Sequence, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Whether ``allocate(seq, num_new_tokens, computed_blocks)`` would succeed."""
        computed = computed_blocks or []
        have = len(seq.block_table) + len(computed)
        start = seq.num_computed_tokens + len(computed) * self.block_size
        need = self.blocks_needed(start + num_new_tokens) - have
        # Taking an unreferenced cached block removes it from the free pool too.
        revived = sum(1 for b in computed if self._ref[b] == 0)
        return need + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, computed_blocks: list[int] | None = None) -> None:
        """Extend ``seq.block_table`` to cover ``num_computed_tokens + num_new_tokens`` tokens.

        ``computed_blocks`` (from ``get_computed_blocks``, for a sequence without blocks) are shared, and the
        caller then advances ``seq.num_computed_tokens`` by ``len(computed_blocks) * block_size``.
        """
        if not self.can_allocate(seq, num_new_tokens, computed_blocks):
            raise RuntimeError(f"out of KV blocks for sequence {seq.seq_id}")
        for bid in computed_blocks or []:
            if self._ref[bid] == 0:
                del self._evictable[bid]
            self._ref[bid] += 1
            seq.block_table.append(bid)
        start = seq.num_computed_tokens + len(computed_blocks or []) * self.block_size
        for _ in range(self.blocks_needed(start + num_new_tokens) - len(seq.block_table)):
            bid = self._take_free()
            self._ref[bid] = 1
            seq.block_table.append(bid)

    def _take_free(self) -> int:
        if self._free:
            bid = heapq.heappop(self._free)
        else:
            bid, _ = self._evictable.popitem(last=False)
            self._uncache(bid)
        self._max_used = max(self._max_used, bid)
        return bid

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks and clear its block table (cached full blocks stay reusable)."""
        # Release in reverse so a chain's tail is evicted before its head (heads are shared more often).
        for bid in reversed(seq.block_table):
            self._ref[bid] -= 1
            if self._ref[bid] == 0:
                if bid in self._key:
                    self._evictable[bid] = None
                else:
                    heapq.heappush(self._free, bid)
        seq.block_table = []
        self._seq_keys.pop(seq.seq_id, None)

    def set_num_blocks(self, n: int) -> None:
        """Change capacity at runtime. Growing adds free ids; shrinking needs every used id below ``n``."""
        if n < 1:
            raise ValueError(f"num_blocks must be at least 1, got {n}")
        if n < self.num_blocks:
            held = [b for b in range(n, self.num_blocks) if self._ref[b] > 0]
            if held:
                raise ValueError(f"cannot shrink to {n} blocks: block ids {held[:8]} are in use (preempt first)")
            for bid in range(n, self.num_blocks):
                self._uncache(bid)
                self._evictable.pop(bid, None)
            self._free = [b for b in self._free if b < n]
            heapq.heapify(self._free)
            del self._ref[n:]
            self._max_used = min(self._max_used, n - 1)
        else:
            self._ref.extend([0] * (n - self.num_blocks))
            for bid in range(self.num_blocks, n):
                heapq.heappush(self._free, bid)
        self.num_blocks = n
