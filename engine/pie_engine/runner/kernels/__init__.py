"""Triton kernels for CUDA. Importing this package needs triton; the torch path (attention.py) never imports it."""

from pie_engine.runner.kernels.paged_attention import paged_decode_attention
from pie_engine.runner.kernels.store_kv import store_kv

__all__ = ["paged_decode_attention", "store_kv"]
