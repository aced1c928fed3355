"""``make_copy_engine``: the copy engine backend for a device."""

from __future__ import annotations

from typing import Any

import torch

from pie_engine.pie.copy.base import CopyEngine
from pie_engine.pie.copy.cuda import CudaCopyEngine
from pie_engine.pie.copy.link import LinkModel
from pie_engine.pie.copy.native import cpu_engine_from_env
from pie_engine.pie.copy.threads import ThreadCopyEngine
from pie_engine.pie.copy.trace import Trace


def make_copy_engine(device: torch.device, link_in: LinkModel | None = None, link_out: LinkModel | None = None,
                     trace: Trace | None = None) -> CopyEngine[Any]:
    """The backend for ``device``: CUDA streams on a GPU; on the CPU the GIL-free C workers (native.py) when they
    build, else worker threads. ``PIE_COPY_ENGINE=native|threads`` forces one (native unavailable: RuntimeError).
    A traced run always uses threads: only they record copy events in true completion order."""
    if device.type == "cuda":
        return CudaCopyEngine(device, link_in, link_out, trace)
    if trace is None and (engine := cpu_engine_from_env(link_in, link_out)) is not None:
        return engine
    return ThreadCopyEngine(link_in, link_out, trace)
