"""What a model sees of the KV cache: one layer at a time.

Kept apart from ``kv/cache.py`` so that models depend on these two calls only, not on the step plan that the
cache's owner drives it with (models never import core).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class LayerKV(ABC):
    """The model calls ``begin_layer(l)`` right before layer l's attention and ``end_layer(l)`` right after it."""

    @abstractmethod
    def begin_layer(self, layer: int) -> torch.Tensor:
        """Return layer ``layer``'s KV tensor, ready to read and write (may wait for a swap-in)."""

    @abstractmethod
    def end_layer(self, layer: int) -> None:
        """Layer ``layer`` finished reading/writing its KV this step."""
