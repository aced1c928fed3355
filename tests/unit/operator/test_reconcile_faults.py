"""reconcile() when the apiserver refuses a pod (quota, Pod Security, an admission webhook): the pass still writes
its status (Degraded, with the apiserver's message), backs off exponentially, and announces each distinct refusal
once; and the writes that an unchanged world or a fresh scrape must not cause."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from pie_operator.observe import Observations, PodTarget
from pie_operator.reconcile import create_backoff, reconcile
from pie_operator.scrape import REQUIRED, EngineMetrics, Observation
from tests.unit.operator.fake_kube import T0, FakeKube, api_error
from tests.unit.operator.test_reconcile import NAME, NS, cluster_writes, converged, pods, spec, status

QUOTA = ('pods \\"tiny-x\\" is forbidden: exceeded quota: gpu-pods, requested: pods=1, used: pods=2, '
         'limited: pods=2')
REFUSALS = {
    "quota": (403, "Forbidden", QUOTA),
    "pod-security": (403, "Forbidden", 'pods \\"tiny-x\\" is forbidden: violates PodSecurity \\"restricted:latest\\"'),
    "webhook": (400, "Bad Request", 'admission webhook \\"deny.example.com\\" denied the request: no GPUs today'),
}


class CountingKube(FakeKube):
    """Counts create attempts, refused ones included (FakeKube records only those that went through). A refusal
    names the pod as the apiserver does: with the name it generated for this attempt."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.create_attempts = 0

    def create_pod(self, pod: dict[str, Any]) -> dict[str, Any]:
        self.create_attempts += 1
        if (e := self.fail.get("create_pod")) is not None:
            generated = f"{pod['metadata']['generateName']}{self.create_attempts:05d}"
            refusal = ApiException(status=e.status, reason=e.reason)
            refusal.body = e.body.replace('\\"tiny-x\\"', f'\\"{generated}\\"')
            raise refusal
        return super().create_pod(pod)


def degraded(kube: FakeKube) -> dict[str, Any]:
    return next(c for c in status(kube)["conditions"] if c["type"] == "Degraded")


def warnings(kube: FakeKube) -> list[str]:
    return [r for t, r, _ in kube.events if t == "Warning"]


def at(seconds: float) -> dict[str, Any]:
    return {"now": T0 + timedelta(seconds=60 + seconds)}


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_refused_create_is_degraded_backs_off_and_is_announced_once(refusal: str) -> None:
    kube = converged(kube_class=CountingKube)
    assert isinstance(kube, CountingKube)
    kube.create_attempts = 0
    kube.set_spec(NS, NAME, spec(replicas=3))
    code, reason, message = REFUSALS[refusal]
    kube.fail["create_pod"] = api_error(code, reason, message)

    out = reconcile(kube, NS, NAME, **at(0))  # does not raise: a refusal is not a transient API error
    assert out is not None and out.status_written and out.retry_after == create_backoff(1)
    cond = degraded(kube)
    assert (status(kube)["phase"], cond["status"], cond["reason"]) == ("Degraded", "True", "CreateRejected")
    # (without the pod name the apiserver generated for that attempt: the same refusal reads the same every time)
    assert message.replace('\\"', '"').replace('"tiny-x"', '"tiny-*"') in re.sub(r'"tiny-[a-z0-9]+-\*"',
                                                                               '"tiny-*"', cond["message"])
    assert str(code) in cond["message"]
    assert warnings(kube) == ["CreateRejected"]
    assert kube.create_attempts == 1

    # Within the backoff: no attempt, no write, no Event (pod events and resyncs keep triggering passes).
    kube.clear()
    for s in (1, 2, create_backoff(1) - 1):
        out = reconcile(kube, NS, NAME, **at(s))
        assert out is not None and 0 < (out.retry_after or 0) <= create_backoff(1)
    assert kube.create_attempts == 1 and kube.writes == []

    # After it: one attempt; refused again, the wait doubles; the same refusal is not announced again.
    out = reconcile(kube, NS, NAME, **at(create_backoff(1)))
    assert kube.create_attempts == 2 and out is not None and out.retry_after == create_backoff(2)
    assert create_backoff(2) == 2 * create_backoff(1) and warnings(kube) == []
    assert cluster_writes(kube) == [("patch", "status")]  # the count of refusals

    # The quota is lifted: the next attempt goes through and Degraded clears.
    del kube.fail["create_pod"]
    out = reconcile(kube, NS, NAME, **at(create_backoff(1) + create_backoff(2)))
    assert out is not None and len(out.created) == 1 and out.retry_after is None
    assert (degraded(kube)["status"], len(pods(kube))) == ("False", 3)
    assert "podCreation" not in status(kube)


def test_a_new_refusal_message_is_announced() -> None:
    kube = converged(kube_class=CountingKube)
    kube.set_spec(NS, NAME, spec(replicas=3))
    kube.fail["create_pod"] = api_error(*REFUSALS["quota"])
    reconcile(kube, NS, NAME, **at(0))
    kube.fail["create_pod"] = api_error(*REFUSALS["webhook"])
    reconcile(kube, NS, NAME, **at(create_backoff(1)))
    assert warnings(kube) == ["CreateRejected", "CreateRejected"]
    assert "no GPUs today" in degraded(kube)["message"]


def test_backoff_is_exponential_and_capped() -> None:
    waits = [create_backoff(n) for n in range(1, 12)]
    assert waits[:4] == [5, 10, 20, 40] and max(waits) == waits[-1] == 300


def test_transient_create_error_still_raises() -> None:
    kube = converged()
    kube.set_spec(NS, NAME, spec(replicas=3))
    kube.fail["create_pod"] = api_error(500, "Internal Server Error", "etcdserver: request timed out")
    with pytest.raises(ApiException):
        reconcile(kube, NS, NAME, **at(0))
    assert degraded(kube)["reason"] == "ApiError"


def metrics(used: int) -> EngineMetrics:
    return EngineMetrics({**dict.fromkeys(REQUIRED, 0.0), "pie_expansion_ratio": 1.0 + used / 2**30,
                          "pie_host_kv_used_bytes": float(used)})


def test_a_scrape_with_new_numbers_writes_no_status() -> None:
    """status.pods[] shows the engines' numbers as of the last real change: a scrape that only moves them (KV use
    goes up and down with load) is not worth a status write per pod per scrape."""
    kube = converged()
    store = Observations()
    reconcile(kube, NS, NAME, observations=store, **at(0))
    targets = [PodTarget(p["metadata"]["name"], p["metadata"]["uid"], p["status"]["podIP"]) for p in pods(kube)]
    key = (NS, NAME)
    for t in targets:
        store.record(key, t, Observation(at=(T0 + timedelta(seconds=61)).timestamp(), metrics=metrics(2**20)))
    reconcile(kube, NS, NAME, observations=store, **at(2))  # metrics "" -> "ok": a real change, written
    assert {p["metrics"] for p in status(kube)["pods"]} == {"ok"}
    kube.clear()
    for i, t in enumerate(targets * 3):
        store.record(key, t, Observation(at=(T0 + timedelta(seconds=63 + i)).timestamp(),
                                         metrics=metrics((i + 2) * 2**20)))
        reconcile(kube, NS, NAME, observations=store, **at(4 + i))
    assert kube.writes == []
