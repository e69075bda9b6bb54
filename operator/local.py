"""run a TrainingJob on this machine, no cluster needed (`aiaas run -f job.yaml`)

The job is rendered exactly as the operator renders it (:func:`aiaas.operator.render.render_trainingjob`),
and the StatefulSet's pod template is executed as local processes, one process group per pod ordinal:

* the container's ``command``/``args`` run as they are, with ``$(VAR)`` references expanded the way the
  kubelet does; ``torchrun`` and ``python`` resolve to this interpreter's (``python -m torch.distributed.run``);
  a ``torchrun`` of one node with one process starts its one worker directly, with the environment torchrun
  would give it (:func:`single_worker`): the agent would cost a second torch import and a rendezvous;
* env is resolved per pod: literal values as rendered, downward-API ``fieldRef``s (``metadata.name`` ->
  ``<job>-<ordinal>``, ``metadata.labels['apps.kubernetes.io/pod-index']`` -> the ordinal, ...);
* pod DNS names (``<job>-<i>.<service>...``) become ``127.0.0.1``, the rendezvous and master ports become free
  local ports, and each pod's metrics ports are shifted by ``ordinal x nprocPerNode`` so they do not collide;
* volume mount paths (``/var/run/aiaas``, your data volumes) map to directories under the run directory, or
  to local paths given with ``--mount NAME=PATH``; ``/dev/shm`` and ``/tmp`` stay what they are;
* each pod gets its own termination log; the runner reads them to report the outcome and exits with the
  trainer's code (0 success, 78 permanent error, 1 retryable after the restarts are used up, 143 stopped).
  Your own command (``spec.trainer.command``) writes no termination message: it succeeds when every pod
  exits 0, and fails with the exit code of the first pod that failed, and that pod's log tail;
* a module the pods cannot import (torch in an environment without the trainer extra) is a permanent error:
  checked before anything starts for ``torchrun`` and the built-in trainer, read from the log otherwise.

On a terminal the trainer's step lines become one progress line per job (steps, loss, accuracy, ETA) redrawn in
place; other lines print above it. Piped or with ``--plain``, every line prints as it comes.

Like the operator, the runner restarts the whole gang from the last checkpoint after a retryable failure,
up to ``spec.runPolicy.backoffLimit`` times. Ctrl-C (and SIGTERM or SIGHUP to `aiaas run`) sends SIGTERM to every
pod (the trainer checkpoints and stops); a second one kills them. Should `aiaas run` itself die (SIGKILL), its pods
get SIGTERM from the kernel. Without ``--resume`` the checkpoints of an earlier run are deleted, but only inside the
run directory; a volume's ``subPath`` must stay inside its volume, as the API server requires.
This module never imports torch: the pods are separate processes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import importlib.util
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from aiaas.contract import launch
from aiaas.contract.artifact import DONE_FILE, METRICS_FILE
from aiaas.contract.outcome import RETRYABLE, SUCCEEDED, classify, most_severe, read_outcome

from . import api, load
from .render import JobPlan, RenderSettings, render_trainingjob

SKIPPED_MOUNTS = ("/dev/shm", "/tmp")
TRAINER_INSTALL = "pip install 'aiaas[trainer]'"  # what brings torch (the trainer extra, pyproject.toml)
LOG_TAIL_LINES = 20
# torchrun's own report of a failed worker starts here; the worker's error is in the lines before it
_TORCHRUN_REPORT = re.compile(r"torch/distributed/elastic/multiprocessing/api\.py:\d+\] failed \(exitcode")
_MISSING_MODULE = re.compile(r"ModuleNotFoundError: No module named '([^']+)'")
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")
# what `aiaas run` does on these signals: what Ctrl-C does (SIGTERM to every pod, they checkpoint and stop)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when the thread that started it dies


class LocalPlanError(ValueError):
    """A job that cannot run on this machine as written; the message says what to change."""


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
    custom_command: bool = False  # spec.trainer.command: success is every pod exiting 0, no artifact expected
    volumes: dict[str, Path] = field(default_factory=dict)  # container mount path -> local directory


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
            local = local / _checked_sub_path(m["subPath"], name)
        out[path.rstrip("/")] = local
    return out


def _checked_sub_path(sub_path: str, volume: str) -> str:
    """``sub_path`` if it stays inside its volume, as the API server requires of a pod's volumeMounts."""
    parts = PurePosixPath(sub_path).parts
    if PurePosixPath(sub_path).is_absolute() or ".." in parts:
        raise LocalPlanError(
            f"volume {volume}: subPath {sub_path!r} must be a relative path without '..' (it would reach outside "
            "the volume; Kubernetes refuses it too); name a directory inside the volume")
    return sub_path


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


# torchrun flags that say nothing once there is one node with one process (value-taking, then bare)
_TORCHRUN_VALUE_FLAGS = {"nnodes", "nproc-per-node", "nproc_per_node", "node-rank", "node_rank", "rdzv-backend",
                         "rdzv_backend", "rdzv-endpoint", "rdzv_endpoint", "rdzv-id", "rdzv_id", "max-restarts",
                         "max_restarts"}
_TORCHRUN_BARE_FLAGS = {"standalone"}


def single_worker(argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]] | None:
    """A ``torchrun`` pod of one node with one process, as that one worker started directly (its command and
    the environment torchrun gives it); None for anything else. torchrun's agent would only import torch a
    second time and host a rendezvous for a single process: seconds of fixed cost per job."""
    if argv[:3] != [sys.executable, "-m", "torch.distributed.run"]:
        return None
    flags: dict[str, str] = {}
    rest = argv[3:]
    while rest and rest[0].startswith("--"):
        name, has_value, value = rest[0][2:].partition("=")
        if name in _TORCHRUN_BARE_FLAGS and not has_value:
            rest = rest[1:]
        elif name in _TORCHRUN_VALUE_FLAGS and (has_value or len(rest) > 1):
            flags[name.replace("_", "-")] = value if has_value else rest[1]
            rest = rest[1 if has_value else 2:]
        else:
            return None  # a flag whose meaning the runner would have to reproduce: keep torchrun
    nnodes = flags.get("nnodes", env.get(launch.ENV_NNODES, "1"))
    nproc = flags.get("nproc-per-node", env.get(launch.ENV_NPROC_PER_NODE, "1"))
    if nnodes != "1" or nproc != "1" or not rest or (rest[0] == "-m" and len(rest) < 2):
        return None
    worker_env = {
        **env, "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0", "ROLE_RANK": "0", "ROLE_NAME": "default",
        "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": "1",
        launch.ENV_MASTER_ADDR: "127.0.0.1", launch.ENV_MASTER_PORT: env.get(launch.ENV_MASTER_PORT) or str(free_port()),
        "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": flags.get("max-restarts", "0"),
        "TORCHELASTIC_RUN_ID": flags.get("rdzv-id", env.get(launch.ENV_RDZV_ID, "none")),
        "TORCHELASTIC_USE_AGENT_STORE": "False",
    }
    return [sys.executable, *rest], worker_env


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
        argv = _resolve_command([localize(expand_vars(a, env)) for a in wanted])
        argv, env = single_worker(argv, env) or (argv, env)
        pods.append(LocalPod(pod_name, ordinal, argv, env, term, pod_dir / "output.log", ports))
    return pods, mount_map


def plan(job: api.TrainingJob, run_dir: Path, mounts: dict[str, str] | None = None,
         metrics_base: int | None = None, settings: RenderSettings | None = None) -> LocalPlan:
    """Render ``job`` and plan its pods under ``run_dir``."""
    # locally every pod is this machine: run topology.nodes pods even when the job is elastic or suspended; the
    # StatefulSet holds the pod template a one-node job's bare pod is made of too (render.trainingjob.worker_pods)
    manifests = render_trainingjob(job, settings or RenderSettings(),
                                   JobPlan(replicas=job.spec.topology.nodes, workload="StatefulSet"))
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
        custom_command=job.spec.trainer.command is not None,
        volumes=mount_map,
    )


def _needs_torch(argv: list[str]) -> bool:
    """Whether a pod's (resolved) command is torchrun or the built-in trainer, which import torch."""
    modules = {argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "-m"}
    return bool(modules & {"torch.distributed.run", "aiaas.trainer"})


def missing_module_message(module: str) -> str:
    """What to do when the pods cannot import ``module`` (they run with this interpreter)."""
    if module.split(".")[0] == "torch":
        return (f"No module named 'torch' in {sys.prefix}: `aiaas run` starts the pods with {sys.executable}; "
                f"install the trainer there: {TRAINER_INSTALL}")
    return (f"No module named '{module}' in {sys.prefix}: the pods run with {sys.executable}; install it "
            f"there (restarting cannot help)")


def preflight(p: LocalPlan) -> str | None:
    """A problem that would make every pod fail at once, found before starting any (None: none)."""
    if any(_needs_torch(pod.argv) for pod in p.pods) and importlib.util.find_spec("torch") is None:
        return missing_module_message("torch")
    return None


# ------------------------------------------------------------------------------------------------- display
# torchrun's own chatter, shown only with --verbose
QUIET_LINES = ("OMP_NUM_THREADS", "node_rank is only used for static rdzv_backend")
# the built-in trainer's progress line (trainer/train.py, log_window); a real-trainer test keeps the two in step
STEP_LINE = re.compile(r"epoch (?P<epoch>\d+)/(?P<epochs>\d+) step (?P<step>\d+)/(?P<total>\d+) \(\d+%\) "
                       r"loss (?P<loss>\S+) acc (?P<acc>\S+) \| (?P<sps>\S+) samples/s \| eta (?P<eta>\S+)")
CLEAR_LINE = "\r\x1b[K"


class Console:
    """Where the runner's output goes. On a terminal the trainer's step lines become one progress line that is
    redrawn in place (``\\r``), every other line is printed above it; elsewhere (a pipe, a file) every line is
    printed as it comes. Thread-safe: each pod's output is pumped by its own thread."""

    def __init__(self, out: IO[str], job: str, bar: bool) -> None:
        self.out, self.job, self.bar = out, job, bar
        self.status = ""  # the progress line drawn last ("" when none is on screen)
        self.lock = threading.RLock()  # re-entrant: the Ctrl-C handler may print while the main thread does

    @classmethod
    def for_stream(cls, out: IO[str], job: str, plain: bool = False) -> Console:
        tty = not plain and out.isatty() and os.environ.get("TERM", "") != "dumb"
        return cls(out, job, tty)

    def say(self, line: str) -> None:
        with self.lock:
            self.out.write((CLEAR_LINE if self.status else "") + line + "\n" + self.status)
            self.out.flush()

    def pod_line(self, pod: str, line: str) -> None:
        """One line of a pod's output: a step line moves the progress bar (on a terminal), anything else is
        printed with the pod's name."""
        m = STEP_LINE.search(line) if self.bar else None
        if m is None:
            self.say(f"{pod} | {line}")
            return
        with self.lock:
            self.status = progress_line(self.job, m, shutil.get_terminal_size().columns)
            self.out.write(CLEAR_LINE + self.status)
            self.out.flush()

    def finish(self) -> None:
        """End the progress line, so what follows starts on a line of its own."""
        with self.lock:
            if self.status:
                self.out.write("\n")
                self.out.flush()
            self.status = ""


def progress_line(job: str, m: re.Match[str], columns: int) -> str:
    """``job [#####-----] 240/440 54% | epoch 6/10 | loss 0.0391 acc 0.9906 | 348 samples/s | eta 18s``; the
    richest form that fits the terminal's width (epoch and samples/s go first, then the bar), else cut."""
    step, total = int(m["step"]), max(int(m["total"]), 1)
    steps = f"{step}/{total} {100 * step // total}%"
    fit = f"loss {m['loss']} acc {m['acc']}"
    forms = [(20, f" | epoch {m['epoch']}/{m['epochs']} | {fit} | {m['sps']} samples/s | eta {m['eta']}"),
             (20, f" | {fit} | eta {m['eta']}"), (10, f" | {fit} | eta {m['eta']}"), (0, f" {fit} eta {m['eta']}")]
    for width, rest in forms:
        bar = f" [{'#' * (width * min(step, total) // total)}{'-' * (width - width * min(step, total) // total)}]"
        text = f"{job}{bar if width else ''} {steps}{rest}"
        if len(text) < columns:
            return text
    return text[: max(columns - 1, 10)]


# ----------------------------------------------------------------------------------------------- execution


def _stop_with(runner_pid: int) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the pod get SIGTERM when `aiaas run` dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG; a no-op elsewhere): its pods run in sessions of their own, so nothing else would stop them."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def in_child() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != runner_pid:  # the runner died before the request took effect
            os._exit(128 + int(signal.SIGTERM))
    return in_child


class Runner:
    """Runs a :class:`LocalPlan`'s pods, streams their output, and reports the outcome."""

    def __init__(self, p: LocalPlan, console: Console, verbose: bool = False) -> None:
        self.plan = p
        self.console = console
        self.verbose = verbose
        self.procs: list[subprocess.Popen[bytes]] = []
        self.threads: list[threading.Thread] = []
        self.stopping = 0
        self.tails = {pod.name: collections.deque[str](maxlen=10 * LOG_TAIL_LINES) for pod in p.pods}
        self.first_failed: int | None = None  # index of the pod that failed first

    def _pump(self, pod: LocalPod, stream: IO[bytes]) -> None:
        width = max(len(p.name) for p in self.plan.pods)
        with open(pod.log_file, "ab") as log:
            for raw in iter(stream.readline, b""):
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace").rstrip()
                if not line:
                    continue
                self.tails[pod.name].append(line)
                noisy = line.startswith("W") and "torch/distributed" in line and not self.verbose
                quiet = not self.verbose and any(w in line for w in QUIET_LINES)
                if noisy or quiet or set(line.split()[-1:]) == {"*" * 41}:
                    continue
                self.console.pod_line(f"{pod.name:<{width}}", line)

    def start(self) -> None:
        for pod in self.plan.pods:
            pod.termination_log.parent.mkdir(parents=True, exist_ok=True)
            pod.termination_log.unlink(missing_ok=True)
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
            env.update(pod.env)
            env.setdefault("PYTHONUNBUFFERED", "1")
            env.setdefault("PYTHONSAFEPATH", "1")  # a repo checkout's operator/ must not shadow the stdlib
            proc = subprocess.Popen(pod.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(self.plan.run_dir),
                                    preexec_fn=_stop_with(os.getpid()))
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
            if self.first_failed is None:
                self.first_failed = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
            if all(c is not None for c in codes):
                break
            if self.first_failed is not None and not self.stopping:
                self.stopping = 1
                self.stop(self.plan.grace_seconds)
                continue
            if deadline and time.monotonic() > deadline:
                self.console.say(f"timeout: stopping {self.plan.job} after {timeout:.0f}s")
                self.stopping = 1
                self.stop(self.plan.grace_seconds)
                continue
            time.sleep(0.1)
        for t in self.threads:
            t.join(timeout=5)
        return [int(p.returncode) for p in self.procs]

    def outcome(self) -> dict[str, Any] | None:
        """The most severe termination message of all pods; without any (your own command, or a crash before
        the trainer wrote one), an outcome made from the exit code and log tail of the pod that failed first."""
        written = most_severe(({**data, "pod": pod.name} if (data := read_outcome(pod.termination_log)) else None)
                              for pod in self.plan.pods)
        if written or self.first_failed is None:
            return written
        pod = self.plan.pods[self.first_failed]
        code = _exit_status(self.procs[self.first_failed].returncode)
        tail = log_tail(list(self.tails[pod.name]))
        missing = next((m.group(1) for line in tail if (m := _MISSING_MODULE.search(line))), None)
        if missing:
            return {"outcome": classify(None, launch.EXIT_PERMANENT), "exitCode": launch.EXIT_PERMANENT,
                    "pod": pod.name, "message": missing_module_message(missing), "logTail": tail}
        return {"outcome": classify(None, code), "exitCode": code, "pod": pod.name,
                "message": f"{pod.name} exited with code {code}", "logTail": tail}


def log_tail(lines: list[str]) -> list[str]:
    """The last lines of a failed pod's output that say why: torchrun's own report of the failure cut off."""
    cut = next((i for i, line in enumerate(lines) if _TORCHRUN_REPORT.search(line)), len(lines))
    return (lines[:cut] or lines)[-LOG_TAIL_LINES:]


def _exit_status(returncode: int) -> int:
    """A process's exit status as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def exit_code_of(outcome: dict[str, Any] | None, codes: list[int]) -> int:
    if outcome and isinstance(outcome.get("exitCode"), int):
        if outcome["outcome"] == SUCCEEDED and any(codes):
            return launch.EXIT_RETRYABLE
        return int(outcome["exitCode"])
    return launch.EXIT_SUCCESS if not any(codes) else launch.EXIT_RETRYABLE


def run_plan(p: LocalPlan, console: Console | None = None, verbose: bool = False,
             timeout: float | None = None, restarts: int | None = None) -> tuple[int, dict[str, Any] | None]:
    """Run the pods to the end, restarting the gang after retryable failures. Returns (exit code, outcome)."""
    out = console or Console(sys.stdout, p.job, bar=False)
    try:
        return _attempts(p, out, verbose, timeout, p.backoff_limit if restarts is None else restarts)
    finally:
        out.finish()


def _attempts(p: LocalPlan, out: Console, verbose: bool, timeout: float | None,
              restarts: int) -> tuple[int, dict[str, Any] | None]:
    attempt = 0
    while True:
        runner = Runner(p, out, verbose)
        interrupted = {"n": 0}

        def on_stop(signum: int, frame: Any, runner: Runner = runner, interrupted: dict[str, int] = interrupted
                    ) -> None:
            interrupted["n"] += 1
            if interrupted["n"] == 1:
                why = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
                out.say(f"\nstopping {p.job} on {why} (SIGTERM to every pod; Ctrl-C again to kill)")
                runner.stopping = 1
                runner.signal_all(signal.SIGTERM)
            else:
                runner.signal_all(signal.SIGKILL)

        in_main = threading.current_thread() is threading.main_thread()
        saved = {sig: signal.signal(sig, on_stop) for sig in STOP_SIGNALS} if in_main else {}
        try:
            runner.start()
            codes = runner.wait(timeout)
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
        outcome = runner.outcome()
        code = exit_code_of(outcome, codes)
        if interrupted["n"]:
            return launch.EXIT_PREEMPTED, outcome
        if code != launch.EXIT_SUCCESS and classify(None, code) == RETRYABLE and attempt < restarts:
            attempt += 1
            msg = (outcome or {}).get("message", f"exit codes {codes}")
            since = "" if p.custom_command else " from its last checkpoint"
            out.say(f"restarting {p.job}{since} ({attempt}/{restarts}): {msg}")
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
    p.add_argument("--plain", action="store_true",
                   help="print every log line, also on a terminal (default there: one progress line per job)")


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
    try:
        p = plan(job, run_dir, mounts, args.metrics_port)
    except LocalPlanError as e:
        print(f"error: {job.metadata.name}: {e}", file=sys.stderr)
        return launch.EXIT_PERMANENT
    missing = [f"--mount {k}={v}: {Path(v).expanduser()} does not exist" for k, v in mounts.items()
               if not Path(v).expanduser().exists()]
    problem = "; ".join(missing) or preflight(p)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return launch.EXIT_PERMANENT
    problem = None if args.resume else start_over(p)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return launch.EXIT_PERMANENT
    for local in [run_dir / "pods", *p.volumes.values()]:  # like emptyDirs, the volumes exist when pods start
        if local.is_relative_to(run_dir):
            local.mkdir(parents=True, exist_ok=True)
    t = job.spec.topology
    print(f"running TrainingJob {job.metadata.name}: {t.nodes} pod(s) x {t.nproc_per_node} process(es) in {run_dir}")
    for pod in p.pods:
        ports = f", metrics on :{pod.metrics_ports[0]}" + (f"-{pod.metrics_ports[-1]}" if len(pod.metrics_ports) > 1
                                                          else "") if pod.metrics_ports else ""
        print(f"  {pod.name}: {' '.join(pod.argv[3:] if pod.argv[:3] == [sys.executable, '-m', 'torch.distributed.run'] else pod.argv)}{ports}")
    start = time.monotonic()
    console = Console.for_stream(sys.stdout, job.metadata.name, plain=args.plain)
    code, outcome = run_plan(p, console, verbose=args.verbose, timeout=args.timeout, restarts=args.restarts)
    return report(p, code, outcome, time.monotonic() - start)


def start_over(p: LocalPlan) -> str | None:
    """Delete the checkpoints of an earlier run, but only inside the run directory, which `aiaas run` owns; one
    elsewhere (a hostPath volume, ``--mount``) is kept, and the problem returned says what to do instead."""
    ckpt = p.checkpoint_dir.resolve()
    if ckpt.is_relative_to(p.run_dir.resolve()):
        shutil.rmtree(ckpt, ignore_errors=True)
        return None
    if ckpt.is_dir() and any(ckpt.iterdir()):
        return (f"the checkpoint directory {ckpt} lies outside the run directory {p.run_dir} (a hostPath volume "
                "or --mount) and is not empty; aiaas run deletes only what it owns: pass --resume to continue "
                "from those checkpoints, or remove them yourself to start over")
    return None


def report(p: LocalPlan, code: int, outcome: dict[str, Any] | None, took: float) -> int:
    """Say how the run ended and where its results are; the exit code of ``aiaas run``."""
    if code == launch.EXIT_SUCCESS and p.custom_command:
        print(f"\n{p.job} succeeded in {took:.0f}s: all {len(p.pods)} pod(s) exited 0")
        for mount, local in sorted(p.volumes.items()):
            print(f"volume {mount}: {local}")
        return 0
    if code == launch.EXIT_SUCCESS and (p.artifact_dir / DONE_FILE).exists():
        metrics = json.loads((p.artifact_dir / METRICS_FILE).read_text())
        print(f"\n{p.job} succeeded in {took:.0f}s: {metrics.get('steps')} steps, eval accuracy "
              f"{metrics.get('accuracy', float('nan')):.4f}")
        print(f"model artifact: {p.artifact_dir}")
        print(f"serve it:       aiaas serve --model {p.artifact_dir}")
        return 0
    what = outcome.get("outcome") if outcome else "Failed"
    msg = outcome.get("message") if outcome else "no termination message; see the pod logs"
    if code == launch.EXIT_SUCCESS:
        msg = f"every pod exited 0, but the trainer exported no model to {p.artifact_dir}"
    tail = (outcome or {}).get("logTail") or []
    if tail:
        print(f"\nlast lines of {outcome and outcome.get('pod')}:", *(f"  {line}" for line in tail),
              sep="\n", file=sys.stderr)
    print(f"\n{p.job} {what} after {took:.0f}s (exit {code}): {msg}", file=sys.stderr)
    print(f"logs: {p.run_dir / 'pods'}", file=sys.stderr)
    return code if code else 1
