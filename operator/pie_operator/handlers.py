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
from collections.abc import Mapping
from typing import Any

import kopf

from pie_operator.builders import DEPLOYMENT_LABEL
from pie_operator.config import OperatorConfig
from pie_operator.k8s import Kube
from pie_operator.observe import Observations, scrape_loop
from pie_operator.reconcile import Outcome, reconcile
from pie_operator.spec import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)
RESOURCE = (GROUP, VERSION, PLURAL)
REQUEUES = 3  # passes run back to back while each one asks for the next (actuate.Outcome.requeue)


class Reconciler:
    """Runs reconciles one at a time per PieDeployment (pod events, resyncs and kopf handlers would otherwise race
    and create pods twice) and coalesces bursts: a request is dropped when a run for the same object is already
    queued but not started, because that run will read the newer cluster state anyway."""

    def __init__(self, kube: Kube, observations: Observations | None = None,
                 config: OperatorConfig | None = None) -> None:
        self.kube = kube
        self.observations = observations
        self.config = config
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._queued: set[tuple[str, str]] = set()

    async def run(self, namespace: str, name: str, *, coalesce: bool) -> Outcome | None:
        key = (namespace, name)
        if coalesce and key in self._queued:
            return None
        self._queued.add(key)
        async with self._locks.setdefault(key, asyncio.Lock()):
            self._queued.discard(key)
            for _ in range(1 + REQUEUES):
                out = await asyncio.to_thread(reconcile, self.kube, namespace, name, observations=self.observations,
                                              config=self.config)
                if out is not None and (out.created or out.deleted or out.resized or out.gpu_live):
                    log.info("%s/%s: revision %s created=%s deleted=%s resized=%s gpu_live=%s phase=%s", namespace,
                             name, out.revision, out.created, out.deleted, out.resized, out.gpu_live,
                             out.status.get("phase"))
                if out is None or not out.requeue:
                    break
        if out is None and self.observations is not None:
            self.observations.forget(key)  # deleted: stop scraping its pods
        return out


async def _resync(memo: Any) -> None:
    while True:
        await asyncio.sleep(memo.resync_seconds)
        try:
            items = await asyncio.to_thread(memo.kube.list_deployments, memo.namespaces)
        except Exception:  # the apiserver may be briefly away; the next round retries
            log.exception("resync: could not list PieDeployments")
            continue
        for item in items:
            try:
                await memo.reconciler.run(item["metadata"]["namespace"], item["metadata"]["name"], coalesce=True)
            except Exception:  # one broken object must not stop the resync of the others
                log.exception("resync of %s/%s failed", item["metadata"]["namespace"], item["metadata"]["name"])


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(
        field="status.kopf.lastHandledConfiguration")
    # kopf would post an Event for every successful handler; reconcile posts the meaningful ones itself.
    settings.posting.level = logging.WARNING
    memo.resync_task = asyncio.create_task(_resync(memo))
    memo.scrape_task = asyncio.create_task(scrape_loop(
        memo.reconciler.observations, memo.scrape, lambda ns, name: memo.reconciler.run(ns, name, coalesce=True)))


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
