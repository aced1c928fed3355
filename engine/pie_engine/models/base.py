"""What the loader and the runner rely on in every model class, stated once so both are type-checked against it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from pie_engine.kv.layer import LayerKV
from pie_engine.models.model_config import ModelConfig
from pie_engine.runner.attention import AttentionMetadata


class CausalLM(nn.Module, ABC):
    """A decoder over flattened varlen tokens. Module names mirror the HF checkpoint's, so weight names map one to
    one except where ``packed_modules`` fuses several checkpoint tensors into one parameter."""

    # checkpoint sub-module name -> (fused module name, part index)
    packed_modules: ClassVar[dict[str, tuple[str, int]]] = {}
    # checkpoint tensors that are not weights of this model (e.g. rotary buffers old checkpoints saved)
    ignored_weight_suffixes: ClassVar[tuple[str, ...]] = ()
    config: ModelConfig

    @property
    def tied_weight_names(self) -> tuple[str, ...]:
        """Checkpoint tensors the model takes from another parameter instead (a tied head): skipped on load."""
        return ()

    def rename_weight(self, name: str) -> str:
        """A checkpoint tensor name -> this model's name for it."""
        return name

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv: LayerKV) -> torch.Tensor:
        """input_ids [T], positions [T] -> hidden [T, hidden_size]."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] -> logits [N, vocab_size] in the model dtype."""
