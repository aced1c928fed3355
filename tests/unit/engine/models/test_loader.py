"""Checkpoint loading: config parsing, dtype choice, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pie_engine.config import EngineConfig
from pie_engine.core.plan import ScheduledSeq, StepPlan
from pie_engine.core.sampling_params import SamplingParams
from pie_engine.core.sequence import Sequence
from pie_engine.models import model_class
from pie_engine.models.loader import load_model
from pie_engine.models.model_config import ModelConfig
from pie_engine.runner.model_runner import ModelRunner

PROMPT = [1, 40, 41, 42, 300, 301, 7]


@pytest.fixture
def ckpt(tiny_model, tmp_path: Path) -> Path:
    """A private, writable copy of a 2-layer llama checkpoint."""
    return Path(shutil.copytree(tiny_model("llama", layers=2), tmp_path / "m"))


def prefill_logits(model_dir: Path, dtype: str = "float32", **kw: object) -> torch.Tensor:
    runner = ModelRunner(EngineConfig(model=str(model_dir), device="cpu", dtype=dtype, num_device_blocks=4, **kw))
    seq = Sequence(prompt_token_ids=PROMPT, params=SamplingParams(), block_table=[3, 1])
    return runner.execute(StepPlan(scheduled=[ScheduledSeq(seq, len(PROMPT), sample=True)]))[0]


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path)


def test_unknown_architecture(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ValueError, match=r"unsupported architecture 'GPTNeoXForCausalLM'.*LlamaForCausalLM"):
        ModelConfig.from_pretrained(ckpt)
    with pytest.raises(ValueError, match="unsupported architecture"):
        model_class("GPTNeoXForCausalLM")


def test_unsupported_rope_scaling(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        ModelConfig.from_pretrained(ckpt)


def test_missing_tensor_is_named(ckpt: Path) -> None:
    # k_proj is fused into qkv_proj in the engine; the error still names the checkpoint tensor.
    _edit_tensors(ckpt / "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj\.weight"):
        prefill_logits(ckpt)


def test_unexpected_and_misshaped_tensors_are_named(ckpt: Path) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
        t["model.norm.weight"] = torch.zeros(3)

    _edit_tensors(ckpt / "model.safetensors", edit)
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.extra\.weight.*"
                                         r"wrong shape: model\.norm\.weight \(3,\) \(expected \(64,\)\)"):
        prefill_logits(ckpt)


def test_no_weights_and_missing_shard(ckpt: Path, tiny_model, tmp_path: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        prefill_logits(ckpt)
    sharded = Path(shutil.copytree(tiny_model("llama", layers=2, shards=2), tmp_path / "s"))
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        prefill_logits(sharded)


def test_lm_head_in_tied_checkpoint_is_ignored(tiny_model, tmp_path: Path) -> None:
    d = Path(shutil.copytree(tiny_model("qwen2", layers=2), tmp_path / "q"))
    before = prefill_logits(d)
    _edit_tensors(d / "model.safetensors", lambda t: t.__setitem__("lm_head.weight", torch.zeros(512, 64)))
    torch.testing.assert_close(prefill_logits(d), before, atol=0, rtol=0)


def test_old_opt_names_without_model_prefix(tiny_model, tmp_path: Path) -> None:
    d = Path(shutil.copytree(tiny_model("opt", layers=2), tmp_path / "o"))
    before = prefill_logits(d)
    _edit_tensors(d / "model.safetensors",
                  lambda t: t.update({k.removeprefix("model."): t.pop(k) for k in list(t)}))
    torch.testing.assert_close(prefill_logits(d), before, atol=0, rtol=0)


def test_dtype_auto_follows_checkpoint(tiny_model) -> None:
    bf16 = tiny_model("llama", layers=2, dtype="bfloat16")
    runner = ModelRunner(EngineConfig(model=str(bf16), device="cpu", num_device_blocks=4))
    assert runner.dtype == torch.bfloat16 and runner.kv_cache.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in runner.model.parameters())
    low, high = prefill_logits(bf16, "bfloat16"), prefill_logits(bf16, "float32")
    assert low.dtype == torch.float32  # logits are always returned as float32
    # bf16 activations: ~3 significant digits over 2 layers; logits have std ~8.
    assert (low - high).abs().max() < 0.5 and int(low.argmax()) == int(high.argmax())
    with pytest.raises(ValueError, match="dtype\n  Input should be 'auto', 'float32', 'bfloat16' or 'float16'"):
        prefill_logits(bf16, "int8")


def test_model_config_fields(tiny_model) -> None:
    llama = ModelConfig.from_pretrained(tiny_model("llama", layers=2))
    assert (llama.num_attention_heads, llama.num_key_value_heads, llama.head_dim) == (4, 2, 16)
    assert not llama.qkv_bias and not llama.tie_word_embeddings and llama.rope_type == "default"
    qwen2 = ModelConfig.from_pretrained(tiny_model("qwen2", layers=2))
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.tie_word_embeddings and qwen2.sliding_window is None
    opt = ModelConfig.from_pretrained(tiny_model("opt", layers=2))
    assert opt.is_opt and opt.num_key_value_heads == opt.num_attention_heads and opt.hidden_act == "relu"
    model = load_model(tiny_model("opt", layers=2), opt, torch.float32, torch.device("cpu"))
    assert model.model.decoder.embed_positions.weight.shape[0] == opt.max_position_embeddings + 2


def test_max_model_len_limits(tiny_model) -> None:
    model = tiny_model("mistral", layers=2, config_overrides={"sliding_window": 256})
    runner = ModelRunner(EngineConfig(model=str(model), device="cpu", num_device_blocks=4))
    assert runner.max_model_len == 256  # capped at the window: sliding-window attention is not implemented
    with pytest.raises(ValueError, match="sliding window"):
        ModelRunner(EngineConfig(model=str(model), device="cpu", num_device_blocks=4, max_model_len=512))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ModelRunner(EngineConfig(model=str(model), device="cpu", num_device_blocks=4, max_model_len=4096))
