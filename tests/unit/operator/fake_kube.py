"""An in-memory fake of the operator's own API boundary (`pie_operator.k8s.Kube`), for driving reconcile() in unit
tests. It implements the interface whole (the ABC refuses to instantiate a fake that misses a method) and records
every request that would change the cluster in `writes`, so tests can say exactly what a pass did.

It is a fake of `Kube`, not of the apiserver: e2e tests (tests/e2e/) run the operator against a real control plane.
"""

from __future__ import annotations

import base64
import copy
import itertools
from datetime import datetime, timezone
from typing import Any

from kubernetes.client.exceptions import ApiException

from pie_operator.k8s import Kube, admin_token_missing

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
Obj = dict[str, Any]


def merge_patch(target: Obj, patch: Obj) -> Obj:
    """RFC 7386 JSON merge patch (what patch_status sends): objects merge, null deletes, anything else replaces."""
    out = dict(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_patch(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def api_error(status: int, reason: str, message: str) -> ApiException:
    e = ApiException(status=status, reason=reason)
    e.body = f'{{"kind": "Status", "status": "Failure", "message": "{message}", "code": {status}}}'
    return e


class FakeKube(Kube):
    """PieDeployments, pods, owned objects and Events in dicts. `writes` lists (verb, what) per write request;
    `fail[method]` is raised by every call of `method` while set (an apiserver that refuses)."""

    def __init__(self, *, resize: bool | None = True) -> None:
        self.deployments: dict[tuple[str, str], Obj] = {}
        self.pods: dict[tuple[str, str], Obj] = {}
        self.objects: dict[tuple[str, str, str], Obj] = {}  # (kind, namespace, name)
        self.events: list[tuple[str, str, str]] = []  # (type, reason, message)
        self.writes: list[tuple[str, str]] = []
        self.fail: dict[str, ApiException] = {}
        self.resize = resize
        self.nodes: dict[str, dict[str, str]] = {}  # node name -> labels
        self.now = T0  # creationTimestamp of what is created
        self._ids = itertools.count(1)

    def _call(self, method: str) -> None:
        if method in self.fail:
            raise self.fail[method]

    def _meta(self, meta: Obj) -> Obj:
        n = next(self._ids)
        return {**meta, "uid": f"uid-{n}", "resourceVersion": str(n),
                "creationTimestamp": self.now.strftime("%Y-%m-%dT%H:%M:%SZ")}

    # --- what tests do to the world --------------------------------------------------------------------------
    def add_deployment(self, namespace: str, name: str, spec: Obj) -> Obj:
        body = {"apiVersion": "pie.io/v1alpha1", "kind": "PieDeployment",
                "metadata": self._meta({"name": name, "namespace": namespace, "generation": 1}), "spec": spec}
        self.deployments[(namespace, name)] = body
        return body

    def set_spec(self, namespace: str, name: str, spec: Obj) -> None:
        body = self.deployments[(namespace, name)]
        body["spec"] = copy.deepcopy(spec)
        body["metadata"]["generation"] += 1

    def run_pods(self) -> None:
        """What the scheduler and kubelet would do: every pod without an IP gets one, runs and is Ready."""
        for i, pod in enumerate(self.pods.values()):
            st = pod.setdefault("status", {})
            if not st.get("podIP"):
                st.update({"phase": "Running", "podIP": f"127.0.1.{i + 10}",
                           "conditions": [{"type": "Ready", "status": "True"}],
                           "containerStatuses": [{"name": c["name"], "ready": True, "restartCount": 0}
                                                 for c in pod["spec"]["containers"]]})

    def clear(self) -> None:
        self.writes.clear()
        self.events.clear()

    # --- Kube: reads -----------------------------------------------------------------------------------------
    def get_deployment(self, namespace: str, name: str) -> Obj | None:
        self._call("get_deployment")
        return copy.deepcopy(self.deployments.get((namespace, name)))

    def list_deployments(self, namespaces: list[str] | None) -> list[Obj]:
        self._call("list_deployments")
        return [copy.deepcopy(d) for (ns, _), d in self.deployments.items() if namespaces is None or ns in namespaces]

    def list_pods(self, namespace: str, selector: str, owner_uid: str) -> list[Obj]:
        self._call("list_pods")
        wanted = dict(part.split("=", 1) for part in selector.split(","))
        return [copy.deepcopy(p) for (ns, _), p in sorted(self.pods.items()) if ns == namespace
                and wanted.items() <= p["metadata"].get("labels", {}).items()
                and any(r["uid"] == owner_uid and r.get("controller") for r in p["metadata"]["ownerReferences"])]

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        self._call("get")
        return copy.deepcopy(self.objects.get((kind, namespace, name)))

    def supports_resize(self) -> bool | None:
        self._call("supports_resize")
        return self.resize

    def list_nodes(self, selector: str) -> list[Obj]:
        """`key`, `key=v` and `key!=v` terms, like the apiserver's label selectors."""
        self._call("list_nodes")

        def match(labels: dict[str, str], term: str) -> bool:
            if "!=" in term:
                k, v = term.split("!=", 1)
                return labels.get(k) != v
            if "=" in term:
                k, v = term.split("=", 1)
                return labels.get(k) == v
            return term in labels

        return [{"metadata": {"name": n, "labels": dict(labels)}} for n, labels in sorted(self.nodes.items())
                if all(match(labels, t) for t in selector.split(","))]

    # --- Kube: writes ----------------------------------------------------------------------------------------
    def patch_status(self, namespace: str, name: str, status: Obj) -> None:
        self._call("patch_status")
        self.writes.append(("patch", "status"))
        body = self.deployments[(namespace, name)]
        body["status"] = merge_patch(body.get("status") or {}, status)

    def create_pod(self, pod: Obj) -> Obj:
        self._call("create_pod")
        meta = pod["metadata"]
        name = f"{meta['generateName']}{next(self._ids):05d}"
        created = {**copy.deepcopy(pod), "metadata": self._meta({**copy.deepcopy(meta), "name": name}),
                   "status": {"phase": "Pending"}}
        self.pods[(meta["namespace"], name)] = created
        self.writes.append(("create", "Pod"))
        return copy.deepcopy(created)

    def delete_pod(self, namespace: str, name: str, uid: str) -> bool:
        self._call("delete_pod")
        self.writes.append(("delete", name))
        pod = self.pods.get((namespace, name))
        if pod is None or pod["metadata"]["uid"] != uid:
            return False  # 404, or 409: the uid precondition failed
        del self.pods[(namespace, name)]
        return True

    def label_pod(self, namespace: str, name: str, labels: dict[str, str | None]) -> bool:
        self._call("label_pod")
        self.writes.append(("label", name))
        pod = self.pods.get((namespace, name))
        if pod is None:
            return False
        pod["metadata"]["labels"] = merge_patch(pod["metadata"].get("labels", {}), labels)
        return True

    def resize_pod(self, namespace: str, name: str, container: str, memory_request: str,
                   memory_limit: str | None) -> None:
        self._call("resize_pod")
        self.writes.append(("resize", name))
        (c,) = [c for c in self.pods[(namespace, name)]["spec"]["containers"] if c["name"] == container]
        c["resources"].setdefault("requests", {})["memory"] = memory_request
        if memory_limit is not None:
            c["resources"].setdefault("limits", {})["memory"] = memory_limit

    def ensure_admin_token(self, secret: Obj) -> str:
        self._call("ensure_admin_token")
        key = (secret["kind"], secret["metadata"]["namespace"], secret["metadata"]["name"])
        if key not in self.objects:
            self.writes.append(("create", "Secret"))
            data = {k: base64.b64encode(b"fake-token").decode() for k in secret["stringData"]}
            self.objects[key] = {**{k: v for k, v in secret.items() if k != "stringData"},
                                 "metadata": self._meta(secret["metadata"]), "data": data}
        token_key = next(iter(secret["stringData"]))
        if not (self.objects[key].get("data") or {}).get(token_key):  # never overwritten (like k8s.ApiKube)
            raise admin_token_missing(key[1], key[2], token_key)
        return base64.b64decode(self.objects[key]["data"][token_key]).decode()

    def apply(self, obj: Obj) -> Obj:
        self._call("apply")
        self.writes.append(("apply", obj["kind"]))
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        stored = merge_patch(self.objects.get(key) or {"metadata": self._meta({})}, obj)
        if obj["kind"] == "Service":  # a field the apiserver adds: what we did not set must not count as a change
            stored["spec"].setdefault("clusterIP", "10.0.0.10")
        self.objects[key] = stored
        return copy.deepcopy(stored)

    def post_event(self, owner: Obj, type_: str, reason: str, message: str) -> None:
        self.writes.append(("event", reason))
        self.events.append((type_, reason, message))
