"""In-place resize as the kubelet reports it (resize.py), and what the operator does with it over whole passes
(reconcile against fake_kube.py, playing the kubelet's part by hand): a resize is done only when the container's
status says so; Deferred waits, Infeasible replaces the pod; what the apiserver refuses is never sent again."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from pie_operator.k8s import ApiKube
from pie_operator.reconcile import reconcile
from pie_operator.resize import qos_change, resize_state
from tests.unit.operator.fake_kube import FakeKube, api_error
from tests.unit.operator.test_decisions import engine_pod, loaded, tune
from tests.unit.operator.test_reconcile import NAME, NS, converged, later, spec, status

FLOOR = {"memory.hostMemory": {"min": "32Gi"}, "memory.headroom": "0"}  # every pod: 16Gi -> 48Gi, by Bounds


def kubelet(pod: dict[str, Any], request: str, *conditions: tuple[str, str, str]) -> dict[str, Any]:
    """The pod as a kubelet reports it: its container runs with `request`; `conditions` (type, reason, message)."""
    pod = copy.deepcopy(pod)
    pod["status"]["containerStatuses"][0]["resources"] = {"requests": {"memory": request}}
    pod["status"]["conditions"] = [{"type": t, "status": "True", "reason": r, "message": m} for t, r, m in conditions]
    return pod


@pytest.mark.parametrize(("pod", "expected"), [
    (engine_pod(memory="16Gi"), ("", "")),  # the status does not say: nothing to verify
    (kubelet(engine_pod(memory="16Gi"), "16Gi"), ("Done", "")),
    (kubelet(engine_pod(memory="20Gi"), "16Gi"), ("Pending", "")),  # accepted, not picked up by the kubelet yet
    (kubelet(engine_pod(memory="20Gi"), "16Gi", ("PodResizePending", "Deferred", "Node didn't have enough memory")),
     ("Deferred", "Node didn't have enough memory")),
    (kubelet(engine_pod(memory="20Gi"), "16Gi", ("PodResizePending", "Infeasible", "exceeds node capacity")),
     ("Infeasible", "exceeds node capacity")),
    (kubelet(engine_pod(memory="20Gi"), "16Gi", ("PodResizeInProgress", "", "")), ("InProgress", "")),
])
def test_resize_state(pod: dict[str, Any], expected: tuple[str, str]) -> None:
    assert resize_state(pod) == expected


def with_cpu(pod: dict[str, Any], request: str, limit: str) -> dict[str, Any]:
    res = pod["spec"]["containers"][0]["resources"]
    res["requests"]["cpu"], res.setdefault("limits", {})["cpu"] = request, limit
    return pod


def test_qos_change_is_what_the_apiserver_refuses() -> None:
    burstable = engine_pod(memory="16Gi", limit="24Gi")
    assert qos_change(burstable, "20Gi", "24Gi") is None
    guaranteed = with_cpu(engine_pod(memory="24Gi", limit="24Gi"), "8", "8")
    assert qos_change(guaranteed, "20Gi", "24Gi") == ("Guaranteed", "Burstable")
    assert qos_change(guaranteed, "30Gi", "30Gi") is None  # request and limit move together: still Guaranteed
    almost = with_cpu(engine_pod(memory="16Gi", limit="24Gi"), "8", "8")
    assert qos_change(almost, "24Gi", "24Gi") == ("Burstable", "Guaranteed")


def test_a_resize_that_changes_the_qos_class_is_never_sent_the_pod_is_replaced() -> None:
    guaranteed = with_cpu(engine_pod(memory="17Gi", limit="17Gi"), "8", "8")
    tp = tune({"memory.headroom": "1Gi", "memory.hostMemory": {"max": "8Gi"}}, [guaranteed], loaded(4096))
    assert tp.resize == {} and tp.replace == {"p": "MemoryChanged: memory request 17Gi -> 21Gi"}
    (_, _, via), = tp.changes
    assert via == "Rolling (a resize would change the pod's QoS class Guaranteed -> Burstable)"


def test_while_a_resize_is_unfinished_nothing_more_is_decided() -> None:
    for state in (("PodResizePending", "Deferred", "no room now"), ("PodResizeInProgress", "", "")):
        tp = tune({"memory.headroom": "1Gi"}, [kubelet(engine_pod(memory="17Gi"), "16Gi", state)], loaded(8192))
        assert (tp.resize, tp.replace, tp.changes) == ({}, {}, [])


class CountingKube(FakeKube):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.resizes: list[str] = []

    def resize_pod(self, namespace: str, name: str, container: str, memory_request: str,
                   memory_limit: str | None) -> None:
        self.resizes.append(name)
        super().resize_pod(namespace, name, container, memory_request, memory_limit)


def floor_raised() -> CountingKube:
    kube = converged()
    counting = CountingKube()
    counting.__dict__.update(kube.__dict__)
    counting.resizes = []
    counting.set_spec(NS, NAME, spec(**FLOOR))
    return counting


def play_kubelet(kube: FakeKube, running: str, *conditions: tuple[str, str, str]) -> None:
    for key, pod in kube.pods.items():
        kube.pods[key] = kubelet(pod, running, *conditions)
        kube.pods[key]["status"]["conditions"].append({"type": "Ready", "status": "True"})


def test_a_refused_resize_is_not_sent_again_the_pod_is_replaced() -> None:
    kube = floor_raised()
    kube.fail["resize_pod"] = api_error(422, "Unprocessable Entity", "Pod QoS is immutable")
    reconcile(kube, NS, NAME, **later(60))
    first = list(kube.resizes)
    assert len(first) == 2 and ("Warning", "ResizeFailed") in [(t, r) for t, r, _ in kube.events]
    for s in range(61, 70):
        reconcile(kube, NS, NAME, **later(s))
        kube.run_pods()
    assert kube.resizes == first  # never again, whatever the number of passes
    assert any(r == "DeletedMemoryChanged" for _, r, _ in kube.events)


def test_a_transient_resize_error_is_retried_not_replaced() -> None:
    kube = floor_raised()
    kube.fail["resize_pod"] = api_error(503, "Service Unavailable", "etcd leader changed")
    reconcile(kube, NS, NAME, **later(60))
    del kube.fail["resize_pod"]
    reconcile(kube, NS, NAME, **later(61))
    assert len(kube.resizes) == 4 and not any(w[0] == "delete" for w in kube.writes)


def test_deferred_waits_and_says_so_infeasible_replaces() -> None:
    kube = floor_raised()
    reconcile(kube, NS, NAME, **later(60))
    assert len(kube.resizes) == 2
    play_kubelet(kube, "16Gi", ("PodResizePending", "Deferred", "Node didn't have enough memory"))
    for s in (61, 62):
        reconcile(kube, NS, NAME, **later(s))
    assert {p["resize"] for p in status(kube)["pods"]} == {"Deferred: Node didn't have enough memory"}
    assert {p["memoryAllocated"] for p in status(kube)["pods"]} == {"16Gi"}
    assert len(kube.resizes) == 2 and not any(w[0] == "delete" for w in kube.writes)
    play_kubelet(kube, "48Gi")  # the kubelet found room: actuated
    reconcile(kube, NS, NAME, **later(63))
    assert {p["resize"] for p in status(kube)["pods"]} == {"Done"}
    kube.set_spec(NS, NAME, spec(**{**FLOOR, "memory.hostMemory": {"min": "64Gi"}}))
    reconcile(kube, NS, NAME, **later(64))
    play_kubelet(kube, "48Gi", ("PodResizePending", "Infeasible", "Node didn't have enough capacity"))
    reconcile(kube, NS, NAME, **later(65))
    assert any(r == "DeletedResizeInfeasible" for _, r, _ in kube.events)


def test_resize_support_unknown_decides_no_memory_change() -> None:
    kube = converged(resize=True)
    kube.resize = None  # the apiserver could not say (a 429 on discovery)
    kube.set_spec(NS, NAME, spec(**FLOOR))
    reconcile(kube, NS, NAME, **later(60))
    assert not any(w[0] in ("resize", "delete") for w in kube.writes)


def test_discovery_errors_are_no_answer_and_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    answers: list[Any] = [ApiException(status=429, reason="Too Many Requests"),
                          {"resources": [{"name": "pods"}, {"name": "pods/resize"}]}]

    def request(method: str, path: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)

    kube = ApiKube(api_client=object())  # type: ignore[arg-type]  # no request leaves: _request is replaced
    monkeypatch.setattr(kube, "_request", request)
    assert kube.supports_resize() is None
    assert kube.supports_resize() is True and answers == []


def test_an_oom_kill_at_the_limit_carries_the_raised_limit_to_new_pods() -> None:
    """Rolling: the OOM-killed pod is replaced; its replacement (and any new pod) gets the raised limit, not the one
    the engine was killed at. Then an unchanged world writes nothing."""
    rolling = {"memory.hostMemory": {"max": "8Gi"}, "memory.headroom": "0", "memory.apply": "Rolling"}
    kube = converged(rolling)
    killed = next(iter(kube.pods))
    kube.pods[killed]["status"]["containerStatuses"][0]["lastState"] = {
        "terminated": {"reason": "OOMKilled", "finishedAt": "2025-01-01T00:00:00Z"}}
    for s in range(60, 66):
        reconcile(kube, NS, NAME, **later(s))
        kube.run_pods()
    (new,) = [p for k, p in kube.pods.items() if k != killed
              and p["spec"]["containers"][0]["resources"]["requests"]["memory"] == "19661Mi"]  # 16Gi x 1.2
    assert new["spec"]["containers"][0]["resources"]["limits"]["memory"] == "29492Mi"  # 24Gi x 1.2, not 24Gi
    assert status(kube)["memory"]["hostMemoryLimit"] == "29492Mi"
    kube.clear()
    reconcile(kube, NS, NAME, **later(70))
    assert kube.writes == []
