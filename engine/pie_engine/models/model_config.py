"""The model's shape, parsed once from an HF ``config.json`` (llama family and OPT)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Architectures whose decoder is the llama block (RMSNorm, rotary, SiLU-gated MLP); they differ only in flags.
LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
OPT_FAMILY = ("OPTForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    """Everything the engine needs to know about a checkpoint's architecture.

    NOTE: ``num_key_value_heads`` < ``num_attention_heads`` means GQA; every KV-cache size is derived from
    ``num_key_value_heads`` and ``head_dim``, never from ``hidden_size``.
    """

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: True; Llama: config.attention_bias
    o_bias: bool = False  # Llama with attention_bias=True only
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral/Qwen2; the runner caps max_model_len at it (not implemented)
    torch_dtype: str | None = None  # the checkpoint's dtype name, e.g. "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # OPT only
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    remove_final_layer_norm: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    @property
    def is_opt(self) -> bool:
        return self.architecture in OPT_FAMILY

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        """Parse ``model_dir/config.json``; a clear error if it is missing, malformed or unsupported."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in model directory {model_dir!s}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry; cannot tell which model to build")
        arch = archs[0]
        if arch in LLAMA_FAMILY:
            cfg = cls._llama(arch, raw)
        elif arch in OPT_FAMILY:
            cfg = cls._opt(arch, raw)
        else:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(LLAMA_FAMILY + OPT_FAMILY)}")
        cfg.validate()
        return cfg

    @classmethod
    def _common(cls, raw: dict[str, Any]) -> dict[str, Any]:
        return {
            "model_type": raw.get("model_type", ""),
            "vocab_size": _req(raw, "vocab_size"),
            "hidden_size": _req(raw, "hidden_size"),
            "num_hidden_layers": _req(raw, "num_hidden_layers"),
            "num_attention_heads": _req(raw, "num_attention_heads"),
            "max_position_embeddings": _req(raw, "max_position_embeddings"),
            # transformers >= 4.56 writes "dtype"; older checkpoints "torch_dtype".
            "torch_dtype": raw.get("torch_dtype") or raw.get("dtype"),
            "bos_token_id": raw.get("bos_token_id"),
            "eos_token_id": raw.get("eos_token_id"),
            "raw": raw,
        }

    @classmethod
    def _llama(cls, arch: str, raw: dict[str, Any]) -> ModelConfig:
        common = cls._common(raw)
        heads = common["num_attention_heads"]
        qwen2 = arch == "Qwen2ForCausalLM"
        attention_bias = bool(raw.get("attention_bias", False))
        window = raw.get("sliding_window")
        if qwen2 and not raw.get("use_sliding_window", False):
            window = None  # Qwen2 configs carry a sliding_window value that is unused unless enabled
        return cls(
            architecture=arch,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or common["hidden_size"] // heads,
            intermediate_size=_req(raw, "intermediate_size"),
            hidden_act=raw.get("hidden_act", "silu"),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rope_scaling=raw.get("rope_scaling"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qwen2 or attention_bias,
            o_bias=attention_bias and not qwen2,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            sliding_window=window,
            **common,
        )

    @classmethod
    def _opt(cls, arch: str, raw: dict[str, Any]) -> ModelConfig:
        common = cls._common(raw)
        heads = common["num_attention_heads"]
        return cls(
            architecture=arch,
            num_key_value_heads=heads,
            head_dim=common["hidden_size"] // heads,
            intermediate_size=_req(raw, "ffn_dim"),
            hidden_act=raw.get("activation_function", "relu"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
            do_layer_norm_before=bool(raw.get("do_layer_norm_before", True)),
            word_embed_proj_dim=raw.get("word_embed_proj_dim") or common["hidden_size"],
            enable_bias=bool(raw.get("enable_bias", True)),
            layer_norm_elementwise_affine=bool(raw.get("layer_norm_elementwise_affine", True)),
            remove_final_layer_norm=bool(raw.get("_remove_final_layer_norm", False)),
            **common,
        )

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if not self.is_opt:
            if self.rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"unsupported rope_scaling type {self.rope_type!r}; "
                                 f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
            if self.head_dim % 2:
                raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        elif self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of heads={self.num_attention_heads}")


def _req(raw: dict[str, Any], key: str) -> Any:
    if key not in raw:
        raise ValueError(f"config.json is missing required field {key!r}")
    return raw[key]
