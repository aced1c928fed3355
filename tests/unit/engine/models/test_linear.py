"""models/linear.py: the oneDNN pre-packed CPU path computes what F.linear computes, and is used where it should be."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pie_engine.models.linear import Linear, MergedLinear, cpu_prepack_supported, prepack_linears

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _filled(layer: Linear, seed: int) -> Linear:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return layer


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (33, 48), (2, 3, 48)])
def test_prepacked_matches_f_linear(bias: bool, shape: tuple[int, ...]) -> None:
    layer = _filled(Linear(48, 80, bias, torch.float32), seed=0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ref = F.linear(x, layer.weight, layer.bias)
    layer.prepack()
    assert layer.packed_weight is not None
    out = layer(x)
    assert out.shape == ref.shape
    # Another summation order, same math: float32 rounding only.
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_merged_linear_prepacked_keeps_part_layout() -> None:
    layer = _filled(MergedLinear(32, [16, 8, 8], True, torch.float32), seed=2)
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(3))
    parts = [F.linear(x, layer.shard(layer.weight, i), layer.shard(layer.bias, i)) for i in range(3)]
    prepack_linears(layer)
    q, k, v = layer(x).split([16, 8, 8], dim=-1)
    for got, want in zip((q, k, v), parts, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_prepack_only_cpu_float32_and_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.ModuleList([Linear(8, 8, False, torch.float32), Linear(8, 8, False, torch.bfloat16),
                                 MergedLinear(8, [4, 4], False, torch.float32)])
    assert prepack_linears(model) == 2
    assert [m.packed_weight is not None for m in model] == [True, False, True]
    monkeypatch.setenv("PIE_CPU_PREPACK", "0")
    assert not cpu_prepack_supported(model[0].weight)
    assert prepack_linears(torch.nn.ModuleList([Linear(8, 8, False, torch.float32)])) == 0


def test_unpacked_linear_is_f_linear() -> None:
    layer = _filled(Linear(6, 4, True, torch.float32), seed=4)
    x = torch.randn(3, 6)
    assert layer.packed_weight is None
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
