"""p95 latencies from the engines' histograms: parsing (scrape.py), the quantile (latency.py), and the per-pod window
of scrapes they are taken over (observe.py)."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

from pie_operator import scrape as S
from pie_operator.latency import WINDOW, increase, p95, quantile, reset
from pie_operator.observe import Observations, PodTarget
from tests.unit.operator.test_scrape import engine_text

INF = math.inf
BUCKETS = (0.1, 0.5, 1.0, 2.5)


def histogram_text(ttft: list[float], itl: list[float] | None = None, **gauges: float) -> str:
    """An engine's /metrics with its TTFT (and inter-token latency) histogram having observed these values."""
    r = CollectorRegistry()
    for name, values in ((S.TTFT_HISTOGRAM, ttft), (S.TPOT_HISTOGRAM, itl)):
        if values is not None:
            h = Histogram(name, "doc", buckets=BUCKETS, registry=r)
            for v in values:
                h.observe(v)
    for name, value in gauges.items():
        Gauge(name, "doc", registry=r).set(value)
    return engine_text().decode() + generate_latest(r).decode()


@pytest.mark.parametrize(("buckets", "q", "expected"), [
    (((0.1, 0.0), (0.5, 10.0), (1.0, 20.0), (INF, 20.0)), 0.5, 0.5),  # the 10th of 20 ends the second bucket
    (((0.1, 0.0), (0.5, 10.0), (1.0, 20.0), (INF, 20.0)), 0.75, 0.75),  # halfway into (0.5, 1.0]
    (((0.1, 4.0), (0.5, 4.0), (INF, 4.0)), 0.95, 0.095),  # the first bucket interpolates from 0
    (((0.1, 0.0), (1.0, 1.0), (INF, 10.0)), 0.95, 1.0),  # in +Inf: the highest finite bound, nothing known above
    (((0.1, 0.0), (INF, 0.0)), 0.95, None),  # nothing observed
    ((), 0.95, None),
])
def test_quantile_is_histogram_quantile(buckets: tuple[tuple[float, float], ...], q: float,
                                        expected: float | None) -> None:
    got = quantile(q, buckets)
    assert got == (None if expected is None else pytest.approx(expected))


def test_p95_is_of_what_was_observed_between_the_oldest_and_newest_scrape() -> None:
    before = ((0.1, 100.0), (1.0, 100.0), (INF, 100.0))  # 100 fast requests since the engine started
    after = ((0.1, 100.0), (1.0, 110.0), (INF, 110.0))  # then 10 slow ones
    assert increase(after, before) == ((0.1, 0.0), (1.0, 10.0), (INF, 10.0))
    assert p95([before, after]) == pytest.approx(0.955)  # not the cumulative p95 (0.1: the old fast ones)
    assert p95([after]) is None and p95([before, before]) is None
    assert reset(before, after) and not reset(after, before)  # counts went down: the engine restarted
    assert reset(((0.5, 1.0), (INF, 1.0)), ((0.1, 1.0), (INF, 1.0)))  # another layout is no baseline either


def test_parse_keeps_well_formed_latency_histograms_and_the_headroom() -> None:
    m = S.parse_metrics(histogram_text([0.05, 0.7], [0.02], pie_expansion_headroom_layers=3))
    assert m.buckets[S.TTFT_HISTOGRAM] == ((0.1, 1.0), (0.5, 1.0), (1.0, 2.0), (2.5, 2.0), (INF, 2.0))
    assert m.buckets[S.TPOT_HISTOGRAM][-1] == (INF, 1.0)
    assert m["pie_expansion_headroom_layers"] == 3
    assert S.parse_metrics(engine_text().decode()).buckets == {}  # optional: an engine without them is fresh


def test_a_malformed_latency_histogram_is_left_out_not_stale() -> None:
    broken = (engine_text().decode() + f"# TYPE {S.TTFT_HISTOGRAM} histogram\n"
              f'{S.TTFT_HISTOGRAM}_bucket{{le="0.1"}} 5.0\n{S.TTFT_HISTOGRAM}_bucket{{le="1.0"}} 3.0\n'
              f'{S.TTFT_HISTOGRAM}_bucket{{le="+Inf"}} 5.0\n')
    m = S.parse_metrics(broken)  # counts that go down along le
    assert S.TTFT_HISTOGRAM not in m.buckets and m["pie_expansion_ratio"] == 1.0


def record(store: Observations, at: float, text: str | None) -> None:
    pod = PodTarget("p", "u1", "127.0.0.1")
    obs = S.Observation(at, metrics=S.parse_metrics(text)) if text is not None else S.Observation(at, error="timeout")
    store.record(("ns", "x"), pod, obs)


def test_the_store_takes_p95s_over_the_last_window_of_scrapes() -> None:
    store = Observations()
    store.set_targets(("ns", "x"), 1, [PodTarget("p", "u1", "127.0.0.1")])
    fast = [0.05] * 100
    record(store, 0.0, histogram_text(fast, fast))
    view = store.view(("ns", "x"), 0.0, 60)["p"]
    assert (view.ttft_p95, view.tpot_p95) == (None, None)  # one scrape: nothing known about the last minute yet
    record(store, 15.0, histogram_text(fast + [2.0] * 10, fast))
    view = store.view(("ns", "x"), 15.0, 60)["p"]
    assert view.ttft_p95 == pytest.approx(2.425) and view.tpot_p95 is None  # no token in between: no TPOT p95
    record(store, 30.0, None)  # a failed scrape: the last fresh one stays the evidence, its p95 too
    view = store.view(("ns", "x"), 30.0, 60)["p"]
    assert view.last is not None and not view.last.ok and view.last_ok is not None and view.last_ok.at == 15.0
    assert view.ttft_p95 == pytest.approx(2.425)
    record(store, 45.0, histogram_text(fast + [2.0] * 10 + [0.05] * 10, fast))
    record(store, 45.0 + WINDOW - 10, histogram_text(fast + [2.0] * 10 + [0.05] * 20, fast))
    assert store.view(("ns", "x"), 95.0, 60)["p"].ttft_p95 == pytest.approx(0.095)  # the slow ones aged out
    record(store, 100.0, histogram_text([0.7], fast))  # the engine restarted: counts went down
    assert store.view(("ns", "x"), 100.0, 60)["p"].ttft_p95 is None  # no baseline from before the restart
    record(store, 110.0, histogram_text([0.7] * 11, fast))
    assert store.view(("ns", "x"), 110.0, 60)["p"].ttft_p95 == pytest.approx(0.975)  # counted from the restart
