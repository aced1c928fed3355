"""rollout.serving(): which pods the Service may route to (the operator sets their pie.io/serving label)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from pie_operator.rollout import PAUSED, PROGRESSING, ROLLED_BACK, RolloutState, serving
from tests.unit.operator.test_rollout import COMPLETE_A, A, B, pod


@pytest.mark.parametrize(("state", "pods", "expected"), [
    (COMPLETE_A, [pod("a1", A), pod("a2", A, ready=False)], {"a1", "a2"}),  # readiness is the endpoints' concern
    (replace(COMPLETE_A, passed=("a1",)), [pod("a1", A), pod("a2", A)], {"a1"}),  # a2 has not passed its gate
    (replace(COMPLETE_A, revision=B, phase=PROGRESSING, passed=("a1", "b1")), [pod("a1", A), pod("b1", B)],
     {"a1", "b1"}),
    # paused: the revision under suspicion serves nothing (one of its pods failed the gate), the last good does
    (replace(COMPLETE_A, revision=B, phase=PAUSED, passed=("a1", "b1")), [pod("a1", A), pod("b1", B), pod("b2", B)],
     {"a1"}),
    (replace(COMPLETE_A, revision=B, phase=ROLLED_BACK, failed_revision=B, passed=("a1", "b1")),
     [pod("a1", A), pod("b1", B)], {"a1"}),
    # no last good revision: what passed of the only revision there is serves
    (RolloutState(revision=B, phase=PAUSED, passed=("b1",)), [pod("b1", B), pod("b2", B)], {"b1"}),
    (COMPLETE_A, [pod("a1", A, phase="Failed"), pod("a2", A)], {"a2"}),
])
def test_serving(state: RolloutState, pods: list[dict[str, Any]], expected: set[str]) -> None:
    assert serving(state, pods) == expected
