"""Operator throughput and latency against a real control plane, next to a baseline measured in the same run.

    python bench/operator_bench.py --jobs 100 --repeats 3   # cluster from hack/cluster.sh (or $KUBECONFIG)
    python bench/operator_bench.py --jobs 1000 --skip-baseline

Baseline: a minimal watcher -- one thread, a TrainingJob watch, and for every new job one POST of the
StatefulSet the renderer produces; no status, no Service, no caches. Operator: ``aiaas operator`` (standalone,
progress scraping off because kwok pod IPs are fake). With ``--repeats R`` the two alternate (B O, O B, B O, ...)
so that a change in the machine's load hits both. Each phase creates N one-node TrainingJobs in a fresh
namespace from 8 client threads and records, per job, the time from its create call to its StatefulSet, its pod
(created by the StatefulSet controller), the pod scheduled, the pod Running and (operator only) ``status.phase``
Running. Printed per phase: p50/p99 of each, StatefulSets/s and pods Running/s, the controller process's CPU
seconds and peak RSS, the CPU seconds of the control-plane processes (when ``hack/cluster.sh`` started them),
the StatefulSet controller's queue wait and the controller-manager's client-side rate-limit wait (its
/metrics), the API requests per job by client (``--audit-log``: an apiserver audit log), and operator/baseline
ratios (the median of the per-repeat ratios). Anchors: Kueue's envtest baseline ~43 workloads/s; the
pod-startup SLO p99 <= 5 s.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
OPERATOR_ARGS: list[str] = []


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


def job_manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "aiaas.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
        "spec": {"trainer": {"hyperparameters": {"epochs": 1, "batchSize": 32}},
                 "topology": {"nodes": 1, "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}},
    }


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
def baseline_worker(namespace: str) -> int:
    """The minimal controller: watch TrainingJobs, POST the rendered StatefulSet for each new one."""
    from kubernetes import client, watch

    from aiaas.operator import api
    from aiaas.operator.render import RenderSettings, render_trainingjob

    apic = _api("aiaas-baseline")
    custom, apps = client.CustomObjectsApi(apic), client.AppsV1Api(apic)
    settings = RenderSettings()
    print("ready", flush=True)
    for ev in watch.Watch().stream(custom.list_namespaced_custom_object, "aiaas.dev", "v1alpha1", namespace,
                                   "trainingjobs", timeout_seconds=3600):
        if ev["type"] != "ADDED":
            continue
        job = api.TrainingJob.model_validate(ev["object"])
        sts = next(m for m in render_trainingjob(job, settings) if m["kind"] == "StatefulSet")
        try:
            apps.create_namespaced_stateful_set(namespace, sts)  # type: ignore[arg-type]
        except client.ApiException as err:
            if err.status != 409:
                print(f"create failed: {err.reason}", file=sys.stderr, flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- phase
STAGES = ("sts", "pod", "scheduled", "pod_running", "running")  # in the order a job goes through them
STAGE_TITLES = {"sts": "→STS", "pod": "→pod", "scheduled": "→bound", "pod_running": "→pod Run",
                "running": "→Running"}


class Recorder:
    """Watches StatefulSets, pods and TrainingJobs of a namespace; first-seen times per stage by job name
    (the list functions are lambdas, so the watch hands over plain dicts)."""

    def __init__(self, namespace: str) -> None:
        self.ns = namespace
        self.seen: dict[str, dict[str, float]] = {stage: {} for stage in STAGES}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._watch, args=(w,), daemon=True)
                        for w in (self._sts_stream, self._pod_stream, self._job_stream)]
        for t in self.threads:
            t.start()

    def _mark(self, stage: str, job: str) -> None:
        self.seen[stage].setdefault(job, time.monotonic())

    def _watch(self, stream: Any) -> None:
        from kubernetes import watch

        list_fn, on_event = stream()
        while not self.stop.is_set():
            for ev in watch.Watch().stream(list_fn, timeout_seconds=5):
                on_event(ev["object"])
                if self.stop.is_set():
                    return

    def _sts_stream(self) -> tuple[Any, Any]:
        from kubernetes import client

        apps = client.AppsV1Api(_api())
        return (lambda **kw: apps.list_namespaced_stateful_set(self.ns, **kw),
                lambda sts: self._mark("sts", sts["metadata"]["name"]))

    def _pod_stream(self) -> tuple[Any, Any]:
        from kubernetes import client

        core = client.CoreV1Api(_api())

        def on_pod(pod: dict[str, Any]) -> None:
            job = pod["metadata"]["name"].rsplit("-", 1)[0]
            self._mark("pod", job)
            if (pod.get("spec") or {}).get("nodeName"):
                self._mark("scheduled", job)
            if (pod.get("status") or {}).get("phase") == "Running":
                self._mark("pod_running", job)

        return lambda **kw: core.list_namespaced_pod(self.ns, **kw), on_pod

    def _job_stream(self) -> tuple[Any, Any]:
        from kubernetes import client

        custom = client.CustomObjectsApi(_api())

        def on_job(obj: dict[str, Any]) -> None:
            if (obj.get("status") or {}).get("phase") == "Running":
                self._mark("running", obj["metadata"]["name"])

        return (lambda **kw: custom.list_namespaced_custom_object("aiaas.dev", "v1alpha1", self.ns, "trainingjobs",
                                                                  **kw), on_job)


def create_jobs(namespace: str, n: int, created: dict[str, float]) -> None:
    from kubernetes import client

    custom = client.CustomObjectsApi(_api())

    def one(i: int) -> None:
        name = f"bench-{i:05d}"
        created[name] = time.monotonic()
        for attempt in range(5):
            try:
                custom.create_namespaced_custom_object("aiaas.dev", "v1alpha1", namespace, "trainingjobs",
                                                       job_manifest(name))
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


def kcm_metrics(url: str | None) -> dict[str, float]:
    """The KCM_SERIES counters now ({} when the controller-manager's /metrics is not reachable)."""
    if not url:
        return {}
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:  # noqa: S310 - local, ours
            text = resp.read().decode()
    except OSError:
        return {}
    out = dict.fromkeys(KCM_SERIES, 0.0)
    for line in text.splitlines():
        for key, prefix in KCM_SERIES.items():
            if line.startswith(prefix) and (prefix.endswith("}") or line[len(prefix)] in "{ "):
                out[key] += float(line.rsplit(" ", 1)[1])
    return out


def audit_counts(path: str | None, namespace: str) -> Counter[str]:
    """API requests (not watches) in ``namespace``, by client and verb/resource, from an audit log."""
    counts: Counter[str] = Counter()
    if not path or not Path(path).exists():
        return counts
    with open(path) as f:
        for line in f:
            if namespace not in line:
                continue
            ev = json.loads(line)
            ref = ev.get("objectRef") or {}
            if ref.get("namespace") != namespace or ev.get("stage") != "ResponseComplete":
                continue
            user = ev["user"]["username"].removeprefix("system:serviceaccount:kube-system:")
            agent = ev.get("userAgent", "").split("/")[0]
            who = agent if agent.startswith("aiaas-") else "operator" if user == "kubernetes-admin" else user
            resource = ref.get("resource", "") + ("/" + ref["subresource"] if ref.get("subresource") else "")
            counts[f"{who} {ev['verb']} {resource}"] += 1
    return counts


# ---------------------------------------------------------------------------------------------- phase
def start_controller(kind: str, ns: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(f"/tmp/{ns}.log", "wb")  # noqa: SIM115
    if kind == "baseline":
        cmd = [sys.executable, __file__, "baseline-worker", "--namespace", ns]
    else:
        cmd = [sys.executable, "-m", "aiaas.operator", "operator", "--namespace", ns, "--standalone",
               "--metrics-port", "0", "--metrics-url-template", "", "--log-level", "WARNING",
               *OPERATOR_ARGS]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def run_phase(kind: str, n: int, timeout: float, opts: argparse.Namespace) -> dict[str, Any]:
    ns = f"bench-{kind}-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    proc = start_controller(kind, ns)
    time.sleep(3)  # imports, watches established
    if opts.py_spy and kind == "operator":
        fmt = "raw" if opts.py_spy.endswith(".txt") else "flamegraph"  # raw: collapsed stacks, one per line
        subprocess.Popen(["py-spy", "record", "-r", "50", "-f", fmt, "-o", opts.py_spy, "--pid", str(proc.pid)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cp_pids = control_plane_pids()
    cpu0, cp0, kcm0 = proc_stats(proc.pid)[0], cpu_of(cp_pids), kcm_metrics(opts.kcm_metrics)
    load = os.getloadavg()[0]
    rec = Recorder(ns)
    time.sleep(0.5)
    created: dict[str, float] = {}
    t0 = time.monotonic()
    create_jobs(ns, n, created)
    t_created = time.monotonic() - t0
    target = rec.seen["running" if kind == "operator" else "pod_running"]
    deadline = time.monotonic() + timeout
    while len(target) < n and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    cpu1, peak = proc_stats(proc.pid) if proc.poll() is None else (float("nan"), float("nan"))
    cp1, kcm1 = cpu_of(cp_pids), kcm_metrics(opts.kcm_metrics)
    rec.stop.set()
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    result: dict[str, Any] = {
        "kind": kind, "namespace": ns, "jobs": n, "load1": round(load, 2), "create_seconds": round(t_created, 2),
        "cpu_seconds": cpu1 - cpu0, "peak_rss_mib": peak,
        "control_plane_cpu_s": {k: round(cp1[k] - cp0[k], 2) for k in cp0},
        "kcm": {k: round(kcm1.get(k, 0) - v, 2) for k, v in kcm0.items()},
    }
    for stage in STAGES:
        lat = [rec.seen[stage][k] - created[k] for k in created if k in rec.seen[stage]]
        last = max(rec.seen[stage].values(), default=t0) - t0
        result[stage] = {"count": len(lat), "p50": pct(lat, 50), "p99": pct(lat, 99),
                         "per_second": len(lat) / last if last > 0 else float("nan")}
    kubectl("delete", "namespace", ns, "--wait=false", check=False)
    time.sleep(2)  # the audit log is written after the response
    result["requests_per_job"] = {k: round(v / n, 2) for k, v in sorted(audit_counts(opts.audit_log, ns).items())
                                  if v / n >= 0.05}  # not the namespace's own set-up
    return result


def wait_namespace_gone(ns: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if kubectl("get", "namespace", ns, check=False).returncode != 0:
            return
        time.sleep(2)


# --------------------------------------------------------------------------------------------- report
def print_table(results: list[dict[str, Any]], n: int) -> None:
    print(f"\noperator benchmark: N={n} one-node TrainingJobs, created from 8 threads (create→X p50/p99 s)")
    print(f"{'':16}{'load1':>6}" + "".join(f"{STAGE_TITLES[s]:>13}" for s in STAGES)
          + f"{'STS/s':>7}{'podRun/s':>9}{'CPU s':>7}{'ms/job':>7}{'RSS':>8}")
    for i, r in enumerate(results):
        cells = "".join(f"{r[s]['p50']:>7.2f}/{r[s]['p99']:<5.2f}" for s in STAGES)
        print(f"{r['kind'] + ' #' + str(i // 2 + 1):16}{r['load1']:>6.1f}{cells}{r['sts']['per_second']:>7.1f}"
              f"{r['pod_running']['per_second']:>9.1f}{r['cpu_seconds']:>7.1f}"
              f"{1000 * r['cpu_seconds'] / n:>7.1f}{r['peak_rss_mib']:>5.0f}MiB")
    print("(→pod: created by the StatefulSet controller; →bound: scheduled; →pod Run: kwok set it Running;"
          " →Running: status.phase written by the operator, the baseline writes none)")
    for r in results:
        print(f"{r['kind']} {r['namespace']}: control-plane CPU s {r['control_plane_cpu_s']}; "
              f"controller-manager {r['kcm']}")
        if r["requests_per_job"]:
            print("  API requests per job: " + ", ".join(f"{k} {v}" for k, v in r["requests_per_job"].items()))


def ratios(results: list[dict[str, Any]]) -> dict[str, float]:
    """operator/baseline per repeat (each pair ran back to back), then the median over repeats."""
    pairs = [(results[i], results[i + 1]) for i in range(0, len(results) - 1, 2)]
    per: dict[str, list[float]] = {}
    for a, b in pairs:
        op, base = (a, b) if a["kind"] == "operator" else (b, a)
        for name, value in {
            "sts_p50": op["sts"]["p50"] / base["sts"]["p50"], "sts_p99": op["sts"]["p99"] / base["sts"]["p99"],
            "sts_per_second": op["sts"]["per_second"] / base["sts"]["per_second"],
            "pod_running_p99": op["pod_running"]["p99"] / base["pod_running"]["p99"],
            "cpu": op["cpu_seconds"] / max(base["cpu_seconds"], 1e-9),
        }.items():
            per.setdefault(name, []).append(value)
    return {k: statistics.median(v) for k, v in per.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", default="bench", choices=["bench", "baseline-worker"])
    p.add_argument("--jobs", "-n", type=int, default=100)
    p.add_argument("--repeats", "-r", type=int, default=1, help="baseline/operator pairs, alternating order")
    p.add_argument("--namespace", help="(baseline-worker) namespace to watch")
    p.add_argument("--timeout", type=float, default=600, help="per phase")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--json", help="also write the raw results as JSON to this file")
    p.add_argument("--operator-args", default="", help="extra flags for `aiaas operator`, e.g. '--workers 32'")
    p.add_argument("--audit-log", help="the apiserver's audit log (JSON lines): count API requests per job")
    p.add_argument("--kcm-metrics", help="the controller-manager's /metrics URL, e.g. https://127.0.0.1:17257/metrics")
    p.add_argument("--py-spy", metavar="SVG", help="record a py-spy profile of the (last) operator phase (.svg; .txt: collapsed stacks)")
    args = p.parse_args()
    OPERATOR_ARGS.extend(args.operator_args.split())
    os.environ["KUBECONFIG"] = _kubeconfig()
    if args.mode == "baseline-worker":
        return baseline_worker(args.namespace)
    bin_dir = subprocess.run([str(REPO / "hack" / "cluster.sh"), "bin-dir"], capture_output=True, text=True)
    if bin_dir.returncode == 0:
        os.environ["PATH"] = f"{bin_dir.stdout.strip()}{os.pathsep}{os.environ['PATH']}"
    applied = kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=aiaas-bench", "-f",
                      str(REPO / "crds"), check=False)
    if applied.returncode != 0:
        print(f"warning: could not apply crds/ ({applied.stderr.strip()[:200]}...); using the installed CRDs",
              file=sys.stderr)
    kubectl("wait", "--for=condition=Established", "crd/trainingjobs.aiaas.dev", "--timeout=60s")

    order = [("operator",)] * args.repeats if args.skip_baseline else \
        [("baseline", "operator") if r % 2 == 0 else ("operator", "baseline") for r in range(args.repeats)]
    results = []
    for pair in order:
        for kind in pair:
            results.append(run_phase(kind, args.jobs, args.timeout, args))
            print(json.dumps(results[-1]), flush=True)
            wait_namespace_gone(results[-1]["namespace"])
    print_table(results, args.jobs)
    if not args.skip_baseline:
        print("ratio operator/baseline (median over repeats): "
              + ", ".join(f"{k} x{v:.2f}" for k, v in ratios(results).items()))
    ops = [r for r in results if r["kind"] == "operator"]
    missing = sum(args.jobs - r["running"]["count"] for r in ops)
    if missing:
        print(f"WARNING: {missing} job(s) did not reach Running within {args.timeout:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
