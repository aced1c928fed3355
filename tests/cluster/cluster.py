"""A real local control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok on 127.0.0.1.

Usage::

    with Cluster(tmp_path / "k8s") as c:       # or c = Cluster(...); c.start(); ...; c.stop()
        c.kubectl("get", "nodes")

Every cluster has its own state dir (certs, kubeconfigs, etcd data, one log per component) and free ports, so
several can run at once. Processes are stopped on ``stop()``, at interpreter exit, on SIGTERM/SIGHUP, and (through
PR_SET_PDEATHSIG) when the Python process dies hard; ``detach=True`` (``python -m tests.cluster up``) skips all of
that so the cluster outlives the command, and ``Cluster.down(state_dir)`` stops it later from its pid file.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from tests.cluster import build, components, nodes
from tests.cluster.api import Api, probe
from tests.cluster.certs import generate, kubeconfig
from tests.cluster.procs import ClusterError, Proc, cmdline, free_ports, pid_alive, terminate

PIDS = "pids.json"
# What a cluster runs (helm is not needed to run one: `build.build(["helm"])` if a test wants it).
BINARIES = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok"]
_live: set[Cluster] = set()
_handlers_installed = False


class KubectlError(subprocess.CalledProcessError):
    """kubectl failed; unlike CalledProcessError, str() includes what kubectl printed."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"


class Cluster:
    """One local control plane with ``nodes`` kwok-managed fake GH200 nodes (``gh200-0`` ...)."""

    def __init__(self, state_dir: Path, nodes: int = 2, detach: bool = False) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.nodes = nodes
        self.detach = detach
        self.kubeconfig: Path = self.state_dir / "kubeconfig"
        # The CA that signed the apiserver's serving cert, for clients that authenticate some other way (SA tokens).
        self.ca_cert: Path = self.state_dir / "pki" / "ca.crt"
        self.bin_dir: Path = build.bin_dir()
        self.api_url = ""
        self.env: dict[str, str] = dict(os.environ)
        self._procs: list[Proc] = []
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> Cluster:
        """Start every component and return once nodes are Ready and ``default/default`` ServiceAccount exists."""
        self.bin_dir = build.build(BINARIES)
        _prepare_state_dir(self.state_dir)
        for attempt in range(3):
            if not self.detach:
                _register(self)  # (again after a retry: stop() unregisters)
            try:
                self._start_once(timeout)
                return self
            except ClusterError as e:
                self.stop()
                # Free ports are picked before the components bind them; another cluster may win the race.
                if "address already in use" not in str(e) or attempt == 2:
                    raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> None:
        t0 = time.monotonic()
        deadline = t0 + timeout
        st = self.state_dir
        for sub in ("etcd", "pki", "logs"):
            shutil.rmtree(st / sub, ignore_errors=True)
        (st / "logs").mkdir(parents=True)
        creds = generate(st / "pki")
        lay = components.Layout(st, self.bin_dir, creds, *free_ports(5))
        self.api_url = lay.api_url
        kubeconfig(self.kubeconfig, self.api_url, creds.ca_cert, *creds.clients["admin"], "kubernetes-admin")
        for who in ("controller-manager", "scheduler", "kwok"):
            kubeconfig(lay.kubeconfig(who), self.api_url, creds.ca_cert, *creds.clients[who], who)
        self.env = {**os.environ, "KUBECONFIG": str(self.kubeconfig),
                    "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                    # Per-cluster discovery cache: ports get reused, and a stale cache hides freshly added CRDs.
                    "KUBECACHEDIR": str(st / "kube-cache")}
        api = Api(self.api_url, creds.ca_cert, *creds.clients["admin"])

        etcd = self._spawn("etcd", components.etcd(lay))
        self._wait("etcd /health", [etcd], deadline,
                   lambda: probe(f"http://127.0.0.1:{lay.etcd_client}/health"))
        apiserver = self._spawn("kube-apiserver", components.apiserver(lay))
        self._wait("kube-apiserver /readyz", [apiserver], deadline, lambda: api.request("GET", "/readyz")[0] == 200)
        # The rest only needs the apiserver, so they start together.
        kcm = self._spawn("kube-controller-manager", components.controller_manager(lay))
        sched = self._spawn("kube-scheduler", components.scheduler(lay))
        # kwok reads ~/.kwok/kwok.yaml if present; a private HOME keeps a user's config out of the tests.
        (st / "kwok-home").mkdir(exist_ok=True)
        kwok = self._spawn("kwok", components.kwok(lay), env={**os.environ, "HOME": str(st / "kwok-home")})
        for i in range(self.nodes):
            status, text = api.request("POST", "/api/v1/nodes", nodes.gh200_node(i))
            if status not in (200, 201):
                raise apiserver.failure(f"creating node {nodes.node_name(i)}: HTTP {status} {text}")
        self._wait("kube-controller-manager /healthz", [kcm], deadline,
                   lambda: probe(f"https://127.0.0.1:{lay.controller_manager}/healthz"))
        self._wait("kube-scheduler /healthz", [sched], deadline,
                   lambda: probe(f"https://127.0.0.1:{lay.scheduler}/healthz"))
        self._wait(f"{self.nodes} Ready node(s) without not-ready taints", [kwok, kcm], deadline,
                   lambda: self._nodes_ready(api))
        self._wait("ServiceAccount default/default", [kcm], deadline,
                   lambda: api.get_json("/api/v1/namespaces/default/serviceaccounts/default") is not None)
        self._write_info(lay, time.monotonic() - t0)

    def _nodes_ready(self, api: Api) -> bool:
        got = api.get_json("/api/v1/nodes?labelSelector=type%3Dkwok")
        items = (got or {}).get("items", [])
        return len(items) == self.nodes and all(nodes.is_ready(n) for n in items)

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, args, self.state_dir / "logs" / f"{name}.log", env)
        proc.start(self.detach)
        self._procs.append(proc)
        # Written after every spawn so `down` finds even a half-started cluster.
        (self.state_dir / PIDS).write_text(json.dumps({p.name: p.pid for p in self._procs}))
        return proc

    def _wait(self, what: str, blame: list[Proc], deadline: float, ready: Any) -> None:
        while True:
            for p in self._procs:
                rc = p.exited()
                if rc is not None:
                    raise p.failure(f"exited with code {rc} while waiting for {what}")
            with contextlib.suppress(OSError, ValueError):
                if ready():
                    return
            if time.monotonic() > deadline:
                errs = [str(p.failure(f"timed out waiting for {what}")) for p in blame]
                raise ClusterError("\n\n".join(errs))
            time.sleep(0.1)

    def _write_info(self, lay: components.Layout, startup_s: float) -> None:
        info = {"api_url": self.api_url, "kubeconfig": str(self.kubeconfig), "bin_dir": str(self.bin_dir),
                "nodes": self.nodes, "startup_seconds": round(startup_s, 2),
                "ports": {"etcd": lay.etcd_client, "etcd_peer": lay.etcd_peer, "apiserver": lay.apiserver,
                          "controller_manager": lay.controller_manager, "scheduler": lay.scheduler},
                "pids": {p.name: p.pid for p in self._procs}}
        (self.state_dir / "cluster.json").write_text(json.dumps(info, indent=2))

    def stop(self) -> None:
        """Stop every component (SIGTERM, then SIGKILL), check none survived, drop etcd data. Idempotent."""
        with self._lock:
            _live.discard(self)
            # Only still-running children: an exited one was reaped, so its pid may belong to someone else now.
            live = [p for p in self._procs if p.exited() is None]
            popens = [p.popen for p in live if p.popen is not None]
            survivors = _stop_dir(self.state_dir, [p.pid for p in live], popens)
            self._procs = []
        if survivors:
            raise ClusterError(f"processes survived SIGKILL: {survivors}")

    @classmethod
    def attach(cls, state_dir: Path) -> Cluster:
        """A handle on a detached cluster that ``start()`` left running in ``state_dir`` (it manages no processes)."""
        state_dir = Path(state_dir).resolve()
        info = json.loads((state_dir / "cluster.json").read_text())
        c = cls(state_dir, info["nodes"], detach=True)
        c.api_url = info["api_url"]
        c.env["KUBECONFIG"] = info["kubeconfig"]
        c.env["KUBECACHEDIR"] = str(state_dir / "kube-cache")
        return c

    @classmethod
    def down(cls, state_dir: Path) -> None:
        """Stop a (detached) cluster from its pid file and remove its state dir."""
        state_dir = Path(state_dir).resolve()
        survivors = _stop_dir(state_dir, [], [])
        if survivors:
            raise ClusterError(f"processes survived SIGKILL: {survivors}")
        shutil.rmtree(state_dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- tools -------------------------------------------------------------------------------------------------
    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this cluster (text mode, output captured)."""
        cmd = [str(self.bin_dir / "kubectl"), *args]
        cp = subprocess.run(cmd, input=input, text=True, capture_output=True, env=self.env, timeout=timeout)
        if check and cp.returncode != 0:
            raise KubectlError(cp.returncode, cmd, cp.stdout, cp.stderr)
        return cp

    def apply_crds(self, crd_dir: Path, timeout: int = 60) -> list[str]:
        """``kubectl apply`` every manifest in ``crd_dir`` and wait until each CRD is Established; returns names."""
        crd_dir = Path(crd_dir)
        if not any(crd_dir.glob("*.y*ml")) and not any(crd_dir.glob("*.json")):
            return []
        out = self.kubectl("apply", "-f", str(crd_dir), "-o", "name", timeout=timeout).stdout.split()
        names = [n for n in out if n.startswith("customresourcedefinition")]
        if names:
            self.kubectl("wait", "--for=condition=Established", f"--timeout={timeout}s", *names, timeout=timeout + 10)
        return names


def _prepare_state_dir(state_dir: Path) -> None:
    """Refuse to start over a running cluster; otherwise clear what a previous (crashed) one left."""
    pids = _recorded_pids(state_dir)
    running = [p for p in pids if pid_alive(p) and owns_process(p, state_dir)]
    if running:
        raise ClusterError(f"a cluster is already running in {state_dir} (pids {running}); "
                           f"stop it with `python -m tests.cluster down --state-dir {state_dir}`")
    state_dir.mkdir(parents=True, exist_ok=True)


def _recorded_pids(state_dir: Path) -> list[int]:
    try:
        return [int(p) for p in json.loads((state_dir / PIDS).read_text()).values()]
    except (FileNotFoundError, ValueError):
        return []


def owns_process(pid: int, state_dir: Path) -> bool:
    """A process running one of the component binaries with this state dir on its command line.

    NOTE: recorded pids are checked with this too: one may have been recycled by an unrelated process since.
    """
    cl = cmdline(pid)
    return bool(cl) and Path(cl.split(" ", 1)[0]).name in BINARIES and str(state_dir) + os.sep in cl


def _stop_dir(state_dir: Path, pids: list[int], popens: list[subprocess.Popen[bytes]]) -> list[int]:
    candidates = set(pids) | set(_recorded_pids(state_dir)) | _scan(state_dir)
    targets = sorted(p for p in candidates if p in pids or owns_process(p, state_dir))
    # etcd goes last: a stopping apiserver still writes to it (it deletes its identity lease).
    etcd = [p for p in targets if Path(cmdline(p).split(" ", 1)[0]).name == "etcd"]
    survivors = terminate([p for p in targets if p not in etcd], popens)
    survivors += terminate(etcd, popens)
    # Anything that still runs our binaries over this state dir (e.g. from a pid file lost in a crash) goes too.
    survivors += terminate(sorted(_scan(state_dir) - set(survivors)))
    (state_dir / PIDS).unlink(missing_ok=True)
    shutil.rmtree(state_dir / "etcd", ignore_errors=True)
    return survivors


def _scan(state_dir: Path) -> set[int]:
    return {int(d.name) for d in Path("/proc").iterdir()
            if d.name.isdigit() and int(d.name) != os.getpid() and owns_process(int(d.name), state_dir)
            and pid_alive(int(d.name))}


def _stop_all() -> None:
    for c in list(_live):
        with contextlib.suppress(Exception):
            c.stop()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _stop_all()
    # Then die of the same signal, as if no handler had been installed.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _register(c: Cluster) -> None:
    global _handlers_installed
    _live.add(c)
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_stop_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            # Leave handlers that someone else installed alone.
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)
