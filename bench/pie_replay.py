"""The Pie benchmarks' measure of iteration-latency overhead: replay every forward pass of a swapping run on a
no-swap KV cache, on the same batches, and compare.

Expansion exists to run batches the no-swap engine cannot fit, so "the same iteration without swapping" is not
something a no-swap run ever executes; a latency model fitted on other loads was this bench's reference before,
and its error (about 5% here: cost per context token grows with the context, CPU caches) was as large as the
effect being measured. A replay has no model in it: ``ForwardRecorder`` keeps each step's prepared inputs
(``ModelRunner.forward``'s arguments) and its critical-path cost; ``replay`` then runs the same inputs, in the same
order (so the KV it reads is the same), through a fresh runner whose cache is a plain ``DeviceKVCache`` large
enough for every block id the run used. Per iteration, only the forward pass is exchanged:

    overhead = sum(iteration) / sum(iteration - forward_swap + forward_replay) - 1

Both forward costs are critical-path seconds on the same thread (CPU time, plus stalls for the swapping run).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch


@dataclass
class RecordedForward:
    plan: Any  # StepPlan (DeviceKVCache ignores it)
    inputs: Any  # StepInputs: tensors built for this step only, never mutated afterwards
    cost: float  # critical-path seconds of the forward pass in the recorded run


class ForwardRecorder:
    """Wraps ``runner.forward``: records the inputs and cost of every forward pass from now on. With
    ``shadow`` (a no-swap runner), each forward pass is also replayed on it at once, between two engine steps."""

    def __init__(self, runner: Any, clock: Callable[[], float], shadow: Any = None,
                 before_shadow: Callable[[], None] | None = None) -> None:
        self.steps: list[RecordedForward] = []
        self.shadow_costs: list[float] = []
        inner = runner.forward

        def forward(plan: Any, inputs: Any) -> torch.Tensor:
            t0 = clock()
            out = inner(plan, inputs)
            self.steps.append(RecordedForward(plan, inputs, clock() - t0))
            if shadow is not None:
                if before_shadow is not None:
                    before_shadow()
                t1 = time.thread_time()
                shadow.forward(plan, inputs)
                self.shadow_costs.append(time.thread_time() - t1)
            return out

        runner.forward = forward


def replay(config: Any, recorded: list[RecordedForward]) -> list[float]:
    """Critical-path seconds of each recorded forward pass, re-run without swapping (expansion off)."""
    from pie_engine.model_runner import ModelRunner
    from pie_engine.models.loader import resolve_dtype
    from pie_engine.models.model_config import ModelConfig

    if not recorded:
        return []
    mc = ModelConfig.from_pretrained(config.model)
    elem = torch.empty((), dtype=resolve_dtype(config.dtype, mc)).element_size()
    block_bytes = 2 * config.block_size * mc.num_key_value_heads * mc.head_dim * elem
    blocks = 1 + max((int(s.inputs.meta.block_tables.max()) for s in recorded
                      if s.inputs.meta.block_tables.numel()), default=0)
    budget = blocks * mc.num_hidden_layers * block_bytes
    runner = ModelRunner(replace(config, expansion="off", gpu_memory_budget=str(budget)))
    out = []
    for step in recorded:
        t0 = time.thread_time()
        runner.forward(step.plan, step.inputs)
        out.append(time.thread_time() - t0)
    return out


def replay_overhead(iteration_costs: list[float], forward_costs: list[float],
                    replay_costs: list[float]) -> float | None:
    """See the module docstring; None without iterations."""
    if not iteration_costs:
        return None
    if not len(iteration_costs) == len(forward_costs) == len(replay_costs):
        raise ValueError(f"{len(iteration_costs)} iterations, {len(forward_costs)} forward passes, "
                         f"{len(replay_costs)} replays: the records do not line up")
    swapped = sum(iteration_costs)
    reference = sum(i - f + r for i, f, r in zip(iteration_costs, forward_costs, replay_costs, strict=True))
    return swapped / reference - 1.0
