"""The HF transformers reference the engine's end-to-end exactness tests compare against."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

_cache: dict[tuple[str, tuple[tuple[int, ...], ...], int], list[list[int]]] = {}


def hf_greedy(path: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """HF ``generate(do_sample=False)``, one prompt at a time (no padding), EOS disabled like ignore_eos.

    Cached per (checkpoint, prompts, length): HF generation dominates these tests' time.
    """
    key = (str(path), tuple(map(tuple, prompts)), new_tokens)
    if key not in _cache:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        cfg = copy.deepcopy(model.generation_config)
        # An EOS id outside the vocab never matches: HF then runs the full length like ignore_eos does (None would
        # be replaced by the model's default, and min_new_tokens would mask EOS logits, changing the argmax).
        cfg.eos_token_id, cfg.pad_token_id = 10**6, 0
        outs = []
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([p])
                out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg,
                                     do_sample=False, max_new_tokens=new_tokens)
                assert out.shape[1] == len(p) + new_tokens
                outs.append(out[0, len(p):].tolist())
        _cache[key] = outs
    return _cache[key]
