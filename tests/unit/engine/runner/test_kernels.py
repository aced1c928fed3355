"""Triton kernels (kernels/) vs the torch reference (attention.py), run by the Triton interpreter on CPU.

NOTE: TRITON_INTERPRET=1 only takes effect if set before triton is first imported, and other test files may
already have imported it in this process; so the checks run in ONE fresh subprocess (this file as a script) with
the variable set, and each pytest case reads its result. Works in any test order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[4]

# (name, dtype, B, H, Hkv, D, block_size, seq_lens): GQA, MHA and MQA; head dims and block sizes that are not
# powers of two; context lengths that are not block multiples (and 1).
DECODE_CASES = [
    ("gqa-fp32", "float32", 3, 4, 2, 16, 4, [1, 7, 37]),
    ("gqa-fp16", "float16", 3, 4, 2, 16, 16, [5, 16, 83]),
    ("mha-fp32-bs6-d24", "float32", 2, 2, 2, 24, 6, [13, 6]),
    ("mqa-fp16", "float16", 2, 8, 1, 32, 16, [130, 17]),
]
STORE_CASES = [("fp32", "float32", 4, 2, 16), ("fp16-bs6-d24", "float16", 6, 3, 24)]


def _check_decode(dtype_name: str, batch: int, heads: int, kv_heads: int, dim: int, block_size: int,
                  seq_lens: list[int]) -> dict[str, Any]:
    import torch

    from pie_engine.runner.attention import paged_decode_torch
    from pie_engine.runner.kernels import paged_decode_attention

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    kv = torch.randn(2, num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # scattered, non-contiguous block tables
    table = torch.zeros(batch, max(blocks_per_seq), dtype=torch.int32)
    for i, n in enumerate(blocks_per_seq):
        table[i, :n] = torch.tensor(perm[:n])
        perm = perm[n:]
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    scale = dim**-0.5
    out = paged_decode_attention(q, kv, table, lens, scale, block_n=16)  # small tiles: several per sequence
    ref = paged_decode_torch(q.float(), kv.float(), table, lens, scale)
    return {"dtype": str(out.dtype).removeprefix("torch."), "max_err": (out.float() - ref).abs().max().item()}


def _check_store(dtype_name: str, block_size: int, kv_heads: int, dim: int) -> dict[str, Any]:
    import torch

    from pie_engine.runner.attention import store_kv_torch
    from pie_engine.runner.kernels import store_kv

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(1)
    num_blocks, tokens = 5, 9
    # k/v as strided views of a fused qkv row, like the model produces them.
    qkv = torch.randn(tokens, 3 * kv_heads * dim, generator=gen).to(dtype)
    k = qkv[:, kv_heads * dim: 2 * kv_heads * dim].view(tokens, kv_heads, dim)
    v = qkv[:, 2 * kv_heads * dim:].view(tokens, kv_heads, dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[4] = -1  # padding token: must not be written
    ours = torch.zeros(2, num_blocks, block_size, kv_heads, dim, dtype=dtype)
    store_kv(k, v, ours, slots)
    ref = torch.zeros_like(ours)
    keep = slots >= 0
    store_kv_torch(k[keep], v[keep], ref, slots[keep])
    return {"equal": bool(torch.equal(ours, ref)), "written": int((ours != 0).any(-1).any(-1).sum())}


def _check_model() -> dict[str, Any]:
    """A whole llama (GQA) step sequence through the kernels vs through the torch path: prefill + 3 decodes."""
    import tempfile

    import torch

    from pie_engine.config import EngineConfig
    from pie_engine.core.plan import ScheduledSeq, StepPlan
    from pie_engine.core.sampling_params import SamplingParams
    from pie_engine.core.sequence import Sequence
    from pie_engine.models.test_model import make_test_model
    from pie_engine.runner.model_runner import ModelRunner

    with tempfile.TemporaryDirectory() as tmp:
        model = make_test_model("llama", Path(tmp), layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64)
        results = {}
        for backend in ("torch", "triton"):
            os.environ["PIE_ATTENTION_BACKEND"] = backend
            runner = ModelRunner(EngineConfig(model=str(model), device="cpu", block_size=4, num_device_blocks=16))
            seqs = [Sequence(prompt_token_ids=list(range(3, 3 + n)), params=SamplingParams(temperature=0.0),
                             block_table=table) for n, table in ((5, [7, 2, 9]), (10, [0, 11, 4, 5]))]
            steps = [runner.execute(StepPlan(scheduled=[ScheduledSeq(s, s.num_tokens, True) for s in seqs]))]
            for _ in range(3):
                for s, row in zip(seqs, steps[-1], strict=True):
                    s.num_computed_tokens = s.num_tokens
                    s.output_token_ids.append(int(row.argmax()))
                steps.append(runner.execute(StepPlan(scheduled=[ScheduledSeq(s, 1, True) for s in seqs])))
            results[backend] = torch.stack(steps)
        os.environ.pop("PIE_ATTENTION_BACKEND")
    return {"max_err": (results["torch"] - results["triton"]).abs().max().item()}


def _run_all() -> dict[str, Any]:
    results: dict[str, Any] = {"model": _check_model()}
    for name, *args in DECODE_CASES:
        results[f"decode-{name}"] = _check_decode(*args)
    for name, *args in STORE_CASES:
        results[f"store-{name}"] = _check_store(*args)
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "engine"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"kernel subprocess failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_paged_decode_attention_matches_torch(interpreted: dict[str, Any], case: tuple) -> None:
    res = interpreted[f"decode-{case[0]}"]
    assert res["dtype"] == case[1]
    # fp32: online softmax vs SDPA reorder sums (~1e-6); fp16: output rounding (values ~1 -> ulp ~1e-3).
    assert res["max_err"] < (1e-5 if case[1] == "float32" else 2e-3), res


@pytest.mark.parametrize("case", STORE_CASES, ids=[c[0] for c in STORE_CASES])
def test_store_kv_matches_torch(interpreted: dict[str, Any], case: tuple) -> None:
    res = interpreted[f"store-{case[0]}"]
    assert res["equal"], res
    assert res["written"] == 8 * 2, res  # 8 real tokens, K and V each; the padding token wrote nothing


def test_model_steps_through_kernels_match_torch_path(interpreted: dict[str, Any]) -> None:
    # Same model, same steps: only the attention backend differs (logits have std ~8).
    assert interpreted["model"]["max_err"] < 1e-4, interpreted["model"]


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest (it sets TRITON_INTERPRET=1)"
    print(json.dumps(_run_all()))
