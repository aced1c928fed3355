"""The engine's model side against HF transformers, in float32: greedy tokens identical, logits close.

A tiny scheduler here drives ModelRunner with hand-built StepPlans: all prompts prefill in one step (or in chunks,
so later steps mix prefill chunks with decodes), then decode one token per step, with block tables taken from a
shuffled free list (non-contiguous, so a block-table indexing bug cannot hide). HF runs each prompt alone with
``generate(do_sample=False, max_new_tokens=64, output_logits=True)``.

Mistral: its sliding window (4096) exceeds every length here, so full attention is exact (the engine caps
max_model_len at the window; sliding-window attention itself is not implemented).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from pie_engine.config import EngineConfig
from pie_engine.core.plan import ScheduledSeq, StepPlan
from pie_engine.core.sampling_params import SamplingParams
from pie_engine.core.sequence import Sequence
from pie_engine.runner.model_runner import ModelRunner

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

MAX_NEW = 64
EOS = 2  # make_test_model's </s>
# Observed max |logit diff| vs HF over all steps of all cases: 4e-5 (prefill steps alone: 2.2e-5), with logits of
# std 1.2..8 and a smallest top-2 gap of 1.4e-3 (see make_test_model): float32 reordering noise of paged attention
# vs HF's SDPA. The tolerance leaves ~7x headroom and still catches any real bug (a wrong position, mask or weight
# moves logits by O(1)).
ATOL, RTOL = 3e-4, 1e-5
PROMPT_LENS = (1, 6, 17, 40)


def prompts(n_lens: tuple[int, ...] = PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 512) for _ in range(n - 1)] for n in n_lens]


def engine_greedy(model_dir: Path, prompt_ids: list[list[int]], *, block_size: int = 4, chunk: int | None = None,
                  max_new: int = MAX_NEW) -> tuple[list[list[int]], list[torch.Tensor], int]:
    """Greedy-decode every prompt as one continuous batch; returns (tokens, per-seq stacked logits, mixed steps)."""
    runner = ModelRunner(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", block_size=block_size,
                                      num_device_blocks=512))
    free = list(range(runner.num_blocks))
    random.Random(1).shuffle(free)
    seqs = [Sequence(prompt_token_ids=list(p), params=SamplingParams(max_tokens=max_new, temperature=0.0))
            for p in prompt_ids]
    for s in seqs:
        need = -(-(s.num_prompt_tokens + max_new) // block_size)
        s.block_table, free = free[:need], free[need:]
    logits: list[list[torch.Tensor]] = [[] for _ in seqs]
    done = [False] * len(seqs)
    mixed_steps = 0
    while not all(done):
        scheduled = []
        for s, d in zip(seqs, done, strict=True):
            if d:
                continue
            remaining = s.num_tokens - s.num_computed_tokens
            n = min(remaining, chunk) if chunk else remaining
            scheduled.append(ScheduledSeq(s, n, sample=s.num_computed_tokens + n == s.num_tokens))
        mixed_steps += len({x.num_new_tokens == 1 for x in scheduled}) == 2
        out = runner.execute(StepPlan(scheduled=scheduled))
        assert out.dtype == torch.float32 and out.shape == (sum(x.sample for x in scheduled), runner.vocab_size)
        rows = iter(out)
        for x in scheduled:
            x.seq.num_computed_tokens += x.num_new_tokens
            if not x.sample:
                continue
            i = seqs.index(x.seq)
            row = next(rows)
            logits[i].append(row)
            token = int(row.argmax())
            x.seq.output_token_ids.append(token)
            done[i] = token == EOS or len(x.seq.output_token_ids) == max_new
    return [s.output_token_ids for s in seqs], [torch.stack(lg) for lg in logits], mixed_steps


def hf_greedy(model_dir: Path, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[torch.Tensor]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokens, logits = [], []
    for p in prompt_ids:
        out = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0,
                             eos_token_id=EOS, output_logits=True, return_dict_in_generate=True)
        tokens.append(out.sequences[0, len(p):].tolist())
        logits.append(torch.cat(out.logits).float())
    return tokens, logits


def assert_matches_hf(model_dir: Path, prompt_ids: list[list[int]], **kw: object) -> int:
    ours, our_logits, mixed = engine_greedy(model_dir, prompt_ids, **kw)  # type: ignore[arg-type]
    ref, ref_logits = hf_greedy(model_dir, prompt_ids)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a == b, f"prompt {i} (len {len(prompt_ids[i])}): tokens differ from HF\n ours {a}\n HF   {b}"
        # Step 0 is the prefill's logits; later steps are decode logits.
        torch.testing.assert_close(our_logits[i], ref_logits[i], atol=ATOL, rtol=RTOL)
    assert sum(len(t) for t in ours) > 2 * len(ours), "degenerate test: almost every prompt ended at once"
    return mixed


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "opt"])
def test_batch_matches_hf(tiny_model, arch: str) -> None:
    assert_matches_hf(tiny_model(arch, seed=3), prompts())


def test_chunked_prefill_mixed_with_decode_matches_hf(tiny_model) -> None:
    # Chunks of 7 with 4-token blocks start mid-block; short prompts decode while long ones still prefill.
    mixed = assert_matches_hf(tiny_model("llama", seed=4), prompts((3, 9, 30, 45)), chunk=7)
    assert mixed > 0, "no step mixed prefill chunks with decodes"


def test_llama3_rope_scaling_matches_hf(tiny_model) -> None:
    # original_max_position_embeddings=64 puts head_dim-16 wavelengths (6..20000) in all three llama3 bands.
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    model = tiny_model("llama", seed=5, config_overrides={"rope_scaling": scaling, "rope_theta": 500000.0})
    assert_matches_hf(model, prompts((5, 70), seed=5), block_size=16)


def test_opt_post_layernorm_projected_embeddings_matches_hf(tiny_model) -> None:
    # The OPT-350m layout: LayerNorm after each block, word_embed_proj_dim != hidden (project_in / project_out).
    model = tiny_model("opt", seed=6, config_overrides={"do_layer_norm_before": False, "word_embed_proj_dim": 32})
    assert_matches_hf(model, prompts((4, 23), seed=6), chunk=5)


def test_sharded_checkpoint_matches_hf(tiny_model) -> None:
    model = tiny_model("qwen2", seed=7, shards=3)
    assert len(list(model.glob("model-*-of-00003.safetensors"))) == 3
    assert_matches_hf(model, prompts((8, 19), seed=7), block_size=8)


def test_prefix_cached_context_matches_hf(tiny_model) -> None:
    """A sequence whose first blocks were computed by ANOTHER sequence (prefix caching) attends to them."""
    model = tiny_model("llama", seed=8)
    shared = prompts((24,), seed=8)[0]
    tail = [7, 8, 9, 10, 11]
    runner = ModelRunner(EngineConfig(model=str(model), device="cpu", dtype="float32", block_size=8,
                                      num_device_blocks=32))
    first = Sequence(prompt_token_ids=shared, params=SamplingParams(max_tokens=1, temperature=0.0),
                     block_table=[5, 9, 2])
    runner.execute(StepPlan(scheduled=[ScheduledSeq(first, len(shared), sample=True)]))
    # The second sequence reuses the 3 full blocks (24 tokens) and computes only its tail.
    second = Sequence(prompt_token_ids=shared + tail, params=SamplingParams(max_tokens=1, temperature=0.0),
                      block_table=[5, 9, 2, 17], num_computed_tokens=len(shared))
    ours = runner.execute(StepPlan(scheduled=[ScheduledSeq(second, len(tail), sample=True)]))[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([shared + tail])).logits[0, -1]
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)
