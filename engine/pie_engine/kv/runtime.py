"""The seam between the engine loop and whatever manages KV capacity between steps.

``core`` drives a ``KVRuntime`` without knowing what is behind it: with Pie (``pie/runtime.py``) it fills the plan
with the step's swap facts, feeds the expansion controller and resizes the cache when m changes. The engine never
imports ``pie``: a ``KVBackend`` (``kv/backend.py``) is handed to it by the composition root (``factory.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from pie_engine.core.plan import StepPlan


class BudgetError(ValueError):
    """A device KV budget that can never work (less than one block per layer): HTTP 400."""


class NeedsRestartError(RuntimeError):
    """A device KV budget that cannot be applied live (HTTP 409; the message says why)."""


class BudgetBusyError(NeedsRestartError):
    """A device KV budget that cannot be applied live NOW, because an unfinished request needs more KV than it holds:
    HTTP 409 with ``code: "busy"`` -- retry once the request finished (a restart would cut it short). A subclass, so
    that callers that only know NeedsRestartError still refuse the change."""


class KVRuntime(ABC):
    """What ``LLMEngine`` calls around each step, and what the server's admin and state routes call.

    NOTE: every method runs on the engine thread between steps, except ``state`` and ``reachable_blocks``, which
    read plain numbers and are safe from the server's event loop.
    """

    clock: Callable[[], float]  # what LLMEngine.step times iterations with

    @property
    @abstractmethod
    def collectors(self) -> list[Any]:
        """Prometheus collectors the server registers next to its own metrics."""

    @abstractmethod
    def fill_plan(self, plan: StepPlan) -> None:
        """Add what the KV cache needs to know about the scheduled step (``plan.swap``)."""

    @abstractmethod
    def after_step(self, plan: StepPlan, iteration_seconds: float) -> list[Any]:
        """Account the finished iteration; may change capacity. Returns the sequences it preempted."""

    @abstractmethod
    def reachable_blocks(self) -> int:
        """Blocks per layer one request can ever get (requests needing more are rejected up front)."""

    @abstractmethod
    def require_blocks(self, blocks: int) -> None:
        """A request needing ``blocks`` per layer was queued: grow now if it could not fit otherwise."""

    @abstractmethod
    def set_device_kv_budget(self, budget_bytes: int) -> dict[str, Any]:
        """Apply a new device KV budget live. Raises BudgetError or NeedsRestartError."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """The KV capacity state as JSON-able values (GET /v1/pie/expansion)."""

    @abstractmethod
    def close(self) -> None:
        """Release threads and memory (the engine is done)."""
