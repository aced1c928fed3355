"""OPT (the Pie paper's model family): learned positions (offset 2), LayerNorm, ReLU MLP, tied lm_head.

Handles both OPT layouts: pre-LN (125m, 1.3b, 6.7b, ...) and post-LN with a projected embedding (350m:
``do_layer_norm_before=False``, ``word_embed_proj_dim`` != hidden_size -> project_in / project_out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pie_engine.kv.layer import LayerKV
from pie_engine.models.base import CausalLM
from pie_engine.models.layers import activation
from pie_engine.models.linear import MergedLinear, linear
from pie_engine.models.model_config import ModelConfig
from pie_engine.runner.attention import Attention, AttentionMetadata

# HF's OPTLearnedPositionalEmbedding reserves the first two rows (a fairseq padding convention).
POSITION_OFFSET = 2


class OPTAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        hidden = cfg.hidden_size
        self.scaling = self.head_dim**-0.5
        self.qkv_proj = MergedLinear(hidden, [hidden, hidden, hidden], cfg.enable_bias, dtype)
        self.out_proj = linear(hidden, hidden, cfg.enable_bias, dtype)
        # HF scales q after the projection and attends with scale 1.0; same order here.
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim, 1.0)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata, kv: LayerKV) -> torch.Tensor:
        num_tokens, hidden = h.shape
        q, k, v = self.qkv_proj(h).split([hidden, hidden, hidden], dim=-1)
        q = (q * self.scaling).view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_heads, self.head_dim)
        v = v.view(num_tokens, self.num_heads, self.head_dim)
        # NOTE: begin_layer/end_layer bracket exactly this layer's KV use (Pie swapping hooks in here).
        kv_layer = kv.begin_layer(self.layer_idx)
        out = self.attn(q, k, v, kv_layer, meta)
        kv.end_layer(self.layer_idx)
        return self.out_proj(out.reshape(num_tokens, hidden))


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, affine = cfg.hidden_size, cfg.layer_norm_elementwise_affine
        self.pre_ln = cfg.do_layer_norm_before
        self.self_attn = OPTAttention(cfg, layer_idx, dtype)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, eps=cfg.layer_norm_eps, elementwise_affine=affine,
                                                 dtype=dtype)
        self.fc1 = linear(hidden, cfg.intermediate_size, cfg.enable_bias, dtype)
        self.fc2 = linear(cfg.intermediate_size, hidden, cfg.enable_bias, dtype)
        self.final_layer_norm = nn.LayerNorm(hidden, eps=cfg.layer_norm_eps, elementwise_affine=affine, dtype=dtype)
        self.act = activation(cfg.hidden_act)

    def forward(self, h: torch.Tensor, meta: AttentionMetadata, kv: LayerKV) -> torch.Tensor:
        x = self.self_attn_layer_norm(h) if self.pre_ln else h
        h = h + self.self_attn(x, meta, kv)
        if not self.pre_ln:
            h = self.self_attn_layer_norm(h)
        x = self.final_layer_norm(h) if self.pre_ln else h
        h = h + self.fc2(self.act(self.fc1(x)))
        if not self.pre_ln:
            h = self.final_layer_norm(h)
        return h


class OPTDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        proj = cfg.word_embed_proj_dim or cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, proj, dtype=dtype)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size,
                                            dtype=dtype)
        self.project_in = linear(proj, cfg.hidden_size, False, dtype) if proj != cfg.hidden_size else None
        self.project_out = linear(cfg.hidden_size, proj, False, dtype) if proj != cfg.hidden_size else None
        self.final_layer_norm = (
            nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, elementwise_affine=cfg.layer_norm_elementwise_affine,
                         dtype=dtype)
            if cfg.do_layer_norm_before and not cfg.remove_final_layer_norm else None
        )
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg, i, dtype) for i in range(cfg.num_hidden_layers))


class OPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.decoder = OPTDecoder(cfg, dtype)


class OPTForCausalLM(CausalLM):
    """``forward`` -> hidden [T, hidden_size]; ``compute_logits`` applies project_out (if any) and the tied head."""

    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = cfg
        self.model = OPTModel(cfg, dtype)
        proj = cfg.word_embed_proj_dim or cfg.hidden_size
        # Every released OPT ties lm_head to embed_tokens; honour an explicit tie_word_embeddings=false anyway.
        self.lm_head = None if cfg.tie_word_embeddings else linear(proj, cfg.vocab_size, False, dtype)

    @property
    def tied_weight_names(self) -> tuple[str, ...]:
        return ("lm_head.weight",) if self.config.tie_word_embeddings else ()

    def rename_weight(self, name: str) -> str:
        # The original facebook/opt-* checkpoints name tensors "decoder.*" (no "model." prefix).
        return "model." + name if name.startswith("decoder.") else name

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv: LayerKV) -> torch.Tensor:
        """input_ids [T], positions [T] -> hidden [T, hidden_size] (after the final layer norm, if any)."""
        dec = self.model.decoder
        h = dec.embed_tokens(input_ids)
        if dec.project_in is not None:
            h = dec.project_in(h)
        h = h + dec.embed_positions(positions + POSITION_OFFSET)
        for layer in dec.layers:
            h = layer(h, meta, kv)
        if dec.final_layer_norm is not None:
            h = dec.final_layer_norm(h)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] -> logits [N, vocab_size] in the model dtype."""
        dec = self.model.decoder
        if dec.project_out is not None:
            hidden = dec.project_out(hidden)
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return F.linear(hidden, dec.embed_tokens.weight)
