"""Pure builders: (spec, memory decision) -> the desired Pod template, Service, ConfigMap and PodDisruptionBudget.

No I/O and no randomness: the same inputs give identical dicts, hence the same template hash. Pods are bare pods
named by the apiserver from `generateName: <name>-<hash>-` (docs/architecture.md says why not a Deployment).
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from pie_operator.config import AdminPeer
from pie_operator.memory import MemoryDecision, pod_memory
from pie_operator.spec import API_VERSION, KIND, PieDeploymentSpec

NAME_LABEL, INSTANCE_LABEL, MANAGED_BY_LABEL = "app.kubernetes.io/name", "app.kubernetes.io/instance", \
    "app.kubernetes.io/managed-by"
DEPLOYMENT_LABEL, HASH_LABEL = "pie.io/deployment", "pie.io/template-hash"
# Set (patched) by the operator on a pod once it passed its rollout gate, removed when its revision fails: the Service
# selects on it, so traffic follows the gate. Not part of the pod template, hence not of the revision hash.
SERVING_LABEL = "pie.io/serving"
ENGINE_CONTAINER = "engine"
TMP_DIR, SHM_DIR = "/tmp", "/dev/shm"
ADMIN_DIR, ADMIN_TOKEN_KEY = "/var/run/pie/admin", "token"
ADMIN_TOKEN_FILE = f"{ADMIN_DIR}/{ADMIN_TOKEN_KEY}"
BUDGET_FLAG = "--gpu-memory-budget"
RUN_AS = 1000  # runAsNonRoot needs a numeric uid when the image's USER is a name (or root)


def selector_labels(name: str) -> dict[str, str]:
    """Labels that select the pods of one PieDeployment (Service, PDB, status.selector)."""
    return {NAME_LABEL: "pie-engine", DEPLOYMENT_LABEL: name}


def common_labels(name: str) -> dict[str, str]:
    return {**selector_labels(name), INSTANCE_LABEL: name, MANAGED_BY_LABEL: "pie-operator"}


def selector_string(name: str) -> str:
    """status.selector (the scale subresource's labelSelectorPath wants the string form)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(name).items()))


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    """The controller owner reference every child carries, so deleting the PieDeployment garbage-collects it."""
    return {"apiVersion": API_VERSION, "kind": KIND, "name": body["metadata"]["name"],
            "uid": body["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def engine_args(spec: PieDeploymentSpec, name: str, decision: MemoryDecision) -> list[str]:
    """The `pie-engine serve` flags (engine contract), then the user's extra args."""
    m = spec.model
    args = ["--model", m.path, "--host", "0.0.0.0", "--port", str(spec.engine.port),
            "--served-model-name", m.served_model_name or name, "--dtype", m.dtype]
    if m.max_model_len is not None:
        args += ["--max-model-len", str(m.max_model_len)]
    args += [BUDGET_FLAG, decision.gpu_memory_budget, "--expansion", decision.expansion]
    if decision.expansion_latency_target is not None:
        # str(float): the shortest text that reads back as the same float ("0.05"); "%g" would drop digits
        args += ["--expansion-latency-target", str(decision.expansion_latency_target)]
    if decision.host_memory_limit is not None:
        args += ["--host-memory-limit", str(decision.host_memory_limit)]
    args += ["--admin-token-file", ADMIN_TOKEN_FILE, "--admin-port", str(spec.engine.admin_port)]
    return args + list(spec.engine.args)


def owned_names(name: str, *, network_policy: bool = False) -> dict[str, str]:
    """kind -> name of the objects besides pods that PieDeployment `name` owns and keeps as rendered here
    (`network_policy`: the operator knows its own pods, so it renders `admin_network_policy`)."""
    names = {"Service": name, "ConfigMap": f"{name}-engine", "PodDisruptionBudget": name}
    return {**names, "NetworkPolicy": f"{name}-admin"} if network_policy else names


def admin_secret_name(name: str) -> str:
    """The Secret with the engines' admin token (the operator creates it; see k8s.ensure_admin_token)."""
    return f"{name}-admin-token"


def admin_secret(name: str, namespace: str, token: str, owner: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": admin_secret_name(name), "namespace": namespace, "labels": common_labels(name),
                     "ownerReferences": [owner]},
        "stringData": {ADMIN_TOKEN_KEY: token},
    }


def _model_volume(spec: PieDeploymentSpec) -> dict[str, Any] | None:
    src = spec.model.source
    if src.pvc is not None:
        return {"name": "model", "persistentVolumeClaim": {"claimName": src.pvc.claim_name, "readOnly": True}}
    if src.host_path is not None:
        return {"name": "model", "hostPath": {"path": src.host_path.path, "type": "Directory"}}
    return None  # source: image -- the checkpoint is already in the image


def _probe(port_name: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": "/health", "port": port_name}, "periodSeconds": period,
            "timeoutSeconds": 3, "failureThreshold": failures}


def _container(spec: PieDeploymentSpec, name: str, decision: MemoryDecision) -> dict[str, Any]:
    gpus = str(spec.gpu.count)
    mem_request, mem_limit = pod_memory(spec.memory, decision)
    requests = {**spec.engine.resources.requests, "memory": mem_request, "nvidia.com/gpu": gpus}
    limits = {**spec.engine.resources.limits, "nvidia.com/gpu": gpus}
    if mem_limit is not None:
        limits["memory"] = mem_limit
    # HOME and caches point at the writable /tmp emptyDir: the root filesystem is read-only.
    env = [{"name": "HOME", "value": TMP_DIR}, {"name": "XDG_CACHE_HOME", "value": f"{TMP_DIR}/.cache"},
           {"name": "TRITON_CACHE_DIR", "value": f"{TMP_DIR}/.triton"}]
    env += [e.model_dump(by_alias=True, exclude_none=True) for e in spec.engine.env]
    mounts = [{"name": "tmp", "mountPath": TMP_DIR}, {"name": "dshm", "mountPath": SHM_DIR},
              {"name": "admin-token", "mountPath": ADMIN_DIR, "readOnly": True}]
    if _model_volume(spec) is not None:
        mount = {"name": "model", "mountPath": spec.model.path, "readOnly": True}
        if spec.model.source.pvc is not None and spec.model.source.pvc.sub_path:
            mount["subPath"] = spec.model.source.pvc.sub_path
        mounts.append(mount)
    return {
        "name": ENGINE_CONTAINER,
        "image": spec.engine.image,
        "imagePullPolicy": spec.engine.image_pull_policy,
        "command": ["pie-engine", "serve"],
        "args": engine_args(spec, name, decision),
        # `admin`: the GPU-budget endpoint, for the operator only (admin_network_policy); no Service targets it.
        "ports": [{"name": "http", "containerPort": spec.engine.port, "protocol": "TCP"},
                  {"name": "admin", "containerPort": spec.engine.admin_port, "protocol": "TCP"}],
        "env": env,
        "resources": {"requests": requests, "limits": limits},
        # The memory request follows the adaptive pool: resizing it must not restart the engine (KV would be lost).
        "resizePolicy": [{"resourceName": "memory", "restartPolicy": "NotRequired"},
                         {"resourceName": "cpu", "restartPolicy": "NotRequired"}],
        # Loading a large checkpoint takes minutes: the startup probe holds liveness off for up to 20 minutes.
        "startupProbe": _probe("http", 5, 240),
        "readinessProbe": _probe("http", 5, 3),
        "livenessProbe": _probe("http", 10, 6),
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": mounts,
    }


def pod_template(spec: PieDeploymentSpec, name: str, decision: MemoryDecision) -> dict[str, Any]:
    """The desired pod (without name, hash label and owner): what every replica of this revision runs."""
    # The admin token: readable by the engine's group only (fsGroup), never by other users in the container.
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}},
                                     {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                                     {"name": "admin-token", "secret": {"secretName": admin_secret_name(name),
                                                                        "defaultMode": 0o440}}]
    if (mv := _model_volume(spec)) is not None:
        volumes.append(mv)
    port = str(spec.engine.port)
    return {
        "metadata": {
            "labels": common_labels(name),
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": port,
                            "prometheus.io/path": "/metrics"},
        },
        "spec": {
            "restartPolicy": "Always",
            "enableServiceLinks": False,  # no *_SERVICE_HOST env clutter in the engine
            "automountServiceAccountToken": False,  # the engine never talks to the apiserver
            "terminationGracePeriodSeconds": 30,
            "nodeSelector": dict(sorted(spec.gpu.node_selector.items())),
            "tolerations": [t.model_dump(by_alias=True, exclude_none=True) for t in spec.gpu.tolerations],
            "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [_container(spec, name, decision)],
            "volumes": volumes,
        },
    }


def template_hash(template: dict[str, Any]) -> str:
    """10 hex chars over the template WITHOUT the container memory request/limit and the --gpu-memory-budget value
    (those follow the per-pod decisions and change in place or live; see memory.py, tuning.py), so a new memory or
    GPU-budget decision is not a new revision."""
    t = copy.deepcopy(template)
    for c in t["spec"]["containers"]:
        for part in ("requests", "limits"):
            c.get("resources", {}).get(part, {}).pop("memory", None)
        args = c.get("args") or []
        if BUDGET_FLAG in args[:-1]:
            args[args.index(BUDGET_FLAG) + 1] = "*"
    canonical = json.dumps(t, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def with_memory(template: dict[str, Any], request: str, limit: str | None, budget: str) -> dict[str, Any]:
    """`template` (e.g. the last good revision's, kept in status) with the current memory request/limit and GPU
    budget: the values outside the hash follow the latest decisions whatever the revision."""
    t = copy.deepcopy(template)
    for c in t["spec"]["containers"]:
        if c.get("name") != ENGINE_CONTAINER:
            continue
        res = c.setdefault("resources", {})
        res.setdefault("requests", {})["memory"] = request
        if limit is None:
            res.get("limits", {}).pop("memory", None)
        else:
            res.setdefault("limits", {})["memory"] = limit
        args = c.get("args") or []
        if BUDGET_FLAG in args[:-1]:
            args[args.index(BUDGET_FLAG) + 1] = budget
    return t


def pod(template: dict[str, Any], name: str, namespace: str, revision: str, owner: dict[str, Any]) -> dict[str, Any]:
    """A Pod object for the apiserver: the apiserver appends 5 random chars to `<name>-<revision>-`."""
    p = copy.deepcopy(template)
    p["apiVersion"], p["kind"] = "v1", "Pod"
    p["metadata"].update({"generateName": f"{name}-{revision}-", "namespace": namespace, "ownerReferences": [owner]})
    p["metadata"]["labels"][HASH_LABEL] = revision
    return p


def service(spec: PieDeploymentSpec, name: str, namespace: str, owner: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": common_labels(name), "ownerReferences": [owner]},
        "spec": {"type": spec.service.type, "selector": {**selector_labels(name), SERVING_LABEL: "true"},
                 "ports": [{"name": "http", "port": spec.service.port, "targetPort": "http", "protocol": "TCP"}]},
    }


def config_map(spec: PieDeploymentSpec, name: str, namespace: str, revision: str, decision: MemoryDecision,
               owner: dict[str, Any]) -> dict[str, Any]:
    """The rendered engine configuration (what the pods of `revision` run, and the memory policy behind it), for
    people and tools (`kubectl get cm <name>-engine -o yaml`); pods do not mount it."""
    request, limit = pod_memory(spec.memory, decision)
    rendered = {
        "revision": revision,
        "command": ["pie-engine", "serve", *engine_args(spec, name, decision)],
        "memory": {"policy": spec.memory.model_dump(by_alias=True, exclude_none=True),
                   "hostPoolBytes": decision.host_pool_bytes, "request": request, "limit": limit},
    }
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": owned_names(name)["ConfigMap"], "namespace": namespace, "labels": common_labels(name),
                     "ownerReferences": [owner]},
        "data": {"engine.json": json.dumps(rendered, indent=2, sort_keys=True) + "\n"},
    }


def pod_disruption_budget(spec: PieDeploymentSpec, name: str, namespace: str, owner: dict[str, Any]) -> dict[str, Any]:
    """Voluntary disruptions (node drains) take at most rollout.maxUnavailable engines at a time."""
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": namespace, "labels": common_labels(name), "ownerReferences": [owner]},
        "spec": {"maxUnavailable": spec.rollout.max_unavailable, "selector": {"matchLabels": selector_labels(name)}},
    }


def admin_network_policy(spec: PieDeploymentSpec, name: str, namespace: str, owner: dict[str, Any],
                         peer: AdminPeer) -> dict[str, Any]:
    """Ingress to the engine pods: their public port from anywhere (as without a policy), their admin port only
    from the operator's pods. NOTE: NetworkPolicies add up, so another policy that admits all ports to these pods
    opens the admin port too; the bearer token still guards it."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": owned_names(name, network_policy=True)["NetworkPolicy"], "namespace": namespace,
                     "labels": common_labels(name), "ownerReferences": [owner]},
        "spec": {
            "podSelector": {"matchLabels": selector_labels(name)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"ports": [{"port": spec.engine.port, "protocol": "TCP"}]},
                {"ports": [{"port": spec.engine.admin_port, "protocol": "TCP"}],
                 "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": peer.namespace}},
                           "podSelector": {"matchLabels": dict(sorted(peer.labels.items()))}}]},
            ],
        },
    }
