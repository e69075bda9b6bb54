"""Operator settings: one frozen object built from flags, with environment variables as defaults.

Every knob the e2e tests and the benchmark need (timers, the metrics URL of a training pod, leader election)
lives here, so handlers never read the environment themselves.
"""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from dataclasses import dataclass, field

from aiaas.contract import launch

from .render.settings import RenderSettings

ENV_PREFIX = "AIAAS_OPERATOR_"
FIELD_MANAGER = "aiaas-operator"
SUCCESS_POLICIES = ("AllWorkers", "Rank0")


def _env(name: str, default: str) -> str:
    return os.environ.get(ENV_PREFIX + name, default)


def _env_float(name: str, default: float) -> float:
    return float(_env(name, str(default)))


def _env_bool(name: str, default: bool) -> bool:
    return _env(name, "1" if default else "0").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class OperatorSettings:
    """What the operator does and how often. Defaults suit a real cluster; tests shorten the timers."""

    namespaces: tuple[str, ...] = ()  # empty: every namespace (cluster-wide)
    render: RenderSettings = field(default_factory=RenderSettings)
    field_manager: str = FIELD_MANAGER
    # How often every unfinished TrainingJob is looked at again (progress scrape, deadlines, missed events).
    resync_seconds: float = 10.0
    # Base delay before retrying a reconcile that raised (doubles up to 5 minutes).
    retry_seconds: float = 2.0
    # Rank 0's Prometheus endpoint. Placeholders: {pod_ip} {port} {pod} {namespace} {job}. Tests point it at
    # a loopback server, because fake (kwok) pods have IPs nobody listens on.
    metrics_url_template: str = "http://{pod_ip}:{port}/metrics"
    scrape_timeout_seconds: float = 2.0
    # Completion: every worker pod's trainer reported Succeeded, or rank 0's alone.
    success_policy: str = "AllWorkers"
    # Own endpoints: /metrics, /healthz, /readyz. 0 disables the server.
    metrics_port: int = 8080
    metrics_host: str = "0.0.0.0"
    # Leader election with a coordination.k8s.io Lease; standalone turns it off (one replica, tests).
    standalone: bool = False
    lease_name: str = "aiaas-operator"
    lease_namespace: str = "default"
    lease_duration_seconds: float = 15.0
    renew_deadline_seconds: float = 10.0
    retry_period_seconds: float = 2.0
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    log_level: str = "INFO"
    # Reconciles running at once (threads; each mostly waits on the API server).
    workers: int = 32



def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``aiaas operator``; each defaults to ``$AIAAS_OPERATOR_<NAME>``, else to
    :class:`OperatorSettings`' own default (written there only)."""
    d, r = OperatorSettings, RenderSettings
    parser.add_argument("-n", "--namespace", action="append", default=None,
                        help="watch only this namespace (repeatable; default: $AIAAS_OPERATOR_NAMESPACES, "
                        "comma-separated, else all namespaces)")
    parser.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument("--trainer-image", default=_env("TRAINER_IMAGE", r.trainer_image),
                        help="default trainer image")
    parser.add_argument("--server-image", default=_env("SERVER_IMAGE", r.server_image),
                        help="default model server image")
    parser.add_argument("--image-pull-policy", default=_env("IMAGE_PULL_POLICY", r.image_pull_policy))
    parser.add_argument("--service-account", default=_env("SERVICE_ACCOUNT", "") or None,
                        help="service account of training pods")
    parser.add_argument("--network-policy", action=argparse.BooleanOptionalAction,
                        default=_env_bool("NETWORK_POLICY", r.network_policy),
                        help="a NetworkPolicy per TrainingJob: only its own pods reach its pods; metrics ports also "
                        "from the operator's namespace and --monitoring-namespace-selector; and one per namespace, "
                        f"{launch.ISOLATION_POLICY_NAME}, that closes every TrainingJob pod until its job's admits")
    parser.add_argument("--operator-namespace", default=_env("NAMESPACE", os.environ.get("POD_NAMESPACE", "")),
                        help="the operator's namespace, allowed to scrape training pods' metrics ports")
    parser.add_argument("--monitoring-namespace-selector", default=_env("MONITORING_NAMESPACE_SELECTOR", ""),
                        help="labels (k=v,k2=v2) of the namespaces allowed to scrape training pods' metrics "
                        "(e.g. kubernetes.io/metadata.name=monitoring); empty: none")
    parser.add_argument("--resync-seconds", type=float, default=_env_float("RESYNC_SECONDS", d.resync_seconds),
                        help="re-check every unfinished job this often (progress, deadlines)")
    parser.add_argument("--retry-seconds", type=float, default=_env_float("RETRY_SECONDS", d.retry_seconds),
                        help="first retry delay after a failed reconcile")
    parser.add_argument("--metrics-url-template", default=_env("METRICS_URL_TEMPLATE", d.metrics_url_template),
                        help="rank 0's metrics URL; placeholders {pod_ip} {port} {pod} {namespace} {job}")
    parser.add_argument("--scrape-timeout", type=float, default=_env_float("SCRAPE_TIMEOUT", d.scrape_timeout_seconds))
    parser.add_argument("--success-policy", choices=SUCCESS_POLICIES, default=_env("SUCCESS_POLICY", d.success_policy),
                        help="a job succeeded when all workers (default) or rank 0 reported Succeeded")
    parser.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", str(d.metrics_port))),
                        help="port of /metrics, /healthz and /readyz (0: off)")
    parser.add_argument("--metrics-host", default=_env("METRICS_HOST", d.metrics_host))
    parser.add_argument("--standalone", action="store_true", default=_env_bool("STANDALONE", d.standalone),
                        help="no leader election (a single replica, or tests)")
    parser.add_argument("--lease-name", default=_env("LEASE_NAME", d.lease_name))
    parser.add_argument("--lease-namespace",
                        default=_env("LEASE_NAMESPACE", os.environ.get("POD_NAMESPACE", d.lease_namespace)))
    parser.add_argument("--lease-duration", type=float, default=_env_float("LEASE_DURATION", d.lease_duration_seconds))
    parser.add_argument("--renew-deadline", type=float, default=_env_float("RENEW_DEADLINE", d.renew_deadline_seconds))
    parser.add_argument("--retry-period", type=float, default=_env_float("RETRY_PERIOD", d.retry_period_seconds))
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", d.log_level))
    parser.add_argument("--workers", type=int, default=int(_env("WORKERS", str(d.workers))),
                        help="reconciles running at once (threads; each mostly waits on the API server)")


def parse_labels(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` -> a label dict; a clear error for anything else."""
    labels: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise SystemExit(f"--monitoring-namespace-selector: {part!r} is not key=value (e.g. "
                             "kubernetes.io/metadata.name=monitoring)")
        labels[key.strip()] = value.strip()
    return labels


def from_args(args: argparse.Namespace) -> OperatorSettings:
    if args.all_namespaces:
        namespaces: tuple[str, ...] = ()
    elif args.namespace:
        namespaces = tuple(args.namespace)
    else:
        namespaces = tuple(n for n in _env("NAMESPACES", "").split(",") if n.strip())
    return OperatorSettings(
        namespaces=namespaces,
        render=RenderSettings(
            trainer_image=args.trainer_image,
            server_image=args.server_image,
            image_pull_policy=args.image_pull_policy,
            service_account_name=args.service_account,
            network_policy=args.network_policy,
            operator_namespace=args.operator_namespace,
            monitoring_namespace_selector=parse_labels(args.monitoring_namespace_selector),
        ),
        resync_seconds=args.resync_seconds,
        retry_seconds=args.retry_seconds,
        metrics_url_template=args.metrics_url_template,
        scrape_timeout_seconds=args.scrape_timeout,
        success_policy=args.success_policy,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        standalone=args.standalone,
        lease_name=args.lease_name,
        lease_namespace=args.lease_namespace,
        lease_duration_seconds=args.lease_duration,
        renew_deadline_seconds=args.renew_deadline,
        retry_period_seconds=args.retry_period,
        log_level=args.log_level,
        workers=args.workers,
    )
