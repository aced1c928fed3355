"""Observe: everything one reconcile pass decides from, read once at its start into an immutable `Snapshot`.

Only reads: the apiserver through `k8s.Kube`, the engines through the operator's latest scrapes (observe.py). The
decision (decide.py) is a pure function of the snapshot, so anything it may depend on has to be in here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from pie_operator import builders
from pie_operator.config import ACCOUNTABLE_MODES, OperatorConfig, host_path_violation
from pie_operator.k8s import Kube, secret_value
from pie_operator.observe import Observations, PodView
from pie_operator.planning import Pod
from pie_operator.spec import PieDeploymentSpec


def validation_message(err: ValidationError) -> str:
    """A pydantic error as one line a user can act on: `spec.memory.hostMemory: <why>; ...`."""
    parts = []
    for e in err.errors():
        where = ".".join(["spec", *(str(x) for x in e["loc"])])
        parts.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


@dataclass(frozen=True)
class Snapshot:
    """One PieDeployment and what surrounds it, as seen at `now`."""

    body: dict[str, Any]  # the PieDeployment as read (metadata, spec, status)
    now: datetime
    spec: PieDeploymentSpec | None = None  # None: the spec is invalid (`invalid` says why); nothing else is read
    invalid: str = ""
    pods: list[Pod] = field(default_factory=list)  # the pods it controls, terminating and finished ones included
    owned: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # Service etc. as read (None: absent)
    admin_token: str = ""  # "": the Secret is missing or holds no token yet
    views: dict[str, PodView] = field(default_factory=dict)  # pod name -> its latest scrape and sample window
    # memory.apply is InPlace and the apiserver serves pods/resize; None: InPlace, but the apiserver could not say
    resize_supported: bool | None = False
    config: OperatorConfig = field(default_factory=OperatorConfig)  # the operator's own flags
    node_modes: dict[str, str] = field(default_factory=dict)  # node -> its GPU memory mode, where not accountable
    evaluated_at: float | None = None  # when this operator last evaluated the autoscaler's windows (scaling.py)

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def generation(self) -> int:
        return int(self.body["metadata"].get("generation", 0))

    @property
    def previous(self) -> dict[str, Any]:
        """The status as the previous pass left it (where everything that must survive a restart lives)."""
        return self.body.get("status") or {}

    @property
    def selector(self) -> str:
        return builders.selector_string(self.name)


def observe(kube: Kube, body: dict[str, Any], *, now: datetime, observations: Observations | None,
            config: OperatorConfig | None = None) -> Snapshot:
    """Read what a pass over PieDeployment `body` (as just read) needs, under the operator's `config`."""
    config = config or OperatorConfig()
    try:
        spec = PieDeploymentSpec.model_validate(body.get("spec") or {})
    except ValidationError as e:
        return Snapshot(body=body, now=now, invalid=validation_message(e), config=config)
    if why := host_path_violation(spec, config.host_path_allow):  # valid for the CRD, not for this cluster
        return Snapshot(body=body, now=now, invalid=why, config=config)
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    secret = kube.get("Secret", namespace, builders.admin_secret_name(name))
    views = {} if observations is None else observations.view(
        (namespace, name), now.timestamp(), spec.memory.tuning.window_seconds)
    pods = kube.list_pods(namespace, builders.selector_string(name), meta["uid"])
    owned = builders.owned_names(name, network_policy=config.admin_peer is not None)
    return Snapshot(
        body=body, now=now, spec=spec, pods=pods,
        owned={kind: kube.get(kind, namespace, n) for kind, n in owned.items()},
        admin_token=secret_value(secret, builders.ADMIN_TOKEN_KEY),
        views=views,
        # Asked only when it matters (the real client caches the answer per process).
        resize_supported=spec.memory.apply == "InPlace" and kube.supports_resize(),
        config=config, node_modes=_node_modes(kube, config.memory_mode_label, pods),
        evaluated_at=None if observations is None else observations.evaluated((namespace, name)))


def _node_modes(kube: Kube, label: str, pods: list[Pod]) -> dict[str, str]:
    """Only the nodes whose `label` names a mode other than the accountable ones: usually none, so the answer stays
    small however many GPU nodes there are. Not asked without a scheduled pod."""
    if not label or not any(p.get("spec", {}).get("nodeName") for p in pods):
        return {}
    selector = ",".join([label, *(f"{label}!={m}" for m in ACCOUNTABLE_MODES)])
    return {n["metadata"]["name"]: n["metadata"].get("labels", {}).get(label, "") for n in kube.list_nodes(selector)}
