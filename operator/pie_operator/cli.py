"""`pie-operator run`: start the kopf operator programmatically (no `kopf run` file loading)."""

from __future__ import annotations

import hashlib
import logging
import socket

import typer

from pie_operator.config import AdminPeer, OperatorConfig, normalize_allow, parse_labels

app = typer.Typer(add_completion=False, help="Pie operator: reconciles PieDeployments into GH200 engine pods.")


class _QuietPodEvents(logging.Filter):
    """kopf logs each successful event handler at INFO: for pod events, one line per pod status change."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Handler 'on_pod_event' succeeded" not in record.getMessage()


@app.callback()
def _root() -> None:
    """Pie operator."""


@app.command()
def run(
    namespace: list[str] = typer.Option([], "--namespace", "-n", help="Watch this namespace (repeatable)."),
    all_namespaces: bool = typer.Option(False, "--all-namespaces", "-A", help="Watch every namespace."),
    standalone: bool = typer.Option(True, "--standalone/--peering",
                                    help="Standalone (default): run ONE replica, no kopf peering objects."),
    liveness: str | None = typer.Option(None, "--liveness", help="Liveness endpoint, e.g. http://0.0.0.0:8080/healthz"),
    priority: str = typer.Option("0", "--priority", help="kopf peering priority (with --peering): an integer, or "
                                 "'auto' = derived from the hostname (the pod name), so replicas differ."),
    resync_seconds: float = typer.Option(30.0, "--resync-seconds", min=1.0, help="Periodic full reconcile interval."),
    metrics_interval: float = typer.Option(15.0, "--metrics-interval-seconds", min=0.1,
                                           help="How often every Ready engine's /health and /metrics are read."),
    metrics_timeout: float = typer.Option(2.0, "--metrics-timeout-seconds", min=0.1,
                                          help="Timeout of one engine scrape (/health + /metrics)."),
    metrics_concurrency: int = typer.Option(16, "--metrics-concurrency", min=1, help="Engines scraped at once."),
    reconcile_concurrency: int = typer.Option(16, "--reconcile-concurrency", min=1,
                                              help="PieDeployments reconciled at once (resyncs, after scrapes)."),
    metrics_port: int = typer.Option(0, "--metrics-port", min=0, max=65535, help="Serve the operator's own "
                                     "Prometheus metrics (desired and recommended replicas per PieDeployment, the "
                                     "signals behind them) at /metrics on this port; 0: off."),
    host_path_allow: list[str] = typer.Option([], "--host-path-allow", help="A node directory (and what is below "
                                              "it) that hostPath model sources may use (repeatable; none: no "
                                              "hostPath sources)."),
    admin_peer_namespace: str = typer.Option("", "--admin-peer-namespace", help="The operator's namespace: with "
                                             "--admin-peer-labels, each PieDeployment gets a NetworkPolicy "
                                             "admitting only these pods to the engines' admin port."),
    admin_peer_labels: str = typer.Option("", "--admin-peer-labels", help="The operator pods' labels, k=v,k2=v2."),
    memory_mode_label: str = typer.Option("", "--memory-mode-label", help="Node label naming the GPU memory mode "
                                          "(e.g. pie.io/gpu-memory-mode): warn when a pod runs on a node whose mode "
                                          "is not cdmm. Needs `list nodes`."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    log_passes: bool = typer.Option(False, "--log-passes", help="Log every reconcile pass and its duration "
                                    "(what bench/operator_scale.py measures latency from)."),
) -> None:
    """Run the operator until SIGINT/SIGTERM."""
    if bool(namespace) == all_namespaces:
        raise typer.BadParameter("pass --namespace NS (one or more) or --all-namespaces, not both / neither")
    kopf_priority = peering_priority(priority)
    config = operator_config(host_path_allow, admin_peer_namespace, admin_peer_labels, memory_mode_label)
    import kopf

    from pie_operator import handlers  # noqa: F401 -- registers the handlers in kopf's default registry
    from pie_operator.exporter import Exporter
    from pie_operator.handlers import Reconciler
    from pie_operator.k8s import ApiKube
    from pie_operator.observe import Observations, ScrapeSettings

    kopf.configure(verbose=verbose)
    if not verbose:
        logging.getLogger("kopf.objects").addFilter(_QuietPodEvents())
    logging.getLogger("pie_operator").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per engine scrape otherwise
    if log_passes:
        logging.getLogger("pie_operator.passes").setLevel(logging.DEBUG)
    kube = ApiKube()
    exporter = Exporter()
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, registry=exporter.registry)  # (a daemon thread)
    memo = kopf.Memo(kube=kube, reconciler=Reconciler(kube, Observations(), reconcile_concurrency, config, exporter),
                     namespaces=None if all_namespaces else list(namespace), resync_seconds=resync_seconds,
                     scrape=ScrapeSettings(metrics_interval, metrics_timeout, metrics_concurrency))
    kopf.run(standalone=standalone, clusterwide=all_namespaces, namespaces=namespace, liveness_endpoint=liveness,
             priority=kopf_priority, memo=memo)


def operator_config(host_path_allow: list[str], peer_namespace: str, peer_labels: str,
                    memory_mode_label: str) -> OperatorConfig:
    """The policy flags as an OperatorConfig; a bad value is a usage error naming the flag."""
    if bool(peer_namespace) != bool(peer_labels):
        raise typer.BadParameter("--admin-peer-namespace and --admin-peer-labels go together (both or neither)")
    try:
        labels = parse_labels(peer_labels)
        allow = normalize_allow(host_path_allow)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    peer = AdminPeer(peer_namespace, labels) if peer_namespace else None
    return OperatorConfig(host_path_allow=allow, admin_peer=peer, memory_mode_label=memory_mode_label)


def peering_priority(value: str) -> int:
    """An integer, or "auto": a stable hash of the hostname. Peered kopf operators with EQUAL priorities all pause,
    so the replicas of one Deployment (identical args, distinct pod names) need distinct ones."""
    if value == "auto":
        return 1 + int(hashlib.sha256(socket.gethostname().encode()).hexdigest()[:7], 16)
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"--priority must be an integer or 'auto', got {value!r}") from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
