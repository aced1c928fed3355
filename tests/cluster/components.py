"""Command lines of the control-plane components (etcd, kube-apiserver, controller-manager, scheduler, kwok)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.cluster.certs import Credentials
from tests.cluster.nodes import KWOK_ANNOTATION

# NOTE: the apiserver accepts a loopback service range; nothing ever connects to a cluster IP here, and loopback keeps
# every address the cluster hands out inside 127.0.0.0/8. It must not overlap the pod ranges 127.0.<i+1>.0/24.
SERVICE_CIDR = "127.100.0.0/16"
# kwok's fallback pod range for a managed node without spec.podCIDR (ours always have one).
KWOK_FALLBACK_CIDR = "127.0.0.0/24"
STAGES = Path(__file__).with_name("kwok-stages.yaml")
AUDIT_POLICY = Path(__file__).with_name("audit-policy.yaml")


@dataclass(frozen=True)
class Layout:
    """Where one cluster keeps its files and which loopback ports it listens on."""

    state: Path
    bin: Path
    creds: Credentials
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int

    def kubeconfig(self, who: str) -> Path:
        return self.state / f"{who}.kubeconfig"

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver}"


def etcd(lay: Layout) -> list[str]:
    client, peer = f"http://127.0.0.1:{lay.etcd_client}", f"http://127.0.0.1:{lay.etcd_peer}"
    return [
        str(lay.bin / "etcd"), "--name=pie", f"--data-dir={lay.state / 'etcd'}",
        f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}", f"--initial-cluster=pie={peer}",
        "--initial-cluster-state=new", "--log-level=warn",
        # Throwaway test data: skipping fsync makes every write (and so the whole suite) much faster.
        "--unsafe-no-fsync",
    ]


def apiserver(lay: Layout) -> list[str]:
    c = lay.creds
    return [
        str(lay.bin / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{lay.etcd_client}",
        "--bind-address=127.0.0.1", f"--secure-port={lay.apiserver}", "--advertise-address=127.0.0.1",
        f"--cert-dir={lay.state / 'apiserver'}", f"--tls-cert-file={c.server_cert}",
        f"--tls-private-key-file={c.server_key}", f"--client-ca-file={c.ca_cert}",
        f"--service-account-key-file={c.sa_pub}", f"--service-account-signing-key-file={c.sa_key}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        "--authorization-mode=Node,RBAC", f"--service-cluster-ip-range={SERVICE_CIDR}",
        # The default reconciler would publish 127.0.0.1 as the `kubernetes` service endpoint, which Endpoints
        # validation rejects (loopback); nothing in this cluster dials that service anyway.
        "--endpoint-reconciler-type=none",
        f"--requestheader-client-ca-file={c.front_proxy_ca}", "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={c.front_proxy_cert}", f"--proxy-client-key-file={c.front_proxy_key}",
        "--allow-privileged=true", "--profiling=false", "--v=0",
        # One JSON line per request (no bodies): what tests and the scale benchmark count API calls from.
        f"--audit-policy-file={AUDIT_POLICY}", f"--audit-log-path={audit_log(lay.state)}", "--audit-log-format=json",
        "--audit-log-maxsize=500", "--audit-log-maxbackup=1",
    ]


def audit_log(state: Path) -> Path:
    """Where the apiserver of the cluster in `state` writes its audit log."""
    return state / "logs" / "audit.log"


def _common_secure(lay: Layout, who: str, port: int) -> list[str]:
    kc = lay.kubeconfig(who)
    return [
        f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
        "--bind-address=127.0.0.1", f"--secure-port={port}", f"--cert-dir={lay.state / who}",
        "--leader-elect=false", "--profiling=false",
    ]


def controller_manager(lay: Layout) -> list[str]:
    c = lay.creds
    return [
        str(lay.bin / "kube-controller-manager"), *_common_secure(lay, "controller-manager", lay.controller_manager),
        # Every controller talks to the apiserver as its own service account, with its bootstrap RBAC role.
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={c.sa_key}", f"--root-ca-file={c.ca_cert}",
        f"--cluster-signing-cert-file={c.ca_cert}", f"--cluster-signing-key-file={c.ca_key}",
        # Node IPAM stays off (the default): the node manifests carry their own 127.0.<i+1>.0/24 podCIDR.
        "--allocate-node-cidrs=false", "--controllers=*",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
    ]


def scheduler(lay: Layout) -> list[str]:
    return [str(lay.bin / "kube-scheduler"), *_common_secure(lay, "scheduler", lay.scheduler)]


def kwok(lay: Layout) -> list[str]:
    return [
        str(lay.bin / "kwok"), f"--kubeconfig={lay.kubeconfig('kwok')}", f"--config={STAGES}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION[0]}={KWOK_ANNOTATION[1]}",
        "--node-ip=127.0.0.1", f"--cidr={KWOK_FALLBACK_CIDR}", "--node-lease-duration-seconds=40",
    ]
