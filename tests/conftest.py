"""Shared fixtures. ``tiny_model`` builds tiny random-weight HF checkpoints once per session."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_model(arch="llama", **kw) -> Path``: a checkpoint from ``make_test_model(arch, dir, **kw)``, built once
    per distinct (arch, kwargs) in this session (a few hundred ms each)."""
    root = tmp_path_factory.mktemp("models")
    cache: dict[str, Path] = {}

    def make(arch: str = "llama", **kw: Any) -> Path:
        # Imported lazily: operator-only test runs must not pay for torch.
        from pie_engine.models.test_model import make_test_model

        key = arch + json.dumps(kw, sort_keys=True, default=str)
        if key not in cache:
            cache[key] = make_test_model(arch, root / f"{arch}-{len(cache)}", **kw)
        return cache[key]

    return make
