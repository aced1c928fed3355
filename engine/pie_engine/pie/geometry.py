"""Which layers stay on the device and how host-backed layers rotate through staging slots (pure, no torch).

Geometry: the device KV pool holds ``pool_blocks`` layer-blocks (one block of one layer, K and V). With ``m``
layers on host, the device keeps ``S = n - m`` layer slots of ``C = pool_blocks // S`` blocks each, so every layer
can address C blocks: the same pool holds ``n / (n - m)`` times more KV (the expansion ratio).

Of the S slots, ``k`` are staging slots and ``R = S - k`` hold permanently resident layers. The other
``H = n - R = m + k`` layers are host-backed: their authoritative copy lives in host memory and they cycle through
the staging slots in forward order, continuing across steps (see ``SwapSchedule``). After host-backed layer ``j``
has run, its slot is written back and refilled with host-backed layer ``j + k`` (mod H: the first k of the next
step). ``k = S`` (R = 0) is the paper's full rotation: after layer l, layer (l + n - m) mod n comes in.
See docs/pie.md for why the slots are laid out this way.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


def spread_layers(num_layers: int, count: int) -> tuple[int, ...]:
    """``count`` layer ids spread evenly over ``range(num_layers)`` (midpoints of equal strata).

    Even spacing makes every gap between consecutive host-backed layers (including the wrap from the last to the
    first one across the step boundary) about ``n / count`` layers, so each prefetch overlaps the same amount of
    resident compute and no swap-in is left with a short window.
    """
    if not 0 <= count <= num_layers:
        raise ValueError(f"cannot pick {count} of {num_layers} layers")
    return tuple(int((i + 0.5) * num_layers / count) for i in range(count))


@dataclass(frozen=True)
class SwapSchedule:
    """The slot plan for one value of m (see module docstring). Slots: resident ``0..R-1``, staging ``R..S-1``.

    The rotation is continuous across steps, as in the paper: counting host-backed layer uses over all steps,
    use number ``u`` goes to staging slot ``u mod k``. So host-backed layer ``j`` of a step with phase ``p``
    (= uses before the step, mod k) sits in slot ``R + (p + j) mod k``, and every swap-in is issued exactly k
    host-backed layers ahead, also across the step boundary, whatever H mod k is.
    """

    num_layers: int
    layers_on_host: int
    num_staging: int  # k actually used (0 when m == 0)
    host_backed: tuple[int, ...]  # ascending layer ids, the rotation order
    resident: tuple[int, ...]

    @property
    def num_slots(self) -> int:
        return self.num_layers - self.layers_on_host

    @cached_property
    def host_backed_set(self) -> frozenset[int]:
        """``host_backed`` for O(1) membership: it is checked per layer of every step."""
        return frozenset(self.host_backed)

    @cached_property
    def _rotation_index(self) -> dict[int, int]:
        return {layer: j for j, layer in enumerate(self.host_backed)}

    def is_host_backed(self, layer: int) -> bool:
        return layer in self.host_backed_set

    def slot(self, layer: int, phase: int = 0) -> int:
        """Device slot of ``layer`` in a step whose rotation phase is ``phase``."""
        if layer in self.resident:
            return self.resident.index(layer)
        return len(self.resident) + (phase + self.host_backed.index(layer)) % self.num_staging

    def next_phase(self, phase: int) -> int:
        """Phase of the step after one with ``phase``."""
        return (phase + len(self.host_backed)) % self.num_staging if self.num_staging else 0

    def first_swap_ins(self) -> tuple[int, ...]:
        """Host-backed layers that occupy the staging slots first in a step (their swap-in starts the step)."""
        return self.host_backed[: self.num_staging]

    def next_swap_in(self, layer: int) -> tuple[int, bool] | None:
        """After host-backed ``layer`` ran and was written back: (layer to bring into its slot, wraps to next step).

        Full rotation (k = S, all n layers host-backed) gives the paper's rule: layer (l + n - m) mod n.
        None for resident layers.
        """
        if (j := self._rotation_index.get(layer)) is None:
            return None
        nxt = j + self.num_staging
        h = len(self.host_backed)
        return self.host_backed[nxt % h], nxt >= h

    def excess_seconds(self, layer_periods: list[float]) -> float | None:
        """What swapping added to one step, measured inside that step: ``H * (mean host-backed period - mean
        resident period)``, where ``layer_periods[l]`` is the time from layer l's ``begin_layer`` to layer l+1's
        (stalls, write-back and prefetch issue included). Every layer does the same work at the same load, so the
        resident layers are the no-swap reference at exactly this batch; a model of no-swap cost fitted on other
        loads cannot be that precise. The last layer's period (it ends with the final norm instead of the next
        layer's projections) is left out of the means. None when there is nothing to compare (m = 0, or every
        layer host-backed as in the full rotation). NOTE: it misses a slowdown that hits all layers alike (copy
        threads competing for cores); the controller's latency baseline covers that."""
        n = self.num_layers
        if not self.host_backed or len(layer_periods) < n:
            return None
        hb_set = self.host_backed_set
        hb = [layer_periods[i] for i in range(n - 1) if i in hb_set]
        res = [layer_periods[i] for i in range(n - 1) if i not in hb_set]
        if not hb or not res:
            return None
        return len(self.host_backed) * (sum(hb) / len(hb) - sum(res) / len(res))


@dataclass(frozen=True)
class SwapGeometry:
    """Capacity arithmetic shared by the KV cache (swap_cache.py) and the controller (controller.py)."""

    num_layers: int
    pool_blocks: int  # device pool size, in layer-blocks (= num_layers * blocks per layer at m = 0)
    num_staging: int = 2  # configured k; clamped to the number of slots
    layer_block_bytes: int = 1  # bytes of one block of one layer (K and V)

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.num_staging < 1:
            raise ValueError(f"num_staging must be >= 1, got {self.num_staging}")
        if self.pool_blocks < self.num_layers:
            raise ValueError(f"a pool of {self.pool_blocks} layer-blocks cannot hold one block of each of "
                             f"{self.num_layers} layers")

    def check(self, m: int) -> None:
        if not 0 <= m <= self.num_layers - 1:
            raise ValueError(f"layers_on_host must be in [0, {self.num_layers - 1}], got {m}")

    def num_slots(self, m: int) -> int:
        self.check(m)
        return self.num_layers - m

    def staging(self, m: int) -> int:
        """k used at this m: none without swapping, at most one per slot."""
        return 0 if m == 0 else min(self.num_staging, self.num_slots(m))

    def capacity_blocks(self, m: int) -> int:
        """C: blocks per layer at this m."""
        return self.pool_blocks // self.num_slots(m)

    def num_host_backed(self, m: int) -> int:
        return 0 if m == 0 else m + self.staging(m)

    def host_bytes(self, m: int) -> int:
        """Host KV bytes at full capacity: every host-backed layer holds C blocks."""
        return self.num_host_backed(m) * self.capacity_blocks(m) * self.layer_block_bytes

    def device_bytes(self, m: int) -> int:
        """Device KV bytes actually laid out (S slots of C blocks; at most the pool)."""
        return self.num_slots(m) * self.capacity_blocks(m) * self.layer_block_bytes

    def expansion_ratio(self, m: int) -> float:
        return self.num_layers / self.num_slots(m)

    def feasible(self, m: int, host_memory_limit: int | None) -> bool:
        return 0 <= m < self.num_layers and (host_memory_limit is None or self.host_bytes(m) <= host_memory_limit)

    def max_layers_on_host(self, host_memory_limit: int | None) -> int:
        """Largest m such that every m' <= m fits the host limit (0 if even m = 1 does not)."""
        m = 0
        while m + 1 < self.num_layers and self.feasible(m + 1, host_memory_limit):
            m += 1
        return m

    def schedule(self, m: int) -> SwapSchedule:
        k = self.staging(m)
        n = self.num_layers
        host_backed = spread_layers(n, self.num_host_backed(m))
        resident = tuple(layer for layer in range(n) if layer not in host_backed)
        return SwapSchedule(n, m, k, host_backed, resident)
