"""How the engine gets its KV cache and the runtime around it, without knowing which kind it is."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from pie_engine.kv.cache import KVCache, KVSpec
from pie_engine.kv.runtime import KVRuntime

if TYPE_CHECKING:  # the scheduler is only passed through; importing it here would tie kv to core at run time
    from pie_engine.core.scheduler import Scheduler


class KVBackend(ABC):
    """Builds the KV cache once the runner knows the geometry, then the runtime that manages it between steps."""

    @abstractmethod
    def make_cache(self, spec: KVSpec) -> KVCache:
        """The cache for ``spec`` (``spec.num_blocks``: blocks per layer the device budget holds unswapped)."""

    @abstractmethod
    def make_runtime(self, cache: KVCache, scheduler: Scheduler, device: torch.device) -> KVRuntime:
        """The runtime around ``cache`` (built after the scheduler, which it may resize)."""
