"""LLMEngine end to end on tiny random checkpoints: greedy output must equal HF transformers token for token,
also when KV blocks run out (preemption by recompute) and with chunked prefill."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pie_engine.config import EngineConfig
from pie_engine.core.engine import LLMEngine
from pie_engine.core.sampling_params import SamplingParams
from pie_engine.factory import create_engine
from tests import hf_reference

NEW_TOKENS = 64
PROMPT_LENS = [3, 17, 40, 9, 28]


def prompts(vocab: int = 512) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENS]


def hf_greedy(path: Path) -> list[list[int]]:
    return hf_reference.hf_greedy(path, prompts(), NEW_TOKENS)


def engine_greedy(path: Path, **cfg) -> tuple[list[list[int]], LLMEngine]:
    config = EngineConfig(model=str(path), device="cpu", dtype="float32", block_size=4, **cfg)
    engine = create_engine(config)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = engine.generate(prompts(), params)
    assert all(o.finished and o.finish_reason == "length" for o in outs)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # everything freed
    return [o.token_ids for o in outs], engine


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_greedy_matches_hf(tiny_model, arch: str) -> None:
    path = tiny_model(arch)
    out, engine = engine_greedy(path)
    assert engine.scheduler.num_preemptions_total == 0
    assert out == hf_greedy(path)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_greedy_matches_hf_under_preemption(tiny_model, arch: str) -> None:
    path = tiny_model(arch)
    # The longest request needs (40 + 64) / 4 = 26 blocks; all five together need ~95.
    out, engine = engine_greedy(path, num_device_blocks=30)
    assert engine.scheduler.num_preemptions_total > 0
    assert out == hf_greedy(path)


def test_greedy_matches_hf_with_chunked_prefill(tiny_model) -> None:
    path = tiny_model("qwen2")
    out, engine = engine_greedy(path, max_num_batched_tokens=8)
    assert out == hf_greedy(path)


def test_prefix_caching_same_output(tiny_model) -> None:
    path = tiny_model("llama")
    config = EngineConfig(model=str(path), device="cpu", dtype="float32", block_size=4, enable_prefix_caching=True)
    engine = create_engine(config)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    first = [o.token_ids for o in engine.generate(prompts(), params)]
    again = [o.token_ids for o in engine.generate(prompts(), params)]  # served from cached prefix blocks
    assert engine.block_manager.num_cache_hit_tokens > 0
    assert first == again == hf_greedy(path)


def test_seeded_sampling_is_batch_independent(tiny_model) -> None:
    path = tiny_model("llama")
    engine = create_engine(EngineConfig(model=str(path), device="cpu", dtype="float32", block_size=4))
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=42, ignore_eos=True)
    alone = engine.generate([prompts()[1]], seeded)[0].token_ids
    others = SamplingParams(temperature=0.7, max_tokens=30, ignore_eos=True)
    batch = engine.generate(prompts(), [others, seeded, others, others, others])
    assert batch[1].token_ids == alone
    assert batch[0].token_ids != alone


def test_text_stop_string_and_validation(tiny_model) -> None:
    path = tiny_model("llama")
    engine = create_engine(EngineConfig(model=str(path), device="cpu", dtype="float32", max_model_len=64))
    full = engine.generate(["Hello world"], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0]
    assert full.text == engine.tokenizer.decode(full.token_ids)
    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip(), "the tiny model produced only whitespace"
    cut = engine.generate(["Hello world"], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                                          stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("e", [], SamplingParams())
    with pytest.raises(ValueError, match="maximum context length is 64"):
        engine.add_request("l", list(range(3, 63)), SamplingParams(max_tokens=10))
    assert not engine.has_unfinished_requests()
