"""The operator's view of quantities: byte quantities and GPU budgets come from the engine's parser
(``pie_engine.quantity``, torch-free), so the spec, the CRD and the engine flags read a value the same way. Only
int-or-percent values (rollout bounds, memory.headroom) are the operator's own."""

from __future__ import annotations

import math
import re

from pie_engine.quantity import (  # noqa: F401 -- re-exported: the operator imports quantities from here
    BUDGET_RE,
    MAX_BYTES,
    PERCENT_RE,
    QUANTITY_OR_PERCENT_RE,
    QUANTITY_RE,
    format_bytes,
    parse_budget,
    parse_bytes,
)


def is_percent(value: str | int) -> bool:
    """Whether an int-or-string value is a percentage ("25%")."""
    return isinstance(value, str) and re.fullmatch(PERCENT_RE, value) is not None


def resolve_int_or_percent(value: int | str, total: int, round_up: bool) -> int:
    """Deployment semantics: "25%" of ``total``, rounded up (surge) or down (unavailable); ints pass through."""
    if isinstance(value, int):
        return value
    frac = float(value.rstrip("%")) / 100.0 * total
    return math.ceil(frac) if round_up else math.floor(frac)


def resolve_budget(budget: str, gpu_total: int | None) -> int | None:
    """Bytes of a GPU budget; None for a fraction while the GPU's total memory is unknown (None or 0: no GPU
    metrics yet)."""
    return parse_budget(budget).resolve(gpu_total or None)
