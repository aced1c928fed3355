"""BlockManager: lowest-id-first allocation, freeing, runtime resize, prefix caching."""

from __future__ import annotations

import pytest

from pie_engine.core.block_manager import BlockManager
from pie_engine.core.sampling_params import SamplingParams
from pie_engine.core.sequence import Sequence


def make_seq(n: int, start: int = 0) -> Sequence:
    return Sequence(prompt_token_ids=list(range(start, start + n)), params=SamplingParams())


def test_allocate_covers_tokens_lowest_ids_first() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq(5), make_seq(4)
    bm.allocate(a, 5)
    bm.allocate(b, 4)
    assert a.block_table == [0, 1] and b.block_table == [2]
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    assert bm.max_used_block_id == 2
    # Growing within a block needs nothing new; crossing a boundary takes the next lowest id.
    a.num_computed_tokens = 5
    bm.allocate(a, 3)
    assert a.block_table == [0, 1]
    bm.allocate(a, 4)
    assert a.block_table == [0, 1, 3]


def test_free_returns_ids_and_reuses_lowest() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b, c = make_seq(4), make_seq(4), make_seq(2)
    bm.allocate(a, 4)
    bm.allocate(b, 4)
    assert bm.max_used_block_id == 3
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 4
    assert bm.max_used_block_id == 3  # b still holds 2, 3
    bm.allocate(c, 2)
    assert c.block_table == [0]
    bm.free(b)
    assert bm.max_used_block_id == 0
    bm.free(c)
    assert bm.max_used_block_id == -1 and bm.usage == 0.0


def test_can_allocate_and_out_of_blocks() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    a = make_seq(9)
    assert not bm.can_allocate(a, 9)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(a, 9)
    assert a.block_table == [] and bm.num_free_blocks == 2
    assert bm.can_allocate(a, 8)


def test_set_num_blocks_grow_and_shrink() -> None:
    bm = BlockManager(num_blocks=4, block_size=1)
    a = make_seq(3)
    bm.allocate(a, 3)  # ids 0, 1, 2
    bm.set_num_blocks(6)
    assert bm.num_free_blocks == 3
    b = make_seq(3)
    bm.allocate(b, 3)
    assert b.block_table == [3, 4, 5]
    with pytest.raises(ValueError, match="in use"):
        bm.set_num_blocks(4)
    bm.free(b)
    bm.set_num_blocks(3)
    assert bm.num_blocks == 3 and bm.num_free_blocks == 0 and bm.max_used_block_id == 2
    bm.free(a)
    c = make_seq(3)
    bm.allocate(c, 3)
    assert sorted(c.block_table) == [0, 1, 2]  # no id beyond the new capacity is ever handed out
    with pytest.raises(ValueError):
        bm.set_num_blocks(0)


def test_prefix_cache_hit_shares_blocks_and_skips_last_token() -> None:
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    a = make_seq(10)
    bm.allocate(a, 10)
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)  # blocks 0 and 1 are full
    # Same first 8 tokens, different afterwards: both full blocks hit.
    b = Sequence(prompt_token_ids=list(range(8)) + [99, 98, 97], params=SamplingParams())
    hit = bm.get_computed_blocks(b)
    assert hit == a.block_table[:2]
    assert bm.can_allocate(b, 3, hit)
    bm.allocate(b, 3, hit)
    b.num_computed_tokens = 8
    assert b.block_table[:2] == a.block_table[:2] and len(b.block_table) == 3
    # A prompt of exactly 8 cached tokens reuses only one block: its last token must be recomputed.
    c = make_seq(8)
    assert bm.get_computed_blocks(c) == a.block_table[:1]
    # A different first block breaks the chain even if the second block's tokens match.
    d = Sequence(prompt_token_ids=[7, 7, 7, 7] + list(range(4, 8)) + [1], params=SamplingParams())
    assert bm.get_computed_blocks(d) == []


def test_prefix_cache_survives_free_and_is_evicted_lru() -> None:
    bm = BlockManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    a = make_seq(5)
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    table = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 3 and bm.usage == 0.0
    assert bm.max_used_block_id == 1  # cached blocks 0, 1 keep their KV
    again = make_seq(5)
    hit = bm.get_computed_blocks(again)
    assert hit == table[:2]
    bm.allocate(again, 1, hit)
    assert bm.num_free_blocks == 0
    bm.free(again)
    # Taking all three blocks for unrelated tokens evicts the cached ones.
    other = make_seq(6, start=100)
    bm.allocate(other, 6)
    assert sorted(other.block_table) == [0, 1, 2]
    assert bm.get_computed_blocks(make_seq(5)) == []


def test_prefix_caching_off_never_hits() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq(4)
    bm.allocate(a, 4)
    a.num_computed_tokens = 4
    bm.cache_full_blocks(a)
    assert bm.get_computed_blocks(make_seq(4)) == []
    bm.free(a)
    assert bm.max_used_block_id == -1
