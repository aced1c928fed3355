"""Build pinned control-plane binaries with `go` into a cache outside the checkout.

Binaries land in ``$PIE_CACHE/k8s/<versions>/bin`` (default ``~/.cache/pie``) and are rebuilt only when missing.
k8s.io/kubernetes cannot be `go install`ed directly: its go.mod replaces the staging modules (k8s.io/api, ...) with
local paths, so a small tool module pins each staging module to the matching v0.x release instead. etcd's server
module has the same problem with its sibling modules, so it rides in the same tool module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

K8S_VERSION = "v1.35.4"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.19.5"

# Staging modules that k8s.io/kubernetes replaces with ./staging/src/...; each has a v0.<minor>.<patch> release.
STAGING = [
    "api", "apiextensions-apiserver", "apimachinery", "apiserver", "cli-runtime", "client-go", "cloud-provider",
    "cluster-bootstrap", "code-generator", "component-base", "component-helpers", "controller-manager", "cri-api",
    "cri-client", "csi-translation-lib", "dynamic-resource-allocation", "endpointslice", "externaljwt", "kms",
    "kube-aggregator", "kube-controller-manager", "kube-proxy", "kube-scheduler", "kubectl", "kubelet", "metrics",
    "mount-utils", "pod-security-admission", "sample-apiserver", "sample-cli-plugin", "sample-controller",
]
K8S_COMMANDS = ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"]
# Modules without replace directives can be `go install`ed directly.
GO_INSTALLABLE = {
    "kwok": f"sigs.k8s.io/kwok/cmd/kwok@{KWOK_VERSION}",
    "helm": f"helm.sh/helm/v3/cmd/helm@{HELM_VERSION}",
}
BINARIES = ["etcd", *K8S_COMMANDS, *GO_INSTALLABLE]


def cache_root() -> Path:
    return Path(os.environ.get("PIE_CACHE", Path.home() / ".cache" / "pie"))


def bin_dir() -> Path:
    tag = f"k8s-{K8S_VERSION}_etcd-{ETCD_VERSION}_kwok-{KWOK_VERSION}_helm-{HELM_VERSION}"
    return cache_root() / "k8s" / tag / "bin"


def _staging_version() -> str:
    return "v0" + K8S_VERSION[2:]  # v1.35.4 -> v0.35.4


def _tool_module(src: Path) -> None:
    src.mkdir(parents=True, exist_ok=True)
    sv = _staging_version()
    replaces = "\n".join(f"\tk8s.io/{m} => k8s.io/{m} {sv}" for m in STAGING)
    (src / "go.mod").write_text(
        "module pie.local/k8stools\n\ngo 1.25.0\n\n"
        f"require (\n\tk8s.io/kubernetes {K8S_VERSION}\n\tgo.etcd.io/etcd/server/v3 {ETCD_VERSION}\n)\n\n"
        f"replace (\n{replaces}\n)\n"
    )
    # NOTE: blank imports keep `go mod tidy` from dropping the requirements the build needs.
    imports = "\n".join(f'\t_ "k8s.io/kubernetes/cmd/{c}"' for c in K8S_COMMANDS if c != "kubectl")
    (src / "tools.go").write_text(
        "//go:build tools\n\npackage tools\n\nimport (\n"
        f'{imports}\n\t_ "k8s.io/kubernetes/cmd/kubectl"\n\t_ "go.etcd.io/etcd/server/v3"\n)\n'
    )


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


def build(only: list[str] | None = None) -> Path:
    """Build whatever is missing and return the bin directory."""
    out = bin_dir()
    wanted = only or BINARIES
    missing = [b for b in wanted if not (out / b).exists()]
    if not missing:
        return out
    # Go's default install location is not on every non-login PATH (CI runs with a trimmed environment).
    go_dir = next((str(Path(g).parent) for g in (shutil.which("go"), "/usr/local/go/bin/go") if g and Path(g).exists()),
                  None)
    if go_dir is None:
        raise SystemExit("`go` is not on PATH: it is needed once to build the control plane into " + str(out))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-trimpath", "GOTOOLCHAIN": "local",
           "PATH": go_dir + os.pathsep + os.environ.get("PATH", "")}
    t0 = time.time()
    tool_src = out.parent / "src"
    if any(b in missing for b in ["etcd", *K8S_COMMANDS]):
        _tool_module(tool_src)
        _run(["go", "mod", "tidy"], tool_src, env)
    ldflags = "-s -w"
    for b in missing:
        tmp = out / f".{b}.tmp"
        if b == "etcd":
            _run(["go", "build", "-ldflags", ldflags, "-o", str(tmp), "go.etcd.io/etcd/server/v3"], tool_src, env)
        elif b in K8S_COMMANDS:
            # Version stamping makes `kubectl version` and discovery report the real release instead of v0.0.0.
            pkg = "k8s.io/component-base/version"
            stamp = (f"{ldflags} -X {pkg}.gitVersion={K8S_VERSION} -X {pkg}.gitMajor=1 "
                     f"-X {pkg}.gitMinor={K8S_VERSION.split('.')[1]} -X {pkg}.gitTreeState=clean")
            _run(["go", "build", "-ldflags", stamp, "-o", str(tmp), f"k8s.io/kubernetes/cmd/{b}"], tool_src, env)
        else:
            mod = GO_INSTALLABLE[b]
            gobin = out / ".gobin"
            _run(["go", "install", "-ldflags", ldflags, mod], out, {**env, "GOBIN": str(gobin)})
            shutil.move(str(gobin / b), tmp)
        tmp.rename(out / b)  # atomic: a half-built binary never looks present
    print(f"built {missing} in {time.time() - t0:.0f}s into {out}", flush=True)
    return out


if __name__ == "__main__":
    print(build(sys.argv[1:] or None))
