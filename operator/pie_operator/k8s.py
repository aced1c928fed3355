"""The ONE module that talks to the Kubernetes API: `Kube`, the interface reconcile uses, and `ApiKube`, its
implementation over the `kubernetes` client (synchronous; callers run it in a thread). Objects go in and come out as
plain camelCase dicts (raw JSON, no client models), so they compare directly with what builders.py renders.

The unit tests drive reconcile against an in-memory fake of `Kube` (tests/unit/operator/fake_kube.py); subclassing
the ABC keeps that fake honest: it cannot be instantiated while it misses a method.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import kubernetes
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from pie_operator.spec import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)
FIELD_MANAGER = "pie-operator"
_PATHS = {  # kind -> collection path in a namespace
    "Pod": "/api/v1/namespaces/{ns}/pods",
    "Service": "/api/v1/namespaces/{ns}/services",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Secret": "/api/v1/namespaces/{ns}/secrets",
    "PodDisruptionBudget": "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
    "NetworkPolicy": "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
    "Event": "/api/v1/namespaces/{ns}/events",
    "PieDeployment": f"/apis/{GROUP}/{VERSION}/namespaces/{{ns}}/{PLURAL}",
}


def secret_value(secret: dict[str, Any] | None, key: str) -> str:
    """The (stripped) value under `key` of a Secret as read from the apiserver; "" when there is none."""
    raw = ((secret or {}).get("data") or {}).get(key)
    return base64.b64decode(raw).decode().strip() if raw else ""


def admin_token_missing(namespace: str, name: str, key: str) -> ApiException:
    """The error of a pass that finds the admin-token Secret without a token: the operator will not overwrite a
    Secret it did not fill, so a person has to remove it (the status's Degraded condition carries this message)."""
    err = ApiException(status=409, reason="AdminTokenMissing")
    err.body = json.dumps({"message": f"Secret {namespace}/{name} exists but has no {key!r}: the operator only "
                                      f"creates Secrets, it never changes one; delete it (kubectl delete secret -n "
                                      f"{namespace} {name}) and the next pass creates it with a new token"})
    return err


def load_api_client() -> ApiClient:
    """In-cluster service account when running in a pod, else $KUBECONFIG / ~/.kube/config."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return ApiClient()


class Kube(ABC):
    """What one reconcile pass reads and writes through the Kubernetes API (PieDeployments, their pods and owned
    objects, Events). Reads never change the cluster; every write is one request."""

    # --- reads ------------------------------------------------------------------------------------------------
    @abstractmethod
    def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The PieDeployment, or None when there is none."""

    @abstractmethod
    def list_deployments(self, namespaces: list[str] | None) -> list[dict[str, Any]]:
        """All PieDeployments in `namespaces` (None: cluster-wide)."""

    @abstractmethod
    def list_pods(self, namespace: str, selector: str, owner_uid: str) -> list[dict[str, Any]]:
        """Pods matching `selector` that `owner_uid` controls (a same-named predecessor's leftovers are not ours),
        terminating ones included."""

    @abstractmethod
    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """One namespaced object of `kind` (Secret, Service, ConfigMap, PodDisruptionBudget, ...), or None."""

    @abstractmethod
    def supports_resize(self) -> bool | None:
        """Whether the apiserver serves the pods/resize subresource (in-place pod resize); None: it could not be told
        now (a transient API error), so nothing may be decided from it -- ask again on a later pass."""

    @abstractmethod
    def list_nodes(self, selector: str) -> list[dict[str, Any]]:
        """Nodes matching the label `selector` (cluster-scoped: needs `list nodes`)."""

    # --- writes -----------------------------------------------------------------------------------------------
    @abstractmethod
    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the PieDeployment's `.status` (lists like conditions are replaced whole)."""

    @abstractmethod
    def create_pod(self, pod: dict[str, Any]) -> dict[str, Any]:
        """Create `pod` (named by the apiserver from generateName); returns it as created."""

    @abstractmethod
    def delete_pod(self, namespace: str, name: str, uid: str) -> bool:
        """Delete exactly the pod we looked at (uid precondition); False when it is already gone."""

    @abstractmethod
    def label_pod(self, namespace: str, name: str, labels: dict[str, str | None]) -> bool:
        """Merge `labels` into the pod's labels (None removes one); False when the pod is already gone."""

    @abstractmethod
    def resize_pod(self, namespace: str, name: str, container: str, memory_request: str,
                   memory_limit: str | None) -> None:
        """Change one container's memory request (and limit; None: no limit) in place."""

    @abstractmethod
    def ensure_admin_token(self, secret: dict[str, Any]) -> str:
        """The token in `secret` (builders.admin_secret with an empty token), created with a random one when the
        Secret is missing; never rotated (running engines read it once at start). A Secret that exists without a
        token raises `admin_token_missing`'s ApiException: it is not overwritten."""

    @abstractmethod
    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply `obj` (create or update; fields we stopped setting are removed)."""

    @abstractmethod
    def post_event(self, owner: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on `owner` (what `kubectl describe` shows). Best effort: never raises."""


class ApiKube(Kube):
    """`Kube` over the apiserver: raw REST calls through the `kubernetes` client's ApiClient."""

    def __init__(self, api_client: ApiClient | None = None) -> None:
        self.api = api_client or load_api_client()
        self._resize: bool | None = None

    def _request(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None,
                 content_type: str = "application/json") -> dict[str, Any]:
        resp = self.api.call_api(
            path, method, query_params=list((query or {}).items()), body=body,
            header_params={"Accept": "application/json", "Content-Type": content_type},
            auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True,
            _request_timeout=30)
        data = resp.data
        return json.loads(data) if data else {}

    @staticmethod
    def _path(kind: str, namespace: str, name: str | None = None) -> str:
        base = _PATHS[kind].format(ns=quote(namespace))
        return f"{base}/{quote(name)}" if name else base

    # --- PieDeployments -------------------------------------------------------------------------------------
    def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._request("GET", self._path("PieDeployment", namespace, name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list_deployments(self, namespaces: list[str] | None) -> list[dict[str, Any]]:
        if namespaces is None:
            return self._request("GET", f"/apis/{GROUP}/{VERSION}/{PLURAL}").get("items", [])
        items: list[dict[str, Any]] = []
        for ns in namespaces:
            items += self._request("GET", self._path("PieDeployment", ns)).get("items", [])
        return items

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._request("PATCH", self._path("PieDeployment", namespace, name) + "/status", {"status": status},
                      content_type="application/merge-patch+json")

    # --- Pods -----------------------------------------------------------------------------------------------
    def list_pods(self, namespace: str, selector: str, owner_uid: str) -> list[dict[str, Any]]:
        items = self._request("GET", self._path("Pod", namespace), query={"labelSelector": selector}).get("items", [])
        return [p for p in items
                if any(r.get("uid") == owner_uid and r.get("controller")
                       for r in p["metadata"].get("ownerReferences", []))]

    def create_pod(self, pod: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", self._path("Pod", pod["metadata"]["namespace"]), pod)

    def delete_pod(self, namespace: str, name: str, uid: str) -> bool:
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}}
        try:
            self._request("DELETE", self._path("Pod", namespace, name), body)
            return True
        except ApiException as e:
            if e.status in (404, 409):
                return False
            raise

    def label_pod(self, namespace: str, name: str, labels: dict[str, str | None]) -> bool:
        try:
            self._request("PATCH", self._path("Pod", namespace, name), {"metadata": {"labels": labels}},
                          content_type="application/merge-patch+json")
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    def resize_pod(self, namespace: str, name: str, container: str, memory_request: str,
                   memory_limit: str | None) -> None:
        resources: dict[str, Any] = {"requests": {"memory": memory_request}}
        if memory_limit is not None:
            resources["limits"] = {"memory": memory_limit}
        patch = {"spec": {"containers": [{"name": container, "resources": resources}]}}
        self._request("PATCH", self._path("Pod", namespace, name) + "/resize", patch,
                      content_type="application/strategic-merge-patch+json")

    def list_nodes(self, selector: str) -> list[dict[str, Any]]:
        return list(self._request("GET", "/api/v1/nodes", query={"labelSelector": selector}).get("items", []))

    def supports_resize(self) -> bool | None:
        """Kubernetes >= 1.33. Asked until answered, then once per operator process: discovery first, the server
        version where discovery says nothing. A failed request is no answer (None, not cached): one 429 must not turn
        every in-place resize into a pod replacement."""
        if self._resize is None:
            try:
                resources = self._request("GET", "/api/v1").get("resources", [])
                self._resize = any(r.get("name") == "pods/resize" for r in resources)
                if not self._resize:
                    v = self._request("GET", "/version")
                    digits = re.match(r"[0-9]+", str(v.get("minor", "0")))  # "33+" on some vendors
                    minor = int(digits.group()) if digits else 0
                    self._resize = (int(v.get("major", "0")), minor) >= (1, 33)
            except (ApiException, ValueError, AttributeError) as e:
                log.warning("could not tell whether pods/resize is supported (%s): memory changes wait", e)
                return None
        return self._resize

    # --- The engines' admin token ----------------------------------------------------------------------------
    def ensure_admin_token(self, secret: dict[str, Any]) -> str:
        meta = secret["metadata"]
        key = next(iter(secret["stringData"]))
        current = self.get("Secret", meta["namespace"], meta["name"])
        if token := secret_value(current, key):
            return token
        if current is not None:
            # Least privilege: the operator may create Secrets but not change one it finds (RBAC: get/create only).
            raise admin_token_missing(meta["namespace"], meta["name"], key)
        token = secrets.token_urlsafe(32)
        try:
            self._request("POST", self._path("Secret", meta["namespace"]), {**secret, "stringData": {key: token}})
        except ApiException as e:
            if e.status != 409:  # created meanwhile (another pass): use that one
                raise
            return self.ensure_admin_token(secret)
        return token

    # --- Owned singletons (Service, ConfigMap, PDB) ----------------------------------------------------------
    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        path = self._path(obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        return self._request("PATCH", path, obj, query={"fieldManager": FIELD_MANAGER, "force": "true"},
                             content_type="application/apply-patch+yaml")

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._request("GET", self._path(kind, namespace, name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    # --- Events ---------------------------------------------------------------------------------------------
    def post_event(self, owner: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = owner["metadata"]
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"]},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            self._request("POST", self._path("Event", meta["namespace"]), event)
        except ApiException as e:  # an Event is never worth failing a reconcile for
            log.warning("could not post event %s/%s: %s", reason, message, e.reason)
