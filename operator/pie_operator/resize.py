"""In-place resize as the kubelet reports it, and the QoS rule the apiserver enforces on it. Pure functions of a pod.

A pods/resize PATCH the apiserver accepted only changes the pod's spec; the kubelet then actuates it, or not
(Kubernetes >= 1.33):

- ``status.containerStatuses[].resources``: what the container actually runs with;
- condition ``PodResizePending``, reason ``Deferred`` (the node cannot fit it now; the kubelet retries by itself) or
  ``Infeasible`` (the node can never fit it);
- condition ``PodResizeInProgress`` (being actuated; reason ``Error`` with a message when actuation failed, which
  the kubelet retries).

So a resize is done only when the container's status shows the new values. And the apiserver refuses a resize that
would change the pod's QoS class, whatever the node: such a change is never sent (tuning.py replaces the pod).
"""

from __future__ import annotations

from typing import Any

from kubernetes.utils import parse_quantity

from pie_operator.builders import ENGINE_CONTAINER
from pie_operator.quantity import parse_bytes

Pod = dict[str, Any]
PENDING, IN_PROGRESS, DEFERRED, INFEASIBLE, DONE = "Pending", "InProgress", "Deferred", "Infeasible", "Done"
WAITING = (PENDING, IN_PROGRESS, DEFERRED)  # the kubelet has not finished: no new memory decision meanwhile
QOS_RESOURCES = ("cpu", "memory")


def _engine(pod: Pod, where: str) -> dict[str, Any]:
    key = "containers" if where == "spec" else "containerStatuses"
    return next((c for c in pod.get(where, {}).get(key) or [] if c.get("name") == ENGINE_CONTAINER), {})


def _memory(resources: dict[str, Any] | None, part: str) -> int | None:
    value = ((resources or {}).get(part) or {}).get("memory")
    return None if value is None else parse_bytes(str(value))


def resize_state(pod: Pod) -> tuple[str, str]:
    """(state, the kubelet's message) of the engine container's memory: "" when the container's status does not say
    what it runs with (nothing to verify), DONE when it runs with the spec's values, else PENDING (the kubelet has
    not picked the change up), IN_PROGRESS, DEFERRED or INFEASIBLE."""
    actual = _engine(pod, "status").get("resources")
    if actual is None:
        return "", ""
    for c in pod.get("status", {}).get("conditions") or []:
        if c.get("status") != "True":
            continue
        if c.get("type") == "PodResizePending" and c.get("reason") in (DEFERRED, INFEASIBLE):
            return str(c["reason"]), str(c.get("message") or "")
        if c.get("type") == "PodResizeInProgress":
            return IN_PROGRESS, " ".join(x for x in (c.get("reason"), c.get("message")) if x)
    wanted = _engine(pod, "spec").get("resources") or {}
    if all(_memory(wanted, part) == _memory(actual, part) for part in ("requests", "limits")):
        return DONE, ""
    return PENDING, ""


def actual_memory(pod: Pod) -> str:
    """The engine container's memory request as its status reports it ("" when it does not)."""
    value = ((_engine(pod, "status").get("resources") or {}).get("requests") or {}).get("memory")
    return "" if value is None else str(value)


def _qos(containers: list[dict[str, Any]]) -> str:
    """The pod QoS class of these containers (Kubernetes' rule: cpu and memory only; a request defaults to its
    limit)."""
    guaranteed, best_effort = True, True
    for c in containers:
        res = c.get("resources") or {}
        limits = res.get("limits") or {}
        requests = {**limits, **(res.get("requests") or {})}
        for r in QOS_RESOURCES:
            best_effort = best_effort and r not in requests
            guaranteed = guaranteed and r in limits and parse_quantity(requests[r]) == parse_quantity(limits[r])
    return "BestEffort" if best_effort else "Guaranteed" if guaranteed else "Burstable"


def qos_change(pod: Pod, request: str, limit: str | None) -> tuple[str, str] | None:
    """(before, after) when resizing the engine container's memory to (request, limit) would change the pod's QoS
    class -- the apiserver refuses such a resize -- else None. `limit` None leaves the limit as it is (a resize
    patch without limits does not remove one)."""
    spec = pod.get("spec", {})
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    resized = []
    for c in containers:
        if c.get("name") == ENGINE_CONTAINER and c in spec.get("containers", []):
            res = dict(c.get("resources") or {})
            res["requests"] = {**(res.get("requests") or {}), "memory": request}
            if limit is not None:
                res["limits"] = {**(res.get("limits") or {}), "memory": limit}
            c = {**c, "resources": res}
        resized.append(c)
    before, after = _qos(containers), _qos(resized)
    return None if before == after else (before, after)
