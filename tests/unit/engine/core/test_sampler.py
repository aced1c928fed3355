"""Sampler: greedy, temperature, top-k, top-p, per-request seeds, logprobs."""

from __future__ import annotations

import collections

import pytest
import torch

from pie_engine.core.sampler import Sampler, _apply_top_k_top_p, token_seed
from pie_engine.core.sampling_params import SamplingParams
from pie_engine.core.sequence import Sequence


def seqs(*params: SamplingParams, num_out: int = 0) -> list[Sequence]:
    return [Sequence(prompt_token_ids=[1], params=p, output_token_ids=[5] * num_out) for p in params]


def test_greedy_is_argmax_for_a_batch() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    out = Sampler()(logits, seqs(*[SamplingParams(temperature=0.0)] * 6))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6


def test_temperature_sampling_follows_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    sampler = Sampler(seed=1)
    counts = collections.Counter(sampler(logits, seqs(SamplingParams(temperature=1.0))).token_ids[0]
                                 for _ in range(4000))
    expected = torch.softmax(logits[0], -1).tolist()
    for tok, p in enumerate(expected):
        assert abs(counts[tok] / 4000 - p) < 0.03, (tok, counts, expected)
    # A high temperature flattens the distribution: the least likely token shows up much more often.
    hot = collections.Counter(sampler(logits, seqs(SamplingParams(temperature=5.0))).token_ids[0]
                              for _ in range(2000))
    assert hot[3] / 2000 > 2 * expected[3]


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(3, 1)
    params = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_k=2),
              SamplingParams(temperature=1.0, top_p=0.7)]
    masked = _apply_top_k_top_p(logits, params)
    finite = torch.isfinite(masked)
    assert finite.tolist() == [[True, False, False, False], [True, True, False, False], [True, True, False, False]]
    sampler = Sampler(seed=3)
    seen: list[set[int]] = [set(), set(), set()]
    for _ in range(300):
        for i, t in enumerate(sampler(logits, seqs(*params)).token_ids):
            seen[i].add(t)
    assert seen == [{0}, {0, 1}, {0, 1}]


def test_seeded_request_is_independent_of_batching() -> None:
    gen = torch.Generator().manual_seed(0)
    row = torch.randn(1, 100, generator=gen)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    alone = Sampler(seed=0)(row, seqs(seeded)).token_ids[0]
    # Same request, batched at another position with other (unseeded and seeded) requests, another sampler seed.
    others = torch.randn(3, 100, generator=gen)
    batch = torch.cat([others[:2], row, others[2:]])
    params = [SamplingParams(temperature=0.8), SamplingParams(temperature=0.0), seeded, SamplingParams(seed=9)]
    for sampler_seed in range(5):
        assert Sampler(seed=sampler_seed)(batch, seqs(*params)).token_ids[2] == alone
    # The noise depends on the output index, so later tokens are not all the same draw.
    draws = {Sampler()(row, seqs(seeded, num_out=i)).token_ids[0] for i in range(30)}
    assert len(draws) > 3


def test_token_seed_mixes() -> None:
    seeds = {token_seed(s, i) for s in range(20) for i in range(20)}
    assert len(seeds) == 400 and all(0 <= x < 2**63 for x in seeds)


def test_logprobs_chosen_and_top_n() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [1.0, 0.0, 0.0, 0.0]])
    out = Sampler()(logits, seqs(SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.0)))
    lp = torch.log_softmax(logits[0], -1)
    assert out.token_ids == [1, 0]
    d = out.logprobs[0]
    assert d is not None and list(d) == [1, 3]  # chosen first, then the top-2 (1 already present)
    assert d[1] == pytest.approx(float(lp[1])) and d[3] == pytest.approx(float(lp[3]))
    assert out.logprobs[1] is None
    # logprobs=0: only the chosen token.
    out = Sampler()(logits[:1], seqs(SamplingParams(temperature=0.0, logprobs=0)))
    assert out.logprobs[0] is not None and list(out.logprobs[0]) == [1]


def test_row_count_mismatch() -> None:
    with pytest.raises(ValueError, match="logit rows"):
        Sampler()(torch.zeros(2, 4), seqs(SamplingParams()))
