"""Issue 12 (security and reliability review) on a real control plane: names that cannot collide and objects
that are never adopted, pods that count only when the job controls them, progress scrapes that cannot stall the
operator, leader election that survives a stalled API connection and a skewed clock, custom commands, the
hostPath admission policy and the per-job NetworkPolicy. kwok plays the kubelet, as in test_operator.py."""

# ruff: noqa: F811 - pytest fixtures imported from test_operator are parameters here
from __future__ import annotations

import time
from pathlib import Path

import pytest
from e2e_util import REPO_ROOT, load_yaml_docs, wait_for
from test_operator import (  # noqa: F401 - fixtures
    apply,
    condition,
    event_reasons,
    finish_pod,
    get,
    job_status,
    operator,
    pods,
    progress_endpoint,
    ready_pods,
    trainingjob,
    wait_phase,
)

from aiaas.contract import launch

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240), pytest.mark.usefixtures("e2e_cluster")]


def owner_uid(obj: dict) -> str | None:
    return next((r["uid"] for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")), None)


def uid(kubectl, namespace: str, kind: str, name: str) -> str:
    obj = get(kubectl, namespace, kind, name)
    assert obj is not None, f"{kind} {name}"
    return str(obj["metadata"]["uid"])


# ------------------------------------------------------------------------------------------------ item 7
def test_a_job_and_a_service_of_one_name_keep_their_own_services(kubectl, namespace, operator):  # noqa: F811
    op = operator()
    job = load_yaml_docs(REPO_ROOT / "examples" / "01-cnn-digits.yaml")[0]
    apply(kubectl, namespace, job)
    wait_phase(kubectl, namespace, job["metadata"]["name"], "Running", op=op)
    isvc = load_yaml_docs(REPO_ROOT / "examples" / "05-inferenceservice.yaml")[0]
    isvc["metadata"]["name"] = job["metadata"]["name"]
    apply(kubectl, namespace, isvc)
    name = job["metadata"]["name"]
    job_uid = uid(kubectl, namespace, "trainingjobs.aiaas.dev", name)
    isvc_uid = uid(kubectl, namespace, "inferenceservices.aiaas.dev", name)
    svc = wait_for(lambda: get(kubectl, namespace, "service", name), timeout=30, what="the InferenceService's Service")
    assert owner_uid(svc) == isvc_uid
    headless = get(kubectl, namespace, "service", launch.headless_service_name(name))
    assert headless is not None and owner_uid(headless) == job_uid
    assert headless["spec"]["selector"] == {launch.LABEL_JOB: name} and headless["spec"]["clusterIP"] == "None"
    worker = get(kubectl, namespace, "pod", f"{name}-0")  # a one-node job: a bare pod, named as a StatefulSet's
    assert worker is not None and worker["spec"]["subdomain"] == launch.headless_service_name(name)
    assert owner_uid(worker) == job_uid
    st = job_status(kubectl, namespace, name)
    assert st["phase"] == "Running" and not condition(st, "NameConflict")


def test_a_foreign_object_with_a_childs_name_is_reported_not_adopted(kubectl, namespace, operator):  # noqa: F811
    op = operator()
    theirs = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": launch.headless_service_name("taken")},
              "spec": {"selector": {"app": "theirs"}, "ports": [{"port": 80}]}}
    apply(kubectl, namespace, theirs)
    before = get(kubectl, namespace, "service", launch.headless_service_name("taken"))
    assert before is not None
    apply(kubectl, namespace, trainingjob("taken"))
    st = wait_for(lambda: condition(s := job_status(kubectl, namespace, "taken"), "NameConflict").get("status") == "True"
                  and s, timeout=30, what="NameConflict condition")
    assert "Service taken-workers already exists" in condition(st, "NameConflict")["message"], op.log()
    wait_for(lambda: "NameConflict" in event_reasons(kubectl, namespace, "taken"), timeout=20, what="Warning Event")
    after = get(kubectl, namespace, "service", launch.headless_service_name("taken"))
    assert after is not None and after["spec"]["selector"] == {"app": "theirs"}
    assert not after["metadata"].get("ownerReferences")
    # the user removes it: the job gets its own, and the condition clears
    kubectl("delete", "service", launch.headless_service_name("taken"), namespace=namespace)
    wait_for(lambda: condition(job_status(kubectl, namespace, "taken"), "NameConflict").get("status") == "False",
             timeout=30, what="NameConflict resolved")
    mine = get(kubectl, namespace, "service", launch.headless_service_name("taken"))
    assert mine is not None and owner_uid(mine) == uid(kubectl, namespace, "trainingjobs.aiaas.dev", "taken")


# ------------------------------------------------------------------------------------------------ item 8
def test_a_pod_with_the_jobs_labels_cannot_finish_the_job(kubectl, namespace, operator):  # noqa: F811
    op = operator("--success-policy", "Rank0")
    apply(kubectl, namespace, trainingjob("guarded", nodes=1))
    wait_phase(kubectl, namespace, "guarded", "Running", op=op)
    impostor = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "guarded-0x", "labels": {launch.LABEL_JOB: "guarded",
                                                             launch.POD_INDEX_LABEL: "0"},
                             "annotations": {launch.ANNOTATION_RESTART: "0"}},
                "spec": {"containers": [{"name": launch.TRAINER_CONTAINER, "image": "busybox"}]}}
    apply(kubectl, namespace, impostor)
    wait_for(lambda: get(kubectl, namespace, "pod", "guarded-0x")["status"].get("phase") == "Running",
             timeout=30, what="impostor running")
    finish_pod(kubectl, namespace, "guarded-0x", 0, {"outcome": "Succeeded", "message": "fake", "step": 1})
    wait_for(lambda: (get(kubectl, namespace, "pod", "guarded-0x")["status"].get("containerStatuses") or [{}])[0]
             .get("lastState", {}).get("terminated") or (get(kubectl, namespace, "pod", "guarded-0x")["status"]
             .get("containerStatuses") or [{}])[0].get("state", {}).get("terminated"), timeout=30,
             what="impostor terminated")
    time.sleep(3)  # several resyncs (1 s)
    assert job_status(kubectl, namespace, "guarded")["phase"] == "Running", op.log()
    assert get(kubectl, namespace, "pod", "guarded-0x") is not None, "not deleted by the operator"


# ------------------------------------------------------------------------------------------------ item 6
@pytest.fixture
def hostile_metrics():
    """Rank 0 endpoints per job: /<job>/metrics. ``drip*`` sends a byte every 1.9 s forever, ``redirect*``
    redirects to a good page, anything else answers the step in ``steps``."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from aiaas.contract import metrics as m

    stop = threading.Event()
    steps = {"step": 10}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            job = self.path.strip("/").split("/")[0]
            if job.startswith("drip"):
                self.send_response(200)
                self.end_headers()
                while not stop.is_set():
                    try:
                        self.wfile.write(b"#")
                        self.wfile.flush()
                    except OSError:
                        return
                    stop.wait(1.9)
                return
            if job.startswith("redirect"):
                self.send_response(302)
                self.send_header("Location", "/good/metrics")
                self.end_headers()
                return
            body = f"{m.TRAINER_STEP} {steps['step']}\n{m.TRAINER_TOTAL_STEPS} 100\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a) -> None:
            return

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    steps["url"] = f"http://127.0.0.1:{srv.server_address[1]}" + "/{job}/metrics"  # type: ignore[assignment]
    try:
        yield steps
    finally:
        stop.set()
        srv.shutdown()
        srv.server_close()



def test_slow_and_redirecting_metrics_stall_nothing(kubectl, namespace, operator, hostile_metrics):  # noqa: F811
    op = operator("--metrics-url-template", str(hostile_metrics["url"]), "--scrape-timeout", "2")
    for name in ("drip-a", "drip-b", "redirect-a", "good"):
        apply(kubectl, namespace, trainingjob(name))
    for name in ("drip-a", "drip-b", "redirect-a", "good"):
        wait_phase(kubectl, namespace, name, "Running", op=op)
    wait_for(lambda: (job_status(kubectl, namespace, "good").get("progress") or {}).get("step") == 10,
             timeout=20, what="progress of the good job")
    for step in (20, 30):  # scrapes go on while the dripping ones hang
        hostile_metrics["step"] = step
        wait_for(lambda s=step: (job_status(kubectl, namespace, "good").get("progress") or {}).get("step") == s,
                 timeout=20, what=f"progress step {step}")
        assert op.get("/healthz")[0] == 200
    apply(kubectl, namespace, trainingjob("late"))  # a new job is reconciled promptly
    wait_phase(kubectl, namespace, "late", "Running", op=op)
    assert op.get("/healthz")[0] == 200 and op.proc is not None and op.proc.poll() is None
    assert "progress" not in job_status(kubectl, namespace, "redirect-a"), "a redirect is not followed"
    assert "progress" not in job_status(kubectl, namespace, "drip-a")


# ------------------------------------------------------------------------------------------------ item 4
def test_the_custom_command_example_is_accepted_with_3_nodes_and_succeeds_on_exit_0(kubectl, namespace,
                                                                                    operator):  # noqa: F811
    [job] = load_yaml_docs(REPO_ROOT / "examples" / "09-custom-command.yaml")
    assert job["spec"]["topology"]["nodes"] == 3 and "batchSize" not in str(job)
    op = operator()
    apply(kubectl, namespace, job)  # the CRD's CEL rules accept the default batch size on 3 nodes
    name = job["metadata"]["name"]
    wait_phase(kubectl, namespace, name, "Running", op=op)
    for p in ready_pods(kubectl, namespace, name, 3):  # a PyTorchJob script writes no termination message
        kubectl("annotate", "pod", p["metadata"]["name"], "--overwrite", "fake.aiaas.dev/exit-code=0",
                "fake.aiaas.dev/delay=100ms", namespace=namespace)
    st = wait_phase(kubectl, namespace, name, "Succeeded", op=op)
    assert st["succeededReplicas"] == 3


# ------------------------------------------------------------------------------------------------ item 9
class PausableProxy:
    """A TCP proxy on loopback to the API server; ``paused`` holds every byte (a stalled connection)."""

    def __init__(self, host: str, port: int) -> None:
        import socket
        import threading

        self.upstream = (host, port)
        self.paused = threading.Event()
        self.closed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src, dst) -> None:
        try:
            while not self.closed.is_set():
                data = src.recv(65536)
                if not data:
                    break
                while self.paused.is_set() and not self.closed.is_set():
                    self.closed.wait(0.1)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()  # closing a socket twice is harmless

    def close(self) -> None:
        self.closed.set()
        self.listener.close()


def lease_flags(namespace: str, duration: float = 6, renew: float = 4, retry: float = 1) -> list[str]:
    return ["--lease-name", "op", "--lease-namespace", namespace, "--lease-duration", str(duration),
            "--renew-deadline", str(renew), "--retry-period", str(retry)]


def test_a_leader_behind_a_stalled_connection_exits_by_its_renew_deadline(kubectl, namespace, operator,
                                                                         k8s_cluster, tmp_path,
                                                                         monkeypatch):  # noqa: F811
    import urllib.parse

    import yaml

    config = yaml.safe_load(Path(k8s_cluster.kubeconfig).read_text())
    server = urllib.parse.urlsplit(config["clusters"][0]["cluster"]["server"])
    proxy = PausableProxy(server.hostname or "127.0.0.1", server.port or 443)
    try:
        config["clusters"][0]["cluster"]["server"] = f"{server.scheme}://{server.hostname}:{proxy.port}"
        path = tmp_path / "proxied-kubeconfig"
        path.write_text(yaml.safe_dump(config))
        monkeypatch.setenv("KUBECONFIG", str(path))
        op = operator(*lease_flags(namespace), standalone=False)
        wait_for(lambda: op.get("/readyz")[0] == 200, timeout=30, what="the operator leads")
        proxy.paused.set()
        t0 = time.monotonic()
        assert op.proc is not None
        wait_for(lambda: op.proc.poll() is not None, timeout=25, interval=0.2,
                 what="the leader to exit (renew deadline 4 s; the old 30 s call timeout would overrun)")
        took = time.monotonic() - t0
        assert op.proc.returncode != 0 and took < 15, (took, op.log())
        assert "lost the lease" in op.log()
    finally:
        proxy.close()


def put_lease(kubectl, namespace: str, holder: str, renew: str, rv: str | None = None) -> None:
    body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "op"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 6, "renewTime": renew,
                     "acquireTime": renew}}
    kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=other-replica", "-f", "-",
            input=__import__("json").dumps(body), namespace=namespace)


def test_leases_are_judged_by_our_clock_not_the_holders(kubectl, namespace, operator):  # noqa: F811
    import threading
    from datetime import datetime, timedelta, timezone

    fmt = "%Y-%m-%dT%H:%M:%S.%fZ"
    # a live holder whose clock is an hour behind: it renews, so it must keep the lease
    stop = threading.Event()

    def renew_behind() -> None:
        while not stop.is_set():
            put_lease(kubectl, namespace, "behind", (datetime.now(timezone.utc) - timedelta(hours=1)).strftime(fmt))
            stop.wait(1)

    renewer = threading.Thread(target=renew_behind, daemon=True)
    renewer.start()
    try:
        op = operator(*lease_flags(namespace), standalone=False)
        time.sleep(15)  # 2.5 lease durations
        assert op.get("/readyz")[0] == 503, "took a lease its live holder keeps renewing"
        assert get(kubectl, namespace, "lease", "op")["spec"]["holderIdentity"] == "behind"
    finally:
        stop.set()
        renewer.join(10)
    wait_for(lambda: op.get("/readyz")[0] == 200, timeout=30, what="takes over once the holder stops")
    op.stop()
    # a dead holder whose clock was an hour ahead: its renewTime is in the future, yet it expires on our clock
    put_lease(kubectl, namespace, "ahead", (datetime.now(timezone.utc) + timedelta(hours=1)).strftime(fmt))
    op2 = operator(*lease_flags(namespace), standalone=False)
    wait_for(lambda: op2.get("/readyz")[0] == 200, timeout=40, what="takes the lease of a dead holder")


# ------------------------------------------------------------------------------------------------ item 12
def helm_policy(helm, release: str, *values: str) -> list[dict]:
    out = helm("template", release, str(REPO_ROOT / "charts" / "aiaas"), *values).stdout
    import yaml

    return [d for d in yaml.safe_load_all(out) if d and d["kind"].startswith("ValidatingAdmissionPolicy")]


def test_hostpath_volumes_are_refused_unless_the_chart_allows_them(kubectl, namespace, helm):
    import json

    release = f"hp{namespace[-6:]}"
    docs = helm_policy(helm, release)
    assert [d["kind"] for d in docs] == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    assert helm_policy(helm, release, "--set", "policy.allowHostPath=true") == []
    binding = docs[1]  # only this test's namespace: other tests share the cluster
    binding["spec"]["matchResources"] = {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": namespace}}}
    job = trainingjob("hostpath")
    job["spec"]["trainer"]["volumes"] = [{"name": "node", "hostPath": {"path": "/etc"}}]
    job["spec"]["trainer"]["volumeMounts"] = [{"name": "node", "mountPath": "/node"}]
    plain = trainingjob("plain")

    def dry_run(obj: dict):
        return kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(obj), namespace=namespace,
                       check=False)

    try:
        for d in docs:
            kubectl("apply", "-f", "-", input=json.dumps(d))
        refused = wait_for(lambda: (r := dry_run(job)).returncode != 0 and r, timeout=60, what="the policy to act")
        assert "hostPath volumes are not allowed" in refused.stderr and "(volume node)" in refused.stderr
        assert "policy.allowHostPath=true" in refused.stderr, refused.stderr
        assert dry_run(plain).returncode == 0
    finally:
        for d in reversed(docs):
            kubectl("delete", d["kind"].lower(), d["metadata"]["name"], "--ignore-not-found")
    wait_for(lambda: dry_run(job).returncode == 0, timeout=60, what="accepted without the policy (allowHostPath)")


# ------------------------------------------------------------------------------------------------- item 5
def test_each_job_gets_an_owned_network_policy(kubectl, namespace, operator):
    op = operator("--operator-namespace", "aiaas-system", "--monitoring-namespace-selector",
                  "kubernetes.io/metadata.name=monitoring")
    apply(kubectl, namespace, trainingjob("fenced", nodes=2))
    wait_phase(kubectl, namespace, "fenced", "Running", op=op)
    np = get(kubectl, namespace, "networkpolicy", launch.network_policy_name("fenced"))
    assert np is not None and owner_uid(np) == uid(kubectl, namespace, "trainingjobs.aiaas.dev", "fenced")
    assert np["spec"]["podSelector"]["matchLabels"] == {launch.LABEL_JOB: "fenced"}
    peers, scrapers = np["spec"]["ingress"]
    assert peers["from"] == [{"podSelector": {"matchLabels": {launch.LABEL_JOB: "fenced"}}}]
    assert [p["port"] for p in scrapers["ports"]] == [launch.METRICS_PORT]


def test_a_one_node_jobs_pod_never_exists_before_the_namespaces_isolation_policy(kubectl, namespace, operator):
    """A bare pod is created before its job's own policy, so the namespace's isolation policy (no ingress to any
    TrainingJob pod) is there first; it is shared, owned by no job, and comes back after a resync period when
    deleted by hand."""
    op = operator()
    apply(kubectl, namespace, trainingjob("solo-a", nodes=1))
    wait_phase(kubectl, namespace, "solo-a", "Running", op=op)
    iso = get(kubectl, namespace, "networkpolicy", launch.ISOLATION_POLICY_NAME)
    pod = get(kubectl, namespace, "pod", launch.worker_pod_name("solo-a", 0))
    assert iso is not None and not iso["metadata"].get("ownerReferences")
    assert iso["spec"] == {"podSelector": {"matchExpressions": [{"key": launch.LABEL_JOB, "operator": "Exists"}]},
                           "policyTypes": ["Ingress"]}
    assert int(iso["metadata"]["resourceVersion"]) < int(pod["metadata"]["resourceVersion"]), \
        "written before the pod (etcd revisions)"
    own = wait_for(lambda: get(kubectl, namespace, "networkpolicy", launch.network_policy_name("solo-a")),
                   timeout=30, what="the job's own policy, after its pod")
    assert owner_uid(own) == uid(kubectl, namespace, "trainingjobs.aiaas.dev", "solo-a")
    kubectl("delete", "networkpolicy", launch.ISOLATION_POLICY_NAME, namespace=namespace)
    time.sleep(1.5)  # over the operator's resync period (1 s): what it applied is no longer taken as there
    apply(kubectl, namespace, trainingjob("solo-b", nodes=1))
    wait_phase(kubectl, namespace, "solo-b", "Running", op=op)
    back = get(kubectl, namespace, "networkpolicy", launch.ISOLATION_POLICY_NAME)
    pod_b = get(kubectl, namespace, "pod", launch.worker_pod_name("solo-b", 0))
    assert back is not None and back["metadata"]["uid"] != iso["metadata"]["uid"]
    assert int(back["metadata"]["resourceVersion"]) < int(pod_b["metadata"]["resourceVersion"])
