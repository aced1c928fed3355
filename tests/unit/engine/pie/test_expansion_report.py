"""expansion_report.headroom: the layers m may still grow by (pie_expansion_headroom_layers), table tests."""

from __future__ import annotations

import pytest

from pie_engine.pie.expansion_report import headroom


@pytest.mark.parametrize("adaptive, room, top, ceiling, m, want", [
    (True, True, 7, 8, 0, 7),  # up to the host limit
    (True, True, 7, 8, 7, 0),  # at it
    (True, True, 7, 3, 0, 2),  # below a back-off's ceiling
    (True, True, 7, 3, 4, 0),  # never negative
    (True, False, 7, 8, 0, 0),  # no room to grow (latency, overhead, stall or the link)
    (False, True, 7, 8, 0, 0),  # off or static
])
def test_headroom(adaptive: bool, room: bool, top: int, ceiling: int, m: int, want: int) -> None:
    assert headroom(adaptive, room, top, ceiling, m) == want
