"""Operator throughput and latency against a real control plane, next to a baseline measured in the same run.

    python bench/operator_bench.py --jobs 100 --repeats 3   # cluster from hack/cluster.sh (or $KUBECONFIG)
    python bench/operator_bench.py --jobs 1000 --skip-baseline
    python bench/operator_bench.py --jobs 100 --repeats 3 --peer kubeflow   # after hack/peers/kubeflow.sh build

Baseline: a minimal watcher -- one thread, a TrainingJob watch, and for every new job one POST of the
workload the renderer produces (a StatefulSet, or a one-node job's bare pod); no status, no Service, no caches.
Operator: ``aiaas operator`` (standalone, progress scraping off because kwok pod IPs are fake). Peer (``--peer kubeflow``): Kubeflow's training
operator (``hack/peers/kubeflow.sh``: built from its Go module, its defaults, PyTorchJob only, its webhook
served locally) given one-pod PyTorchJobs (one Master replica, the image and requests of the operator's pod).
kopf floor (``--kopf-floor``): the operator's kopf settings and watches with no-op handlers plus the
baseline's one POST per job -- what any kopf-based operator pays before it reconciles anything.
With ``--repeats R`` the kinds rotate (B O K, O K B, K B O, ...) so that a change in the machine's load hits
all. Each phase creates N jobs of ``--pods-per-job`` pods (default 1) in a fresh namespace from 8 client
threads and records, per job, the time from its create call to its workload (its StatefulSet, or the first pod
its controller created itself: a one-node TrainingJob's, the peer's), its pods (created by the StatefulSet
controller, or by the operator or the peer itself; a pod stage counts when the job's last pod gets there), the
pods scheduled, the pods Running and (operator, peer) the controller's own Running status (``status.phase``; a
Running condition). Printed per phase: p50/p99 of each, workloads/s
and pods Running/s, the controller process's CPU seconds and peak RSS, the CPU seconds of the control-plane
processes (when ``hack/cluster.sh`` started them), the StatefulSet controller's queue wait and the
controller-manager's client-side rate-limit wait (its /metrics), the peer's work queue and request counters
(its /metrics), the API requests per job by client (``--audit-log``: an apiserver audit log), and the ratios
operator/baseline, operator/kopf, kopf/baseline, peer/operator and peer/baseline (the median of the per-repeat ratios). Anchors: Kueue's
envtest baseline ~43 workloads/s; the pod-startup SLO p99 <= 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
OPERATOR_ARGS: list[str] = []
KUBEFLOW = REPO / "hack" / "peers" / "kubeflow.sh"
STATUS_WRITERS = ("operator", "kubeflow")  # the kinds whose phase ends at the job's own Running status
PEER_JOB_LABEL = "training.kubeflow.org/job-name"  # the peer's pods' label naming their job


@dataclass(frozen=True)
class JobKind:
    """The custom resource a phase creates."""

    group: str
    version: str
    plural: str


TRAININGJOB = JobKind("aiaas.dev", "v1alpha1", "trainingjobs")
PYTORCHJOB = JobKind("kubeflow.org", "v1", "pytorchjobs")


def job_kind(kind: str) -> JobKind:
    return PYTORCHJOB if kind == "kubeflow" else TRAININGJOB


def _kubeconfig() -> str:
    if os.environ.get("KUBECONFIG"):
        return os.environ["KUBECONFIG"]
    out = subprocess.run([str(REPO / "hack" / "cluster.sh"), "kubeconfig"], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        sys.exit("no cluster: start one with hack/cluster.sh up, or set KUBECONFIG")
    return out.stdout.strip()


def _api(agent: str = "aiaas-bench"):  # type: ignore[no-untyped-def]
    """A client whose User-Agent tells the audit log its requests from the operator's."""
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=os.environ["KUBECONFIG"], client_configuration=cfg)
    cfg.connection_pool_maxsize = 32
    apic = client.ApiClient(cfg)
    apic.user_agent = agent
    return apic


def job_manifest(name: str, pods: int = 1) -> dict[str, Any]:
    """A TrainingJob of ``pods`` nodes (one pod each)."""
    return {
        "apiVersion": "aiaas.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
        "spec": {"trainer": {"hyperparameters": {"epochs": 1, "batchSize": 32}},
                 "topology": {"nodes": pods, "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}},
    }


def trainer_container() -> dict[str, Any]:
    """The container of the pod the operator renders for ``job_manifest`` (the peer's pods get its image and
    resources)."""
    from aiaas.operator import api
    from aiaas.operator.render import RenderSettings, render_trainingjob

    body = job_manifest("bench")
    body["metadata"].update(namespace="bench", uid="bench")
    pod = next(m for m in render_trainingjob(api.TrainingJob.model_validate(body), RenderSettings())
               if m["kind"] == "Pod")  # a one-node job's bare pod
    return pod["spec"]["containers"][0]  # type: ignore[no-any-return]


def pytorchjob_manifest(name: str, container: dict[str, Any], pods: int = 1) -> dict[str, Any]:
    """A PyTorchJob of ``pods`` pods: one Master replica and ``pods - 1`` Workers (the peer requires the
    container name ``pytorch``)."""
    pod = {"containers": [{"name": "pytorch", "image": container["image"],
                           "command": ["python", "-m", "aiaas.trainer"], "resources": container["resources"]}]}
    replicas = {"Master": 1, "Worker": pods - 1}
    return {
        "apiVersion": f"{PYTORCHJOB.group}/{PYTORCHJOB.version}", "kind": "PyTorchJob", "metadata": {"name": name},
        "spec": {"pytorchReplicaSpecs": {
            role: {"replicas": count, "restartPolicy": "OnFailure", "template": {"spec": pod}}
            for role, count in replicas.items() if count}},
    }


def job_running(obj: dict[str, Any]) -> bool:
    """The controller reports the job Running: ``status.phase`` (TrainingJob) or a Running condition that is
    True (PyTorchJob)."""
    status = obj.get("status") or {}
    return status.get("phase") == "Running" or any(
        c.get("type") == "Running" and c.get("status") == "True" for c in status.get("conditions") or [])


def made_by_statefulset(pod: dict[str, Any]) -> bool:
    """The pod's controller is a StatefulSet (not the operator or the peer creating it itself)."""
    return any(r.get("controller") and r.get("kind") == "StatefulSet"
               for r in pod["metadata"].get("ownerReferences") or [])


def job_of_pod(pod: dict[str, Any]) -> str:
    """The job a pod belongs to, from its job-name label."""
    from aiaas.contract.launch import LABEL_JOB

    labels = pod["metadata"].get("labels") or {}
    return labels.get(LABEL_JOB) or labels.get(PEER_JOB_LABEL) or pod["metadata"]["name"].rsplit("-", 1)[0]


# ---------------------------------------------------------------------------------------- process stats
def proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds user+system, peak RSS MiB) of a live process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    peak = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return cpu, peak


# ------------------------------------------------------------------------------------------- baseline
def create_workload(apic: Any, namespace: str, body: dict[str, Any]) -> None:
    """POST the workload the renderer produces for the TrainingJob ``body``: its StatefulSet, or a one-node
    job's bare pod (one that exists is fine)."""
    from kubernetes import client

    from aiaas.operator import api
    from aiaas.operator.render import RenderSettings, render_trainingjob
    from aiaas.operator.render.trainingjob import WORKLOAD_KINDS

    job = api.TrainingJob.model_validate(dict(body))
    workload = next(m for m in render_trainingjob(job, RenderSettings()) if m["kind"] in WORKLOAD_KINDS)
    try:
        if workload["kind"] == "Pod":
            client.CoreV1Api(apic).create_namespaced_pod(namespace, workload)
        else:
            client.AppsV1Api(apic).create_namespaced_stateful_set(namespace, workload)
    except client.ApiException as err:
        if err.status != 409:
            print(f"create failed: {err.reason}", file=sys.stderr, flush=True)


def baseline_worker(namespace: str) -> int:
    """The minimal controller: watch TrainingJobs, POST the rendered workload for each new one."""
    from kubernetes import client, watch

    apic = _api("aiaas-baseline")
    custom = client.CustomObjectsApi(apic)
    print("ready", flush=True)
    for ev in watch.Watch().stream(custom.list_namespaced_custom_object, "aiaas.dev", "v1alpha1", namespace,
                                   "trainingjobs", timeout_seconds=3600):
        if ev["type"] == "ADDED":
            create_workload(apic, namespace, ev["object"])
    return 0


def kopf_worker(namespace: str) -> int:
    """The kopf floor: the operator's kopf settings and its three watches (TrainingJobs; StatefulSets and pods
    by the job-name label) with handlers that do nothing but the baseline's POST for a new job. Its CPU per job
    is the least any operator built on kopf pays for the same events."""
    import kopf

    from aiaas.operator import api
    from aiaas.operator.reconcile_trainingjob import TrainingJobReconciler
    from aiaas.operator.watch import kopf_settings

    apic = _api("aiaas-kopf-floor")
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_via_client)

    @kopf.on.event(api.GROUP, api.VERSION, "trainingjobs", registry=registry)
    async def on_job(event: kopf.RawEvent, **_: Any) -> None:
        if event.get("type") in (None, "ADDED"):
            await asyncio.to_thread(create_workload, apic, namespace, event["object"])

    children = TrainingJobReconciler.children  # the operator's own child watches, with no-op handlers
    for child in children:
        kopf.on.event(child.group, child.version, child.plural, id=f"watch-{child.plural}",
                      labels={child.owner_label: kopf.PRESENT}, registry=registry)(_ignore)
    print("ready", flush=True)
    asyncio.run(kopf.operator(registry=registry, settings=kopf_settings(children), standalone=True,
                              clusterwide=False, namespaces=[namespace]))
    return 0


async def _ignore(**_: Any) -> None:
    return None


# ---------------------------------------------------------------------------------------------- phase
STAGES = ("workload", "pod", "scheduled", "pod_running", "running")  # in the order a job goes through them
POD_STAGES = ("pod", "scheduled", "pod_running")  # reached when all of a job's pods have
STAGE_TITLES = {"workload": "→workload", "pod": "→pod", "scheduled": "→bound", "pod_running": "→pod Run",
                "running": "→Running"}


class Recorder:
    """Watches StatefulSets, pods and the jobs (``kind``) of a namespace; per stage, the time each job got
    there: a pod stage when the last of its ``pods`` pods did (the list functions are lambdas, so the watch
    hands over plain dicts)."""

    def __init__(self, namespace: str, kind: JobKind, pods: int = 1) -> None:
        self.ns, self.kind, self.pods = namespace, kind, pods
        self.seen: dict[str, dict[str, float]] = {stage: {} for stage in STAGES}
        self.pods_at: dict[str, dict[str, set[str]]] = {stage: {} for stage in POD_STAGES}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._watch, args=(w,), daemon=True)
                        for w in (self._sts_stream, self._pod_stream, self._job_stream)]
        for t in self.threads:
            t.start()

    def _mark(self, stage: str, job: str) -> None:
        self.seen[stage].setdefault(job, time.monotonic())

    def _mark_pod(self, stage: str, job: str, pod: str) -> None:
        at = self.pods_at[stage].setdefault(job, set())
        at.add(pod)
        if len(at) >= self.pods:
            self._mark(stage, job)

    def _watch(self, stream: Any) -> None:
        """Follow one stream until stopped; a watch the apiserver ends (410 Gone, or 504 for a resourceVersion its
        lagging watch cache has not reached: seen at N=5000) starts over with a fresh list. Each watch starts
        with every object of the namespace; it lasts 60 s, because at N=5000 that replay alone took longer
        than the 5 s it had before, so the objects at its end were never seen."""
        from kubernetes import client, watch

        list_fn, on_event = stream()
        while not self.stop.is_set():
            try:
                for ev in watch.Watch().stream(list_fn, timeout_seconds=60):
                    on_event(ev["object"])
                    if self.stop.is_set():
                        return
            except client.ApiException as err:
                print(f"watch restarts after {err.status} {err.reason}", file=sys.stderr, flush=True)
                time.sleep(1)

    def _sts_stream(self) -> tuple[Any, Any]:
        from kubernetes import client

        apps = client.AppsV1Api(_api())
        return (lambda **kw: apps.list_namespaced_stateful_set(self.ns, **kw),
                lambda sts: self._mark("workload", sts["metadata"]["name"]))

    def _pod_stream(self) -> tuple[Any, Any]:
        from kubernetes import client

        core = client.CoreV1Api(_api())

        def on_pod(pod: dict[str, Any]) -> None:
            job, name = job_of_pod(pod), pod["metadata"]["name"]
            if not made_by_statefulset(pod):  # its controller's own pod is the workload
                self._mark("workload", job)
            self._mark_pod("pod", job, name)
            if (pod.get("spec") or {}).get("nodeName"):
                self._mark_pod("scheduled", job, name)
            if (pod.get("status") or {}).get("phase") == "Running":
                self._mark_pod("pod_running", job, name)

        return lambda **kw: core.list_namespaced_pod(self.ns, **kw), on_pod

    def _job_stream(self) -> tuple[Any, Any]:
        from kubernetes import client

        custom = client.CustomObjectsApi(_api())

        def on_job(obj: dict[str, Any]) -> None:
            if job_running(obj):
                self._mark("running", obj["metadata"]["name"])

        k = self.kind
        return (lambda **kw: custom.list_namespaced_custom_object(k.group, k.version, self.ns, k.plural, **kw),
                on_job)


def create_jobs(namespace: str, n: int, created: dict[str, float], kind: str, pods: int) -> None:
    from kubernetes import client

    custom = client.CustomObjectsApi(_api())
    res = job_kind(kind)
    container = trainer_container() if res == PYTORCHJOB else {}

    def one(i: int) -> None:
        name = f"bench-{i:05d}"
        manifest = pytorchjob_manifest(name, container, pods) if res == PYTORCHJOB else job_manifest(name, pods)
        created[name] = time.monotonic()
        for attempt in range(5):
            try:
                custom.create_namespaced_custom_object(res.group, res.version, namespace, res.plural, manifest)
                return
            except client.ApiException as err:
                if err.status == 409:
                    return
                time.sleep(0.2 * (attempt + 1))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(n)))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def kubectl(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", *args], capture_output=True, text=True, check=check, timeout=timeout)


# ------------------------------------------------------------------------------- control-plane probes
def control_plane_pids() -> dict[str, int]:
    """The pids hack/cluster.sh wrote next to the kubeconfig (empty for another cluster)."""
    run = Path(os.environ["KUBECONFIG"]).parent / "run"
    pids = {}
    for f in sorted(run.glob("*.pid")) if run.is_dir() else []:
        try:
            pid = int(f.read_text().strip())
            proc_stats(pid)
            pids[f.stem] = pid
        except (ValueError, OSError):
            continue
    return pids


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = proc_stats(pid)[0]
        except OSError:
            out[name] = float("nan")
    return out


KCM_SERIES = {  # what we read from the controller-manager's /metrics (sums over all label sets)
    "sts_queue_wait_s": 'workqueue_queue_duration_seconds_sum{name="statefulset"}',
    "sts_work_s": 'workqueue_work_duration_seconds_sum{name="statefulset"}',
    "sts_syncs": 'workqueue_adds_total{name="statefulset"}',
    "kcm_throttle_wait_s": "rest_client_rate_limiter_duration_seconds_sum",
}


PEER_SERIES = {  # what we read from the peer's /metrics (controller-runtime's work queue and client)
    "queue_wait_s": 'workqueue_queue_duration_seconds_sum{name="pytorchjob-controller"}',
    "work_s": 'workqueue_work_duration_seconds_sum{name="pytorchjob-controller"}',
    "syncs": 'workqueue_adds_total{name="pytorchjob-controller"}',
    "requests": "rest_client_requests_total",
}


def scrape(url: str | None, series: dict[str, str] = KCM_SERIES) -> dict[str, float]:
    """The ``series`` counters now ({} when the /metrics is not reachable)."""
    if not url:
        return {}
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:  # noqa: S310 - local, ours
            text = resp.read().decode()
    except OSError:
        return {}
    out = dict.fromkeys(series, 0.0)
    for line in text.splitlines():
        for key, prefix in series.items():
            if line.startswith(prefix) and (prefix.endswith("}") or line[len(prefix)] in "{ "):
                out[key] += float(line.rsplit(" ", 1)[1])
    return out


def client_of(user: str, user_agent: str) -> str:
    """Who made a request: the bench's clients by their agent, the peer (its binary's name), the operator (the
    admin user), else the user (a controller-manager controller's service account)."""
    agent = user_agent.split("/")[0]
    if agent.startswith("aiaas-"):
        return agent
    if agent.startswith("training-operator"):
        return "kubeflow"
    return "operator" if user == "kubernetes-admin" else user.removeprefix("system:serviceaccount:kube-system:")


def audit_files(path: str, since: float) -> list[Path]:
    """The audit log and the backups the API server rotated it into since ``since`` (epoch s): it renames a
    full log (``--audit-log-maxsize``, 100 MB) to ``<stem>-<time><suffix>`` and starts a new one."""
    log = Path(path)
    backups = sorted(p for p in log.parent.glob(f"{log.stem}-*{log.suffix}") if p.stat().st_mtime >= since)
    return [*backups, *([log] if log.exists() else [])]


def audit_counts(path: str | None, namespace: str, since: float = 0.0) -> Counter[str]:
    """API requests (not watches) in ``namespace``, by client and verb/resource, from an audit log (and what
    was rotated out of it since ``since``)."""
    counts: Counter[str] = Counter()
    if not path:
        return counts
    for log in audit_files(path, since):
        with open(log) as f:
            for line in f:
                if namespace not in line:
                    continue
                ev = json.loads(line)
                ref = ev.get("objectRef") or {}
                if ref.get("namespace") != namespace or ev.get("stage") != "ResponseComplete":
                    continue
                who = client_of(ev["user"]["username"], ev.get("userAgent", ""))
                resource = ref.get("resource", "") + ("/" + ref["subresource"] if ref.get("subresource") else "")
                counts[f"{who} {ev['verb']} {resource}"] += 1
    return counts


# ---------------------------------------------------------------------------------------------- phase
def start_controller(kind: str, ns: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(f"/tmp/{ns}.log", "wb")  # noqa: SIM115
    if kind == "baseline":
        cmd = [sys.executable, __file__, "baseline-worker", "--namespace", ns]
    elif kind == "kubeflow":  # the script execs the peer: its pid is the peer's
        cmd = [str(KUBEFLOW), "run", "--namespace", ns]
    elif kind == "kopf":
        cmd = [sys.executable, __file__, "kopf-worker", "--namespace", ns]
    else:
        cmd = [sys.executable, "-m", "aiaas.operator", "operator", "--namespace", ns, "--standalone",
               "--metrics-port", "0", "--metrics-url-template", "", "--log-level", "WARNING",
               *OPERATOR_ARGS]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def wait_started(kind: str, proc: subprocess.Popen[bytes], ns: str, timeout: float = 120) -> None:
    """Until the controller can take jobs: 3 s for ours (imports, watches); the peer's PyTorchJob workers
    started (after its webhook certificate is in place), then 1 s."""
    if kind != "kubeflow":
        time.sleep(3)
        return
    deadline = time.monotonic() + timeout
    while '"pytorchjob-controller", "worker count"' not in Path(f"/tmp/{ns}.log").read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the kubeflow training operator did not start its workers; see /tmp/{ns}.log")
        time.sleep(0.5)
    time.sleep(1)


def stop_controller(proc: subprocess.Popen[bytes]) -> tuple[float, float]:
    """(CPU s, peak RSS MiB) of the controller, then stop it."""
    stats = proc_stats(proc.pid) if proc.poll() is None else (float("nan"), float("nan"))
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    return stats


def stage_stats(seen: dict[str, float], created: dict[str, float], t0: float) -> dict[str, float]:
    """p50/p99 from create call to a stage, and jobs per second from the first create to the last one there."""
    lat = [seen[k] - created[k] for k in created if k in seen]
    last = max(seen.values(), default=t0) - t0
    return {"count": len(lat), "p50": pct(lat, 50), "p99": pct(lat, 99),
            "per_second": len(lat) / last if last > 0 else float("nan")}


def run_phase(kind: str, n: int, timeout: float, opts: argparse.Namespace) -> dict[str, Any]:
    ns = f"bench-{kind}-{uuid.uuid4().hex[:6]}"
    began = time.time()
    kubectl("create", "namespace", ns)
    proc = start_controller(kind, ns)
    wait_started(kind, proc, ns)
    if opts.py_spy and kind == opts.py_spy_phase:
        fmt = "raw" if opts.py_spy.endswith(".txt") else "flamegraph"  # raw: collapsed stacks, one per line
        subprocess.Popen(["py-spy", "record", "-r", "50", "-f", fmt, "-o", opts.py_spy, "--pid", str(proc.pid)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peer_url = opts.peer_metrics if kind == "kubeflow" else None
    cp_pids = control_plane_pids()
    cpu0, cp0, kcm0 = proc_stats(proc.pid)[0], cpu_of(cp_pids), scrape(opts.kcm_metrics)
    peer0 = scrape(peer_url, PEER_SERIES)
    load = os.getloadavg()[0]
    rec = Recorder(ns, job_kind(kind), opts.pods_per_job)
    time.sleep(0.5)
    created: dict[str, float] = {}
    t0 = time.monotonic()
    create_jobs(ns, n, created, kind, opts.pods_per_job)
    t_created = time.monotonic() - t0
    target = rec.seen["running" if kind in STATUS_WRITERS else "pod_running"]
    deadline = time.monotonic() + timeout
    while len(target) < n and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    cp1, kcm1, peer1 = cpu_of(cp_pids), scrape(opts.kcm_metrics), scrape(peer_url, PEER_SERIES)
    rec.stop.set()
    cpu1, peak = stop_controller(proc)
    result: dict[str, Any] = {
        "kind": kind, "namespace": ns, "jobs": n, "pods_per_job": opts.pods_per_job, "load1": round(load, 2),
        "create_seconds": round(t_created, 2),
        "cpu_seconds": cpu1 - cpu0, "peak_rss_mib": peak,
        "control_plane_cpu_s": {k: round(cp1[k] - cp0[k], 2) for k in cp0},
        "kcm": {k: round(kcm1.get(k, 0) - v, 2) for k, v in kcm0.items()},
        "peer": {k: round(peer1.get(k, 0) - v, 2) for k, v in peer0.items()},
        **{stage: stage_stats(rec.seen[stage], created, t0) for stage in STAGES},
    }
    kubectl("delete", "namespace", ns, "--wait=false", check=False)
    time.sleep(2)  # the audit log is written after the response
    result["requests_per_job"] = {k: round(v / n, 2) for k, v in sorted(audit_counts(opts.audit_log, ns, began).items())
                                  if v / n >= 0.05}  # not the namespace's own set-up
    return result


def wait_namespace_gone(ns: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if kubectl("get", "namespace", ns, check=False).returncode != 0:
            return
        time.sleep(2)


# --------------------------------------------------------------------------------------------- report
def print_table(results: list[dict[str, Any]], n: int, kinds: int) -> None:
    pods = results[0]["pods_per_job"] if results else 1
    print(f"\noperator benchmark: N={n} jobs of {pods} pod(s), created from 8 threads (create→X p50/p99 s;"
          " a pod stage: the job's last pod)")
    print(f"{'':16}{'load1':>6}" + "".join(f"{STAGE_TITLES[s]:>13}" for s in STAGES)
          + f"{'wl/s':>7}{'podRun/s':>9}{'CPU s':>7}{'ms/job':>7}{'RSS':>8}")
    for i, r in enumerate(results):
        cells = "".join(f"{r[s]['p50']:>7.2f}/{r[s]['p99']:<5.2f}" for s in STAGES)
        print(f"{r['kind'] + ' #' + str(i // kinds + 1):16}{r['load1']:>6.1f}{cells}"
              f"{r['workload']['per_second']:>7.1f}{pods * r['pod_running']['per_second']:>9.1f}{r['cpu_seconds']:>7.1f}"
              f"{1000 * r['cpu_seconds'] / n:>7.1f}{r['peak_rss_mib']:>5.0f}MiB")
    print("(→workload: the StatefulSet, or the first pod a controller created itself; →pod: created by the"
          " StatefulSet controller, by the operator or the peer itself; →bound: scheduled; →pod Run: kwok"
          " set it Running; →Running: status.phase written by the operator, the peer's Running condition, the"
          " baseline writes none)")
    for r in results:
        print(f"{r['kind']} {r['namespace']}: control-plane CPU s {r['control_plane_cpu_s']}; "
              f"controller-manager {r['kcm']}" + (f"; peer {r['peer']}" if r.get("peer") else ""))
        if r["requests_per_job"]:
            print("  API requests per job: " + ", ".join(f"{k} {v}" for k, v in r["requests_per_job"].items()))


RATIO_STAGES = {  # ratio name -> (stage, statistic); a ratio is left out where either phase lacks the stage
    "workload_p50": ("workload", "p50"), "workload_p99": ("workload", "p99"),
    "workloads_per_second": ("workload", "per_second"),
    "pod_p50": ("pod", "p50"), "pod_p99": ("pod", "p99"), "pod_running_p99": ("pod_running", "p99"),
    "pods_running_per_second": ("pod_running", "per_second"),
}
RATIO_PAIRS = (("operator", "baseline"), ("operator", "kopf"), ("kopf", "baseline"), ("kubeflow", "operator"),
               ("kubeflow", "baseline"))


def phase_order(kinds: list[str], repeats: int) -> list[str]:
    """The kinds rotated by one each repeat (B O K, O K B, K B O, ...)."""
    return [kinds[(r + i) % len(kinds)] for r in range(repeats) for i in range(len(kinds))]


def ratios(results: list[dict[str, Any]], kinds: int) -> dict[str, dict[str, float]]:
    """a/b for each pair of RATIO_PAIRS per repeat (the phases of a repeat ran back to back), then the median
    over repeats: {"operator/baseline": {"workload_p50": ..., ...}, ...}."""
    per: dict[str, dict[str, list[float]]] = {}
    for i in range(0, len(results) - kinds + 1, kinds):
        by_kind = {r["kind"]: r for r in results[i:i + kinds]}
        for a, b in RATIO_PAIRS:
            if a not in by_kind or b not in by_kind:
                continue
            ra, rb = by_kind[a], by_kind[b]
            out = per.setdefault(f"{a}/{b}", {})
            for name, (stage, stat) in RATIO_STAGES.items():
                if ra[stage]["count"] and rb[stage]["count"]:
                    out.setdefault(name, []).append(ra[stage][stat] / rb[stage][stat])
            out.setdefault("cpu", []).append(ra["cpu_seconds"] / max(rb["cpu_seconds"], 1e-9))
    return {pair: {k: statistics.median(v) for k, v in vals.items()} for pair, vals in per.items()}


def setup_cluster(peer: str | None, peer_binary: str | None) -> str | None:
    """kubectl on PATH, our CRDs applied, the peer installed (its CRD, webhook); the peer's /metrics URL."""
    bin_dir = subprocess.run([str(REPO / "hack" / "cluster.sh"), "bin-dir"], capture_output=True, text=True)
    if bin_dir.returncode == 0:
        os.environ["PATH"] = f"{bin_dir.stdout.strip()}{os.pathsep}{os.environ['PATH']}"
    applied = kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=aiaas-bench", "-f",
                      str(REPO / "crds"), check=False)
    if applied.returncode != 0:
        print(f"warning: could not apply crds/ ({applied.stderr.strip()[:200]}...); using the installed CRDs",
              file=sys.stderr)
    kubectl("wait", "--for=condition=Established", "crd/trainingjobs.aiaas.dev", "--timeout=60s")
    if peer != "kubeflow":
        return None
    if peer_binary:
        os.environ["AIAAS_KUBEFLOW_BIN"] = peer_binary
    installed = subprocess.run([str(KUBEFLOW), "install"], capture_output=True, text=True)
    if installed.returncode != 0:
        sys.exit(f"hack/peers/kubeflow.sh install failed (run hack/peers/kubeflow.sh build first?):\n"
                 f"{installed.stderr}")
    return subprocess.run([str(KUBEFLOW), "metrics-url"], capture_output=True, text=True, check=True).stdout.strip()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", default="bench", choices=["bench", "baseline-worker", "kopf-worker"])
    p.add_argument("--jobs", "-n", type=int, default=100)
    p.add_argument("--pods-per-job", type=int, default=1, help="nodes of each TrainingJob (the peer: 1 Master and"
                   " the rest Workers)")
    p.add_argument("--repeats", "-r", type=int, default=1, help="rounds of all kinds, order rotated each round")
    p.add_argument("--namespace", help="(baseline-worker, kopf-worker) namespace to watch")
    p.add_argument("--timeout", type=float, default=600, help="per phase")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--kopf-floor", action="store_true",
                   help="also measure the kopf floor (our kopf watches, no reconciling)")
    p.add_argument("--peer", choices=["kubeflow"], help="also measure a peer: Kubeflow's training operator")
    p.add_argument("--peer-binary", help="the peer's binary (default: what hack/peers/kubeflow.sh build made)")
    p.add_argument("--json", help="also write the raw results as JSON to this file")
    p.add_argument("--operator-args", default="", help="extra flags for `aiaas operator`, e.g. '--workers 32'")
    p.add_argument("--audit-log", help="the apiserver's audit log (JSON lines): count API requests per job")
    p.add_argument("--kcm-metrics", help="the controller-manager's /metrics URL, e.g. https://127.0.0.1:17257/metrics")
    p.add_argument("--py-spy", metavar="SVG", help="record a py-spy profile of the (last) operator phase (.svg; .txt: collapsed stacks)")
    p.add_argument("--py-spy-phase", choices=["operator", "kopf"], default="operator",
                   help="whose phase --py-spy records: the operator's (default) or the kopf floor's")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    OPERATOR_ARGS.extend(args.operator_args.split())
    os.environ["KUBECONFIG"] = _kubeconfig()
    if args.mode == "baseline-worker":
        return baseline_worker(args.namespace)
    if args.mode == "kopf-worker":
        return kopf_worker(args.namespace)
    args.peer_metrics = setup_cluster(args.peer, args.peer_binary)
    kinds = ([] if args.skip_baseline else ["baseline"]) + (["kopf"] if args.kopf_floor else []) + ["operator"] + \
        ([args.peer] if args.peer else [])
    results = []
    try:
        for kind in phase_order(kinds, args.repeats):
            results.append(run_phase(kind, args.jobs, args.timeout, args))
            print(json.dumps(results[-1]), flush=True)
            wait_namespace_gone(results[-1]["namespace"])
    finally:
        if args.peer:
            subprocess.run([str(KUBEFLOW), "uninstall"], check=False)
    print_table(results, args.jobs, len(kinds))
    for pair, values in ratios(results, len(kinds)).items():
        print(f"ratio {pair} (median over repeats): " + ", ".join(f"{k} x{v:.2f}" for k, v in values.items()))
    missing = sum(args.jobs - r["running"]["count"] for r in results if r["kind"] in STATUS_WRITERS)
    if missing:
        print(f"WARNING: {missing} job(s) did not reach Running within {args.timeout:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
