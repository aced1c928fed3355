"""KV sizing: bytes per block and the budget -> number of device blocks."""

from __future__ import annotations

import pytest
import torch

from pie_engine.config import EngineConfig
from pie_engine.kv.cache import kv_block_bytes
from pie_engine.models.model_config import ModelConfig
from pie_engine.quantity import parse_bytes
from pie_engine.runner import device as device_mod
from pie_engine.runner.device import (
    CPU_DEFAULT_KV_BUDGET,
    device_memory_info,
    kv_sizing,
    num_blocks_for_budget,
    resolve_device,
)
from pie_operator.quantity import resolve_budget


@pytest.fixture(scope="module")
def llama(tiny_model) -> ModelConfig:
    return ModelConfig.from_pretrained(tiny_model("llama", layers=2))  # 2 layers, 2 KV heads of dim 16


def block_bytes(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return kv_block_bytes(block_size, model.num_key_value_heads, model.head_dim, dtype)


def test_block_bytes(llama: ModelConfig) -> None:
    assert block_bytes(llama, 16, torch.float32) == 2 * 16 * 2 * 16 * 4
    assert block_bytes(llama, 8, torch.bfloat16) == 2 * 8 * 2 * 16 * 2


def test_cpu_budgets(llama: ModelConfig) -> None:
    cpu = torch.device("cpu")
    per_block_all_layers = block_bytes(llama, 16, torch.float32) * 2
    default = num_blocks_for_budget(EngineConfig(model="x"), llama, cpu, torch.float32)
    assert default == parse_bytes(CPU_DEFAULT_KV_BUDGET) // per_block_all_layers
    assert num_blocks_for_budget(EngineConfig(model="x", gpu_memory_budget="1Mi"), llama, cpu,
                                 torch.float32) == 2**20 // per_block_all_layers
    assert num_blocks_for_budget(EngineConfig(model="x", num_device_blocks=7, gpu_memory_budget="1Mi"), llama, cpu,
                                 torch.float32) == 7
    with pytest.raises(ValueError, match="less than one block"):
        num_blocks_for_budget(EngineConfig(model="x", gpu_memory_budget="1000"), llama, cpu, torch.float32)
    with pytest.raises(ValueError, match="fraction"):  # no device total on CPU
        num_blocks_for_budget(EngineConfig(model="x", gpu_memory_budget="0.5"), llama, cpu, torch.float32)


@pytest.mark.parametrize("budget", ["0.9", "0.5", "1", "3Gi"])
def test_a_budget_means_the_same_at_start_up_and_to_the_operator(llama: ModelConfig, budget: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The KV a --gpu-memory-budget gives at start-up is the KV the operator resolves the same budget to live (from
    the exported pie_gpu_memory_overhead_bytes): one meaning of a fraction, not "fraction x total" on one side."""
    total, used = 80 * 2**30, 12 * 2**30
    monkeypatch.setattr(device_mod, "device_memory_info", lambda device: (total, used))
    sizing = kv_sizing(EngineConfig(model="x", gpu_memory_budget=budget), llama, torch.device("cpu"), torch.float32)
    assert sizing.overhead is not None and sizing.overhead > used  # weights etc. plus the activation reserve
    kv = resolve_budget(budget, total, sizing.overhead)
    assert kv is not None and sizing.blocks == kv // (block_bytes(llama, 16, torch.float32) * 2)


def test_device_resolution() -> None:
    assert device_memory_info(torch.device("cpu")) is None
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unsupported device"):
        resolve_device("mps")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_memory_info_and_fraction(llama: ModelConfig) -> None:
    info = device_memory_info(torch.device("cuda"))
    assert info is not None and info[0] > info[1] > 0
    blocks = num_blocks_for_budget(EngineConfig(model="x", gpu_memory_budget="0.5"), llama, torch.device("cuda"),
                                   torch.float16)
    assert 0 < blocks * block_bytes(llama, 16, torch.float16) * 2 < info[0] // 2
