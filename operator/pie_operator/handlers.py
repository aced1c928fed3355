"""Thin kopf handlers: every trigger ends in `reconcile()` (observe -> decide -> act) for one PieDeployment.

Triggers: create/update/resume of a PieDeployment (kopf retries these on errors), any event of an owned pod (so
readiness shows up in status within a second), a periodic resync of every PieDeployment (catches what no event
announces, e.g. a rollout step timing out) and every round of the engine scrape loop (observe.py: the closed
loop decides right after fresh metrics arrive). The resync and scrape loops are plain background tasks rather than
`@kopf.timer`: kopf timers and daemons put a finalizer on the object, and a finalizer would make deletion wait for
a running operator; garbage collection through ownerReferences needs none.

kopf keeps its own bookkeeping in `status.kopf` (progress + last-handled configuration), never in annotations.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import kopf

from pie_operator.builders import DEPLOYMENT_LABEL
from pie_operator.config import OperatorConfig
from pie_operator.exporter import Exporter
from pie_operator.k8s import Kube
from pie_operator.observe import Observations, scrape_loop
from pie_operator.reconcile import Outcome, reconcile
from pie_operator.spec import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)
passes = logging.getLogger("pie_operator.passes")  # one DEBUG line per pass with its duration (--log-passes)
RESOURCE = (GROUP, VERSION, PLURAL)
REQUEUES = 3  # passes run back to back while each one asks for the next (actuate.Outcome.requeue)
CONCURRENCY = 16  # passes running at once across PieDeployments (each in a worker thread, mostly waiting on the API)


class Reconciler:
    """Runs reconciles one at a time per PieDeployment (pod events, resyncs and kopf handlers would otherwise race
    and create pods twice), at most `concurrency` PieDeployments at once, and coalesces bursts: a request is dropped
    when a run for the same object is already queued but not started, because that run will read the newer cluster
    state anyway. A pass whose pod creation backs off (`Outcome.retry_after`) gets a run of its own when the wait is
    over, whatever else triggers one."""

    def __init__(self, kube: Kube, observations: Observations | None = None, concurrency: int = CONCURRENCY,
                 config: OperatorConfig | None = None, exporter: Exporter | None = None) -> None:
        self.kube = kube
        self.observations = observations
        self.config = config
        self.exporter = exporter
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._queued: set[tuple[str, str]] = set()
        self._slots = asyncio.Semaphore(concurrency)
        # Its own threads: asyncio's default executor has min(32, CPUs + 4) workers, which on a small node would cap
        # the passes in flight below `concurrency` (a pass mostly waits on the API, not on a CPU).
        self._threads = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="reconcile")
        self._retries: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()  # (strong references: the loop keeps only weak ones)

    async def run(self, namespace: str, name: str, *, coalesce: bool) -> Outcome | None:
        key = (namespace, name)
        if coalesce and key in self._queued:
            return None
        self._queued.add(key)
        async with self._locks.setdefault(key, asyncio.Lock()), self._slots:
            self._queued.discard(key)
            for _ in range(1 + REQUEUES):
                started = time.monotonic()
                out = await asyncio.get_running_loop().run_in_executor(self._threads, partial(
                    reconcile, self.kube, namespace, name, observations=self.observations,
                    config=self.config, exporter=self.exporter))
                passes.debug("pass %s/%s %.4f s", namespace, name, time.monotonic() - started)
                if out is not None and (out.created or out.deleted or out.resized or out.gpu_live):
                    log.info("%s/%s: revision %s created=%s deleted=%s resized=%s gpu_live=%s phase=%s", namespace,
                             name, out.revision, out.created, out.deleted, out.resized, out.gpu_live,
                             out.status.get("phase"))
                if out is None or not out.requeue:
                    break
        if out is None and self.observations is not None:
            self.observations.forget(key)  # deleted: stop scraping its pods
        if out is None and self.exporter is not None:
            self.exporter.forget(key)
        self._retry_later(key, None if out is None else out.retry_after)
        return out

    def _retry_later(self, key: tuple[str, str], delay: float | None) -> None:
        if (old := self._retries.pop(key, None)) is not None:
            old.cancel()
        if delay is None:
            return

        def start() -> None:
            self._retries.pop(key, None)
            task = asyncio.create_task(self.run(*key, coalesce=True))
            self._tasks.add(task)
            task.add_done_callback(self._done)

        self._retries[key] = asyncio.get_running_loop().call_later(delay, start)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a retry of pod creation failed: %s", task.exception())

    async def run_all(self, keys: list[tuple[str, str]], why: str) -> None:
        """A coalescing run for each of `keys`, concurrently (bounded by `concurrency`): one slow or broken
        PieDeployment does not hold up the others."""
        results = await asyncio.gather(*(self.run(ns, name, coalesce=True) for ns, name in keys),
                                       return_exceptions=True)
        for (ns, name), r in zip(keys, results, strict=True):
            if isinstance(r, BaseException):
                log.error("%s of %s/%s failed: %s", why, ns, name, r, exc_info=r)


async def resync_once(memo: Any) -> None:
    """Reconcile every PieDeployment once (what the periodic resync does each round)."""
    items = await asyncio.to_thread(memo.kube.list_deployments, memo.namespaces)
    await memo.reconciler.run_all([(i["metadata"]["namespace"], i["metadata"]["name"]) for i in items], "resync")


async def _resync(memo: Any) -> None:
    while True:
        await asyncio.sleep(memo.resync_seconds)
        try:
            await resync_once(memo)
        except Exception:  # the apiserver may be briefly away; the next round retries
            log.exception("resync: could not list PieDeployments")


def watch_settings(settings: kopf.OperatorSettings) -> None:
    """The pod watch asks the apiserver for the operator's pods only (labelSelector on the watch request): kopf's
    `labels=` filter on a handler is applied client-side, after every pod in the cluster has been sent and parsed."""
    settings.watching.label_selectors["v1", "pods"] = DEPLOYMENT_LABEL


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(
        field="status.kopf.lastHandledConfiguration")
    # kopf would post an Event for every successful handler; reconcile posts the meaningful ones itself.
    settings.posting.level = logging.WARNING
    watch_settings(settings)
    memo.resync_task = asyncio.create_task(_resync(memo))
    memo.scrape_task = asyncio.create_task(scrape_loop(
        memo.reconciler.observations, memo.scrape, lambda keys: memo.reconciler.run_all(keys, "post-scrape pass")))


@kopf.on.cleanup()
async def stop_resync(memo: kopf.Memo, **_: Any) -> None:
    for task in (getattr(memo, "resync_task", None), getattr(memo, "scrape_task", None)):
        if task is not None:
            task.cancel()


@kopf.on.resume(*RESOURCE, backoff=5)
@kopf.on.create(*RESOURCE, backoff=5)
@kopf.on.update(*RESOURCE, backoff=5)
async def on_change(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    assert namespace is not None  # PieDeployments are namespaced
    await memo.reconciler.run(namespace, name, coalesce=False)


@kopf.on.event("v1", "pods", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
async def on_pod_event(namespace: str | None, labels: Mapping[str, str], memo: kopf.Memo, **_: Any) -> None:
    assert namespace is not None  # pods are namespaced
    await memo.reconciler.run(namespace, labels[DEPLOYMENT_LABEL], coalesce=True)
