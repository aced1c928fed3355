"""One quantity parser (pie_engine.quantity): Kubernetes semantics, checked against kubernetes.utils.parse_quantity,
the operator's spec and the CRD's patterns. tests/e2e/test_quantity_apiserver.py runs the same tables against an
apiserver."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.utils import parse_quantity as k8s_parse_quantity
from pydantic import ValidationError

from pie_engine.quantity import MAX_BYTES, Budget, format_bytes, parse_budget, parse_bytes
from pie_operator.spec import HostMemory, MemorySpec

REPO = Path(__file__).resolve().parents[3]
Ei = 2**60

# Kinds of rejection. "stricter": forms the apiserver takes although its documented grammar excludes them (a number
# without digits reads as 0, "-0", an exponent with more than 3 digits, and, in a Pod's or quota's resources only,
# blanks around the value); the parser and the CRD reject them.
SYNTAX, NEGATIVE, SUB_BYTE, TOO_LARGE, STRICTER = "syntax", "negative", "sub-byte", "too-large", "stricter"
MESSAGES = {SYNTAX: ("not a byte quantity",), NEGATIVE: ("negative",), SUB_BYTE: ("less than one byte",),
            TOO_LARGE: ("more than 1Ei",), STRICTER: ("not a byte quantity", "negative")}

# form -> bytes, or the kind of rejection
BYTES: dict[str, int | str] = {
    "0": 0, "0.0": 0, "0m": 0, "0e9": 0, "+0": 0, "1": 1, "+1": 1, "007": 7, "1.": 1, "1024": 1024,
    "1.5": 2, "1500m": 2, "1000m": 1, "2000000u": 2, "1000000000n": 1, "0.9999999995": 1,  # up, like Value()
    "1k": 1000, ".5k": 500, "2G": 2 * 10**9, "3M": 3 * 10**6, "1T": 10**12, "1P": 10**15, "1E": 10**18,
    "1Ki": 1024, "1.1Ki": 1127, "512Mi": 512 * 2**20, "1.5Gi": 3 * 2**29, "8Gi": 8 * 2**30, "1Ti": 2**40,
    "1Pi": 2**50, "1Ei": Ei, "1152921504606846976": Ei,
    "1e3": 1000, "1E3": 1000, "1e+3": 1000, "1.5e3": 1500, "1.e3": 1000, "15e-1": 2, "1e-0": 1, "1e18": 10**18,
    "": SYNTAX, "8GB": SYNTAX, "8gi": SYNTAX, "1ki": SYNTAX, "1K": SYNTAX, "1e": SYNTAX, "1Ee3": SYNTAX,
    "1e3k": SYNTAX, "1_000": SYNTAX, "1,000": SYNTAX, "0x10": SYNTAX,
    "Infinity": SYNTAX, "NaN": SYNTAX, "1.5.2Gi": SYNTAX, "++1": SYNTAX, "12 apples": SYNTAX, "1.5Gib": SYNTAX,
    "-1": NEGATIVE, "-1Gi": NEGATIVE, "-0.5": NEGATIVE, "-1e3": NEGATIVE,
    "512m": SUB_BYTE, "0.5": SUB_BYTE, ".5": SUB_BYTE, "+.5": SUB_BYTE, "999m": SUB_BYTE, "1u": SUB_BYTE,
    "1n": SUB_BYTE, "1e-3": SUB_BYTE, "0.000001Ki": SUB_BYTE, "0.9999999": SUB_BYTE,
    "2Ei": TOO_LARGE, "8Ei": TOO_LARGE, "1.0000000001Ei": TOO_LARGE, "1152921504606846977": TOO_LARGE,
    "1e19": TOO_LARGE, "1e999": TOO_LARGE,
    "k": STRICTER, "Mi": STRICTER, ".": STRICTER, "+": STRICTER, "-": STRICTER, "e3": STRICTER, "+.": STRICTER,
    "-0": STRICTER, "1e0003": STRICTER, " 1": STRICTER, "1 ": STRICTER,
}
# Where kubernetes.utils.parse_quantity (Python's Decimal underneath) is laxer than the apiserver.
PYTHON_LAXER = {"1K", "1e3k", "1_000", "Infinity", "NaN"}

# budget -> ("fraction", value) | ("bytes", n) | an error message fragment
BUDGETS: dict[str, tuple[str, float | int] | str] = {
    "0.9": ("fraction", 0.9), ".5": ("fraction", 0.5), "1": ("fraction", 1.0), "1.0": ("fraction", 1.0),
    "1.": ("fraction", 1.0), "00.5": ("fraction", 0.5), "0.000001": ("fraction", 1e-6),
    "80Gi": ("bytes", 80 * 2**30), "1000": ("bytes", 1000), "01": ("bytes", 1), "+1": ("bytes", 1),
    "1e9": ("bytes", 10**9), "1.5Gi": ("bytes", 3 * 2**29), "0": ("bytes", 0), "1500m": ("bytes", 2),
    "1.5": "must be in (0, 1]", "0.0": "must be in (0, 1]", "0.": "must be in (0, 1]", "2.0": "must be in (0, 1]",
    "512m": "less than one byte", "+0.5": "less than one byte", "2Ei": "more than 1Ei", "-0.5": "negative",
    "90%": "not a byte quantity", "8GB": "not a byte quantity", "": "not a byte quantity",
    "1.5.2": "not a byte quantity", "lots": "not a byte quantity",
}

CRD = yaml.safe_load((REPO / "crds" / "piedeployments.pie.io.yaml").read_text())
MEMORY = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["memory"]
CRD_QUANTITY_RE = MEMORY["properties"]["hostMemory"]["properties"]["max"]["pattern"]
CRD_BUDGET_RE = MEMORY["properties"]["gpuMemoryBudget"]["pattern"]


def outcome(value: str | int) -> int | str:
    """Bytes, or the error message."""
    try:
        return parse_bytes(value)
    except ValueError as e:
        return str(e)


@pytest.mark.parametrize(("form", "expected"), BYTES.items())
def test_bytes(form: str, expected: int | str) -> None:
    got = outcome(form)
    if isinstance(expected, int):
        assert got == expected
    else:
        assert isinstance(got, str) and any(m in got for m in MESSAGES[expected]), got


@pytest.mark.parametrize(("form", "expected"), BYTES.items())
def test_agrees_with_the_kubernetes_client(form: str, expected: int | str) -> None:
    try:
        k8s: Decimal | None = k8s_parse_quantity(form)
    except ValueError:
        k8s = None
    if isinstance(expected, int):
        assert k8s is not None and math.ceil(k8s) == expected
    elif expected == SYNTAX:
        assert k8s is None or form in PYTHON_LAXER
    elif expected == NEGATIVE:
        assert k8s is not None and k8s < 0
    elif expected == SUB_BYTE:
        assert k8s is not None and 0 < k8s < 1
    elif expected == TOO_LARGE:
        assert k8s is not None and k8s > MAX_BYTES


@pytest.mark.parametrize(("form", "expected"), BYTES.items())
def test_the_operator_and_the_crd_pattern_agree(form: str, expected: int | str) -> None:
    def accepts(doc: dict[str, Any]) -> bool:
        try:
            HostMemory.model_validate(doc)
            return True
        except ValidationError:
            return False

    ok = isinstance(expected, int)
    assert accepts({"max": form}) == ok
    assert accepts({"min": form}) == ok
    # The pattern admits the syntax; the CEL rule next to it rejects sub-byte and too large values (e2e checks it).
    assert (re.fullmatch(CRD_QUANTITY_RE, form) is not None) == (ok or expected in (SUB_BYTE, TOO_LARGE))


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (5, 5), (Ei, Ei), (Ei + 1, "more than 1Ei"),
                                                 (-1, "negative"), (True, "not a byte quantity"),
                                                 (1.5, "not a byte quantity")])
def test_ints(value: Any, expected: int | str) -> None:
    got = outcome(value)
    assert got == expected if isinstance(expected, int) else expected in str(got)


@pytest.mark.parametrize(("budget", "expected"), BUDGETS.items())
def test_budgets(budget: str, expected: tuple[str, float | int] | str) -> None:
    try:
        got: Budget | str = parse_budget(budget)
    except ValueError as e:
        got = str(e)
    if isinstance(expected, str):
        assert isinstance(got, str) and expected in got, got
        assert re.fullmatch(CRD_BUDGET_RE, budget) is None or expected in ("less than one byte", "more than 1Ei")
    else:
        kind, value = expected
        assert got == (Budget(fraction=float(value)) if kind == "fraction" else Budget(nbytes=int(value)))
        assert re.fullmatch(CRD_BUDGET_RE, budget) is not None
    try:
        MemorySpec(gpu_memory_budget=budget)
        assert not isinstance(expected, str)
    except ValidationError as e:
        assert isinstance(expected, str) and expected in str(e)


def test_budget_resolution() -> None:
    assert parse_budget("0.5").resolve(1000) == 500
    assert parse_budget("0.5").resolve(None) is None  # a fraction needs the device's total
    assert parse_budget("8Gi").resolve(None) == 8 * 2**30


@pytest.mark.parametrize(("n", "text"), [(0, "0"), (1000, "1000"), (1024, "1Ki"), (1536 * 2**20, "1536Mi"),
                                          (2**40, "1Ti"), (3 * 2**50, "3Pi"), (Ei, "1Ei")])
def test_format_bytes_round_trips(n: int, text: str) -> None:
    assert format_bytes(n) == text and parse_bytes(text) == n


def test_the_operator_imports_it_without_torch() -> None:
    # The operator image has no torch: every operator module, and the engine's quantity module, import without it.
    code = ("import importlib, pkgutil, sys, pie_operator\n"
            "for m in pkgutil.iter_modules(pie_operator.__path__):\n"
            "    if m.name != '__main__': importlib.import_module('pie_operator.' + m.name)\n"
            "assert 'pie_engine.quantity' in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)
