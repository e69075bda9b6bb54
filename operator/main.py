"""Run the operator: reconcile TrainingJobs and InferenceServices (kopf; leader election on a Lease).

``aiaas operator [-n NAMESPACE ...] [--standalone]``. One replica leads at a time: a replica first takes the
``coordination.k8s.io/v1`` Lease ``aiaas-operator`` (client-go's algorithm: expired or free -> take it with an
optimistic-concurrency PUT), only then starts its watches, renews it every ``--retry-period`` seconds, and exits
at once if it cannot renew within ``--renew-deadline`` (shorter than the lease, so a successor never overlaps).
Every Lease call is bounded by the time left to that deadline, so a stalled connection cannot outlast it. A
lease is expired when its record (resourceVersion, holder, renewTime) has not changed for its duration on OUR
monotonic clock since we first saw that record — never by comparing the holder's renewTime with our wall
clock, which clock skew would break.
A standby replica serves /healthz and answers 503 on /readyz. ``--standalone`` skips the election.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from . import settings as settings_mod
from .k8s import Kube, KubeError, load_api_client
from .metrics import Health, OperatorMetrics, serve
from .settings import OperatorSettings

log = logging.getLogger("aiaas.operator")

MICROTIME = "%Y-%m-%dT%H:%M:%S.%fZ"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings_mod.add_arguments(parser)


# -------------------------------------------------------------------------------------- leader election


@dataclass(frozen=True)
class LeaseObservation:
    """A lease record as we last saw it, and when we first saw it (our monotonic clock)."""

    record: tuple[str, str, str]  # resourceVersion, holderIdentity, renewTime
    since: float


def observe_lease(prev: LeaseObservation | None, lease: dict[str, Any], now: float) -> LeaseObservation:
    """The observation after reading ``lease`` at monotonic time ``now``: the clock restarts only when the
    record changed. Pure."""
    spec = lease.get("spec") or {}
    record = (str((lease.get("metadata") or {}).get("resourceVersion") or ""), str(spec.get("holderIdentity") or ""),
              str(spec.get("renewTime") or ""))
    if prev is not None and prev.record == record:
        return prev
    return LeaseObservation(record, now)


def lease_is_free(spec: dict[str, Any], identity: str, observed: LeaseObservation, now: float) -> bool:
    """May ``identity`` take (or keep) a lease with this spec at monotonic time ``now``? Free, ours, or its
    record unchanged for leaseDurationSeconds since we first saw it. Pure."""
    holder = spec.get("holderIdentity") or ""
    if not holder or holder == identity:
        return True
    duration = float(spec.get("leaseDurationSeconds") or 15)
    return now - observed.since >= duration


def lease_spec(prev: dict[str, Any], identity: str, now: datetime, duration: float) -> dict[str, Any]:
    held = prev.get("holderIdentity") == identity
    stamp = now.strftime(MICROTIME)
    return {
        **prev,
        "holderIdentity": identity,
        "leaseDurationSeconds": int(duration),
        "acquireTime": prev.get("acquireTime") if held and prev.get("acquireTime") else stamp,
        "renewTime": stamp,
        "leaseTransitions": int(prev.get("leaseTransitions") or 0) + (0 if held else 1),
    }


class LeaderElector:
    def __init__(self, kube: Kube, s: OperatorSettings) -> None:
        self.kube, self.s = kube, s
        self.stopped = threading.Event()
        self.observed: LeaseObservation | None = None

    def try_acquire_or_renew(self, deadline: float) -> bool:
        """One attempt; every call is bounded by the time left until ``deadline`` (monotonic)."""
        ns, name = self.s.lease_namespace, self.s.lease_name

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KubeError(0, "the renew deadline passed")
            return remaining

        try:
            lease = self.kube.get_lease(ns, name, timeout=left())
            now = datetime.now(timezone.utc)
            if lease is None:
                self.kube.create_lease({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": lease_spec({}, self.s.identity, now, self.s.lease_duration_seconds),
                }, timeout=left())
                return True
            self.observed = observe_lease(self.observed, lease, time.monotonic())
            spec = lease.get("spec") or {}
            if not lease_is_free(spec, self.s.identity, self.observed, time.monotonic()):
                return False
            lease["spec"] = lease_spec(spec, self.s.identity, now, self.s.lease_duration_seconds)
            self.kube.replace_lease(lease, timeout=left())
            return True
        except KubeError as err:
            if not err.conflict:
                log.warning("leader election: %s", err)
            return False
        except Exception as err:  # noqa: BLE001 - the renew loop must survive anything, to exit when it should
            log.warning("leader election: %s: %s", type(err).__name__, err)
            return False

    def acquire(self) -> None:
        log.info("waiting to lead (Lease %s/%s, identity %s)", self.s.lease_namespace, self.s.lease_name,
                 self.s.identity)
        while not self.try_acquire_or_renew(time.monotonic() + self.s.renew_deadline_seconds):
            time.sleep(self.s.retry_period_seconds)
        log.info("leading (Lease %s/%s)", self.s.lease_namespace, self.s.lease_name)

    def renew_forever(self) -> None:
        """Renew every retry period; exit the process once the renew deadline passes without a renewal."""
        last = time.monotonic()
        while True:
            deadline = last + self.s.renew_deadline_seconds
            if self.stopped.wait(max(0.0, min(self.s.retry_period_seconds, deadline - time.monotonic()))):
                return
            if self.try_acquire_or_renew(deadline):
                last = time.monotonic()
            elif time.monotonic() >= deadline:
                log.error("lost the lease %s/%s: exiting so that only the new leader acts",
                          self.s.lease_namespace, self.s.lease_name)
                logging.shutdown()
                os._exit(1)

    def release(self) -> None:
        self.stopped.set()
        timeout = self.s.retry_period_seconds
        try:
            lease = self.kube.get_lease(self.s.lease_namespace, self.s.lease_name, timeout=timeout)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.s.identity:
                lease["spec"] = {**lease["spec"], "holderIdentity": None, "leaseDurationSeconds": 1}
                self.kube.replace_lease(lease, timeout=timeout)
        except KubeError as err:
            log.warning("could not release the lease: %s", err)


# ------------------------------------------------------------------------------------------------- run
async def _heartbeat(health: Health, period: float) -> None:
    """Refresh the liveness heartbeat while the event loop runs (a stalled loop stops it)."""
    while True:
        health.heartbeat()
        await asyncio.sleep(period)


def run(args: argparse.Namespace) -> int:
    s = settings_mod.from_args(args)
    logging.basicConfig(level=s.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kubernetes", "urllib3", "aiohttp.access", "kopf.objects", "kopf.activities"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return asyncio.run(operate(s))


async def operate(s: OperatorSettings, stop_flag: asyncio.Event | None = None) -> int:
    import kopf  # the operator's only kopf entry point; imported late so `aiaas --help` stays fast

    from .reconcile_inferenceservice import InferenceServiceReconciler
    from .reconcile_trainingjob import TrainingJobReconciler
    from .runtime import Runtime
    from .watch import kopf_settings, register

    kube = Kube(load_api_client(pool_size=2 * s.workers + 8), s.field_manager)
    health = Health(stale_after=max(60.0, 4 * s.resync_seconds))
    jobs = TrainingJobReconciler(s.render, s.success_policy, s.metrics_url_template, s.scrape_timeout_seconds)
    services = InferenceServiceReconciler(s.render)
    metrics = OperatorMetrics(jobs=lambda: rt.phases(jobs.kind), services=lambda: rt.phases(services.kind))
    rt = Runtime(s, kube, [jobs, services], metrics, health)
    server = serve(metrics, health, s.metrics_host, s.metrics_port) if s.metrics_port else None
    if server is not None:
        log.info("metrics on http://%s:%d/metrics (also /healthz, /readyz)", s.metrics_host, server.server_address[1])

    # Liveness is the event loop's heartbeat, from the start: a standby replica waiting for the Lease is alive
    # (a real kubelet restarted standbys whose heartbeat went stale while they waited).
    beating = asyncio.create_task(_heartbeat(health, period=min(5.0, s.resync_seconds)))
    elector: LeaderElector | None = None
    if not s.standalone:
        # its own client: no urllib3 retries, so each Lease call ends by the time it is given
        elector = LeaderElector(Kube(load_api_client(pool_size=2, retries=0), s.field_manager), s)
        await asyncio.to_thread(elector.acquire)
        threading.Thread(target=elector.renew_forever, name="lease-renew", daemon=True).start()

    registry = kopf.OperatorRegistry()
    register(registry, rt)
    scope = f"namespaces {', '.join(s.namespaces)}" if s.namespaces else "all namespaces"
    log.info("aiaas operator starting: %s, resync %.1fs, success policy %s", scope, s.resync_seconds,
             s.success_policy)
    try:
        await kopf.operator(
            registry=registry,
            settings=kopf_settings(child for rec in rt.reconcilers.values() for child in rec.children),
            standalone=True,  # our Lease does the leader election; kopf's peering is not used
            clusterwide=not s.namespaces,
            namespaces=list(s.namespaces),
            stop_flag=stop_flag,
        )
    finally:
        beating.cancel()
        if elector is not None:
            await asyncio.to_thread(elector.release)
        if server is not None:
            server.shutdown()
    return 0
