"""Pie engine: a paged-KV LLM inference engine with performance-transparent layer-wise KV swapping."""

__version__ = "0.1.0"
