"""The operator against a real control plane: `aiaas operator` runs as a subprocess, kwok plays the kubelet.

Pods never run containers here. A test makes a trainer "finish" or "fail" by annotating a pod for the kwok stage
hack/kwok/stages/pod-container-exit.yaml (``fake.aiaas.dev/exit-code`` + ``fake.aiaas.dev/message``, the JSON
termination message the trainer writes), exactly as the kubelet would report it: ``lastState.terminated`` on a
restartPolicy Always pod. Progress comes from a Prometheus endpoint the test serves on loopback (kwok pod IPs
are fake), wired in with ``--metrics-url-template``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from e2e_util import REPO_ROOT, wait_for

from aiaas.contract import launch
from aiaas.contract import metrics as m

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180), pytest.mark.usefixtures("e2e_cluster")]

EXIT_ANNOTATION = "fake.aiaas.dev/exit-code"
MESSAGE_ANNOTATION = "fake.aiaas.dev/message"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Operator:
    """`aiaas operator` as a subprocess, with its /metrics port."""

    def __init__(self, namespace: str, extra: list[str], log_path: str) -> None:
        self.namespace = namespace
        self.port = _free_port()
        self.extra = extra
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Operator:
        cmd = [sys.executable, "-m", "aiaas.operator", "operator", "--namespace", self.namespace,
               "--resync-seconds", "1", "--retry-seconds", "0.5", "--metrics-host", "127.0.0.1",
               "--metrics-port", str(self.port), *self.extra]
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for(lambda: self.get("/healthz")[0] == 200, timeout=30, what="operator /healthz")
        return self

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()
        except OSError:
            return 0, ""

    def metrics(self) -> str:
        code, text = self.get("/metrics")
        assert code == 200, text
        return text

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-6000:]
        except OSError:
            return ""


@pytest.fixture
def progress_endpoint() -> Iterator[dict[str, float]]:
    """A loopback Prometheus endpoint shaped like rank 0 of the trainer; mutate the dict to change it."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    values = {m.TRAINER_STEP: 120, m.TRAINER_TOTAL_STEPS: 500, m.TRAINER_EPOCH: 2, m.TRAINER_LOSS: 0.4321,
              m.TRAINER_ACCURACY: 0.875, m.TRAINER_SAMPLES_PER_SECOND: 1234.5}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            lines = []
            for name, v in values.items():
                lines += [f"# TYPE {name} gauge", f'{name}{{job="j",rank="0"}} {v}']
            body = ("\n".join(lines) + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=server.serve_forever, daemon=True).start()
    values["__port__"] = server.server_address[1]
    try:
        yield values
    finally:
        server.shutdown()


@pytest.fixture
def operator(namespace: str, tmp_path, progress_endpoint) -> Iterator[Callable[..., Operator]]:
    """``operator(*extra_flags)`` starts one (standalone unless flags say otherwise); all stop at the end."""
    started: list[Operator] = []
    url = f"http://127.0.0.1:{int(progress_endpoint['__port__'])}/metrics"

    def start(*extra: str, standalone: bool = True) -> Operator:
        flags = ["--metrics-url-template", url, *extra]
        if standalone:
            flags.append("--standalone")
        op = Operator(namespace, flags, str(tmp_path / f"operator-{len(started)}.log")).start()
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()


# ------------------------------------------------------------------------------------------------ helpers
def trainingjob(name: str, nodes: int = 1, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "aiaas.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "trainer": {"model": {"architecture": "cnn"}, "dataset": {"kind": "digits"},
                        "hyperparameters": {"epochs": 1, "batchSize": 32}},
            "topology": {"nodes": nodes, "nprocPerNode": 1,
                         "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}},
        },
    }
    for k, v in spec.items():
        body["spec"][k] = v
    return body


def apply(kubectl, namespace: str, obj: dict[str, Any]) -> None:
    kubectl("apply", "-f", "-", input=json.dumps(obj), namespace=namespace)


def get(kubectl, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    r = kubectl("get", kind, name, "-o", "json", namespace=namespace, check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def job_status(kubectl, namespace: str, name: str) -> dict[str, Any]:
    return (get(kubectl, namespace, "trainingjobs.aiaas.dev", name) or {}).get("status") or {}


def wait_phase(kubectl, namespace: str, name: str, phase: str, timeout: float = 40,
               op: Operator | None = None) -> dict[str, Any]:
    try:
        return wait_for(lambda: (s := job_status(kubectl, namespace, name)).get("phase") == phase and s,
                        timeout=timeout, interval=0.3, what=f"TrainingJob {name} phase {phase}")
    except TimeoutError:
        print(json.dumps(job_status(kubectl, namespace, name), indent=1))
        if op is not None:
            print(op.log())
        raise


def pods(kubectl, namespace: str, job: str) -> list[dict[str, Any]]:
    out = kubectl("get", "pods", "-l", f"{launch.LABEL_JOB}={job}", "-o", "json", namespace=namespace).stdout
    return [p for p in json.loads(out)["items"] if not p["metadata"].get("deletionTimestamp")]


def ready_pods(kubectl, namespace: str, job: str, n: int) -> list[dict[str, Any]]:
    def ok() -> list[dict[str, Any]] | None:
        ps = pods(kubectl, namespace, job)
        ready = [p for p in ps if any(c["type"] == "Ready" and c["status"] == "True"
                                      for c in p["status"].get("conditions", []))]
        return ready if len(ready) == n else None

    return wait_for(ok, timeout=30, interval=0.3, what=f"{n} ready pods of {job}")


def finish_pod(kubectl, namespace: str, pod: str, exit_code: int, outcome: dict[str, Any]) -> None:
    """Make the pod's trainer exit (kwok stage), with the termination message the trainer would write."""
    kubectl("annotate", "pod", pod, "--overwrite", f"{EXIT_ANNOTATION}={exit_code}",
            f"{MESSAGE_ANNOTATION}={json.dumps(outcome)}", "fake.aiaas.dev/delay=100ms", namespace=namespace)


def events(kubectl, namespace: str, name: str) -> list[dict[str, Any]]:
    out = kubectl("get", "events", "--field-selector", f"involvedObject.name={name}", "-o", "json",
                  namespace=namespace).stdout
    return json.loads(out)["items"]


def event_reasons(kubectl, namespace: str, name: str) -> set[str]:
    return {e["reason"] for e in events(kubectl, namespace, name)}


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def sts_replicas(kubectl, namespace: str, name: str) -> int | None:
    sts = get(kubectl, namespace, "statefulset", name)
    return None if sts is None else int(sts["spec"]["replicas"])


def bare_workers(kubectl, namespace: str, name: str) -> int:
    """A one-node job's workers: its bare pods not being deleted (it has no StatefulSet)."""
    assert get(kubectl, namespace, "statefulset", name) is None, "a one-node job has no StatefulSet"
    return len(pods(kubectl, namespace, name))


SUCCEEDED = {"outcome": "Succeeded", "reason": "Completed", "message": "training finished", "step": 500,
             "artifact": "/var/run/aiaas/artifacts"}


# -------------------------------------------------------------------------------------------------- tests
def test_job_runs_with_conditions_children_and_progress(kubectl, namespace, operator, progress_endpoint):
    op = operator()
    apply(kubectl, namespace, trainingjob("lenet", nodes=2))
    st = wait_phase(kubectl, namespace, "lenet", "Running", op=op)
    assert st["readyReplicas"] == 2 and st["replicas"] == 2 and st["restartCount"] == 0
    assert condition(st, "Created")["status"] == "True"
    assert condition(st, "Running")["status"] == "True"
    assert st["startTime"] and st["observedGeneration"] == 1
    job = get(kubectl, namespace, "trainingjobs.aiaas.dev", "lenet")
    assert job is not None
    for kind, child_name in (("statefulset", "lenet"), ("service", launch.headless_service_name("lenet"))):
        child = get(kubectl, namespace, kind, child_name)
        assert child is not None, kind
        owner = child["metadata"]["ownerReferences"][0]
        assert owner["uid"] == job["metadata"]["uid"] and owner["controller"] is True
    # rank 0's metrics, scraped on the resync timer, shown by the printer column
    st = wait_for(lambda: (s := job_status(kubectl, namespace, "lenet")).get("progress") and s, timeout=15,
                  what="status.progress")
    p = st["progress"]
    assert p["summary"] == "120/500 (24%)" and p["step"] == 120 and p["totalSteps"] == 500
    assert p["loss"] == pytest.approx(0.4321) and p["metric"] == pytest.approx(0.875) and p["epoch"] == 2
    assert "120/500 (24%)" in kubectl("get", "trainingjobs.aiaas.dev", "lenet", namespace=namespace).stdout
    progress_endpoint[m.TRAINER_STEP] = 250
    wait_for(lambda: job_status(kubectl, namespace, "lenet")["progress"]["summary"] == "250/500 (50%)",
             timeout=15, what="progress refresh")
    assert {"Created", "Running"} <= event_reasons(kubectl, namespace, "lenet")


def test_completion_marks_succeeded_and_scales_down(kubectl, namespace, operator):
    op = operator()
    apply(kubectl, namespace, trainingjob("done", nodes=2))
    wait_phase(kubectl, namespace, "done", "Running", op=op)
    for p in ready_pods(kubectl, namespace, "done", 2):
        finish_pod(kubectl, namespace, p["metadata"]["name"], 0, SUCCEEDED)
    st = wait_phase(kubectl, namespace, "done", "Succeeded", op=op)
    assert st["artifact"] == {"uri": "file:///var/run/aiaas/artifacts", "version": "500"}
    assert st["completionTime"] and st["succeededReplicas"] == 2
    assert condition(st, "Succeeded")["status"] == "True" and condition(st, "Running")["status"] == "False"
    # finished pods must not restart and hold their GPUs: scaled to zero (cleanPodPolicy Running)
    wait_for(lambda: sts_replicas(kubectl, namespace, "done") == 0, timeout=15, what="StatefulSet scaled to 0")
    wait_for(lambda: not pods(kubectl, namespace, "done"), timeout=20, what="pods gone")
    assert get(kubectl, namespace, "service", launch.headless_service_name("done")) is not None  # kept: Running keeps what is not running
    assert "Succeeded" in event_reasons(kubectl, namespace, "done")


def test_pod_failure_restarts_the_gang(kubectl, namespace, operator):
    op = operator()
    apply(kubectl, namespace, trainingjob("flaky", nodes=2))
    wait_phase(kubectl, namespace, "flaky", "Running", op=op)
    before = {p["metadata"]["uid"] for p in ready_pods(kubectl, namespace, "flaky", 2)}
    finish_pod(kubectl, namespace, "flaky-1", 1, {"outcome": "RetryableError", "reason": "NCCLTimeout",
                                                  "message": "collective timed out", "step": 40})
    wait_for(lambda: job_status(kubectl, namespace, "flaky").get("restartCount") == 1, timeout=20,
             what="restartCount 1")
    st = wait_for(lambda: (s := job_status(kubectl, namespace, "flaky")).get("phase") == "Running"
                  and s.get("readyReplicas") == 2 and s, timeout=30, what="Running again")
    assert st["restartCount"] == 1
    restarting = condition(st, "Restarting")
    assert restarting["status"] == "False" and restarting["reason"] == "Recovered"
    after = ready_pods(kubectl, namespace, "flaky", 2)
    assert not before & {p["metadata"]["uid"] for p in after}, "the whole gang is recreated, not one pod"
    assert all(p["metadata"]["annotations"][launch.ANNOTATION_RESTART] == "1" for p in after)
    ev = [e for e in events(kubectl, namespace, "flaky") if e["reason"] == "Restarting"]
    assert ev and "NCCLTimeout" in ev[0]["message"] and "flaky-1" in ev[0]["message"]


def test_backoff_limit_exhausted_fails_the_job(kubectl, namespace, operator):
    op = operator()
    apply(kubectl, namespace, trainingjob("doomed", runPolicy={"backoffLimit": 1}))
    wait_phase(kubectl, namespace, "doomed", "Running", op=op)
    oom = {"outcome": "RetryableError", "reason": "Error", "message": "killed"}
    finish_pod(kubectl, namespace, "doomed-0", 137, oom)
    wait_for(lambda: job_status(kubectl, namespace, "doomed").get("restartCount") == 1, timeout=20,
             what="first restart")
    wait_phase(kubectl, namespace, "doomed", "Running", op=op)
    again = ready_pods(kubectl, namespace, "doomed", 1)[0]  # a one-node job's bare pod, made again
    assert again["metadata"]["annotations"][launch.ANNOTATION_RESTART] == "1"
    assert again["metadata"]["ownerReferences"][0]["kind"] == "TrainingJob"
    finish_pod(kubectl, namespace, "doomed-0", 137, oom)
    st = wait_phase(kubectl, namespace, "doomed", "Failed", op=op)
    assert st["reason"] == "BackoffLimitExceeded" and "backoffLimit is 1" in st["message"]
    assert st["restartCount"] == 1
    wait_for(lambda: bare_workers(kubectl, namespace, "doomed") == 0, timeout=15, what="its pod deleted")


def test_permanent_error_fails_at_once(kubectl, namespace, operator):
    op = operator()
    apply(kubectl, namespace, trainingjob("badcfg"))
    wait_phase(kubectl, namespace, "badcfg", "Running", op=op)
    finish_pod(kubectl, namespace, "badcfg-0", 78, {"outcome": "PermanentError", "reason": "DatasetNotFound",
                                                    "message": "no such file: /data/mnist.npz"})
    st = wait_phase(kubectl, namespace, "badcfg", "Failed", op=op)
    assert st["reason"] == "DatasetNotFound" and st["restartCount"] == 0
    assert "/data/mnist.npz" in st["message"] and "permanent" in st["message"]
    assert condition(st, "Failed")["status"] == "True"
    assert "DatasetNotFound" in event_reasons(kubectl, namespace, "badcfg")


def test_active_deadline_fails_with_deadline_exceeded(kubectl, namespace, operator):
    op = operator()
    apply(kubectl, namespace, trainingjob("slow", runPolicy={"activeDeadlineSeconds": 3}))
    wait_phase(kubectl, namespace, "slow", "Running", op=op)
    st = wait_phase(kubectl, namespace, "slow", "Failed", timeout=15, op=op)
    assert st["reason"] == "DeadlineExceeded"
    wait_for(lambda: bare_workers(kubectl, namespace, "slow") == 0, timeout=15, what="its pod deleted")


def test_ttl_after_finished_deletes_the_job(kubectl, namespace, operator):
    op = operator()
    apply(kubectl, namespace, trainingjob("ephemeral", runPolicy={"ttlSecondsAfterFinished": 2}))
    wait_phase(kubectl, namespace, "ephemeral", "Running", op=op)
    finish_pod(kubectl, namespace, "ephemeral-0", 0, SUCCEEDED)
    wait_phase(kubectl, namespace, "ephemeral", "Succeeded", op=op)
    wait_for(lambda: get(kubectl, namespace, "trainingjobs.aiaas.dev", "ephemeral") is None, timeout=20,
             what="job deleted after its TTL")


def test_suspend_and_resume(kubectl, namespace, operator):
    op = operator()
    apply(kubectl, namespace, trainingjob("pausable", nodes=2))
    wait_phase(kubectl, namespace, "pausable", "Running", op=op)
    kubectl("patch", "trainingjobs.aiaas.dev", "pausable", "--type=merge", "-p", '{"spec":{"suspend":true}}',
            namespace=namespace)
    st = wait_phase(kubectl, namespace, "pausable", "Suspended", op=op)
    assert condition(st, "Suspended")["status"] == "True" and condition(st, "Running")["status"] == "False"
    wait_for(lambda: sts_replicas(kubectl, namespace, "pausable") == 0, timeout=15, what="scaled to 0")
    wait_for(lambda: not pods(kubectl, namespace, "pausable"), timeout=20, what="pods gone")
    kubectl("patch", "trainingjobs.aiaas.dev", "pausable", "--type=merge", "-p", '{"spec":{"suspend":false}}',
            namespace=namespace)
    st = wait_phase(kubectl, namespace, "pausable", "Running", op=op)
    assert condition(st, "Suspended")["status"] == "False" and condition(st, "Suspended")["reason"] == "Resumed"
    assert st["readyReplicas"] == 2 and st["restartCount"] == 0
    assert {"Suspended", "Resumed"} <= event_reasons(kubectl, namespace, "pausable")


def test_created_suspended_then_admitted(kubectl, namespace, operator):
    """Kueue's flow: created with suspend true, admitted later by flipping it."""
    op = operator()
    apply(kubectl, namespace, trainingjob("queued", suspend=True))
    wait_phase(kubectl, namespace, "queued", "Suspended", op=op)
    assert bare_workers(kubectl, namespace, "queued") == 0
    kubectl("patch", "trainingjobs.aiaas.dev", "queued", "--type=merge", "-p", '{"spec":{"suspend":false}}',
            namespace=namespace)
    wait_phase(kubectl, namespace, "queued", "Running", op=op)


def test_elastic_job_scales_with_nodes(kubectl, namespace, operator):
    op = operator()
    job = trainingjob("stretchy", nodes=2, elastic={"minNodes": 1, "maxNodes": 4})
    job["spec"]["trainer"]["hyperparameters"]["batchSize"] = 48  # splits over 1..4 data-parallel ranks
    apply(kubectl, namespace, job)
    wait_phase(kubectl, namespace, "stretchy", "Running", op=op)
    kubectl("patch", "trainingjobs.aiaas.dev", "stretchy", "--type=merge", "-p",
            '{"spec":{"topology":{"nodes":3}}}', namespace=namespace)
    wait_for(lambda: sts_replicas(kubectl, namespace, "stretchy") == 3, timeout=15, what="scaled to 3")
    ready_pods(kubectl, namespace, "stretchy", 3)
    st = wait_for(lambda: (s := job_status(kubectl, namespace, "stretchy")).get("readyReplicas") == 3 and s,
                  timeout=15, what="3 ready in status")
    assert st["phase"] == "Running" and st["restartCount"] == 0 and st["observedGeneration"] == 2


def test_unschedulable_gpu_request_names_the_scheduler_reason(kubectl, namespace, operator):
    op = operator()
    topology = {"nodes": 1, "nprocPerNode": 1, "resources": {"limits": {"nvidia.com/gpu": 64}}}
    apply(kubectl, namespace, trainingjob("huge", topology=topology))
    st = wait_for(lambda: (s := job_status(kubectl, namespace, "huge")).get("reason") == "Unschedulable" and s,
                  timeout=30, what="reason Unschedulable")
    assert st["phase"] == "Created"
    assert "Insufficient nvidia.com/gpu" in st["message"] and "huge-0" in st["message"], st["message"]
    running = condition(st, "Running")
    assert running["status"] == "False" and running["reason"] == "Unschedulable"
    assert "Unschedulable" in event_reasons(kubectl, namespace, "huge")
    del op


def test_operator_restart_mid_job_continues_without_duplicates(kubectl, namespace, operator):
    op = operator()
    apply(kubectl, namespace, trainingjob("durable", nodes=2))
    wait_phase(kubectl, namespace, "durable", "Running", op=op)
    ready_pods(kubectl, namespace, "durable", 2)
    op.stop(signal.SIGKILL)  # no goodbye
    finish_pod(kubectl, namespace, "durable-0", 1, {"outcome": "RetryableError", "reason": "Error", "message": "x"})
    time.sleep(1.5)
    op2 = operator()
    wait_for(lambda: job_status(kubectl, namespace, "durable").get("restartCount") == 1, timeout=20,
             what="the new operator restarts the gang")
    st = wait_for(lambda: (s := job_status(kubectl, namespace, "durable")).get("phase") == "Running"
                  and s.get("readyReplicas") == 2 and s, timeout=30, what="Running again")
    assert st["restartCount"] == 1
    sts = json.loads(kubectl("get", "statefulsets", "-o", "json", namespace=namespace).stdout)["items"]
    svcs = json.loads(kubectl("get", "services", "-o", "json", namespace=namespace).stdout)["items"]
    assert [s["metadata"]["name"] for s in sts] == ["durable"]
    assert [s["metadata"]["name"] for s in svcs] == [launch.headless_service_name("durable")]
    full = json.loads(kubectl("get", "statefulset", "durable", "-o", "json", "--show-managed-fields",
                              namespace=namespace).stdout)
    managers = {f["manager"] for f in full["metadata"]["managedFields"] if f["operation"] == "Apply"}
    assert managers == {"aiaas-operator"}
    time.sleep(2)  # a steady state: no more restarts, no fight
    assert job_status(kubectl, namespace, "durable")["restartCount"] == 1
    del op2


def test_deletion_garbage_collects_every_child(kubectl, namespace, operator):
    op = operator()
    apply(kubectl, namespace, trainingjob("gone", nodes=2))
    wait_phase(kubectl, namespace, "gone", "Running", op=op)
    kubectl("delete", "trainingjobs.aiaas.dev", "gone", "--wait=true", namespace=namespace)

    def nothing_left() -> bool:
        return (get(kubectl, namespace, "statefulset", "gone") is None
                and get(kubectl, namespace, "service", launch.headless_service_name("gone")) is None and not pods(kubectl, namespace, "gone"))

    wait_for(nothing_left, timeout=40, what="children garbage-collected")


def test_leader_election_one_replica_acts(kubectl, namespace, operator):
    lease = ["--lease-name", f"op-{namespace[-6:]}", "--lease-namespace", namespace, "--lease-duration", "4",
             "--renew-deadline", "3", "--retry-period", "0.5"]
    first = operator(*lease, standalone=False)
    wait_for(lambda: first.get("/readyz")[0] == 200, timeout=20, what="first replica leads")
    second = operator(*lease, standalone=False)
    time.sleep(2)
    assert second.get("/readyz")[0] == 503, "the standby must not act"
    apply(kubectl, namespace, trainingjob("ha"))
    wait_phase(kubectl, namespace, "ha", "Running", op=first)
    first.stop()  # graceful: releases the lease
    wait_for(lambda: second.get("/readyz")[0] == 200, timeout=20, what="standby takes over")
    finish_pod(kubectl, namespace, "ha-0", 0, SUCCEEDED)
    wait_phase(kubectl, namespace, "ha", "Succeeded", op=second)
    holder = get(kubectl, namespace, "lease", f"op-{namespace[-6:]}")
    assert holder is not None and holder["spec"]["holderIdentity"]


def test_operator_metrics_parse_and_count(kubectl, namespace, operator):
    op = operator()
    apply(kubectl, namespace, trainingjob("good"))
    apply(kubectl, namespace, trainingjob("bad"))
    wait_phase(kubectl, namespace, "good", "Running", op=op)
    wait_phase(kubectl, namespace, "bad", "Running", op=op)
    finish_pod(kubectl, namespace, "good-0", 0, SUCCEEDED)
    finish_pod(kubectl, namespace, "bad-0", 78, {"outcome": "PermanentError", "reason": "InvalidConfig",
                                                 "message": "bad"})
    wait_phase(kubectl, namespace, "good", "Succeeded", op=op)
    wait_phase(kubectl, namespace, "bad", "Failed", op=op)
    text = wait_for(lambda: (t := op.metrics()) and f'{m.OPERATOR_JOBS}{{phase="Failed"}} 1.0' in t and t,
                    timeout=10, what="phase gauge")
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[(m.OPERATOR_JOBS_CREATED + "_total", ())] == 2
    assert samples[(m.OPERATOR_JOBS_SUCCEEDED + "_total", ())] == 1
    assert samples[(m.OPERATOR_JOBS_FAILED + "_total", (("reason", "InvalidConfig"),))] == 1
    assert samples[(m.OPERATOR_JOBS, (("phase", "Succeeded"),))] == 1
    assert samples[(m.OPERATOR_TIME_TO_RUNNING + "_count", ())] == 2
    assert samples[(m.OPERATOR_RECONCILE_DURATION + "_count", (("kind", "TrainingJob"),))] > 0
    assert op.get("/healthz")[0] == 200 and op.get("/readyz")[0] == 200
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install -y prometheus): exposition format not linted")
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def _static_volume(kubectl, namespace: str, claim: str) -> None:
    """A PersistentVolume pre-bound to ``claim`` (no provisioner in the test cluster)."""
    pv = f"{namespace}-{claim}"[:63]
    apply(kubectl, namespace, {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany", "ReadOnlyMany"],
                 "storageClassName": "", "hostPath": {"path": f"/tmp/{pv}"},
                 "claimRef": {"namespace": namespace, "name": claim},
                 "persistentVolumeReclaimPolicy": "Delete"},
    })
    apply(kubectl, namespace, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
        "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                 "resources": {"requests": {"storage": "1Gi"}}},
    })
    wait_for(lambda: (get(kubectl, namespace, "pvc", claim) or {}).get("status", {}).get("phase") == "Bound",
             timeout=30, what=f"PVC {claim} bound")


def test_inferenceservice_waits_for_its_trainingjob(kubectl, namespace, operator):
    op = operator()
    _static_volume(kubectl, namespace, "models")
    apply(kubectl, namespace, trainingjob("digits", storage={"claimName": "models"}))
    apply(kubectl, namespace, {"apiVersion": "aiaas.dev/v1alpha1", "kind": "InferenceService",
                               "metadata": {"name": "digits-svc"},
                               "spec": {"model": {"trainingJob": "digits"}}})
    wait_phase(kubectl, namespace, "digits", "Running", op=op)

    def isvc() -> dict[str, Any]:
        return (get(kubectl, namespace, "inferenceservices.aiaas.dev", "digits-svc") or {}).get("status") or {}

    st = wait_for(lambda: (s := isvc()).get("phase") == "WaitingForModel" and "Running" in s.get("message", "") and s,
                  timeout=20, what="WaitingForModel while the job runs")
    mr = condition(st, "ModelReady")
    assert mr["status"] == "False" and mr["reason"] == "WaitingForTrainingJob"
    assert "digits" in mr["message"] and "phase Running" in mr["message"]
    assert condition(st, "Ready")["status"] == "False"
    assert get(kubectl, namespace, "deployment", "digits-svc") is None
    finish_pod(kubectl, namespace, "digits-0", 0, SUCCEEDED)
    wait_phase(kubectl, namespace, "digits", "Succeeded", op=op)
    st = wait_for(lambda: (s := isvc()).get("phase") == "Ready" and s, timeout=40, what="InferenceService Ready")
    assert st["model"] == {"source": "trainingjob/digits", "uri": "pvc://models/digits/artifacts", "version": "500"}
    assert st["url"] == f"http://digits-svc.{namespace}.svc/v2/models/digits-svc"
    assert all(condition(st, t)["status"] == "True" for t in ("Ready", "PredictorReady", "ModelReady"))
    assert st["readyReplicas"] == 1
    dep = get(kubectl, namespace, "deployment", "digits-svc")
    assert dep is not None
    vols = dep["spec"]["template"]["spec"]["volumes"]
    assert {"claimName": "models", "readOnly": True} in [v.get("persistentVolumeClaim") for v in vols]
    kubectl("delete", "inferenceservices.aiaas.dev", "digits-svc", "--wait=true", namespace=namespace)
    wait_for(lambda: get(kubectl, namespace, "deployment", "digits-svc") is None
             and get(kubectl, namespace, "service", "digits-svc") is None, timeout=40, what="isvc children gone")


def test_reconcile_errors_reach_status(kubectl, namespace, operator):
    """A job asking for Volcano gang scheduling on a cluster without Volcano: the PodGroup cannot be created."""
    op = operator()
    apply(kubectl, namespace, trainingjob("gang", scheduling={"gang": {"provider": "volcano"}}))
    st = wait_for(lambda: (s := job_status(kubectl, namespace, "gang")).get("reason") == "ReconcileError" and s,
                  timeout=20, what="reason ReconcileError")
    assert "PodGroup" in st["message"] and "scheduling.volcano.sh" in st["message"], st["message"]
    assert condition(st, "Running")["reason"] == "ReconcileError"
    assert "ReconcileError" in event_reasons(kubectl, namespace, "gang")
    assert f'{m.OPERATOR_RECONCILE_ERRORS}_total{{kind="TrainingJob"}}' in op.metrics()
