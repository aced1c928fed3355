"""``PieKVBackend``: the engine's KV backend. It builds the plain device cache with expansion off and the swapping
cache otherwise, and ``ExpansionRuntime`` in both cases (with expansion off it only exports metrics and applies
live device-budget changes)."""

from __future__ import annotations

import torch

from pie_engine.config import EngineConfig, parse_expansion
from pie_engine.core.scheduler import Scheduler
from pie_engine.kv.backend import KVBackend
from pie_engine.kv.cache import KVCache, KVSpec
from pie_engine.kv.device_cache import DeviceKVCache
from pie_engine.pie.controller_config import ControllerConfig
from pie_engine.pie.copy.link import LinkModel
from pie_engine.pie.runtime import ExpansionRuntime
from pie_engine.pie.swap_cache import LayerSwapKVCache
from pie_engine.quantity import parse_bytes


class PieKVBackend(KVBackend):
    def __init__(self, config: EngineConfig, controller_config: ControllerConfig | None = None) -> None:
        self.config = config
        self.controller_config = controller_config
        # The cache ``make_cache`` built, by kind: the runtime is built around the one it gets back.
        self._swap: LayerSwapKVCache | None = None
        self._unswapped: DeviceKVCache | None = None

    def make_cache(self, spec: KVSpec) -> KVCache:
        """DeviceKVCache with expansion off, else the swapping cache (at m = 0; ExpansionRuntime sets m)."""
        config = self.config
        self._swap = self._unswapped = None
        if parse_expansion(config.expansion)[0] == "off":
            self._unswapped = DeviceKVCache.from_spec(spec)
            return self._unswapped
        limit = None if config.host_memory_limit is None else parse_bytes(config.host_memory_limit)
        link = None
        if config.swap_link_bytes_per_s is not None or config.swap_link_latency_s > 0:
            link = LinkModel(config.swap_link_bytes_per_s, config.swap_link_latency_s)
        self._swap = LayerSwapKVCache(*spec.args(), num_staging=config.swap_staging_slots, host_memory_limit=limit,
                                      link_in=link, link_out=link)
        return self._swap

    def make_runtime(self, cache: KVCache, scheduler: Scheduler, device: torch.device) -> ExpansionRuntime:
        """The runtime around ``cache``, which must be the last cache ``make_cache`` built."""
        if cache is not self._swap and cache is not self._unswapped:
            raise ValueError("PieKVBackend.make_runtime: the cache was not built by this backend's make_cache")
        return ExpansionRuntime(scheduler, self.config, device, self.controller_config, swap=self._swap,
                                unswapped=self._unswapped)
