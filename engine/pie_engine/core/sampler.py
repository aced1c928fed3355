"""Turn the runner's last-position logits into one token per sequence (greedy, temperature, top-k, top-p).

Random choices use the exponential race (argmax of ``probs / q`` with ``q ~ Exp(1)``), which samples exactly
from ``probs``. A request with a ``seed`` draws its noise from a generator seeded by (seed, output index), so its
tokens depend only on its own logits: the same no matter how it was batched or how often it was preempted.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from pie_engine.core.sampling_params import SamplingParams
from pie_engine.core.sequence import Sequence

_GREEDY_EPS = 1e-5  # temperatures below this are greedy (dividing by them would overflow the logits)
_MASK64 = (1 << 64) - 1


def token_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit generator seed for output token ``index`` of a request seeded with ``seed``."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64  # splitmix64: nearby inputs -> unrelated seeds
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per sequence: {chosen token: logprob, then the top-N tokens: logprob}, or None when not requested.
    logprobs: list[dict[int, float] | None]


class Sampler:
    """Stateless apart from the generator that serves requests without a seed."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> SamplerOutput:
        """``logits`` [num_seqs, vocab] float32 (CPU), row i belongs to ``seqs[i]``."""
        if logits.shape[0] != len(seqs):
            raise ValueError(f"{logits.shape[0]} logit rows for {len(seqs)} sequences")
        params = [s.params for s in seqs]
        token_ids = logits.argmax(dim=-1)
        rand = [i for i, p in enumerate(params) if p.temperature >= _GREEDY_EPS]
        if rand:
            token_ids[rand] = self._sample(logits[rand], [seqs[i] for i in rand])
        ids = token_ids.tolist()
        return SamplerOutput(ids, self._logprobs(logits, params, ids))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.params for s in seqs]
        temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
        logits = _apply_top_k_top_p(logits / temps[:, None], params)
        probs = torch.softmax(logits, dim=-1)
        q = torch.empty_like(probs)
        unseeded = [r for r, p in enumerate(params) if p.seed is None]
        if unseeded:
            q[unseeded] = torch.empty(len(unseeded), probs.shape[1]).exponential_(generator=self.generator)
        for r, s in enumerate(seqs):
            if s.params.seed is not None:
                g = torch.Generator().manual_seed(token_seed(s.params.seed, len(s.output_token_ids)))
                q[r].exponential_(generator=g)
        return (probs / q).argmax(dim=-1)

    @staticmethod
    def _logprobs(logits: torch.Tensor, params: list[SamplingParams], ids: list[int]) -> list[dict[int, float] | None]:
        out: list[dict[int, float] | None] = [None] * len(params)
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return out
        # NOTE: logprobs of the model's raw distribution (before temperature / top-k / top-p), as vLLM reports.
        lp = torch.log_softmax(logits[rows], dim=-1)
        k = max(params[i].logprobs or 0 for i in rows)
        top_v, top_i = lp.topk(k, dim=-1)  # k = 0 (logprobs=0 everywhere): empty, never read
        for r, i in enumerate(rows):
            d = {ids[i]: float(lp[r, ids[i]])}
            n = params[i].logprobs or 0
            if n:
                for t, v in zip(top_i[r, :n].tolist(), top_v[r, :n].tolist(), strict=True):
                    d.setdefault(t, v)
            out[i] = d
        return out


def _apply_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, then outside its top-p nucleus. [n, vocab] -> [n, vocab]."""
    use_k = any(p.top_k > 0 for p in params)
    use_p = any(p.top_p < 1.0 for p in params)
    if not (use_k or use_p):
        return logits
    vocab = logits.shape[1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    if use_k:
        k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params])
        sorted_logits.masked_fill_(torch.arange(vocab)[None, :] >= k[:, None], float("-inf"))
    if use_p:
        top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # Keep a token while the mass of the tokens ranked above it is below top_p (so the first always stays).
        sorted_logits.masked_fill_(mass_before >= top_p[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)
