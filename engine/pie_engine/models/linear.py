"""The models' linear layers (``Linear``, fused ``MergedLinear``) and their CPU fast path.

On CPU in float32 the matmuls are most of a step. oneDNN's GEMM on a weight packed ONCE into its blocked layout
(what torch.compile's CPU weight prepacking uses) measured 15-25% faster than ``F.linear`` (MKL) at decode batch
sizes on a 2-core AVX-512 EPYC, more on 2 threads than on 1 (MKL's own packed GEMM gained nothing there).
``prepack_linears`` (run by the loader once the weights are in) gives every layer that packed copy; ``forward``
then uses it. Same math, another summation order: outputs differ from ``F.linear`` by float32 rounding only
(~1e-6 relative), well inside what the HF comparison tests allow.

NOTE: the packed copy is kept next to the dense weight (the loader and ``shard`` work on the dense one), so on CPU
linear weights take twice their size. ``PIE_CPU_PREPACK=0`` turns the fast path off (A/B checks, debugging).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class Linear(nn.Module):
    """``y = x @ weight.T + bias`` (HF ``nn.Linear`` parameter names and layout), optionally through a oneDNN
    pre-packed copy of ``weight`` (see ``prepack``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        self.packed_weight: torch.Tensor | None = None  # oneDNN layout; not a parameter (never in a checkpoint)

    def prepack(self) -> None:
        """Pack the (loaded) weight for oneDNN; call again if the weight changes."""
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"prepacked={self.packed_weight is not None}")


class MergedLinear(Linear):
    """Several projections of one input fused into one matmul (q/k/v, gate/up): one kernel instead of three.

    The checkpoint still stores the parts separately; ``shard(i)`` gives the loader the rows of part ``i``.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, dtype: torch.dtype) -> None:
        super().__init__(in_features, sum(output_sizes), bias, dtype)
        self.output_sizes = list(output_sizes)

    def shard(self, param: torch.Tensor, index: int) -> torch.Tensor:
        """Rows of part ``index`` of ``param`` (this module's weight or bias), as a view to copy into."""
        start = sum(self.output_sizes[:index])
        return param.narrow(0, start, self.output_sizes[index])


def linear(in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> Linear:
    return Linear(in_features, out_features, bias, dtype)


def cpu_prepack_supported(weight: torch.Tensor) -> bool:
    """True where ``prepack_linears`` packs: a float32 CPU weight, a torch built with oneDNN that has the (internal,
    torch.compile-facing) packed-linear ops, and ``PIE_CPU_PREPACK`` not "0"."""
    return (os.environ.get("PIE_CPU_PREPACK", "1") != "0" and weight.device.type == "cpu"
            and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def prepack_linears(model: nn.Module) -> int:
    """Pre-pack every ``Linear`` of ``model`` whose weight qualifies (``cpu_prepack_supported``); returns how many.

    Other devices and dtypes keep ``F.linear`` (on CUDA it already runs a tuned GEMM on the weight as it is).
    """
    layers = [m for m in model.modules() if isinstance(m, Linear) and cpu_prepack_supported(m.weight)]
    for layer in layers:
        layer.prepack()
    if layers:
        log.info("oneDNN: pre-packed %d linear weights for CPU float32", len(layers))
    return len(layers)
