"""The operator's own Prometheus metrics (`pie-operator run --metrics-port`): per PieDeployment, the replica count it
converges to and the signals its autoscaler decides on -- the same signals for those who scale with KEDA or an HPA
on the scale subresource instead of spec.autoscaling (docs/operator.md, "Autoscaling").

Every pass sets them from its Scaling (scaling.py); a PieDeployment that is gone loses its series (`forget`). Only
pods with a fresh scrape (spec_autoscaling.MAX_SAMPLE_AGE) and not draining count. A series is kept as it was while a
pass cannot compute it (an invalid spec): a missing series would read as 0 to KEDA, i.e. a scale-down.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Gauge

from pie_operator.scaling import Scaling
from pie_operator.spec_autoscaling import MAX_SAMPLE_AGE

Key = tuple[str, str]  # (namespace, PieDeployment name)
LABELS = ("namespace", "name")
DESIRED, RECOMMENDED, SCRAPED, QUEUE, EXHAUSTED, TTFT, TPOT = (
    "pie_operator_desired_replicas", "pie_operator_recommended_replicas", "pie_operator_scraped_replicas",
    "pie_operator_queue_depth", "pie_operator_expansion_exhausted_replicas", "pie_operator_ttft_p95_seconds",
    "pie_operator_tpot_p95_seconds")
HELP = {
    DESIRED: "Replicas the pods converge to: the autoscaler's decision with spec.autoscaling.enabled, else "
             "spec.replicas",
    RECOMMENDED: "Replicas spec.autoscaling's policy wants now, memory first, without windows or steps (for KEDA / an "
                 "HPA: target AverageValue 1)",
    SCRAPED: "Replicas serving with a fresh scrape (the signals below are over these)",
    QUEUE: "Waiting requests per scraped replica",
    EXHAUSTED: "Scraped replicas whose expansion cannot absorb more load (pie_expansion_headroom_layers 0, or KV not "
               "full)",
    TTFT: "The worst scraped replica's p95 time to first token over the last minute (absent: none measured)",
    TPOT: "The worst scraped replica's p95 time per output token over the last minute (absent: none measured)",
}


class Exporter:
    """The gauges, in a registry of their own (served by cli.py; tests read it directly)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.gauges = {name: Gauge(name, doc, LABELS, registry=self.registry) for name, doc in HELP.items()}

    def update(self, key: Key, scaling: Scaling, now: float) -> None:
        fresh = [x for x in scaling.loads if not x.draining and x.at is not None and now - x.at <= MAX_SAMPLE_AGE]
        values: dict[str, float | None] = {
            DESIRED: scaling.replicas, RECOMMENDED: scaling.recommended, SCRAPED: len(fresh),
            QUEUE: sum(x.waiting for x in fresh) / len(fresh) if fresh else 0.0,
            EXHAUSTED: sum(x.expansion_exhausted for x in fresh),
            TTFT: max((x.ttft_p95 for x in fresh if x.ttft_p95 is not None), default=None),
            TPOT: max((x.tpot_p95 for x in fresh if x.tpot_p95 is not None), default=None)}
        for name, value in values.items():
            if value is None:  # (not measured now: no series rather than a stale one)
                _remove(self.gauges[name], key)
            else:
                self.gauges[name].labels(*key).set(value)

    def forget(self, key: Key) -> None:
        for gauge in self.gauges.values():
            _remove(gauge, key)


def _remove(gauge: Gauge, key: Key) -> None:
    with contextlib.suppress(KeyError):  # (never set)
        gauge.remove(*key)
