"""The operator's own settings (flags set by the Helm chart, not by PieDeployments), and the pure rules that only
they drive: which hostPath model sources are allowed, who may reach the engines' admin port, and which GPU memory
modes a node may report (docs/operator.md, "Security" and "Running on GH200").
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from pie_operator.spec import PieDeploymentSpec

# The node label saying how the NVIDIA driver manages a coherent GPU's memory. NVIDIA's GPU feature discovery
# publishes no such label, so this one is Pie's: admins (or an NFD rule) set it; see docs/operator.md.
MEMORY_MODE_LABEL = "pie.io/gpu-memory-mode"
# Modes whose memory the operator can account for: in CDMM the driver, not the OS, owns the GPU's memory, so a pod's
# memory request and limit are about host memory only, which is what the operator sizes.
ACCOUNTABLE_MODES = ("cdmm",)
MEMORY_MODE_CONDITION = "MemoryModeUnsupported"
HOST_PATH_VALUE = "hostPathAllowlist"  # the chart value behind --host-path-allow


@dataclass(frozen=True)
class AdminPeer:
    """The operator's pods, as a NetworkPolicy peer: the only clients admitted to an engine's admin port."""

    namespace: str
    labels: dict[str, str]


@dataclass(frozen=True)
class OperatorConfig:
    """Cluster-wide policy the operator applies to every PieDeployment (defaults: the strictest)."""

    host_path_allow: tuple[str, ...] = ()  # absolute directory prefixes hostPath model sources may use
    admin_peer: AdminPeer | None = None  # None: no NetworkPolicy (the operator runs outside the cluster)
    memory_mode_label: str = ""  # "": nodes' memory modes are not checked (no nodes read)


def parse_labels(text: str) -> dict[str, str]:
    """`k=v,k2=v2` (a chart-rendered selector) -> a dict; raises ValueError naming the bad part."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"{part!r} is not key=value")
        out[key] = value
    return out


def normalize_allow(prefixes: list[str]) -> tuple[str, ...]:
    """The allowlist as given by flags; raises ValueError for a prefix that is not an absolute, normalized path
    (a typo here would silently allow nothing, or everything)."""
    out = []
    for p in prefixes:
        if not p.startswith("/") or posixpath.normpath(p) != p.rstrip("/") and p != "/":
            raise ValueError(f"--host-path-allow {p!r}: must be an absolute, normalized directory path like /models")
        out.append(p)
    return tuple(out)


def host_path_violation(spec: PieDeploymentSpec, allow: tuple[str, ...]) -> str:
    """Why the spec's hostPath model source is not allowed ("" when it is, or there is none). A hostPath volume
    reads any directory of the node, so only directories the cluster admin listed may be mounted."""
    src = spec.model.source.host_path
    if src is None:
        return ""
    path = src.path
    # `..` could climb out of an allowed directory; the kubelet would resolve it, so it is refused outright.
    if ".." in path.split("/") or posixpath.normpath(path) != path.rstrip("/") and path != "/":
        return (f"spec.model.source.hostPath.path {path!r} must be a normalized absolute path (no '..', '.', or "
                "repeated '/')")
    if any(a == "/" or path == a.rstrip("/") or path.startswith(a.rstrip("/") + "/") for a in allow):
        return ""
    allowed = ", ".join(allow) if allow else "none"
    return (f"spec.model.source.hostPath.path {path!r} is not under an allowed directory (allowed: {allowed}): a "
            f"hostPath source can read any directory of the node, so the cluster admin must list it in the "
            f"operator's Helm value {HOST_PATH_VALUE} (flag --host-path-allow), or use a pvc or image source")


def memory_mode_problems(pods: list[dict[str, Any]], node_modes: dict[str, str], label: str) -> list[str]:
    """One line per running pod on a node whose `label` reports a GPU memory mode the operator cannot account for
    (`node_modes`: node name -> that label's value, for nodes that carry it)."""
    out = []
    for p in sorted(pods, key=lambda p: p["metadata"]["name"]):
        node = p.get("spec", {}).get("nodeName") or ""
        mode = node_modes.get(node)
        if p["metadata"].get("deletionTimestamp") or mode is None or mode.lower() in ACCOUNTABLE_MODES:
            continue
        out.append(f"pod {p['metadata']['name']} runs on node {node} with {label}={mode}")
    return out


def memory_mode_condition(problems: list[str], label: str) -> tuple[bool, str, str]:
    """(status, reason, message) of the MemoryModeUnsupported condition."""
    if not problems:
        return False, "AsExpected", f"no engine pod on a node whose {label} is other than cdmm"
    return True, "UnsupportedNodeMemoryMode", (
        "; ".join(problems) + ": outside CDMM mode the OS manages the GPU's memory as a NUMA node, so the node "
        "over-reports its memory and pod memory limits do not mean what the operator sized them for; switch the "
        "driver to CDMM (docs/operator.md, Running on GH200)")
