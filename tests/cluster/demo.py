"""``make demo`` / ``make demo-down``: the whole Pie loop on this machine, with real parts only.

``up``: local control plane with simulated GH200 nodes (tests/cluster) -> ``helm install`` of charts/pie-operator ->
the operator, authenticated as the chart's ServiceAccount, plus real ``pie-engine serve`` processes on the pods'
loopback IPs (kwok runs no containers, so a detached supervisor plays them: tests/e2e/engines.py) -> a PieDeployment
-> completions through the ``openai`` client -> load, so the engine's KV spills into host memory and the operator
resizes the pod's memory request in place -> a summary. Everything keeps running until ``down``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tests.cluster import build
from tests.cluster.cluster import Cluster
from tests.cluster.procs import pid_alive

REPO = Path(__file__).resolve().parents[2]
STATE = REPO / ".demo"
CLUSTER_STATE = STATE / "cluster"
NS, NAME, RELEASE, OP_NS = "pie-demo", "demo", "pie", "pie-system"
PORT = 8000
PYTHONPATH = os.pathsep.join(str(REPO / p) for p in ("engine", "operator", "."))
console = Console(highlight=False)


def manifest() -> dict[str, Any]:
    """The demo's PieDeployment: a tiny model, a device KV budget of a few blocks, host memory for the rest."""
    return {
        "apiVersion": "pie.io/v1alpha1", "kind": "PieDeployment", "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "replicas": 2, "model": {"path": "/models/tiny", "servedModelName": "tiny"},
            # NOTE: adaptive expansion with CPU-sized thresholds. On a CPU-only machine the swap copies compete with
            # compute for the same two cores, so with the default epsilon (5% latency overhead) the controller rightly
            # stays near m = 0 (bench/adaptive.py measures this); the relaxed thresholds let it trade some iteration
            # latency for capacity, as it would on GH200 where NVLink-C2C hides the copies.
            "engine": {"image": "ghcr.io/pie-project/pie-engine:0.1.0", "port": PORT,
                       "args": ["--expansion-epsilon=0.5", "--expansion-grow-overhead=0.3", "--max-num-seqs=16"]},
            "memory": {"gpuMemoryBudget": "2Mi", "base": "16Mi", "headroom": "0",
                       "hostMemory": {"min": "0", "max": "256Mi"}, "expansion": {"mode": "adaptive"},
                       "tuning": {"windowSeconds": 8, "minSamples": 3, "cooldownSeconds": 6,
                                  "changeThresholdPercent": 10}},
            "rollout": {"stepTimeoutSeconds": 60},
        },
    }


def cluster() -> Cluster:
    return Cluster.attach(CLUSTER_STATE)


def step(msg: str) -> None:
    console.print(f"\n[bold cyan]▶ {msg}[/]")


def wait(fn: Any, what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    with console.status(f"waiting for {what}"):
        while time.monotonic() < deadline:
            if (v := fn()) is not None and v is not False:
                return v
            time.sleep(1)
    raise SystemExit(f"timed out waiting for {what} (logs: {STATE / 'logs'})")


def get(c: Cluster, *what: str) -> dict[str, Any]:
    return json.loads(c.kubectl("get", "-n", NS, *what, "-o", "json").stdout)


def token_kubeconfig(c: Cluster) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount: the operator gets exactly the chart's RBAC."""
    sa = json.loads(c.kubectl("get", "sa", "-n", OP_NS, "-l", "app.kubernetes.io/instance=" + RELEASE,
                              "-o", "json").stdout)["items"][0]["metadata"]["name"]
    token = c.kubectl("create", "token", sa, "-n", OP_NS, "--duration=24h").stdout.strip()
    path = STATE / "operator.kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "local", "cluster": {"server": c.api_url, "certificate-authority": str(c.ca_cert)}}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": sa}}],
    }))
    return path


def supervise() -> None:
    """Detached: the operator process and the engine fleet, until SIGTERM."""
    from tests.e2e.engines import EngineFleet

    c = cluster()
    logs = STATE / "logs"
    env = {**c.env, "PYTHONPATH": PYTHONPATH, "KUBECONFIG": str(STATE / "operator.kubeconfig")}
    with (logs / "operator.log").open("ab") as out:
        op = subprocess.Popen([sys.executable, "-m", "pie_operator", "run", "--standalone", "--all-namespaces",
                               "--resync-seconds", "2", "--metrics-interval-seconds", "1"],
                              cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    with EngineFleet(c, NS, NAME, STATE / "model", logs / "engines"):
        while not stop and op.poll() is None:
            time.sleep(0.5)
    op.terminate()
    op.wait(timeout=20)


def up() -> None:
    if (STATE / "supervisor.pid").exists():
        raise SystemExit("a demo is already running: `make demo-down` first")
    (STATE / "logs").mkdir(parents=True, exist_ok=True)
    step("Control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok (built once with go)")
    build.build()
    subprocess.run([sys.executable, "-m", "tests.cluster", "up", "--state-dir", str(CLUSTER_STATE)], check=True,
                   cwd=REPO, stdout=subprocess.DEVNULL)
    c = cluster()
    console.print(c.kubectl("get", "nodes", "-L", "nvidia.com/gpu.product", "-L", "kubernetes.io/arch").stdout)

    step("helm install charts/pie-operator (CRD + operator + least-privilege RBAC)")
    subprocess.run([str(c.bin_dir / "helm"), "install", RELEASE, str(REPO / "charts" / "pie-operator"), "-n", OP_NS,
                    "--create-namespace", "--wait=false"], check=True, env=c.env)
    c.kubectl("wait", "--for=condition=Established", "crd/piedeployments.pie.io", "--timeout=60s")

    step("Tiny model checkpoint (random weights, HF format) and the operator as the chart's ServiceAccount")
    subprocess.run([sys.executable, "-m", "pie_engine", "make-test-model", "--arch", "llama", "--layers", "8",
                    "--hidden", "256", "--out", str(STATE / "model")], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    token_kubeconfig(c)
    with (STATE / "logs" / "supervisor.log").open("ab") as out:
        sup = subprocess.Popen([sys.executable, "-m", "tests.cluster.demo", "supervise"], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": PYTHONPATH}, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    (STATE / "supervisor.pid").write_text(str(sup.pid))

    step(f"kubectl apply: PieDeployment {NS}/{NAME}")
    c.kubectl("create", "namespace", NS, check=False)
    c.kubectl("apply", "-f", "-", input=json.dumps(manifest()))

    def ready() -> dict[str, Any] | None:
        st = get(c, "pied", NAME).get("status", {})
        return st if st.get("phase") == "Ready" and st.get("readyReplicas") == 2 else None

    wait(ready, "2 Ready engine pods whose gates passed (real engines on the pods' IPs)")
    console.print(c.kubectl("get", "pied", "-n", NS).stdout)
    pods = [p for p in get(c, "pods", "-l", f"pie.io/deployment={NAME}")["items"]]
    ips = [p["status"]["podIP"] for p in pods]

    step("Completions through the openai client, straight to each pod IP")
    from openai import OpenAI

    for ip in ips:
        client = OpenAI(base_url=f"http://{ip}:{PORT}/v1", api_key="unused")
        r = client.completions.create(model="tiny", prompt="Pooling CPU memory for the KV cache", max_tokens=12,
                                      temperature=0)
        console.print(f"  {ip}: {r.choices[0].text!r} ({r.usage.completion_tokens} tokens)")

    step(f"Load on {pods[0]['metadata']['name']}: its KV spills to host memory, the operator follows")
    from tests.e2e.engines import Load

    target = pods[0]["metadata"]["name"]
    before = request(c, target)
    with Load(f"http://{ips[0]}:{PORT}", "tiny", streams=8, max_tokens=96):
        grown = wait(lambda: expanded(ips[0]), "adaptive expansion to move KV layers to host memory", timeout=150)
        console.print(f"  engine {ips[0]}: expansion ratio {grown['expansion_ratio']:.2f} "
                      f"({grown['layers_on_host']} layers' KV on host), stall "
                      f"{grown.get('swap_stall_seconds_total', 0):.3f}s total")
        wait(lambda: request(c, target) != before and request(c, target), "the operator to raise the memory request",
             timeout=150)
        raised = request(c, target)
        console.print(f"  {target}: memory request {before} -> [bold]{raised}[/] (in place, same pod)")
        summary(c, "under load")
    step("Load stopped: after the cooldown the operator brings the request back down within bounds")
    wait(lambda: request(c, target) != raised, "the request to come back down", timeout=150)
    console.print(f"  {target}: memory request {raised} -> [bold]{request(c, target)}[/]")
    summary(c, "after the load")
    console.print(f"\n[green]Demo is up.[/] KUBECONFIG={c.kubeconfig}  ·  logs: {STATE / 'logs'}  ·  "
                  "stop it with [bold]make demo-down[/]")


def expansion(ip: str) -> dict[str, Any]:
    import httpx

    return httpx.get(f"http://{ip}:{PORT}/v1/pie/expansion", timeout=5).json()


def expanded(ip: str) -> dict[str, Any] | None:
    state = expansion(ip)
    return state if state["layers_on_host"] > 0 else None


def request(c: Cluster, pod: str) -> str:
    return get(c, "pod", pod)["spec"]["containers"][0]["resources"]["requests"]["memory"]


def summary(c: Cluster, when: str) -> None:
    step(f"Summary ({when})")
    console.print(c.kubectl("get", "pied", "-n", NS).stdout)
    status = get(c, "pied", NAME)["status"]
    t = Table("time", "pod", "field", "change", "via", "why", title="Operator decisions (status.decisions)")
    for d in status.get("decisions", [])[-8:]:
        t.add_row(str(d.get("time", "")), str(d.get("pod", "")), str(d.get("field", "")),
                  f"{d.get('from')} -> {d.get('to')}", str(d.get("via", "")), str(d.get("reason", "")))
    console.print(t)
    t = Table("pod", "memory request", "GPU budget", "expansion", "revision", title="Pods")
    for p in status.get("pods", []):
        t.add_row(p.get("name", ""), str(p.get("memoryRequest")), str(p.get("gpuMemoryBudget")),
                  str(p.get("expansionRatio", "")), str(p.get("revision", "")))
    console.print(t)


def down() -> None:
    pid_file = STATE / "supervisor.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        if pid_alive(pid):
            os.killpg(pid, signal.SIGTERM)
            for _ in range(40):
                if not pid_alive(pid):
                    break
                time.sleep(0.5)
            else:
                os.killpg(pid, signal.SIGKILL)
        pid_file.unlink()
    if CLUSTER_STATE.exists():
        subprocess.run([sys.executable, "-m", "tests.cluster", "down", "--state-dir", str(CLUSTER_STATE)], cwd=REPO,
                       check=False)
    subprocess.run(["rm", "-rf", str(STATE)], check=False)
    console.print("demo stopped; everything it started is gone")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m tests.cluster.demo")
    ap.add_argument("command", choices=["up", "down", "supervise"])
    {"up": up, "down": down, "supervise": supervise}[ap.parse_args().command]()
