"""Write a tiny random-weight HF-format checkpoint (llama, qwen2, mistral, opt) that both pie_engine and HF
transformers load: config.json, safetensors (sharded on request), tokenizer.json, tokenizer_config.json with a chat
template, generation_config.json. No transformers needed: weights are made with torch and written with safetensors.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIALS = [PAD, BOS, EOS]  # ids 0, 1, 2
# Renders "<|role|>\ncontent</s>\n" per message; BOS is part of the template (encode with add_special_tokens=False).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "mistral": ("MistralForCausalLM", "mistral"),
         "qwen2": ("Qwen2ForCausalLM", "qwen2"), "opt": ("OPTForCausalLM", "opt")}
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Pie pools host memory for the KV cache of large language models, "
    "swapping layers between the GPU and the CPU so that a bigger batch fits. Hello world! Once upon a time there "
    "was a small model that answered every question with random words. 0123456789 + - * / = ( ) [ ] { } < > ? ! "
)


def build_tokenizer(vocab: int, seed: int = 0) -> Tokenizer:
    """Byte-level BPE: 3 specials + 256 byte tokens + merges learned on a fixed text until ``vocab`` entries."""
    if vocab < len(SPECIALS) + 256:
        raise ValueError(f"vocab must be at least {len(SPECIALS) + 256} (specials + 256 bytes), got {vocab}")
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "po", "de", "ga", "ve", "zo", "chi", "an", "er", "in"]
    # Pseudo-words give enough distinct pairs to fill the vocab; the English text gives realistic merges first.
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 5))) for _ in range(4 * vocab)]
    corpus = [_CORPUS] * 8 + [" ".join(words[i:i + 32]) for i in range(0, len(words), 32)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def _config(arch: str, layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
            max_pos: int, dtype: str) -> dict[str, Any]:
    cls, model_type = ARCHS[arch]
    cfg: dict[str, Any] = {"architectures": [cls], "model_type": model_type, "vocab_size": vocab,
                           "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                           "max_position_embeddings": max_pos, "torch_dtype": dtype, "pad_token_id": 0,
                           "bos_token_id": 1, "eos_token_id": 2}
    if arch == "opt":
        return {**cfg, "ffn_dim": intermediate, "do_layer_norm_before": True, "word_embed_proj_dim": hidden,
                "activation_function": "relu", "enable_bias": True, "layer_norm_elementwise_affine": True,
                "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "tie_word_embeddings": True}
    cfg.update({"intermediate_size": intermediate, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
                "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
                "tie_word_embeddings": False, "attention_dropout": 0.0})
    if arch == "llama":
        cfg.update({"attention_bias": False, "mlp_bias": False})
    elif arch == "mistral":
        cfg["sliding_window"] = 4096  # >= max_position_embeddings by default, so the window never applies
    elif arch == "qwen2":  # Qwen2: q/k/v bias (implicit), tied embeddings like the small Qwen2 models
        cfg.update({"rope_theta": 1000000.0, "tie_word_embeddings": True, "use_sliding_window": False,
                    "sliding_window": None, "max_window_layers": layers})
    return cfg


def _shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes for ``cfg``."""
    h, v, n = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    out: dict[str, tuple[int, ...]] = {}
    if cfg["model_type"] == "opt":
        p, f = cfg["word_embed_proj_dim"], cfg["ffn_dim"]
        d = "model.decoder."
        out[d + "embed_tokens.weight"] = (v, p)
        out[d + "embed_positions.weight"] = (cfg["max_position_embeddings"] + 2, h)
        if p != h:
            out[d + "project_in.weight"], out[d + "project_out.weight"] = (h, p), (p, h)
        if cfg["do_layer_norm_before"]:
            out[d + "final_layer_norm.weight"], out[d + "final_layer_norm.bias"] = (h,), (h,)
        for i in range(n):
            pre = f"{d}layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                out[f"{pre}self_attn.{proj}.weight"], out[f"{pre}self_attn.{proj}.bias"] = (h, h), (h,)
            for ln in ("self_attn_layer_norm", "final_layer_norm"):
                out[f"{pre}{ln}.weight"], out[f"{pre}{ln}.bias"] = (h,), (h,)
            out[f"{pre}fc1.weight"], out[f"{pre}fc1.bias"] = (f, h), (f,)
            out[f"{pre}fc2.weight"], out[f"{pre}fc2.bias"] = (h, f), (h,)
        return out
    d, inter = cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    qkv_bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    out["model.embed_tokens.weight"] = (v, h)
    out["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, h)
    for i in range(n):
        pre = f"model.layers.{i}."
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out[f"{pre}self_attn.{proj}.weight"] = (rows, h)
            if qkv_bias:
                out[f"{pre}self_attn.{proj}.bias"] = (rows,)
        out[f"{pre}self_attn.o_proj.weight"] = (h, q)
        if cfg.get("attention_bias", False) and cfg["model_type"] != "qwen2":
            out[f"{pre}self_attn.o_proj.bias"] = (h,)
        out[f"{pre}mlp.gate_proj.weight"] = out[f"{pre}mlp.up_proj.weight"] = (inter, h)
        out[f"{pre}mlp.down_proj.weight"] = (h, inter)
        out[f"{pre}input_layernorm.weight"] = out[f"{pre}post_attention_layernorm.weight"] = (h,)
    return out


_OUTPUT_PROJECTIONS = ("o_proj.weight", "down_proj.weight", "out_proj.weight", "fc2.weight")


def _init(name: str, shape: tuple[int, ...], gen: torch.Generator, tied: bool) -> torch.Tensor:
    # Init scale, chosen so greedy argmax is robust and the text is not degenerate:
    # - Linear weights have std 1/sqrt(fan_in), so projections keep activations O(1) and attention scores are
    #   ~N(0, 1) (not saturated: attention is really exercised); the projections that write into the residual
    #   stream get a gain of 2 so the layers, not the input embedding, dominate the final hidden state.
    # - An untied lm_head / embedding has std 1: logits (unit-RMS hidden times a std-1 matrix) have std
    #   ~sqrt(hidden) = 8, so the top-2 gap is typically ~1 and rarely below 1e-3 over 64 steps, far above float32
    #   reordering noise (~1e-5). With HF's std 0.02 the gap would be ~1e-2 at best and ties would flip.
    # - A tied embedding has std 0.25: with std 1 a token's own embedding dominates its hidden state and the model
    #   repeats its last token forever (a weak test); 0.25 gives varied text with logits of std ~2.
    # - Norm weights ~1 and biases small but nonzero, so a loader that drops them changes the output.
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=gen)
    if "embed_tokens" in name:
        return torch.randn(shape, generator=gen) * (0.25 if tied else 1.0)
    if "embed" in name or "lm_head" in name:
        return torch.randn(shape, generator=gen)
    gain = 2.0 if name.endswith(_OUTPUT_PROJECTIONS) else 1.0
    return torch.randn(shape, generator=gen) * (gain / shape[1] ** 0.5)


def make_test_model(arch: str, out: Path, *, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    intermediate: int = 128, vocab: int = 512, max_position_embeddings: int = 2048, seed: int = 0,
                    dtype: str = "float32", shards: int = 1, config_overrides: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint into ``out`` (created) and return it. ``config_overrides`` patches config.json before
    the weights are made (e.g. rope_scaling, or OPT's do_layer_norm_before / word_embed_proj_dim). OPT has no
    GQA: ``kv_heads`` is ignored for it."""
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads}), heads of kv_heads ({kv_heads})")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**_config(arch, layers, hidden, heads, kv_heads, intermediate, vocab, max_position_embeddings, dtype),
           **(config_overrides or {})}
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    tied = bool(cfg.get("tie_word_embeddings", True))
    tensors = {name: _init(name, shape, gen, tied).to(torch_dtype).contiguous()
               for name, shape in _shapes(cfg).items()}
    _write_weights(out, tensors, shards)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                            "pad_token_id": 0}, indent=2))
    build_tokenizer(vocab, seed).save(str(out / "tokenizer.json"))
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "model_max_length": max_position_embeddings, "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS,
                                                             "pad_token": PAD}, indent=2))
    return out


def _write_weights(out: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    for old in out.glob("*.safetensors*"):
        old.unlink()
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    weight_map: dict[str, str] = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}  # round-robin: every shard gets some layers' tensors
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
