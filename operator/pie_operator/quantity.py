"""The operator's view of quantities: byte quantities and GPU budgets come from the engine's parser
(``pie_engine.quantity``, torch-free), so the spec, the CRD and the engine flags read a value the same way. Only
int-or-percent values (rollout bounds, memory.headroom) and durations (memory.expansion.latencyTarget; the engine's
flag takes plain seconds) are the operator's own."""

from __future__ import annotations

import math
import re
from decimal import Decimal

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

# A duration as Kubernetes fields write one ("50ms", "0.2s"): a decimal number, then ms or s. The pattern itself
# rejects zero (it needs a nonzero digit): a latency target of 0 could never be met. No exponent and no other unit:
# a per-token latency is milliseconds to seconds. The CRD's pattern is this string (tests/unit/operator/test_crd.py).
POSITIVE_DECIMAL = r"([0-9]*[1-9][0-9]*(\.[0-9]*)?|[0-9]*\.[0-9]*[1-9][0-9]*)"  # no sign, no exponent, not 0
DURATION_RE = rf"^{POSITIVE_DECIMAL}(ms|s)$"
# The CRD's maxLength too: it keeps the value a finite float (a 400-digit number would be inf in seconds).
DURATION_MAX_LENGTH = 32


def parse_duration(value: str) -> float:
    """Seconds of a positive duration: ``50ms`` -> 0.05, ``0.2s`` -> 0.2, ``1.5s`` -> 1.5. Raises ValueError with the
    reason. The number is scaled exactly (Decimal), then rounded once to the nearest float, so ``4.1ms`` is 0.0041
    and not 0.0040999999999999995 (the engine flag shows what the user wrote)."""
    if not isinstance(value, str) or len(value) > DURATION_MAX_LENGTH or not re.fullmatch(DURATION_RE, value):
        raise ValueError(f"not a positive duration: {value!r} (a decimal number followed by ms or s, e.g. 50ms or "
                         f"0.2s, at most {DURATION_MAX_LENGTH} characters)")
    number, millis = (value[:-2], True) if value.endswith("ms") else (value[:-1], False)
    return float(Decimal(number).scaleb(-3) if millis else Decimal(number))


def is_percent(value: str | int) -> bool:
    """Whether an int-or-string value is a percentage ("25%")."""
    return isinstance(value, str) and re.fullmatch(PERCENT_RE, value) is not None


def resolve_int_or_percent(value: int | str, total: int, round_up: bool) -> int:
    """Deployment semantics: "25%" of ``total``, rounded up (surge) or down (unavailable); ints pass through."""
    if isinstance(value, int):
        return value
    frac = float(value.rstrip("%")) / 100.0 * total
    return math.ceil(frac) if round_up else math.floor(frac)


def resolve_budget(budget: str, gpu_total: int | None, overhead: int | None) -> int | None:
    """Device KV bytes of a GPU budget, exactly as the engine reads --gpu-memory-budget at start-up
    (``Budget.kv_bytes``: a fraction is the share of the GPU the engine holds in all, minus its overhead); None for
    a fraction while the GPU's total memory or the engine's overhead is unknown (None or 0: no GPU metrics yet, or an
    engine that does not export pie_gpu_memory_overhead_bytes)."""
    return parse_budget(budget).kv_bytes(gpu_total or None, overhead if gpu_total else None)
