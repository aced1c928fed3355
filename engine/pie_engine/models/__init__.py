"""Model registry: HF ``architectures`` name -> engine model class."""

from __future__ import annotations

from pie_engine.models.base import CausalLM
from pie_engine.models.llama import LlamaForCausalLM
from pie_engine.models.model_config import ModelConfig
from pie_engine.models.opt import OPTForCausalLM

# Mistral and Qwen2 are the llama decoder with different flags (bias, window), read by ModelConfig.
MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
}


def model_class(architecture: str) -> type[CausalLM]:
    """The class implementing ``architecture``; a ValueError naming the supported ones otherwise."""
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {architecture!r}; "
                         f"supported: {', '.join(sorted(MODEL_REGISTRY))}") from None


__all__ = ["MODEL_REGISTRY", "CausalLM", "ModelConfig", "model_class"]
