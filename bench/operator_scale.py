"""The operator at scale (a benchmark, not a test): many engine pods on kwok GH200 nodes across many PieDeployments,
on the real local control plane of tests/cluster, with /metrics of every pod played by ONE replay process
(bench/metrics_replay.py: recorded output of a real engine).

Measured: time until all PieDeployments are Ready; at steady state (nothing changes) the operator's API requests
per minute and per reconcile pass (from the apiserver's audit log: the operator is the only client that is
`kubernetes-admin` with a non-kubectl user agent), pass latency p50/p99 (the operator's --log-passes lines), its RSS
and CPU; then a spec change that every pod takes in place (memory.hostMemory.min: a resize of every pod) and the
time from the change until all pods of each PieDeployment carry it (p50/p99/max).

    PYTHONPATH=engine:operator:. python -m bench.operator_scale --deployments 100 --replicas 10

Goals (the issue): zero writes per minute at steady state; p99 from a spec change to all pods updated <= 30 s;
RSS <= 300 MiB. The JSON says which size was run and whether each goal was met.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import kubernetes

from tests.cluster import nodes
from tests.cluster.cluster import Cluster
from tests.cluster.components import audit_log

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PYTHONPATH = ":".join(str(ROOT / p) for p in ("engine", "operator", "."))
NS = "bench"
WRITES = {"create", "update", "patch", "delete", "deletecollection"}


def add_nodes(k8s: Cluster, count: int, gpus: int) -> None:
    """`count` more kwok GH200 nodes (after the cluster's own 2), each with `gpus` GPUs (a pod takes one)."""
    docs = []
    for i in range(k8s.nodes, k8s.nodes + count):
        node = nodes.gh200_node(i)
        cap = {**node["status"]["capacity"], "nvidia.com/gpu": str(gpus), "memory": "8Ti", "cpu": "512"}
        node["status"]["capacity"] = node["status"]["allocatable"] = cap
        docs.append(node)
    k8s.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}),
                timeout=300)
    wait(lambda: sum(nodes.is_ready(n) for n in items(k8s, "nodes")) >= k8s.nodes + count, "nodes Ready", 600)


def items(k8s: Cluster, *what: str) -> list[dict[str, Any]]:
    return json.loads(k8s.kubectl("get", *what, "-o", "json", timeout=300).stdout)["items"]


class Api:
    """The benchmark's own client (kubectl would cost a process start per call; its user agent keeps its requests
    out of the operator's count)."""

    def __init__(self, kubeconfig: Path) -> None:
        self.api = kubernetes.config.new_client_from_config(str(kubeconfig))
        self.api.user_agent = "pie-bench"

    def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        resp = self.api.call_api(path, method, body=body, header_params={
            "Accept": "application/json", "Content-Type": content_type}, auth_settings=["BearerToken"],
            _preload_content=False, _return_http_data_only=True, _request_timeout=120)
        return json.loads(resp.data)

    def pods(self) -> list[dict[str, Any]]:
        return list(self.call("GET", f"/api/v1/namespaces/{NS}/pods")["items"])

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.call("PATCH", f"/apis/pie.io/v1alpha1/namespaces/{NS}/piedeployments/{name}", {"spec": spec},
                  "application/merge-patch+json")

    def events(self, since: float, until: float) -> dict[str, int]:
        """The operator's Events (by reason) last seen in [since, until)."""
        out: Counter[str] = Counter()
        for e in self.call("GET", f"/api/v1/namespaces/{NS}/events")["items"]:
            at = datetime.fromisoformat((e.get("lastTimestamp") or e["eventTime"]).replace("Z", "+00:00"))
            if e.get("source", {}).get("component") == "pie-operator" and int(since) <= at.timestamp() < until:
                out[e["reason"]] += 1
        return dict(out.most_common())


def wait(fn: Any, what: str, timeout: float, interval: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := fn():
            return got
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def deployment(i: int, replicas: int, port: int) -> dict[str, Any]:
    return {"apiVersion": "pie.io/v1alpha1", "kind": "PieDeployment", "metadata": {"name": f"d{i:03d}"},
            "spec": {"replicas": replicas, "model": {"path": "/models/tiny"},
                     "engine": {"image": "pie-engine:0.1.0", "port": port},
                     # More samples than the window can hold (1800 s / 15 s): the closed loop makes no metric-driven
                     # decision from the replayed metrics, so the steady state is one where nothing changes.
                     "memory": {"tuning": {"minSamples": 1000}},
                     "rollout": {"maxUnavailable": "100%"}}}


def ready_count(k8s: Cluster, replicas: int) -> int:
    return sum(1 for d in items(k8s, "pied", "-n", NS)
               if d.get("status", {}).get("phase") == "Ready" and d["status"].get("ready") == f"{replicas}/{replicas}")


def operator_requests(path: Path, since: float, until: float) -> list[dict[str, Any]]:
    """The operator's completed requests in [since, until) (unix time) from the audit log."""
    out = []
    with path.open(errors="replace") as f:
        for line in f:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if (e.get("stage") != "ResponseComplete" or e.get("user", {}).get("username") != "kubernetes-admin"
                    or e.get("userAgent", "").startswith(("kubectl", "pie-bench"))):
                continue
            at = datetime.fromisoformat(e["stageTimestamp"].replace("Z", "+00:00")).timestamp()
            if since <= at < until:
                out.append(e)
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks of 1/100 s


def rss_mib(pid: int) -> float:
    kb = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))  # type: ignore[union-attr]
    return kb / 1024


def pass_durations(log: Path, start: int) -> list[float]:
    return [float(m.group(1)) for m in re.finditer(r"pass \S+ ([0-9.]+) s", log.read_text(errors="replace")[start:])]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)], 4)


def request_summary(reqs: list[dict[str, Any]], minutes: float, passes: int) -> dict[str, Any]:
    non_watch = [e for e in reqs if e["verb"] != "watch"]
    writes = [e for e in reqs if e["verb"] in WRITES]
    by = Counter(f"{e['verb']} {e['objectRef'].get('resource', '')}"
                 f"{'/' + e['objectRef']['subresource'] if e['objectRef'].get('subresource') else ''}" for e in reqs)
    return {"requests_per_minute": round(len(non_watch) / minutes, 1),
            "writes_per_minute": round(len(writes) / minutes, 2),
            "requests_per_pass": round(len(non_watch) / passes, 2) if passes else None,
            "passes": passes, "by_verb_and_resource": dict(by.most_common())}


def run(args: argparse.Namespace) -> dict[str, Any]:
    total = args.deployments * args.replicas
    port = random.randint(40000, 49999)  # (other clusters on this machine hand out the same pod IPs)
    state = Path(tempfile.mkdtemp(prefix="pie-scale-"))
    k8s = Cluster(state / "k8s", nodes=2)
    k8s.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        k8s.apply_crds(ROOT / "crds")
        add_nodes(k8s, math.ceil(total / args.gpus_per_node), args.gpus_per_node)
        k8s.kubectl("create", "namespace", NS)
        env = {**k8s.env, "PYTHONPATH": PYTHONPATH}
        procs.append(subprocess.Popen([sys.executable, "-m", "bench.metrics_replay", "--kubeconfig",
                                       str(k8s.kubeconfig), "--port", str(port)], cwd=ROOT, env=env,
                                      stdout=(state / "replay.log").open("wb"), stderr=subprocess.STDOUT))
        op_log = state / "operator.log"
        op = subprocess.Popen([sys.executable, "-m", "pie_operator", "run", "--namespace", NS, "--log-passes",
                               "--resync-seconds", str(args.resync), "--metrics-interval-seconds",
                               str(args.metrics_interval), "--metrics-timeout-seconds", str(args.metrics_timeout),
                               "--reconcile-concurrency", str(args.concurrency)],
                              cwd=ROOT, env=env, stdout=op_log.open("wb"), stderr=subprocess.STDOUT)
        procs.append(op)
        time.sleep(3)
        t0 = time.monotonic()
        k8s.kubectl("apply", "-n", NS, "-f", "-", timeout=300, input=json.dumps(
            {"apiVersion": "v1", "kind": "List",
             "items": [deployment(i, args.replicas, port) for i in range(args.deployments)]}))
        wait(lambda: ready_count(k8s, args.replicas) == args.deployments, "every PieDeployment Ready", args.timeout)
        all_ready_s = time.monotonic() - t0

        time.sleep(args.settle)  # (the last status writes of the start-up, and a resync round, settle)
        log_mark = len(op_log.read_text(errors="replace"))
        cpu0, since = cpu_seconds(op.pid), time.time()
        time.sleep(args.steady_seconds)
        until, cpu1, rss = time.time(), cpu_seconds(op.pid), rss_mib(op.pid)
        durations = pass_durations(op_log, log_mark)
        steady = request_summary(operator_requests(audit_log(k8s.state_dir), since, until),
                                 (until - since) / 60, len(durations))
        api = Api(k8s.kubeconfig)
        steady["operator_events_by_reason"] = api.events(since, until)
        steady.update(pass_latency_p50_s=pct(durations, 50), pass_latency_p99_s=pct(durations, 99),
                      operator_rss_mib=round(rss, 1),
                      operator_cpu_percent=round(100 * (cpu1 - cpu0) / (until - since), 1),
                      window_seconds=round(until - since, 1))

        # A spec change every pod takes in place: a higher host-memory floor (pods/resize of every pod). Each
        # PieDeployment's time runs from its own patch (the patches go out one after the other).
        before = {p["metadata"]["uid"]: p["spec"]["containers"][0]["resources"]["requests"]["memory"]
                  for p in api.pods()}
        log_mark, change_since = len(op_log.read_text(errors="replace")), time.time()
        started = time.monotonic()
        patched: dict[str, float] = {}
        for i in range(args.deployments):
            api.patch_spec(f"d{i:03d}", {"memory": {"hostMemory": {"min": "32Gi"}}})
            patched[f"d{i:03d}"] = time.monotonic()
        patched_s = time.monotonic() - started
        done: dict[str, float] = {}

        def updated() -> bool:
            by_dep: dict[str, list[bool]] = {}
            pods, now = api.pods(), time.monotonic()
            for p in pods:
                req = p["spec"]["containers"][0]["resources"]["requests"]["memory"]
                by_dep.setdefault(p["metadata"]["labels"]["pie.io/deployment"], []).append(
                    req != before.get(p["metadata"]["uid"]) and not p["metadata"].get("deletionTimestamp"))
            for d, ok in by_dep.items():
                if d not in done and len(ok) >= args.replicas and all(ok):
                    done[d] = now - patched[d]
            return len(done) == args.deployments

        wait(updated, "every pod to take the memory change", args.timeout, interval=0.5)
        change_until = time.time()
        times = list(done.values())
        change = request_summary(operator_requests(audit_log(k8s.state_dir), change_since, change_until),
                                 (change_until - change_since) / 60, len(pass_durations(op_log, log_mark)))
        change.update(seconds_to_patch_all_specs=round(patched_s, 2), all_pods_updated_p50_s=pct(times, 50),
                      all_pods_updated_p99_s=pct(times, 99), all_pods_updated_max_s=round(max(times), 2),
                      replaced_pods=len(set(before) - {p["metadata"]["uid"] for p in api.pods()}),
                      operator_events_by_reason=api.events(change_since, change_until),
                      operator_rss_mib_after=round(rss_mib(op.pid), 1))
        return {
            "size": {"deployments": args.deployments, "replicas": args.replicas, "engine_pods": total,
                     "kwok_nodes": k8s.nodes + math.ceil(total / args.gpus_per_node),
                     "gpus_per_node": args.gpus_per_node},
            "operator_flags": {"resync_seconds": args.resync, "metrics_interval_seconds": args.metrics_interval,
                               "metrics_timeout_seconds": args.metrics_timeout,
                               "reconcile_concurrency": args.concurrency},
            "engines": ("ONE replay process (bench/metrics_replay.py) listening on every pod's IP:port and serving "
                        "/health and the recorded /metrics of a real pie-engine (bench/data/engine_metrics.txt), "
                        "the same text for every pod: no real engines run"),
            "machine": f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} CPUs shared with "
                       "the control plane, kwok and the replay process (and other work on the machine)",
            "seconds_until_all_ready": round(all_ready_s, 1),
            "steady_state": steady,
            "spec_change_in_place": change,
            "goals": {"zero_writes_per_minute_at_steady_state": steady["writes_per_minute"] == 0,
                      "p99_spec_change_to_all_pods_updated_le_30s": (change["all_pods_updated_p99_s"] or 1e9) <= 30,
                      "rss_le_300MiB": max(steady["operator_rss_mib"], change["operator_rss_mib_after"]) <= 300},
        }
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        k8s.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deployments", type=int, default=100)
    ap.add_argument("--replicas", type=int, default=10)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--resync", type=float, default=30.0)
    ap.add_argument("--metrics-interval", type=float, default=15.0)
    ap.add_argument("--metrics-timeout", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--steady-seconds", type=float, default=120.0)
    ap.add_argument("--settle", type=float, default=45.0)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "operator_scale.json")
    args = ap.parse_args()
    result = run(args)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
