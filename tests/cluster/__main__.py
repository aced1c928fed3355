"""``python -m tests.cluster up|down|status [--state-dir DIR] [--nodes N]``: a local control plane for the demo.

``up`` starts a detached cluster (it keeps running after this command exits) and prints its kubeconfig path;
``down`` stops it and removes the state dir; ``status`` reports the components and the apiserver's /readyz.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.cluster.cluster import PIDS, Cluster, owns_process
from tests.cluster.procs import ClusterError, pid_alive

DEFAULT_STATE = Path(__file__).resolve().parents[2] / ".demo" / "cluster"


def _status(state: Path) -> int:
    info_path = state / "cluster.json"
    if not info_path.exists():
        print(f"no cluster in {state}")
        return 1
    info = json.loads(info_path.read_text())
    pids = json.loads((state / PIDS).read_text()) if (state / PIDS).exists() else {}
    ok = bool(pids)
    for name, pid in pids.items():
        alive = pid_alive(pid) and owns_process(pid, state)
        ok &= alive
        state_word = "running" if alive else "NOT RUNNING"
        print(f"{name:24} pid {pid:<8} {state_word:12} log: {state / 'logs' / (name + '.log')}")
    if ok:
        cluster = Cluster.attach(state)
        r = cluster.kubectl("get", "--raw", "/readyz", check=False, timeout=10)
        ok = r.returncode == 0
        print(f"apiserver {info['api_url']} /readyz: {r.stdout.strip() or r.stderr.strip()}")
        print(cluster.kubectl("get", "nodes", "-o", "wide", check=False, timeout=10).stdout)
    print(f"kubeconfig: {info['kubeconfig']}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["up", "down", "status"])
    ap.add_argument("--state-dir", type=Path, default=DEFAULT_STATE, help=f"default: {DEFAULT_STATE}")
    ap.add_argument("--nodes", type=int, default=2, help="number of fake GH200 nodes (up only)")
    args = ap.parse_args(argv)
    state = args.state_dir.resolve()
    try:
        if args.command == "up":
            cluster = Cluster(state, args.nodes, detach=True).start()
            info = json.loads((state / "cluster.json").read_text())
            print(f"cluster up in {info['startup_seconds']}s: {info['api_url']}", file=sys.stderr)
            print(f"export KUBECONFIG={cluster.kubeconfig}", file=sys.stderr)
            print(cluster.kubeconfig)
            return 0
        if args.command == "down":
            Cluster.down(state)
            print(f"stopped; removed {state}", file=sys.stderr)
            return 0
        return _status(state)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
