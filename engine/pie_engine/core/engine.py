"""The offline engine: requests in, tokens out, one ``step()`` at a time (the server drives it from one thread)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

from pie_engine.config import EngineConfig
from pie_engine.core.block_manager import BlockManager
from pie_engine.core.output_processor import OutputProcessor, RequestOutput
from pie_engine.core.sampler import Sampler
from pie_engine.core.sampling_params import SamplingParams
from pie_engine.core.scheduler import Scheduler
from pie_engine.core.sequence import Sequence
from pie_engine.kv.backend import KVBackend


@dataclass
class EngineStats:
    """A snapshot for metrics and /health."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of device KV blocks in use, 0..1
    num_blocks: int
    num_preemptions_total: int
    num_prompt_tokens_total: int
    num_generation_tokens_total: int
    num_steps_total: int


class LLMEngine:
    """Continuous-batching engine over one model. Not thread-safe: call it from a single thread."""

    def __init__(self, config: EngineConfig, kv_backend: KVBackend) -> None:
        """``kv_backend`` builds the KV cache and the runtime that manages its capacity between steps
        (``factory.create_engine`` picks it from the config)."""
        # Imported here so the pure parts (scheduler, server protocol) import without the model stack.
        from pie_engine.runner.model_runner import ModelRunner
        from pie_engine.text.tokenizer import Tokenizer

        self.config = config
        self.tokenizer = Tokenizer.from_pretrained(config.model)
        self.runner = ModelRunner(config, kv_backend.make_cache)
        self.max_model_len: int = self.runner.max_model_len
        self.vocab_size: int = self.runner.model_config.vocab_size
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager, eos_token_ids=self.tokenizer.eos_token_ids,
                                   max_model_len=self.max_model_len)
        self.sampler = Sampler(config.seed)
        self.output_processor = OutputProcessor(self.tokenizer)
        # Between steps: the KV capacity (Pie: the expansion controller, swap facts in the plan) and its metrics.
        self.kv_runtime = kv_backend.make_runtime(self.runner.kv_cache, self.scheduler, self.runner.device)
        # Extra prometheus collectors (e.g. the Pie KV-swap metrics); the server registers them in its registry.
        self.metrics_collectors: list[Any] = [*self.kv_runtime.collectors, self._overhead_gauge()]
        self.num_steps = 0
        self._ids = itertools.count()

    def _overhead_gauge(self) -> Any:
        """pie_gpu_memory_overhead_bytes: what a fractional --gpu-memory-budget leaves out of the KV (0 without a
        GPU). The operator needs it to resolve a fraction live exactly as the start-up did (Budget.kv_bytes)."""
        from prometheus_client import Gauge

        gauge = Gauge("pie_gpu_memory_overhead_bytes", "GPU memory a fractional budget leaves out of the KV: in use "
                      "at start (weights, other processes) plus the activation reserve; 0 without a GPU",
                      registry=None)
        gauge.set(self.runner.gpu_memory_overhead or 0)
        return gauge

    # -------------------------------------------------------------------------------------------- requests
    def tokenize(self, prompt: str | Seq[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Raise ValueError (the message is shown to API clients) when a request can never be served; else return
        the KV blocks per layer it needs to run to completion."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        if n + params.max_tokens > self.max_model_len:
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens, but "
                             f"{n + params.max_tokens} were requested ({n} in the prompt, {params.max_tokens} for "
                             f"the completion); shorten the prompt or lower max_tokens")
        need = self.block_manager.blocks_needed(n + params.max_tokens)
        if need > (reach := self.kv_runtime.reachable_blocks()):
            raise ValueError(f"the request needs {need} KV blocks ({n} + {params.max_tokens} tokens) but the KV "
                             f"cache holds at most {reach}; lower max_tokens")
        return need

    def add_request(self, request_id: str | None, prompt: str | Seq[int], params: SamplingParams,
                    arrival_time: float | None = None) -> Sequence:
        """Queue a request; raises ValueError for an invalid one (empty, too long, duplicate id).

        ``arrival_time`` (time.monotonic()) defaults to now; the server passes the HTTP arrival time.
        """
        ids = self.tokenize(prompt)
        need = self.validate(ids, params)
        self.kv_runtime.require_blocks(need)  # adaptive expansion may have to grow first, or it could never fit
        seq = Sequence(prompt_token_ids=ids, params=params, request_id=request_id or f"req-{next(self._ids)}")
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        self.scheduler.add(seq)
        self.output_processor.add(seq)
        return seq

    def abort_request(self, request_id: str) -> bool:
        """Drop a request and free its KV blocks; False if it was unknown or already finished."""
        self.output_processor.remove(request_id)
        return self.scheduler.abort(request_id) is not None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """Run one forward pass over the scheduled batch; returns the outputs of requests that progressed."""
        start = self.kv_runtime.clock()
        plan = self.scheduler.schedule()
        done_early, self.scheduler.finished_early = self.scheduler.finished_early, []
        if plan.is_empty:
            return self.output_processor.process(done_early, self.scheduler.finish)
        self.kv_runtime.fill_plan(plan)
        logits = self.runner.execute(plan)
        sampled = self.sampler(logits, [s.seq for s in plan.scheduled if s.sample])
        updated = self.scheduler.update(plan, sampled.token_ids, sampled.logprobs)
        self.kv_runtime.after_step(plan, self.kv_runtime.clock() - start)  # may change m (and preempt) between steps
        self.num_steps += 1
        return self.output_processor.process(done_early + updated, self.scheduler.finish)

    def generate(self, prompts: Seq[str | Seq[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Offline helper: run ``prompts`` to completion, return their final outputs in prompt order."""
        params = params if params is not None else SamplingParams()
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        token_ids = [self.tokenize(p) for p in prompts]
        for ids, sp in zip(token_ids, plist, strict=True):
            self.validate(ids, sp)  # all before any is queued: a bad prompt leaves nothing behind
        request_ids = [self.add_request(None, p, sp).request_id for p, sp in zip(token_ids, plist, strict=True)]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in request_ids]

    # ------------------------------------------------------------------------------------------- metrics
    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, kv_cache_usage=self.block_manager.usage,
            num_blocks=self.block_manager.num_blocks, num_preemptions_total=s.num_preemptions_total,
            num_prompt_tokens_total=s.num_prompt_tokens_total,
            num_generation_tokens_total=s.num_generation_tokens_total, num_steps_total=self.num_steps)
