"""The Pie benchmarks' measure of iteration-latency overhead: every forward pass of a run is replayed at once on a
shadow runner without swapping, on the same batch, and the two are compared.

Expansion exists to run batches the no-swap engine cannot fit, so "the same iteration without swapping" is not
something a no-swap run ever executes. A latency model fitted on other loads was this bench's reference before, and
its error (about 5% here: the cost per context token grows with the context, CPU caches) was as large as the effect
being measured. A replay has no model in it: ``ForwardRecorder`` wraps ``ModelRunner.forward``; after each forward
pass it runs the same prepared inputs through a shadow ``ModelRunner`` whose cache is a plain ``DeviceKVCache``
large enough for every block id the run can use. The shadow sees the same steps in the same order, so the KV it
reads is the same. Replaying right away, between two engine steps, keeps the shadow's surroundings (caches,
allocator, the engine's own Python work) like the original's: replaying all passes back to back afterwards ran
3-12% faster than the same passes in the engine, even without swapping. Whichever of the two passes runs second
finds the forward pass's code and the step's inputs in the CPU caches: with the shadow always second, no-swap
runs measured 2-3% "overhead". So the order alternates step by step (``order="alternate"``), which cancels that
bias. Per iteration only the forward pass is exchanged:

    overhead = sum(iteration) / sum(iteration - forward_swap + forward_shadow) - 1

Both forward costs are critical-path seconds of the engine thread (CPU time, plus stalls for the swapping run).
A no-swap run measured the same way shows the method's floor (reported next to the swapping runs).
NOTE: the shadow runs while the next step's prefetch is in flight, which leaves that copy more time than the
engine would give it; stalls are therefore a lower bound on a throttled link (the link bench reports stalls only).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RecordedForward:
    cost: float  # critical-path seconds of the forward pass in the engine
    shadow_cost: float | None  # CPU seconds of the same pass on the no-swap shadow runner


class ForwardRecorder:
    """Wraps ``runner.forward`` from now on: records each pass's cost and, with a ``shadow`` runner, replays it
    there too: right after it (``order="after"``), right before it (``"before"``), or alternating (the default)."""

    def __init__(self, runner: Any, clock: Callable[[], float], shadow: Any = None, order: str = "alternate") -> None:
        if order not in ("after", "before", "alternate"):
            raise ValueError(f"order must be 'after', 'before' or 'alternate', got {order!r}")
        self.steps: list[RecordedForward] = []
        # NOTE: the shadow runs on the engine thread, inside the engine's step: whoever times the engine must
        # subtract these (bench/pie_common.py's clocks do).
        self.shadow_cpu_total = self.shadow_wall_total = 0.0
        inner = runner.forward

        def replay(plan: Any, inputs: Any) -> float:
            w1, t1 = time.perf_counter(), time.thread_time()
            shadow.forward(plan, inputs)  # NOTE: a DeviceKVCache ignores the plan; the inputs are read-only
            cost = time.thread_time() - t1
            self.shadow_cpu_total += cost
            self.shadow_wall_total += time.perf_counter() - w1
            return cost

        def forward(plan: Any, inputs: Any) -> torch.Tensor:
            first = shadow is not None and (order == "before" or (order == "alternate" and len(self.steps) % 2))
            shadow_cost = replay(plan, inputs) if first else None
            t0 = clock()
            out = inner(plan, inputs)
            cost = clock() - t0
            if shadow is not None and not first:
                shadow_cost = replay(plan, inputs)
            self.steps.append(RecordedForward(cost, shadow_cost))
            return out

        runner.forward = forward


def replay_overhead(iteration_costs: list[float], forward_costs: list[float],
                    shadow_costs: list[float]) -> float | None:
    """See the module docstring; None without iterations."""
    if not iteration_costs:
        return None
    if not len(iteration_costs) == len(forward_costs) == len(shadow_costs):
        raise ValueError(f"{len(iteration_costs)} iterations, {len(forward_costs)} forward passes, "
                         f"{len(shadow_costs)} replays: the records do not line up")
    swapped = sum(iteration_costs)
    reference = sum(i - f + r for i, f, r in zip(iteration_costs, forward_costs, shadow_costs, strict=True))
    return swapped / reference - 1.0
