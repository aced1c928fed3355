"""Llama 2/3, Mistral and Qwen2: one decoder (RMSNorm, rotary, SiLU-gated MLP); the families differ in flags only.

Module names mirror HF (``model.layers.N.self_attn...``) so checkpoint names map one to one, except that q/k/v and
gate/up are fused (``packed_modules`` tells the loader which rows each checkpoint tensor fills).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pie_engine.kv.layer import LayerKV
from pie_engine.models.base import CausalLM
from pie_engine.models.layers import RMSNorm, RotaryEmbedding, SiluAndMul, apply_rotary
from pie_engine.models.linear import MergedLinear, linear
from pie_engine.models.model_config import ModelConfig
from pie_engine.runner.attention import Attention, AttentionMetadata


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                            cfg.head_dim)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size], cfg.qkv_bias, dtype)
        self.o_proj = linear(self.q_size, cfg.hidden_size, cfg.o_bias, dtype)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                kv: LayerKV) -> torch.Tensor:
        num_tokens = h.shape[0]
        qk, v = self.qkv_proj(h).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # q and k heads rotated in one pass (the same per-element math as rotating each: bit-identical).
        qk = apply_rotary(qk.view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        # NOTE: begin_layer/end_layer bracket exactly this layer's KV use: Pie swapping waits for the layer's KV
        # in begin_layer (overlapping the projections above) and writes it back / prefetches in end_layer.
        kv_layer = kv.begin_layer(self.layer_idx)
        out = self.attn(q, k, v, kv_layer, meta)
        kv.end_layer(self.layer_idx)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedLinear(cfg.hidden_size, [size, size], cfg.mlp_bias, dtype)
        self.down_proj = linear(size, cfg.hidden_size, cfg.mlp_bias, dtype)
        self.act_and_mul = SiluAndMul(cfg.hidden_act)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(h)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx, dtype)
        self.mlp = LlamaMLP(cfg, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                kv: LayerKV) -> torch.Tensor:
        # HF's order of residual adds, kept literally so float32 results match bit for bit where possible.
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta, kv)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, dtype) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class LlamaForCausalLM(CausalLM):
    """``forward`` over flattened varlen tokens -> final hidden states; ``compute_logits`` for selected rows."""

    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    ignored_weight_suffixes = ("rotary_emb.inv_freq",)  # old checkpoints saved rotary buffers

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, dtype)
        # Tied: logits use the embedding matrix; a checkpoint's lm_head.weight, if present, is ignored (as HF does).
        self.lm_head = None if cfg.tie_word_embeddings else linear(cfg.hidden_size, cfg.vocab_size, False, dtype)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)

    @property
    def tied_weight_names(self) -> tuple[str, ...]:
        return ("lm_head.weight",) if self.config.tie_word_embeddings else ()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv: LayerKV) -> torch.Tensor:
        """input_ids [T], positions [T] -> hidden [T, hidden_size] (after the final norm)."""
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, h.dtype)  # once per step, shared by all layers
        for layer in self.model.layers:
            h = layer(h, cos, sin, meta, kv)
        return self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] -> logits [N, vocab_size] in the model dtype."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return F.linear(hidden, self.model.embed_tokens.weight)
