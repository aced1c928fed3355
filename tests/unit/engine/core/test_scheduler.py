"""Scheduler: token budget, max_num_seqs, chunked prefill, preemption by recompute, stop checks, abort, resize.

The model is replaced by a deterministic token function of the sequence's tokens so far, which is exactly what a
greedy model is; the scheduler itself is the real one.
"""

from __future__ import annotations

import itertools

import pytest

from pie_engine.config import EngineConfig
from pie_engine.core.block_manager import BlockManager
from pie_engine.core.plan import StepPlan
from pie_engine.core.sampling_params import SamplingParams
from pie_engine.core.scheduler import Scheduler
from pie_engine.core.sequence import Sequence, SequenceStatus

_rid = itertools.count()


def make(num_blocks: int = 64, block_size: int = 4, caching: bool = False, **cfg) -> Scheduler:
    config = EngineConfig(model="unused", block_size=block_size, **cfg)
    return Scheduler(config, BlockManager(num_blocks, block_size, caching), eos_token_ids={0}, max_model_len=512)


def add(s: Scheduler, n: int, max_tokens: int = 8, **kw) -> Sequence:
    seq = Sequence(prompt_token_ids=[(7 * i + n) % 50 + 1 for i in range(n)],
                   params=SamplingParams(max_tokens=max_tokens, **kw), request_id=f"r{next(_rid)}")
    s.add(seq)
    return seq


def fake_tokens(plan: StepPlan) -> list[int]:
    """Greedy 'model': the next token depends only on the tokens so far (never 0 = eos)."""
    out = []
    for sc in plan.scheduled:
        if sc.sample:
            toks = sc.seq.token_ids
            out.append(sum(toks) % 97 + 1)
    return out


def check_plan_invariants(s: Scheduler, plan: StepPlan) -> None:
    assert plan.num_batched_tokens <= s.config.max_num_batched_tokens
    assert len(s.running) <= s.config.max_num_seqs
    used = [b for seq in s.running for b in seq.block_table]
    assert len(used) == len(set(used)), "a block is owned twice"
    for sc in plan.scheduled:
        need = sc.seq.num_computed_tokens + sc.num_new_tokens
        assert len(sc.seq.block_table) * s.block_manager.block_size >= need
        assert sc.sample == (need == sc.seq.num_tokens)


def run(s: Scheduler, max_steps: int = 10_000) -> int:
    steps = 0
    while s.has_unfinished():
        plan = s.schedule()
        check_plan_invariants(s, plan)
        s.update(plan, fake_tokens(plan))
        steps += 1
        assert steps < max_steps
    return steps


def test_budget_and_chunked_prefill() -> None:
    s = make(max_num_batched_tokens=10)
    a, b = add(s, 7), add(s, 12)
    plan = s.schedule()
    assert [(x.seq, x.num_new_tokens, x.sample) for x in plan.scheduled] == [(a, 7, True), (b, 3, False)]
    s.update(plan, fake_tokens(plan))
    assert a.num_computed_tokens == 7 and len(a.output_token_ids) == 1 and b.num_computed_tokens == 3
    plan = s.schedule()  # running first: a decodes 1 token, b continues its prefill with the rest of the budget
    assert [(x.seq, x.num_new_tokens, x.sample) for x in plan.scheduled] == [(a, 1, True), (b, 9, True)]


def test_max_num_seqs_limits_admission() -> None:
    s = make(max_num_seqs=2)
    seqs = [add(s, 3) for _ in range(3)]
    plan = s.schedule()
    assert [x.seq for x in plan.scheduled] == seqs[:2] and s.num_waiting == 1
    run(s)
    assert all(q.finish_reason == "length" and len(q.output_token_ids) == 8 for q in seqs)


def test_stop_checks() -> None:
    s = make()
    eos, stop_tok, length = add(s, 4), add(s, 4, stop_token_ids=[55]), add(s, 4, max_tokens=2)
    ign = add(s, 4, max_tokens=3, ignore_eos=True)
    plan = s.schedule()
    n = len(plan.scheduled)
    done = s.update(plan, [0, 55, 5, 0][:n])
    assert eos.finish_reason == "stop" and stop_tok.finish_reason == "stop"
    assert eos.output_token_ids == [0] and eos.block_table == [] and eos.status is SequenceStatus.FINISHED
    assert length.finish_reason is None and ign.finish_reason is None and len(done) == 4
    plan = s.schedule()
    s.update(plan, [5, 0])
    assert length.finish_reason == "length" and ign.finish_reason is None  # ignore_eos keeps going
    run(s)
    assert ign.output_token_ids[1] == 0 and ign.finish_reason == "length"
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_max_model_len_stops() -> None:
    config = EngineConfig(model="unused", block_size=4)
    s = Scheduler(config, BlockManager(16, 4), max_model_len=10)
    seq = add(s, 8, max_tokens=100)
    run(s)
    assert seq.finish_reason == "length" and seq.num_tokens == 10


def _outputs(num_blocks: int, block_size: int = 4, **cfg) -> tuple[list[list[int]], Scheduler]:
    s = make(num_blocks=num_blocks, block_size=block_size, **cfg)
    seqs = [add(s, n, max_tokens=m) for n, m in [(5, 20), (9, 15), (3, 25), (14, 10), (6, 18)]]
    run(s)
    return [q.output_token_ids for q in seqs], s


def test_preemption_by_recompute_keeps_outputs_identical() -> None:
    ref, roomy = _outputs(num_blocks=100)
    assert roomy.num_preemptions_total == 0
    out, tight = _outputs(num_blocks=12)
    assert tight.num_preemptions_total > 0
    assert out == ref
    assert tight.block_manager.num_free_blocks == 12


def test_preemption_with_chunked_prefill_and_prefix_caching() -> None:
    ref, _ = _outputs(num_blocks=100)
    out, s = _outputs(num_blocks=12, max_num_batched_tokens=7, caching=True)
    assert s.num_preemptions_total > 0 and out == ref


def test_victim_is_latest_arrival_and_goes_to_front_of_waiting() -> None:
    s = make(num_blocks=4, block_size=2)
    a, b = add(s, 3, max_tokens=10), add(s, 3, max_tokens=10)
    late = add(s, 1, max_tokens=10)
    s.update(p := s.schedule(), fake_tokens(p))  # a, b take 2 blocks each; late does not fit
    assert s.waiting[0] is late
    s.update(p := s.schedule(), fake_tokens(p))  # the 4th token still fits in 2 blocks
    assert s.num_preemptions_total == 0
    plan = s.schedule()  # a and b both need a third block for their 5th token -> b (later) is preempted
    s.update(plan, fake_tokens(plan))
    assert s.num_preemptions_total == 1 and b.num_preemptions == 1
    assert list(s.waiting) == [b, late] and b.num_computed_tokens == 0 and b.block_table == []
    assert [x.seq for x in plan.scheduled] == [a]


def test_abort_frees_blocks() -> None:
    s = make(num_blocks=8)
    a, b = add(s, 6), add(s, 6)
    s.update(p := s.schedule(), fake_tokens(p))
    assert s.abort(a.request_id) is a
    assert a.finish_reason == "abort" and a.block_table == [] and s.running == [b]
    assert s.abort(a.request_id) is None and s.abort("nope") is None
    w = add(s, 3)
    assert s.abort(w.request_id) is w and not s.waiting
    s.abort(b.request_id)
    assert s.block_manager.num_free_blocks == 8 and not s.has_unfinished()


def test_duplicate_request_id_rejected() -> None:
    s = make()
    a = add(s, 3)
    with pytest.raises(ValueError, match="duplicate"):
        s.add(Sequence(prompt_token_ids=[1], params=SamplingParams(), request_id=a.request_id))


def test_set_num_blocks_preempts_holders_of_high_ids() -> None:
    s = make(num_blocks=8, block_size=2)
    a, b = add(s, 4, max_tokens=6), add(s, 4, max_tokens=6)
    s.update(p := s.schedule(), fake_tokens(p))
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    # What the shrink will cost, asked first: b's 4 computed tokens must be recomputed, a's not; 8 blocks: nothing.
    assert s.tokens_to_recompute(3) == b.num_computed_tokens == 4 and s.tokens_to_recompute(8) == 0
    assert s.tokens_to_recompute(1) == 8
    preempted = s.set_num_blocks(3)
    assert preempted == [b] and s.block_manager.num_blocks == 3 and s.num_preemptions_total == 1
    run(s)
    assert a.finish_reason == b.finish_reason == "length"
    s.set_num_blocks(16)
    assert s.block_manager.num_free_blocks == 16


def test_sequence_longer_than_capacity_finishes_instead_of_looping() -> None:
    s = make(num_blocks=2, block_size=2)
    big = add(s, 3, max_tokens=10)  # fits at first, but grows past 4 tokens of KV
    run(s)
    assert big.finish_reason == "length" and big in s.finished_early


def test_demand_reads_for_a_capacity_controller() -> None:
    """What the expansion runtime reads between steps: the blocks the waiting requests that fit in the batch need
    now, and the blocks the longest unfinished request needs to finish alone (capped at max_model_len)."""
    s = make(block_size=4, max_num_seqs=2)
    assert s.admissible_waiting_blocks() == 0 and s.largest_need_blocks() == 0
    add(s, 9, max_tokens=8)  # 9 tokens now: 3 blocks; 17 to finish: 5 blocks
    add(s, 4, max_tokens=600)  # 4 tokens now: 1 block; 604 to finish, capped at 512: 128 blocks
    add(s, 20, max_tokens=1)  # beyond max_num_seqs: not admissible next
    assert s.admissible_waiting_blocks() == 3 + 1
    assert s.largest_need_blocks() == 512 // 4
    s.schedule()  # both admissible requests start running: no room for the third
    assert s.admissible_waiting_blocks() == 0
