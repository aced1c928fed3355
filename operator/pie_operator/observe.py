"""What the operator has seen of its engines (in memory only) and the periodic task that looks.

Reconcile registers each PieDeployment's Ready pods (`set_targets`); `scrape_loop` reads every registered pod's
engine at http://<podIP>:<port> every `interval` seconds with bounded concurrency, records the result (a fresh sample
goes into the pod's SampleWindow, which keeps the PieDeployment's tuning window and no more), then asks for a
reconcile of each PieDeployment (bounded concurrency too), which decides with the pure functions of decisions.py /
rollout.py. Nothing here is needed to be correct after a restart: the store starts empty, and an empty store means
"no evidence", which never causes a change (see decisions.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from pie_operator.decisions import Sample, SampleWindow
from pie_operator.latency import WINDOW, Buckets, p95, reset
from pie_operator.scrape import TPOT_HISTOGRAM, TTFT_HISTOGRAM, Observation, scrape

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (namespace, PieDeployment name)


@dataclass(frozen=True)
class PodTarget:
    name: str
    uid: str
    ip: str
    ready: bool = True  # only Ready pods are scraped; the others keep their window until they are gone
    probe: str = ""  # the served model name to send a probe request (scrape.probe) to: the pod's gate needs one


@dataclass
class _PodRecord:
    uid: str
    window: SampleWindow
    last: Observation | None = None
    last_ok: Observation | None = None
    # The latency histograms of the fresh scrapes of the last latency.WINDOW seconds, oldest first, none from before
    # the engine's counters last went down (a restart): what its p95s are taken over.
    latency: deque[tuple[float, dict[str, Buckets]]] = field(default_factory=deque)

    def add_latency(self, obs: Observation) -> None:
        assert obs.metrics is not None
        now = obs.metrics.buckets
        if self.latency and any(name not in now or reset(now[name], b) for name, b in self.latency[-1][1].items()):
            self.latency.clear()
        self.latency.append((obs.at, now))
        while self.latency[0][0] < obs.at - WINDOW:
            self.latency.popleft()

    def p95(self, name: str) -> float | None:
        return p95([b[name] for _, b in self.latency if name in b])


@dataclass(frozen=True)
class PodView:
    """A consistent copy of one pod's record: the latest observation, the latest fresh one, the samples in the
    window and the p95 latencies of the last latency.WINDOW seconds (None: fewer than two scrapes, or no request)."""

    last: Observation | None
    samples: list[Sample] = field(default_factory=list)
    last_ok: Observation | None = None
    ttft_p95: float | None = None
    tpot_p95: float | None = None


def to_sample(obs: Observation) -> Sample:
    assert obs.metrics is not None
    m = obs.metrics
    return Sample(at=obs.at, host_kv_used=m.bytes("pie_host_kv_used_bytes"),
                  host_recommended=m.bytes("pie_recommended_host_memory_bytes"),
                  gpu_recommended=m.bytes("pie_recommended_gpu_memory_bytes"))


class Observations:
    """Thread-safe: the scrape loop writes from the event loop, reconcile reads from its worker thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pods: dict[Key, dict[str, _PodRecord]] = {}
        self._targets: dict[Key, tuple[int, tuple[PodTarget, ...]]] = {}
        self._windows: dict[Key, float] = {}
        self._evaluated: dict[Key, float] = {}

    def set_targets(self, key: Key, port: int, pods: list[PodTarget], window_seconds: float = 1800.0) -> None:
        """The pods of one PieDeployment (the Ready ones are scraped from now on) and how long their samples are kept
        (its tuning window); records of pods not listed (gone, or replaced under the same name) go."""
        uids = {p.name: p.uid for p in pods}
        with self._lock:
            self._targets[key] = (port, tuple(pods))
            records = self._pods.setdefault(key, {})
            for name in [n for n, r in records.items() if uids.get(n) != r.uid]:
                del records[name]
            if self._windows.get(key) != window_seconds:
                self._windows[key] = window_seconds
                for r in records.values():
                    r.window.set_window(window_seconds)

    def forget(self, key: Key) -> None:
        with self._lock:
            self._targets.pop(key, None)
            self._pods.pop(key, None)
            self._windows.pop(key, None)
            self._evaluated.pop(key, None)

    def evaluated(self, key: Key) -> float | None:
        """When a pass last evaluated the autoscaler's windows of `key` (scaling.py; None: not since this started)."""
        with self._lock:
            return self._evaluated.get(key)

    def set_evaluated(self, key: Key, at: float) -> None:
        with self._lock:
            self._evaluated[key] = at

    def targets(self) -> list[tuple[Key, int, tuple[PodTarget, ...]]]:
        with self._lock:
            return [(k, port, tuple(p for p in pods if p.ready and p.ip)) for k, (port, pods) in self._targets.items()]

    def record(self, key: Key, pod: PodTarget, obs: Observation) -> None:
        with self._lock:
            if pod not in self._targets.get(key, (0, ()))[1]:
                return  # the pod went away while it was being scraped
            rec = self._pods.setdefault(key, {}).get(pod.name)
            if rec is None or rec.uid != pod.uid:
                rec = self._pods[key][pod.name] = _PodRecord(pod.uid, SampleWindow(self._windows.get(key, 1800.0)))
            if rec.last is not None and obs.at < rec.last.at:
                return
            rec.last = obs
            if obs.ok:
                rec.last_ok = obs
                rec.window.add(to_sample(obs))
                rec.add_latency(obs)

    def view(self, key: Key, now: float, window_seconds: float) -> dict[str, PodView]:
        """Per pod name: the latest observation and the samples of the last `window_seconds`."""
        with self._lock:
            return {name: PodView(r.last, r.window.recent(now, window_seconds), r.last_ok, r.p95(TTFT_HISTOGRAM),
                                  r.p95(TPOT_HISTOGRAM)) for name, r in self._pods.get(key, {}).items()}


@dataclass(frozen=True)
class ScrapeSettings:
    interval: float = 15.0
    timeout: float = 2.0
    concurrency: int = 16


async def scrape_once(store: Observations, client: httpx.AsyncClient, settings: ScrapeSettings,
                      semaphore: asyncio.Semaphore) -> list[Key]:
    """Scrape every registered pod once (at most `concurrency` at a time); returns the PieDeployments scraped."""

    async def one(key: Key, port: int, pod: PodTarget) -> None:
        async with semaphore:
            obs = await scrape(client, pod.ip, port, settings.timeout, pod.probe)
        store.record(key, pod, obs)

    targets = store.targets()
    await asyncio.gather(*(one(key, port, pod) for key, port, pods in targets for pod in pods))
    return [key for key, _, _ in targets]


async def scrape_loop(store: Observations, settings: ScrapeSettings,
                      after: Callable[[list[Key]], Awaitable[object]]) -> None:
    """Forever: scrape, then `after(keys)` with the PieDeployments scraped (a reconcile of each that decides; the
    caller runs them concurrently)."""
    semaphore = asyncio.Semaphore(settings.concurrency)
    # trust_env=False: pod IPs must never go through an HTTP(S)_PROXY from the operator's environment.
    async with httpx.AsyncClient(trust_env=False) as client:
        while True:
            await asyncio.sleep(settings.interval)
            try:
                keys = await scrape_once(store, client, settings, semaphore)
            except Exception:  # a bug in one round must not end the loop
                log.exception("scrape round failed")
                continue
            try:
                await after(keys)
            except Exception:
                log.exception("the reconciles after a scrape failed")
