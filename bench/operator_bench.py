"""Operator throughput and latency against a real control plane, next to a baseline measured in the same run.

    python bench/operator_bench.py --jobs 100            # cluster from hack/cluster.sh (or $KUBECONFIG)
    python bench/operator_bench.py --jobs 1000 --skip-baseline

Phase 1 (baseline): a minimal watcher -- one thread, a TrainingJob watch, and for every new job one POST of the
StatefulSet the renderer produces; no status, no Service, no caches. Phase 2: ``aiaas operator`` (standalone,
progress scraping off because kwok pod IPs are fake). Each phase creates N one-node TrainingJobs in a fresh
namespace from 8 client threads and records, per job, the time from its create call to (a) its StatefulSet
appearing in a watch and (b) (operator only) ``status.phase`` Running, i.e. its pod scheduled and ready (kwok).
Printed: p50/p99 of both, jobs/s, the controller process's CPU seconds and peak RSS, and operator/baseline
ratios. Anchors: Kueue's envtest baseline ~43 workloads/s; the pod-startup SLO p99 <= 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
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


def _api():  # type: ignore[no-untyped-def]
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=os.environ["KUBECONFIG"], client_configuration=cfg)
    cfg.connection_pool_maxsize = 32
    return client.ApiClient(cfg)


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

    apic = _api()
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
            apps.create_namespaced_stateful_set(namespace, sts)
        except client.ApiException as err:
            if err.status != 409:
                print(f"create failed: {err.reason}", file=sys.stderr, flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- phase
class Recorder:
    """Watches StatefulSets and TrainingJobs of a namespace; first-seen times by job name."""

    def __init__(self, namespace: str) -> None:
        self.ns = namespace
        self.sts: dict[str, float] = {}
        self.running: dict[str, float] = {}
        self.pod_ready: dict[str, float] = {}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._watch_sts, daemon=True),
                        threading.Thread(target=self._watch_jobs, daemon=True),
                        threading.Thread(target=self._watch_pods, daemon=True)]
        for t in self.threads:
            t.start()

    def _watch_sts(self) -> None:
        from kubernetes import client, watch

        apps = client.AppsV1Api(_api())
        while not self.stop.is_set():
            for ev in watch.Watch().stream(apps.list_namespaced_stateful_set, self.ns, timeout_seconds=5):
                self.sts.setdefault(ev["object"].metadata.name, time.monotonic())
                if self.stop.is_set():
                    return

    def _watch_pods(self) -> None:
        from kubernetes import client, watch

        core = client.CoreV1Api(_api())
        while not self.stop.is_set():
            for ev in watch.Watch().stream(core.list_namespaced_pod, self.ns, timeout_seconds=5):
                pod = ev["object"]
                if any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or [])):
                    self.pod_ready.setdefault(pod.metadata.name.rsplit("-", 1)[0], time.monotonic())
                if self.stop.is_set():
                    return

    def _watch_jobs(self) -> None:
        from kubernetes import client, watch

        custom = client.CustomObjectsApi(_api())
        while not self.stop.is_set():
            for ev in watch.Watch().stream(custom.list_namespaced_custom_object, "aiaas.dev", "v1alpha1", self.ns,
                                           "trainingjobs", timeout_seconds=5):
                obj = ev["object"]
                if (obj.get("status") or {}).get("phase") == "Running":
                    self.running.setdefault(obj["metadata"]["name"], time.monotonic())
                if self.stop.is_set():
                    return


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


def run_phase(kind: str, n: int, timeout: float) -> dict[str, Any]:
    ns = f"bench-{kind}-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(f"/tmp/{ns}.log", "wb")  # noqa: SIM115
    if kind == "baseline":
        cmd = [sys.executable, __file__, "baseline-worker", "--namespace", ns]
    else:
        cmd = [sys.executable, "-m", "aiaas.operator", "operator", "--namespace", ns, "--standalone",
               "--metrics-port", "0", "--metrics-url-template", "", "--log-level", "WARNING",
               *OPERATOR_ARGS]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    time.sleep(3)  # imports, watches established
    cpu0, _ = proc_stats(proc.pid)
    rec = Recorder(ns)
    time.sleep(0.5)
    created: dict[str, float] = {}
    t0 = time.monotonic()
    create_jobs(ns, n, created)
    t_created = time.monotonic() - t0
    target = rec.running if kind == "operator" else rec.pod_ready
    deadline = time.monotonic() + timeout
    while len(target) < n and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    cpu1, peak = proc_stats(proc.pid) if proc.poll() is None else (float("nan"), float("nan"))
    rec.stop.set()
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    sts_lat = [rec.sts[k] - created[k] for k in created if k in rec.sts]
    run_lat = [rec.running[k] - created[k] for k in created if k in rec.running]
    pod_lat = [rec.pod_ready[k] - created[k] for k in created if k in rec.pod_ready]
    last_sts = max(rec.sts.values(), default=t0) - t0
    last_run = max(rec.running.values(), default=t0) - t0
    kubectl("delete", "namespace", ns, "--wait=false", check=False)
    return {
        "kind": kind, "namespace": ns, "jobs": n, "create_seconds": round(t_created, 2),
        "statefulsets": len(sts_lat), "running": len(run_lat),
        "sts_p50": pct(sts_lat, 50), "sts_p99": pct(sts_lat, 99),
        "run_p50": pct(run_lat, 50), "run_p99": pct(run_lat, 99),
        "pod_p50": pct(pod_lat, 50), "pod_p99": pct(pod_lat, 99),
        "sts_per_second": len(sts_lat) / last_sts if last_sts > 0 else float("nan"),
        "running_per_second": len(run_lat) / last_run if last_run > 0 else float("nan"),
        "cpu_seconds": cpu1 - cpu0, "peak_rss_mib": peak,
    }


def wait_namespace_gone(ns: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if kubectl("get", "namespace", ns, check=False).returncode != 0:
            return
        time.sleep(2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", default="bench", choices=["bench", "baseline-worker"])
    p.add_argument("--jobs", "-n", type=int, default=100)
    p.add_argument("--namespace", help="(baseline-worker) namespace to watch")
    p.add_argument("--timeout", type=float, default=600, help="per phase")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    p.add_argument("--operator-args", default="", help="extra flags for `aiaas operator`, e.g. '--workers 32'")
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

    results = []
    if not args.skip_baseline:
        base = run_phase("baseline", args.jobs, args.timeout)
        results.append(base)
        wait_namespace_gone(base["namespace"])
    op = run_phase("operator", args.jobs, args.timeout)
    results.append(op)

    print(f"\noperator benchmark: N={args.jobs} one-node TrainingJobs, created from 8 threads")
    print(f"{'':10}{'create→STS':>12}{'p99':>7}{'→pod Ready':>12}{'p99':>7}{'→Running':>10}{'p99':>7}"
          f"{'STS/s':>7}{'Running/s':>10}{'CPU s':>7}{'peak RSS':>10}")
    for r in results:
        print(f"{r['kind']:10}{r['sts_p50']:>11.2f}s{r['sts_p99']:>6.2f}s{r['pod_p50']:>11.2f}s{r['pod_p99']:>6.2f}s"
              f"{r['run_p50']:>9.2f}s{r['run_p99']:>6.2f}s{r['sts_per_second']:>7.1f}{r['running_per_second']:>10.1f}"
              f"{r['cpu_seconds']:>7.1f}{r['peak_rss_mib']:>7.0f}MiB")
    print("(p50 unless marked p99; 'Running' is status.phase written by the operator; the baseline writes none)")
    if not args.skip_baseline:
        b = results[0]
        print(f"ratio operator/baseline: create→STS p50 x{op['sts_p50'] / b['sts_p50']:.2f}, "
              f"p99 x{op['sts_p99'] / b['sts_p99']:.2f}, STS/s x{op['sts_per_second'] / b['sts_per_second']:.2f}, "
              f"CPU x{op['cpu_seconds'] / max(b['cpu_seconds'], 1e-9):.2f}")
    print(f"anchors: Kueue envtest ~43 workloads/s -> operator {op['running_per_second']:.1f} jobs/s to Running; "
          f"pod-startup SLO p99 <= 5 s -> create→Running p99 {op['run_p99']:.2f}s")
    missing = args.jobs - op["running"]
    if missing:
        print(f"WARNING: {missing} job(s) did not reach Running within {args.timeout:.0f}s")
    if args.json:
        print(json.dumps(results, indent=1))
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
