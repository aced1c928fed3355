"""Byte quantities and device memory budgets with Kubernetes quantity semantics: the ONE parser that the engine's
flags, the operator's spec and the CRD's validation share. Pure Python (no torch): the operator imports it.

Syntax (apimachinery's ``resource.Quantity``): an optional ``+``, a decimal number (``5``, ``1.5``, ``.5``, ``1.``),
then at most one suffix: binary ``Ki Mi Gi Ti Pi Ei`` (powers of 1024), decimal SI ``n u m k M G T P E`` (``m`` is
MILLI, ``M`` is mega) or an exponent (``1e9``, ``5E-3``). Where the apiserver accepts more than its documented
grammar, this parser and the CRD's patterns are stricter: a number needs a digit (apimachinery reads ``.``, ``k`` or
``Mi`` as 0), no ``-`` sign at all (not even ``-0``), an exponent has at most 3 digits (apimachinery wraps exponents
at int32, and its rounding takes time exponential in them), and no blanks (a Pod's JSON decoding trims them).

Value: the exact value rounded up to a multiple of 1e-9, as ``resource.ParseQuantity`` (and so the CRD's CEL
``quantity()``) stores it, then up to whole bytes, as ``Quantity.Value()`` does: ``1.1Ki`` is 1127 bytes. Two byte
rules on top, which the CRD states in CEL:

* a nonzero value below one byte is an error, not 1 byte: ``512m`` is 0.512 bytes, and was nearly always meant as
  ``512M`` or ``512Mi``;
* so is a value above 1Ei (2^60 bytes): no machine has that much memory, and the apiserver silently caps binary
  quantities at 2^63 - 1, where it would stop agreeing with this parser.

A device memory budget (``--gpu-memory-budget``, ``memory.gpuMemoryBudget``) is a fraction of the GPU's total
memory when it is written as a plain decimal with a point (``0.9``, ``.5``, ``1.0``) or as exactly ``1``; the
fraction must be in (0, 1]. Everything else is a byte quantity (``80Gi``, ``1000``; ``+0.5`` is half a byte: an
error). tests/unit/engine/test_quantity.py checks all of this against ``kubernetes.utils.parse_quantity`` and the
CRD's patterns, tests/e2e/test_quantity_apiserver.py against a real apiserver.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

MAX_BYTES = 2**60  # 1Ei
_NUMBER = r"([0-9]+(\.[0-9]*)?|\.[0-9]+)"
_SUFFIX = r"([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]{1,3})"
# The CRD's patterns are these strings (tests/unit/operator/test_crd.py): RE2 and Python's re read them alike.
QUANTITY_RE = rf"^\+?{_NUMBER}{_SUFFIX}?$"
PERCENT_RE = r"^[0-9]+(\.[0-9]+)?%$"
QUANTITY_OR_PERCENT_RE = rf"^(\+?{_NUMBER}{_SUFFIX}?|[0-9]+(\.[0-9]+)?%)$"
FRACTION_SYNTAX_RE = r"^([0-9]+\.[0-9]*|\.[0-9]+|1)$"  # how a budget says "fraction"; its value may be out of range
# A budget: a fraction in (0, 1], or a byte quantity that does not look like a fraction (a suffix, a "+", or an
# integer: "1000" is bytes, "1" the whole GPU). "1.5" is neither: a fraction out of range.
BUDGET_RE = (rf"^(0*\.[0-9]*[1-9][0-9]*|0*1\.0*|[0-9]+|\+?{_NUMBER}{_SUFFIX}|\+{_NUMBER})$")

_PARTS = re.compile(r"\+?(?P<int>[0-9]*)(\.(?P<frac>[0-9]*))?(?P<suffix>.*)")
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_HINT = "Kubernetes quantity syntax, e.g. 8Gi, 512Mi, 2G, 1.5e9 or a plain byte count"


def _exact_value(value: str) -> Fraction:
    """The exact value of a non-negative quantity string, rounded up to 1e-9 as apimachinery stores it."""
    if value.startswith("-"):
        raise ValueError(f"{value!r} is negative: a byte quantity must be >= 0")
    if not re.fullmatch(QUANTITY_RE, value):
        raise ValueError(f"not a byte quantity: {value!r} ({_HINT})")
    parts = _PARTS.fullmatch(value)
    assert parts is not None  # QUANTITY_RE matched, so this does too
    digits, frac, suffix = parts["int"], parts["frac"] or "", parts["suffix"]
    number = Fraction(int(digits + frac or "0"), 10 ** len(frac))
    if suffix in _BINARY:
        number *= 2 ** _BINARY[suffix]
    else:
        number *= Fraction(10) ** (_DECIMAL[suffix] if suffix in _DECIMAL else int(suffix[1:]))
    return Fraction(math.ceil(number * 10**9), 10**9)


def parse_bytes(value: str | int) -> int:
    """Bytes of a byte quantity (``8Gi``, ``512Mi``, ``2G``, ``1.5e9``, ``1073741824`` or an int); see the module
    docstring for the rules. Raises ValueError with the reason."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"not a byte quantity: {value!r} ({_HINT})")
    exact = Fraction(value) if isinstance(value, int) else _exact_value(value)
    if exact < 0:
        raise ValueError(f"{value!r} is negative: a byte quantity must be >= 0")
    if 0 < exact < 1:
        raise ValueError(f"{value!r} is {float(exact):g} bytes, less than one byte (m is milli; megabytes are M, "
                         "mebibytes Mi)")
    if exact > MAX_BYTES:
        raise ValueError(f"{value!r} is more than 1Ei ({MAX_BYTES} bytes)")
    return math.ceil(exact)


def format_bytes(n: int) -> str:
    """The shortest exact binary-suffixed quantity for ``n`` bytes (``16Gi``, ``1536Mi``, ``1000``)."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        if n and n % 2 ** _BINARY[suffix] == 0:
            return f"{n >> _BINARY[suffix]}{suffix}"
    return str(n)


@dataclass(frozen=True)
class Budget:
    """A device memory budget: a fraction of the device's total memory, or bytes (exactly one is set)."""

    fraction: float | None = None
    nbytes: int | None = None

    def resolve(self, total: int | None) -> int | None:
        """Bytes of the budget on a device with ``total`` bytes; None for a fraction while the total is unknown."""
        if self.fraction is None:
            return self.nbytes
        return None if total is None else int(self.fraction * total)

    def kv_bytes(self, total: int | None, overhead: int | None) -> int | None:
        """Device KV bytes of the budget: THE meaning of a budget, at start-up and live alike. Bytes are the KV
        budget itself. A fraction is the share of the device's ``total`` memory the engine may hold in all, so the KV
        gets it minus ``overhead``, what the engine holds besides KV (measured once at start: the weights and
        whatever else was in use then, plus the activation reserve; ``pie_gpu_memory_overhead_bytes``). None for a
        fraction while either is unknown. Can be <= 0 (the fraction does not even cover the overhead)."""
        if self.fraction is None:
            return self.nbytes
        if total is None or overhead is None:
            return None
        return int(self.fraction * total) - overhead


def is_fraction(value: str) -> bool:
    """Whether a budget is written as a fraction of the device (``0.9``, ``.5``, ``1``) rather than bytes."""
    return re.fullmatch(FRACTION_SYNTAX_RE, value) is not None


def parse_budget(value: str) -> Budget:
    """A device memory budget (``--gpu-memory-budget``): a fraction in (0, 1] or a byte quantity. Raises
    ValueError with the reason."""
    if not isinstance(value, str):
        raise ValueError(f"a memory budget is a string (a fraction like 0.9 or bytes like 8Gi), got {value!r}")
    if is_fraction(value):
        fraction = float(value)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"memory budget {value!r} is a fraction of the GPU, which must be in (0, 1]; write "
                             "bytes with a unit (e.g. 2Gi)")
        return Budget(fraction=fraction)
    return Budget(nbytes=parse_bytes(value))
