"""What the expansion controller reports (pure, no torch): the state behind GET /v1/pie/expansion and the ``pie_*``
metrics (metrics.py), the layers m may still grow by (the operator's "expansion exhausted" signal) and the memory
the observed peak KV demand needs (what the operator sizes pods by: demand.py).

NOTE: read from the metrics thread while the engine loop updates the controller: attributes only, nothing
mutated, and every container read is one the controller replaces whole.
"""

from __future__ import annotations

from pie_engine.pie.controller_config import ControllerConfig
from pie_engine.pie.demand import PeakDemand, device_bytes_for, host_bytes_for
from pie_engine.pie.evidence import Terms
from pie_engine.pie.geometry import SwapGeometry
from pie_engine.pie.latency_baseline import LatencyBaseline
from pie_engine.pie.probe import Ceiling


def headroom(adaptive: bool, room: bool, max_layers_on_host: int, ceiling: int, m: int) -> int:
    """Layers m may still grow by: up to the host limit and below the lowest forbidden m (``ceiling``); 0 when not
    ``adaptive`` or the last window left no ``room`` to grow."""
    if not adaptive or not room:
        return 0
    return max(0, min(max_layers_on_host, ceiling - 1) - m)


class ExpansionReport:
    """The reporting half of ``ExpansionController`` (mixed into it): read-only views of the attributes the
    controller keeps up to date."""

    geometry: SwapGeometry
    mode: str
    ratio: float | None
    config: ControllerConfig
    m: int
    max_layers_on_host: int
    host_memory_limit: int | None
    ceiling: Ceiling
    peak: PeakDemand
    baseline: LatencyBaseline
    transparent_limit: int | None  # highest m known transparent below an overhead-causing one
    overhead: float
    stall_fraction: float
    overheads: Terms
    last_decision: str
    changes: tuple[tuple[int, int, str], ...]
    num_grows: int
    num_shrinks: int
    reconfigure_seconds: float
    _room: bool
    _iteration: int

    @property
    def iterations(self) -> int:
        """Iterations recorded so far (the controller's clock: ttl and probe ages count these)."""
        return self._iteration

    @property
    def headroom_layers(self) -> int:
        """Layers m may still grow by now: 0 when expansion cannot absorb more KV demand -- not adaptive, the host
        memory limit reached, a back-off's ceiling, or latency / overhead / stall leaving no room to grow. The
        operator adds replicas only once this is 0 on every pod (memory first: operator/pie_operator/autoscale.py).
        NOTE: read from the metrics thread: attributes only, nothing mutated."""
        ceiling = self.ceiling.peek(self._iteration, self.geometry.num_layers)
        return headroom(self.mode == "adaptive", self._room, self.max_layers_on_host, ceiling, self.m)

    @property
    def peak_blocks(self) -> int:
        """Observed peak KV demand, blocks per layer, over the last ``peak_window`` iterations."""
        return self.peak.blocks

    @property
    def recommended_host_memory_bytes(self) -> int:
        """Host KV needed at the current (settled) m for the peak demand."""
        return host_bytes_for(self.geometry, self.m, self.peak.blocks, self.config.headroom)

    @property
    def recommended_gpu_memory_bytes(self) -> int:
        """Smallest device KV budget that holds the peak demand at the largest m known to be transparent (below
        the last m that caused overhead, else the current m)."""
        m_t = self.m if self.transparent_limit is None or self.mode != "adaptive" else self.transparent_limit
        return device_bytes_for(self.geometry, m_t, self.peak.blocks, self.config.headroom)

    def state(self) -> dict:
        """Everything above and the controller's settings and latest readings, as GET /v1/pie/expansion serves it."""
        g, cfg = self.geometry, self.config
        return {
            "mode": self.mode, "ratio": self.ratio, "layers_on_host": self.m, "num_layers": g.num_layers,
            "max_layers_on_host": self.max_layers_on_host, "expansion_ratio": g.expansion_ratio(self.m),
            "blocks_per_layer": g.capacity_blocks(self.m), "overhead": self.overhead,
            "stall_fraction": self.stall_fraction, "overheads": dict(self.overheads), "epsilon": cfg.epsilon,
            "grow_overhead": cfg.grow_overhead,
            "last_decision": self.last_decision, "recent_changes": [list(c) for c in self.changes],
            "ceiling": self.ceiling.value, "headroom_layers": self.headroom_layers,
            "transparent_limit": self.transparent_limit, "num_grows": self.num_grows,
            "num_shrinks": self.num_shrinks, "baseline_samples": self.baseline.num_samples,
            "baseline_error": self.baseline.error(),
            "peak_blocks": self.peak_blocks, "reconfigure_seconds": self.reconfigure_seconds,
            "host_memory_limit": self.host_memory_limit,
            "recommended_host_memory_bytes": self.recommended_host_memory_bytes,
            "recommended_gpu_memory_bytes": self.recommended_gpu_memory_bytes,
        }
