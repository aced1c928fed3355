"""The composition root: the one place that wires the engine core to Pie's KV backend.

``core`` and ``runner`` never import ``pie`` (import-linter checks it); they get the KV cache and its runtime
through ``kv.backend.KVBackend``, chosen here.
"""

from __future__ import annotations

from pie_engine.config import EngineConfig
from pie_engine.core.engine import LLMEngine
from pie_engine.pie.backend import PieKVBackend


def create_engine(config: EngineConfig) -> LLMEngine:
    """An ``LLMEngine`` for ``config`` (loads the model; expansion per ``config.expansion``)."""
    return LLMEngine(config, PieKVBackend(config))
