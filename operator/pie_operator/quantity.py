"""Byte quantities and int-or-percent values: the subset of Kubernetes quantity syntax the operator accepts."""

from __future__ import annotations

import math
import re

# NOTE: the subset of Kubernetes quantity syntax that BOTH the apiserver and the engine's parse_bytes() accept
# (no milli "m", no P/E): the operator forwards these values to `pie-engine serve` flags.
QUANTITY_RE = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"
PERCENT_RE = r"^[0-9]+(\.[0-9]+)?%$"
# --gpu-memory-budget: a fraction in (0, 1] (the engine's rule) or bytes; a decimal needs a suffix ("1.5" is neither).
BUDGET_RE = r"^(0?\.[0-9]*[1-9][0-9]*|1(\.0+)?|[0-9]+|[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T))$"

_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def parse_quantity(value: str | int) -> int:
    """Bytes of a quantity (``8Gi``, ``512Mi``, ``2G``, ``1073741824``); rounds a fractional byte count up."""
    if isinstance(value, bool):
        raise ValueError(f"not a byte quantity: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a byte quantity must be >= 0, got {value}")
        return value
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", value.strip())
    if not m:
        raise ValueError(f"not a byte quantity: {value!r} (use e.g. 8Gi, 512Mi, 2G or a plain byte count)")
    return math.ceil(float(m.group(1)) * _UNITS[m.group(2) or ""])


def format_bytes(n: int) -> str:
    """The shortest exact binary-suffixed quantity for ``n`` bytes (``16Gi``, ``1536Mi``, ``1000``)."""
    for suffix in ("Ti", "Gi", "Mi", "Ki"):
        if n and n % _UNITS[suffix] == 0:
            return f"{n // _UNITS[suffix]}{suffix}"
    return str(n)


def is_percent(value: str | int) -> bool:
    return isinstance(value, str) and re.fullmatch(PERCENT_RE, value) is not None


def resolve_int_or_percent(value: int | str, total: int, round_up: bool) -> int:
    """Deployment semantics: "25%" of ``total``, rounded up (surge) or down (unavailable); ints pass through."""
    if isinstance(value, int):
        return value
    frac = float(value.rstrip("%")) / 100.0 * total
    return math.ceil(frac) if round_up else math.floor(frac)


def is_fraction(budget: str) -> bool:
    """A --gpu-memory-budget that is a fraction of the GPU ("0.9", "1") rather than bytes (the engine's rule)."""
    return re.fullmatch(r"0?\.[0-9]+|1(\.0*)?", budget.strip()) is not None


def resolve_budget(budget: str, gpu_total: int | None) -> int | None:
    """Bytes of a GPU budget; None for a fraction while the GPU's total memory is unknown (e.g. no GPU)."""
    if is_fraction(budget):
        return int(float(budget) * gpu_total) if gpu_total else None
    return parse_quantity(budget)
