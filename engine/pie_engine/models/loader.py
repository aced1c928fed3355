"""Build a model from an HF checkpoint directory: config.json + single or sharded ``*.safetensors``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from pie_engine.models import CausalLM, model_class
from pie_engine.models.linear import MergedLinear, prepack_linears
from pie_engine.models.model_config import ModelConfig

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, model_config: ModelConfig) -> torch.dtype:
    """"auto" -> the checkpoint's torch_dtype (float32 when it names none); else one of float32/bfloat16/float16."""
    if name == "auto":
        name = model_config.torch_dtype or "float32"
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[name]


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards its index names, or its single file(s)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index}: no weight_map")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{model_dir}: shards named in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir} (pytorch_model.bin checkpoints are not "
                                "supported: convert them to safetensors)")
    return files


def _expected(model: CausalLM) -> dict[tuple[str, int | None], str]:
    """(param name, part) -> checkpoint name, for every tensor the checkpoint must provide."""
    reverse = {v: k for k, v in model.packed_modules.items()}
    out: dict[tuple[str, int | None], str] = {}
    for name, _ in model.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        module = model.get_submodule(prefix)
        if isinstance(module, MergedLinear):
            mod_prefix, _, fused = prefix.rpartition(".")
            for i in range(len(module.output_sizes)):
                out[(name, i)] = f"{mod_prefix}.{reverse[(fused, i)]}.{leaf}"
        else:
            out[(name, None)] = name
    return out


def _resolve(model: CausalLM, name: str) -> tuple[str, int | None]:
    """Checkpoint tensor name -> (param name, part index for fused params)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in model.packed_modules:
            fused, index = model.packed_modules[part]
            return ".".join([*parts[:i], fused, *parts[i + 1:]]), index
    return name, None


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


@torch.no_grad()
def load_weights(model: CausalLM, model_dir: str | Path) -> None:
    """Copy every checkpoint tensor into ``model`` (converting dtype); ValueError naming missing/unexpected/misshaped
    tensors, so a wrong or truncated checkpoint never serves garbage."""
    params = dict(model.named_parameters())
    expected = _expected(model)
    skip = tuple(model.tied_weight_names)
    ignored = tuple(model.ignored_weight_suffixes)
    loaded: set[tuple[str, int | None]] = set()
    unexpected: list[str] = []
    misshaped: list[str] = []
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for raw_name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = model.rename_weight(raw_name)
                if name in skip or name.endswith(ignored):
                    continue
                target, part = _resolve(model, name)
                if target not in params:
                    unexpected.append(raw_name)
                    continue
                dst: torch.Tensor = params[target]
                if part is not None:
                    module = model.get_submodule(target.rpartition(".")[0])
                    assert isinstance(module, MergedLinear)
                    dst = module.shard(dst, part)
                tensor = f.get_tensor(raw_name)
                if tensor.shape != dst.shape:
                    misshaped.append(f"{raw_name} {tuple(tensor.shape)} (expected {tuple(dst.shape)})")
                    continue
                dst.copy_(tensor)
                loaded.add((target, part))
    missing = [hf for key, hf in expected.items() if key not in loaded]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    if misshaped:
        problems.append(f"tensors of the wrong shape: {_listing(misshaped)}")
    if problems:
        raise ValueError(f"checkpoint {model_dir} does not match {model.config.architecture}: " + "; ".join(problems))


def load_model(model_dir: str | Path, model_config: ModelConfig, dtype: torch.dtype,
               device: torch.device) -> CausalLM:
    """Instantiate the architecture's class without initializing weights, then fill it from the checkpoint."""
    cls = model_class(model_config.architecture)
    with torch.device("meta"):  # no random init and no host copy: parameters are allocated once, on the device
        model = cls(model_config, dtype)
    model = model.to_empty(device=device)
    load_weights(model, model_dir)
    prepack_linears(model)  # CPU float32 only (see linear.py); needs the loaded weights
    return model.eval().requires_grad_(False)
