"""Real engines behind kwok's pods: kwok marks pods Ready but runs nothing, so `EngineFleet` plays the containers.

It watches one PieDeployment's pods and, for each Ready pod, starts a real process listening on the pod's loopback IP
(127.0.x.y): by default `python -m pie_engine serve` with the pod's OWN container args (what the operator rendered),
where only the paths that exist inside a container are mapped to this machine (--model -> a tiny local checkpoint,
--admin-token-file -> a file holding the token from the operator's Secret) and --host becomes the pod IP. A process
whose pod is gone is stopped. `behaviour(pod)` may instead say "garbage" (an HTTP server whose /metrics is not
Prometheus text) or "none" (nothing listens). `Load` sends OpenAI completions to one engine until stopped.

With `startup_idle`, an engine starts at idle CPU priority (SCHED_IDLE) and gets normal priority once it answers
/health: on a cluster a new replica loads its model on its own node, so here its start must not take CPU from the
engines already serving on the same machine (benchmarks; needs CAP_SYS_NICE to raise the priority again).
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import kubernetes

from tests.cluster.cluster import Cluster
from tests.e2e.helpers import PYTHONPATH, REPO

GARBAGE_SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"status":"ok"}' if self.path == "/health" else b"<html>this is not prometheus</html> 1 2 3"
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
HTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""


def _ready(pod: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions") or [])


def _idle_priority() -> None:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def local_args(args: list[str], ip: str, model: Path, token_file: Path) -> list[str]:
    """The pod's `pie-engine serve` args with the container-only paths mapped to this machine."""
    out, i = [], 0
    mapped = {"--model": str(model), "--host": ip, "--admin-token-file": str(token_file)}
    while i < len(args):
        if args[i] in mapped and i + 1 < len(args):
            out += [args[i], mapped[args[i]]]
            i += 2
        else:
            out.append(args[i])
            i += 1
    return out


class EngineFleet:
    """One process per Ready pod of PieDeployment `name`; `seen` records every pod name ever observed."""

    def __init__(self, k8s: Cluster, namespace: str, name: str, model: Path, workdir: Path,
                 behaviour: Callable[[dict[str, Any]], str] = lambda pod: "engine", startup_idle: bool = False) -> None:
        self.namespace, self.name, self.model, self.workdir, self.behaviour = namespace, name, model, workdir, behaviour
        self.startup_idle = startup_idle
        self.starting: dict[str, tuple[str, str, float]] = {}  # pod uid -> (name, health URL, start), while idle
        self.startup_s: dict[str, float] = {}  # pod name -> seconds from its engine's start to /health (startup_idle)
        self.api = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(str(k8s.kubeconfig)))
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}  # pod uid -> (process, log)
        self.seen: set[str] = set()
        self.started: dict[str, str] = {}  # pod name -> what was started for it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fleet-{name}", daemon=True)

    def __enter__(self) -> EngineFleet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for uid in list(self.procs):
            self._end(uid)

    def _pods(self) -> list[dict[str, Any]]:
        items = self.api.list_namespaced_pod(self.namespace, label_selector=f"pie.io/deployment={self.name}").items
        return [self.api.api_client.sanitize_for_serialization(p) for p in items]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception as e:  # the apiserver may blink; the next round retries
                print(f"fleet {self.name}: {e}", file=sys.stderr)
            self._stop.wait(0.3)

    def _sync(self) -> None:
        alive: set[str] = set()
        for pod in self._pods():
            meta = pod["metadata"]
            self.seen.add(meta["name"])
            if meta.get("deletionTimestamp"):
                continue
            alive.add(meta["uid"])
            ip = pod.get("status", {}).get("podIP")
            if meta["uid"] not in self.procs and ip and _ready(pod):
                self._start(pod, ip)
        for uid in set(self.procs) - alive:
            self._end(uid)
        for uid in list(self.starting):
            self._promote_if_healthy(uid)

    def _promote_if_healthy(self, uid: str) -> None:
        """Normal priority for every thread of a started engine once it answers /health."""
        name, url, started = self.starting[uid]
        try:
            if httpx.get(url, timeout=0.5, trust_env=False).status_code != 200:
                return
        except httpx.HTTPError:
            return
        pid = self.procs[uid][0].pid
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.sched_setscheduler(int(tid), os.SCHED_OTHER, os.sched_param(0))
        del self.starting[uid]
        self.startup_s[name] = round(time.monotonic() - started, 1)

    def _token_file(self) -> Path:
        secret = self.api.read_namespaced_secret(f"{self.name}-admin-token", self.namespace)
        path = self.workdir / "admin-token"
        path.write_text(base64.b64decode(secret.data["token"]).decode())
        return path

    def _start(self, pod: dict[str, Any], ip: str) -> None:
        meta, (container,) = pod["metadata"], pod["spec"]["containers"]
        what = self.behaviour(pod)
        self.started[meta["name"]] = what
        if what == "none":
            self.procs[meta["uid"]] = (subprocess.Popen(["sleep", "3600"]), Path("/dev/null"))
            return
        port = container["ports"][0]["containerPort"]
        if what == "garbage":
            cmd = [sys.executable, "-c", GARBAGE_SERVER, ip, str(port)]
        else:
            cmd = [sys.executable, "-m", "pie_engine", "serve",
                   *local_args(container["args"], ip, self.model, self._token_file()), "--log-level", "warning"]
        log = self.workdir / f"{meta['name']}.log"
        idle = self.startup_idle and what == "engine"
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    env={"PYTHONPATH": PYTHONPATH, "PATH": "/usr/bin:/bin", "HOME": str(self.workdir),
                                         "OMP_NUM_THREADS": "1", "NO_PROXY": "*"},
                                    preexec_fn=_idle_priority if idle else None)
        self.procs[meta["uid"]] = (proc, log)
        if idle:
            self.starting[meta["uid"]] = (meta["name"], f"http://{ip}:{port}/health", time.monotonic())

    def _end(self, uid: str) -> None:
        self.starting.pop(uid, None)
        proc, _ = self.procs.pop(uid)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                         for _, log in self.procs.values() if log.exists() and log.is_file())


class Router:
    """What a Service would route to, polled every `interval` s: `targets`, the URLs (port `port`) of deployment
    `name`'s pods that are Ready and labelled serving; and `timeline`, (time, pods holding a GPU: bound to a node,
    not finished) at each poll, for `gpu_seconds`."""

    def __init__(self, k8s: Cluster, ns: str, name: str, port: int, interval: float = 0.3) -> None:
        self.api = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(str(k8s.kubeconfig)))
        self.ns, self.name, self.port, self.interval = ns, name, port, interval
        self.targets: list[str] = []
        self.timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            items = self.api.list_namespaced_pod(self.ns, label_selector=f"pie.io/deployment={self.name}").items
            self.targets = [f"http://{p.status.pod_ip}:{self.port}" for p in items
                            if p.metadata.deletion_timestamp is None and p.status.pod_ip
                            and (p.metadata.labels or {}).get("pie.io/serving") == "true"
                            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]
            gpus = sum(1 for p in items if p.spec.node_name and p.status.phase not in ("Succeeded", "Failed"))
            self.timeline.append((time.perf_counter(), gpus))
            self._stop.wait(self.interval)

    def gpu_seconds(self, t0: float, t1: float) -> float:
        pts = [(t, n) for t, n in self.timeline if t0 <= t <= t1]
        return sum((b[0] - a[0]) * a[1] for a, b in zip(pts, pts[1:], strict=False))

    def __enter__(self) -> Router:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class Load:
    """`streams` concurrent completion requests, each followed by the next, until stopped: against one engine
    (`url`), or each to a random one of the engines `url()` names at the time (a router; none: wait)."""

    def __init__(self, url: str | Callable[[], list[str]], model: str, streams: int = 6, prompt_words: int = 20,
                 max_tokens: int = 64) -> None:
        self.url, self.model, self.streams = url, model, streams
        self.body = {"model": model, "prompt": " ".join(["tell me a long story"] * (prompt_words // 5)),
                     "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(streams)]
        self.completed, self.errors = 0, []

    def _run(self) -> None:
        with httpx.Client(trust_env=False, timeout=60) as client:
            while not self._stop.is_set():
                if not (url := self.url if isinstance(self.url, str) else random.choice(self.url() or [""])):
                    time.sleep(0.1)
                    continue
                try:
                    r = client.post(f"{url}/v1/completions", json=self.body)
                    if r.status_code == 200:
                        self.completed += 1
                    else:
                        self.errors.append(f"{url}: {r.status_code}: {r.text[:200]}")
                        time.sleep(0.2)
                except httpx.HTTPError as e:
                    self.errors.append(f"{url}: {e!r}")
                    time.sleep(0.2)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=70)
