"""run a TrainingJob on this machine, no cluster needed (`aiaas run -f job.yaml`)

The job is rendered exactly as the operator renders it (:func:`aiaas.operator.render.render_trainingjob`),
and the StatefulSet's pod template is executed as local processes, one process group per pod ordinal:

* the container's ``command``/``args`` run as they are, with ``$(VAR)`` references expanded the way the
  kubelet does; ``torchrun`` and ``python`` resolve to this interpreter's (``python -m torch.distributed.run``);
* env is resolved per pod: literal values as rendered, downward-API ``fieldRef``s (``metadata.name`` ->
  ``<job>-<ordinal>``, ``metadata.labels['apps.kubernetes.io/pod-index']`` -> the ordinal, ...);
* pod DNS names (``<job>-<i>.<service>...``) become ``127.0.0.1``, the rendezvous and master ports become free
  local ports, and each pod's metrics ports are shifted by ``ordinal x nprocPerNode`` so they do not collide;
* volume mount paths (``/var/run/aiaas``, your data volumes) map to directories under the run directory, or
  to local paths given with ``--mount NAME=PATH``; ``/dev/shm`` and ``/tmp`` stay what they are;
* each pod gets its own termination log; the runner reads them to report the outcome and exits with the
  trainer's code (0 success, 78 permanent error, 1 retryable after the restarts are used up, 143 stopped).

Like the operator, the runner restarts the whole gang from the last checkpoint after a retryable failure,
up to ``spec.runPolicy.backoffLimit`` times. Ctrl-C sends SIGTERM to every pod (the trainer checkpoints and
stops); a second Ctrl-C kills them. This module never imports torch: the pods are separate processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from aiaas.contract import launch
from aiaas.contract.artifact import DONE_FILE, METRICS_FILE
from aiaas.contract.outcome import SUCCEEDED, most_severe, read_outcome

from . import api, load
from .render import JobPlan, RenderSettings, render_trainingjob

SKIPPED_MOUNTS = ("/dev/shm", "/tmp")
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


# ------------------------------------------------------------------------------------------------ planning
@dataclass
class LocalPod:
    """One StatefulSet pod as a local process."""

    name: str
    ordinal: int
    argv: list[str]
    env: dict[str, str]
    termination_log: Path
    log_file: Path
    metrics_ports: list[int] = field(default_factory=list)


@dataclass
class LocalPlan:
    job: str
    pods: list[LocalPod]
    run_dir: Path
    artifact_dir: Path
    checkpoint_dir: Path
    backoff_limit: int
    grace_seconds: int


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def expand_vars(text: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined variables are replaced, ``$$`` is a literal ``$``, undefined
    references stay as written."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, text)


def _field_value(path: str, pod_name: str, ordinal: int, namespace: str, labels: dict[str, str]) -> str | None:
    if path == "metadata.name":
        return pod_name
    if path == "metadata.namespace":
        return namespace
    m = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
    if m:
        if m.group(1) == launch.POD_INDEX_LABEL:
            return str(ordinal)
        if m.group(1) == "statefulset.kubernetes.io/pod-name":
            return pod_name
        return labels.get(m.group(1))
    if path in ("status.podIP", "status.hostIP"):
        return "127.0.0.1"
    if path == "spec.nodeName":
        return socket.gethostname()
    return None


def _mount_map(container: dict[str, Any], volumes: list[dict[str, Any]], run_dir: Path,
               mounts: dict[str, str]) -> dict[str, Path]:
    """Container mount path -> local directory."""
    by_name = {v["name"]: v for v in volumes}
    out: dict[str, Path] = {}
    for m in container.get("volumeMounts", []):
        path = m["mountPath"]
        if path in SKIPPED_MOUNTS:
            continue
        name = m["name"]
        if name in mounts:
            local = Path(mounts[name]).expanduser().resolve()
        else:
            vol = by_name.get(name, {})
            host = (vol.get("hostPath") or {}).get("path")
            local = Path(host) if host else run_dir / "volumes" / name
        if m.get("subPath") and name not in mounts:
            local = local / m["subPath"]
        out[path.rstrip("/")] = local
    return out


def _map_path(value: str, mount_map: dict[str, Path]) -> str:
    """Rewrite a container path that lies under a mount to the local directory."""
    for mount in sorted(mount_map, key=len, reverse=True):
        if value == mount or value.startswith(mount + "/"):
            return str(mount_map[mount]) + value[len(mount):]
    return value


def _resolve_command(argv: list[str]) -> list[str]:
    head = argv[0]
    if head == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    if head in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    return argv


def plan_pods(sts: dict[str, Any], run_dir: Path, mounts: dict[str, str] | None = None,
              metrics_base: int | None = None, namespace: str = "default") -> tuple[list[LocalPod], dict[str, Path]]:
    """The local processes for a rendered StatefulSet (pure apart from picking free ports)."""
    mounts = mounts or {}
    name = sts["metadata"]["name"]
    service = sts["spec"].get("serviceName", name)
    replicas = int(sts["spec"].get("replicas") or 0)
    template = sts["spec"]["template"]
    labels = dict(template["metadata"].get("labels", {}))
    pod_spec = template["spec"]
    container = pod_spec["containers"][0]
    mount_map = _mount_map(container, pod_spec.get("volumes", []), run_dir, mounts)
    host_re = re.compile(rf"\b{re.escape(name)}-(\d+)\.{re.escape(service)}(\.[a-z0-9-]+)?(\.svc(\.cluster\.local)?)?\b")
    port_map = {str(launch.RDZV_PORT): str(free_port()), str(launch.MASTER_PORT): str(free_port())}
    port_re = re.compile(r"127\.0\.0\.1:(\d+)")
    nproc = 1
    for p in container.get("ports", []):
        if p.get("name", "").startswith("metrics"):
            nproc = max(nproc, int(p["containerPort"]) - launch.METRICS_PORT + 1)

    def localize(value: str) -> str:
        value = host_re.sub("127.0.0.1", value)
        value = port_re.sub(lambda m: "127.0.0.1:" + port_map.get(m.group(1), m.group(1)), value)
        return _map_path(value, mount_map)

    pods = []
    for ordinal in range(replicas):
        pod_name = f"{name}-{ordinal}"
        pod_dir = run_dir / "pods" / pod_name
        env: dict[str, str] = {}
        for e in container.get("env", []):
            if "value" in e and e["value"] is not None:
                value = str(e["value"])
            elif "valueFrom" in e and "fieldRef" in e["valueFrom"]:
                v = _field_value(e["valueFrom"]["fieldRef"]["fieldPath"], pod_name, ordinal, namespace, labels)
                if v is None:
                    print(f"warning: {pod_name}: env {e['name']}: cannot resolve {e['valueFrom']} locally; unset",
                          file=sys.stderr)
                    continue
                value = v
            elif "valueFrom" in e:
                print(f"warning: {pod_name}: env {e['name']} comes from {list(e['valueFrom'])[0]}, which has no "
                      "local equivalent; unset", file=sys.stderr)
                continue
            else:
                value = ""
            env[e["name"]] = expand_vars(value, env)
        for key in list(env):
            env[key] = localize(env[key])
        if env.get(launch.ENV_MASTER_PORT) in port_map:
            env[launch.ENV_MASTER_PORT] = port_map[env[launch.ENV_MASTER_PORT]]
        ports: list[int] = []
        if launch.ENV_CONFIG in env:
            cfg = json.loads(env[launch.ENV_CONFIG])
            for key in ("checkpointDir", "artifactDir"):
                if key in cfg:
                    cfg[key] = _map_path(cfg[key], mount_map)
            if (cfg.get("dataset") or {}).get("path"):
                cfg["dataset"]["path"] = _map_path(cfg["dataset"]["path"], mount_map)
            base = cfg.get("metricsPort", launch.METRICS_PORT) if metrics_base is None else metrics_base
            cfg["metricsPort"] = base + ordinal * nproc if base else 0
            ports = [cfg["metricsPort"] + r for r in range(nproc)] if base else []
            env[launch.ENV_CONFIG] = json.dumps(cfg, separators=(",", ":"))
        term = pod_dir / "termination-log"
        env[launch.ENV_TERMINATION_LOG] = str(term)
        # no kubelet restarts a finished process here: the run-once wrapper is not needed
        wanted = launch.unwrap_run_once([*container.get("command", []), *container.get("args", [])])
        argv = [localize(expand_vars(a, env)) for a in wanted]
        pods.append(LocalPod(pod_name, ordinal, _resolve_command(argv), env, term, pod_dir / "output.log", ports))
    return pods, mount_map


def plan(job: api.TrainingJob, run_dir: Path, mounts: dict[str, str] | None = None,
         metrics_base: int | None = None, settings: RenderSettings | None = None) -> LocalPlan:
    """Render ``job`` and plan its pods under ``run_dir``."""
    # locally every pod is this machine: run topology.nodes pods even when the job is elastic or suspended
    manifests = render_trainingjob(job, settings or RenderSettings(), JobPlan(replicas=job.spec.topology.nodes))
    sts = next(m for m in manifests if m["kind"] == "StatefulSet")
    pods, mount_map = plan_pods(sts, run_dir, mounts, metrics_base, job.metadata.namespace or "default")
    cfg = json.loads(pods[0].env[launch.ENV_CONFIG]) if pods and launch.ENV_CONFIG in pods[0].env else {}
    return LocalPlan(
        job=job.metadata.name,
        pods=pods,
        run_dir=run_dir,
        artifact_dir=Path(cfg.get("artifactDir", _map_path(launch.ARTIFACT_DIR, mount_map))),
        checkpoint_dir=Path(cfg.get("checkpointDir", _map_path(launch.CHECKPOINT_DIR, mount_map))),
        backoff_limit=job.spec.run_policy.backoff_limit,
        grace_seconds=int(sts["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)),
    )


# ----------------------------------------------------------------------------------------------- execution
# torchrun's own chatter, shown only with --verbose
QUIET_LINES = ("OMP_NUM_THREADS", "node_rank is only used for static rdzv_backend")


class Runner:
    """Runs a :class:`LocalPlan`'s pods, streams their output, and reports the outcome."""

    def __init__(self, p: LocalPlan, out: IO[str] | None = None, verbose: bool = False) -> None:
        self.plan = p
        self.out = out or sys.stdout
        self.verbose = verbose
        self.procs: list[subprocess.Popen[bytes]] = []
        self.threads: list[threading.Thread] = []
        self.stopping = 0
        self.lock = threading.Lock()

    def _print(self, line: str) -> None:
        with self.lock:
            self.out.write(line + "\n")
            self.out.flush()

    def _pump(self, pod: LocalPod, stream: IO[bytes]) -> None:
        width = max(len(p.name) for p in self.plan.pods)
        with open(pod.log_file, "ab") as log:
            for raw in iter(stream.readline, b""):
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace").rstrip()
                if not line:
                    continue
                noisy = line.startswith("W") and "torch/distributed" in line and not self.verbose
                quiet = not self.verbose and any(w in line for w in QUIET_LINES)
                if noisy or quiet or set(line.split()[-1:]) == {"*" * 41}:
                    continue
                self._print(f"{pod.name:<{width}} | {line}")

    def start(self) -> None:
        for pod in self.plan.pods:
            pod.termination_log.parent.mkdir(parents=True, exist_ok=True)
            pod.termination_log.unlink(missing_ok=True)
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
            env.update(pod.env)
            env.setdefault("PYTHONUNBUFFERED", "1")
            env.setdefault("PYTHONSAFEPATH", "1")  # a repo checkout's operator/ must not shadow the stdlib
            proc = subprocess.Popen(pod.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(self.plan.run_dir))
            self.procs.append(proc)
            assert proc.stdout is not None
            t = threading.Thread(target=self._pump, args=(pod, proc.stdout), daemon=True)
            t.start()
            self.threads.append(t)

    def signal_all(self, sig: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)

    def stop(self, grace: float) -> None:
        """SIGTERM every pod, wait up to ``grace`` seconds, then SIGKILL what is left."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.1)
        self.signal_all(signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def wait(self, timeout: float | None = None) -> list[int]:
        """Wait until every pod exited; when one fails, stop the others (as the operator restarts the gang)."""
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                break
            if any(c not in (None, 0) for c in codes) and not self.stopping:
                self.stopping = 1
                self.stop(self.plan.grace_seconds)
                continue
            if deadline and time.monotonic() > deadline:
                self._print(f"timeout: stopping {self.plan.job} after {timeout:.0f}s")
                self.stopping = 1
                self.stop(self.plan.grace_seconds)
                continue
            time.sleep(0.1)
        for t in self.threads:
            t.join(timeout=5)
        return [int(p.returncode) for p in self.procs]

    def outcome(self) -> dict[str, Any] | None:
        """The most severe termination message of all pods."""
        return most_severe(({**data, "pod": pod.name} if (data := read_outcome(pod.termination_log)) else None)
                           for pod in self.plan.pods)


def exit_code_of(outcome: dict[str, Any] | None, codes: list[int]) -> int:
    if outcome and isinstance(outcome.get("exitCode"), int):
        if outcome["outcome"] == SUCCEEDED and any(codes):
            return launch.EXIT_RETRYABLE
        return int(outcome["exitCode"])
    return launch.EXIT_SUCCESS if not any(codes) else launch.EXIT_RETRYABLE


def run_plan(p: LocalPlan, out: IO[str] | None = None, verbose: bool = False,
             timeout: float | None = None, restarts: int | None = None) -> tuple[int, dict[str, Any] | None]:
    """Run the pods to the end, restarting the gang after retryable failures. Returns (exit code, outcome)."""
    out = out or sys.stdout
    restarts = p.backoff_limit if restarts is None else restarts
    attempt = 0
    while True:
        runner = Runner(p, out, verbose)
        interrupted = {"n": 0}

        def on_sigint(signum: int, frame: Any, runner: Runner = runner, interrupted: dict[str, int] = interrupted
                      ) -> None:
            interrupted["n"] += 1
            if interrupted["n"] == 1:
                out.write(f"\nstopping {p.job} (SIGTERM to every pod; Ctrl-C again to kill)\n")
                runner.stopping = 1
                runner.signal_all(signal.SIGTERM)
            else:
                runner.signal_all(signal.SIGKILL)

        in_main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, on_sigint) if in_main else None
        try:
            runner.start()
            codes = runner.wait(timeout)
        finally:
            if in_main:
                signal.signal(signal.SIGINT, old)
        outcome = runner.outcome()
        code = exit_code_of(outcome, codes)
        if interrupted["n"]:
            return launch.EXIT_PREEMPTED, outcome
        if code == launch.EXIT_RETRYABLE and attempt < restarts:
            attempt += 1
            msg = (outcome or {}).get("message", f"exit codes {codes}")
            out.write(f"restarting {p.job} from its last checkpoint ({attempt}/{restarts}): {msg}\n")
            continue
        return code, outcome


# ------------------------------------------------------------------------------------------------- the CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--filename", required=True, help="YAML file with a TrainingJob")
    p.add_argument("--name", help="which TrainingJob of the file to run (default: the first)")
    p.add_argument("--run-dir", help="where checkpoints, artifacts and logs go (default: ./runs/<job name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoints of an earlier run in the run directory (default: start over)")
    p.add_argument("--mount", action="append", default=[], metavar="VOLUME=PATH",
                   help="use local PATH for the pod volume VOLUME (e.g. --mount data=./corpus-dir)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="first Prometheus port (pod i, local rank r: +i*nprocPerNode+r); 0 disables; "
                        f"default {launch.METRICS_PORT}")
    p.add_argument("--restarts", type=int, default=None,
                   help="gang restarts after retryable failures (default: spec.runPolicy.backoffLimit)")
    p.add_argument("--timeout", type=float, default=None, help="stop the job after this many seconds")
    p.add_argument("-v", "--verbose", action="store_true", help="show torchrun's own warnings too")


def run(args: argparse.Namespace) -> int:
    items = [i.obj for i in load.load_file(args.filename)]
    jobs = [o for o in items if isinstance(o, api.TrainingJob)]
    if args.name:
        jobs = [j for j in jobs if j.metadata.name == args.name]
    if not jobs:
        print(f"error: {args.filename} has no TrainingJob" + (f" named {args.name}" if args.name else ""),
              file=sys.stderr)
        return 1
    job = jobs[0]
    mounts = {}
    for m in args.mount:
        if "=" not in m:
            print(f"error: --mount {m}: expected VOLUME=PATH", file=sys.stderr)
            return 1
        k, v = m.split("=", 1)
        mounts[k] = v
    run_dir = Path(args.run_dir or Path("runs") / job.metadata.name).resolve()
    p = plan(job, run_dir, mounts, args.metrics_port)
    if not args.resume:
        shutil.rmtree(p.checkpoint_dir, ignore_errors=True)
    (run_dir / "pods").mkdir(parents=True, exist_ok=True)
    t = job.spec.topology
    print(f"running TrainingJob {job.metadata.name}: {t.nodes} pod(s) x {t.nproc_per_node} process(es) in {run_dir}")
    for pod in p.pods:
        ports = f", metrics on :{pod.metrics_ports[0]}" + (f"-{pod.metrics_ports[-1]}" if len(pod.metrics_ports) > 1
                                                          else "") if pod.metrics_ports else ""
        print(f"  {pod.name}: {' '.join(pod.argv[3:] if pod.argv[:3] == [sys.executable, '-m', 'torch.distributed.run'] else pod.argv)}{ports}")
    start = time.monotonic()
    code, outcome = run_plan(p, verbose=args.verbose, timeout=args.timeout, restarts=args.restarts)
    took = time.monotonic() - start
    if code == launch.EXIT_SUCCESS and (p.artifact_dir / DONE_FILE).exists():
        metrics = json.loads((p.artifact_dir / METRICS_FILE).read_text())
        print(f"\n{job.metadata.name} succeeded in {took:.0f}s: {metrics.get('steps')} steps, eval accuracy "
              f"{metrics.get('accuracy', float('nan')):.4f}")
        print(f"model artifact: {p.artifact_dir}")
        print(f"serve it:       aiaas serve --model {p.artifact_dir}")
        return 0
    what = outcome.get("outcome") if outcome else "Failed"
    msg = outcome.get("message") if outcome else "no termination message; see the pod logs"
    print(f"\n{job.metadata.name} {what} after {took:.0f}s (exit {code}): {msg}", file=sys.stderr)
    print(f"logs: {run_dir / 'pods'}", file=sys.stderr)
    return code if code else 1
