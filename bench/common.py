"""Shared benchmark helpers: the benchmark model, workloads, the HF transformers static-batch baseline, output.

The baseline is HF ``generate()`` on the SAME checkpoint in the SAME run: greedy, EOS ignored, left-padded static
batches in arrival order, each batch generating until its longest request is done (that is what static batching
costs; only each request's own tokens count as useful output).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# A small but not trivial model: compute per token dominates Python overhead enough to make batching matter.
MODEL_KW = {"layers": 6, "hidden": 384, "heads": 6, "kv_heads": 2, "intermediate": 1024, "vocab": 2048,
            "max_position_embeddings": 2048}


@dataclass
class Request:
    prompt_token_ids: list[int]
    max_tokens: int
    arrival: float = 0.0  # seconds after the start (online benchmark)


def setup_torch() -> None:
    threads = int(os.environ.get("PIE_BENCH_THREADS", str(os.cpu_count() or 1)))
    torch.set_num_threads(threads)


def bench_model(arch: str = "llama") -> Path:
    """Build (once) the benchmark checkpoint in the cache outside the checkout ($PIE_CACHE/bench-models)."""
    from pie_engine.models.test_model import make_test_model

    tag = "-".join(f"{k}{v}" for k, v in MODEL_KW.items())
    cache = Path(os.environ.get("PIE_CACHE", Path.home() / ".cache" / "pie"))
    out = cache / "bench-models" / f"{arch}-{tag}"
    if not (out / "config.json").is_file():
        make_test_model(arch, out, seed=0, **MODEL_KW)
    return out


def workload(n: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int = 0,
             vocab: int = MODEL_KW["vocab"], rate: float | None = None) -> list[Request]:
    """``n`` requests with lengths uniform in the given inclusive ranges; Poisson arrivals at ``rate`` req/s."""
    rng = random.Random(seed)
    reqs, t = [], 0.0
    for _ in range(n):
        if rate:
            t += rng.expovariate(rate)
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(*input_len))]
        reqs.append(Request(prompt, rng.randint(*output_len), t))
    return reqs


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos: always produce max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


@torch.inference_mode()
def hf_generate_batch(model, batch: list[Request], on_step: Callable[[], None] | None = None) -> list[list[int]]:
    """One static batch: left-padded prompts, ``max_new_tokens`` = the batch's largest ``max_tokens``."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    width = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
        mask[i, width - len(r.prompt_token_ids):] = 1
    new = max(r.max_tokens for r in batch)

    class _Tick(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw) -> torch.Tensor:
            if on_step is not None:
                on_step()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                         stopping_criteria=StoppingCriteriaList([_Tick()]))
    return [out[i, width:width + r.max_tokens].tolist() for i, r in enumerate(batch)]


def hf_offline(model, reqs: list[Request], batch_size: int) -> float:
    """Seconds for HF to serve ``reqs`` in static batches of ``batch_size`` (in order)."""
    start = time.perf_counter()
    for i in range(0, len(reqs), batch_size):
        hf_generate_batch(model, reqs[i:i + batch_size])
    return time.perf_counter() - start


def percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"p50": float("nan"), "p99": float("nan"), "mean": float("nan")}
    s = sorted(xs)
    pick = lambda q: s[min(len(s) - 1, round(q * (len(s) - 1)))]
    return {"p50": pick(0.5), "p99": pick(0.99), "mean": sum(s) / len(s)}


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__")
                               else str(o)))
    return path


def bar_plot(path: Path, title: str, groups: list[str], series: dict[str, list[float]], ylabel: str,
             log: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
