"""A TrainingJob's NetworkPolicy, enforced on the real node (issue 12, item 5).

torchrun's c10d store (29400) and the master port (23456) on a job's pod 0 accept unauthenticated data that
the rendezvous unpickles. The operator renders a NetworkPolicy per TrainingJob (operator/render/trainingjob.py
``network_policy``: every port from the job's own pods, the metrics ports also from the operator's namespace);
kube-network-policies on the real node (hack/node/node.sh) enforces it. With the operator installed as in
test_workloads.py, a two-pod job runs torchrun (c10d rendezvous on pod 0's 29400), all-reduces, then holds its
process group open until the test creates the Service its rank 0 waits for. Meanwhile probe pods try a TCP
connect to pod 0's rendezvous, master and metrics ports about once a second (``nodetest probe``): a dropped
SYN times out, a reached pod answers (open, or refused where nothing listens).

- a pod of another namespace and a pod with another job's label in the job's namespace: both ports dropped;
  the metrics port reached from the operator's namespace (the job's here), dropped from the other one;
- a pod with the job's label reaches them, and the job's own pods rendezvous and the job succeeds;
- the namespace's isolation policy (``aiaas-trainer-isolation``, no ingress to any TrainingJob pod, there before
  any pod) alone drops them all, the job's own label too: a one-node job's pod, created before its job's policy,
  is never open;
- the same probe pods reach the same ports while both policies are gone (the operator scaled to 0, the
  policies deleted), and are dropped again after the operator has re-created them: the policies are what drop
  them, not a broken probe or network. With enforcement off (no kube-network-policies) the first test fails.

And an InferenceService's optional ``spec.networkPolicy``: only the listed clients reach its model server.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import test_workloads as workloads
from e2e_util import wait_for
from node_util import DROPPED, REACHED, STEER_ANNOTATIONS, probe_pod, probe_rounds, wait_phase
from node_util import apply as apply_pods

from aiaas.contract import launch

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]
# The operator as a user installs it: test_workloads' module fixtures, set up again for this module.
jobs_ns, operator_release = workloads.jobs_ns, workloads.operator_release
get, apply, _pods, _wait_phase = workloads.get, workloads.apply, workloads._pods, workloads._wait_phase

JOB = "np-held"
PORTS = {"rendezvous": launch.RDZV_PORT, "master": launch.MASTER_PORT, "metrics": launch.METRICS_PORT}
# Every pod: rendezvous through torchrun (PET_* from the operator), an all-reduce, then rank 0 holds the process
# group, and with it pod 0's rendezvous port, until $RELEASE_NAME resolves (the test creates that Service).
HOLD = """
import os, socket, time
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.ones(1)
dist.all_reduce(t)
print(f"rank {rank}/{world}: rendezvous done, all_reduce {t.item():.0f}", flush=True)
deadline = time.monotonic() + float(os.environ["HOLD_SECONDS"])
while rank == 0 and time.monotonic() < deadline:
    try:
        socket.getaddrinfo(os.environ["RELEASE_NAME"], 80)
        break
    except OSError:
        time.sleep(1)
dist.barrier()
t = torch.ones(1)
dist.all_reduce(t)
print(f"rank {rank}/{world}: released, all_reduce {t.item():.0f}", flush=True)
dist.destroy_process_group()
"""


def _held_job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "aiaas.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
        "spec": {"trainer": {"command": ["torchrun", "--no-python", "python", "-c"], "args": [HOLD],
                             "env": [{"name": "RELEASE_NAME", "value": f"{name}-release"},
                                     {"name": "HOLD_SECONDS", "value": "900"}]},
                 "topology": {"nodes": 2, "nprocPerNode": 1, "resources": workloads.SMALL}},
    }


@pytest.fixture(scope="module")
def other_ns(real_node, kubectl) -> Iterator[str]:
    """A namespace that is neither the job's nor the operator's, its pods on the real node."""
    ns = f"aiaas-np-other-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    kubectl("annotate", "namespace", ns, *(f"{k}={v}" for k, v in STEER_ANNOTATIONS.items()))
    wait_for(lambda: kubectl("get", "serviceaccount", "default", namespace=ns, check=False).returncode == 0,
             timeout=60, what=f"the default service account in {ns}")
    yield ns
    kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="module")
def held(operator_release, images, jobs_ns, other_ns, kubectl) -> Iterator[dict[str, Any]]:
    """The job rendezvoused and holding; three probe pods aimed at its pod 0, Running."""
    apply(kubectl, jobs_ns, _held_job(JOB))
    policy = wait_for(lambda: get(kubectl, jobs_ns, "networkpolicy", launch.network_policy_name(JOB)),
                      timeout=120, what="the job's NetworkPolicy")
    pods = wait_for(lambda: (lambda ps: ps if len(ps) == 2 else None)(
        [p for p in _pods(kubectl, jobs_ns, f"{launch.LABEL_JOB}={JOB}") if p["status"].get("podIP")]),
        timeout=300, what="the job's two pods with pod IPs")

    def rendezvoused() -> bool:
        return all("rendezvous done" in kubectl("logs", p["metadata"]["name"], namespace=jobs_ns,
                                                check=False).stdout for p in pods)

    wait_for(rendezvoused, timeout=600, interval=2, what="both ranks to rendezvous and all-reduce")
    ip0 = next(p["status"]["podIP"] for p in pods if p["metadata"]["name"] == f"{JOB}-0")
    targets = {k: f"{ip0}:{port}" for k, port in PORTS.items()}
    probes = {
        "other-namespace": (other_ns, probe_pod("probe-other-ns", list(targets.values()))),
        "other-job": (jobs_ns, probe_pod("probe-other-job", list(targets.values()),
                                         labels={launch.LABEL_JOB: "someone-else"})),
        "same-job": (jobs_ns, probe_pod("probe-same-job", list(targets.values()), labels={launch.LABEL_JOB: JOB})),
    }
    for ns, doc in probes.values():
        apply_pods(kubectl, ns, doc)
    for ns, doc in probes.values():
        wait_phase(kubectl, ns, doc["metadata"]["name"], {"Running"})
    yield {"policy": policy, "targets": targets, "probes": {k: (ns, d["metadata"]["name"]) for k, (ns, d) in
                                                               probes.items()}, "since": time.time()}
    for ns, doc in probes.values():
        kubectl("delete", "pod", doc["metadata"]["name"], "--wait=false", namespace=ns, check=False)


def _rounds(kubectl, held: dict[str, Any], probe: str, since: float, n: int) -> list[dict[str, str]]:
    """At least ``n`` rounds of ``probe`` that began at or after ``since``."""
    ns, pod = held["probes"][probe]
    return wait_for(lambda: (lambda r: r if len(r) >= n else None)(probe_rounds(kubectl, ns, pod, since)),
                    timeout=60, interval=1, what=f"{n} rounds of {pod}")


def _states(held: dict[str, Any], rounds: list[dict[str, str]], port: str) -> list[str]:
    return [r[held["targets"][port]] for r in rounds]


def _until(kubectl, held: dict[str, Any], probe: str, since: float, want: dict[str, set[str]],
           timeout: float = 90) -> list[dict[str, str]]:
    """Rounds of ``probe`` since ``since`` until two in a row have each port's state in ``want[port]``
    (a policy change takes a moment to reach kube-network-policies)."""
    ns, pod = held["probes"][probe]

    def settled() -> list[dict[str, str]] | None:
        rounds = probe_rounds(kubectl, ns, pod, since)
        ok = [all(r[held["targets"][port]] in states for port, states in want.items()) for r in rounds]
        return rounds if len(ok) >= 2 and ok[-1] and ok[-2] else None

    return wait_for(settled, timeout=timeout, interval=1, what=f"{pod} to see {want}")


def test_the_policy_admits_the_jobs_pods_and_scrapes_from_the_operators_namespace(held, jobs_ns) -> None:
    spec = held["policy"]["spec"]
    assert spec["podSelector"] == {"matchLabels": {launch.LABEL_JOB: JOB}}, spec
    assert spec["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": {launch.LABEL_JOB: JOB}}}]},
        {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": jobs_ns}}}],
         "ports": [{"protocol": "TCP", "port": launch.METRICS_PORT}]},
    ], spec


def test_other_namespace_and_other_job_are_dropped(held, kubectl) -> None:
    """Every connect from them to pod 0's rendezvous and master ports timed out, from their first round on (the
    policy and pod 0 were there before the probe pods started)."""
    for probe in ("other-namespace", "other-job"):
        rounds = _rounds(kubectl, held, probe, 0.0, 5)
        for port in ("rendezvous", "master"):
            assert set(_states(held, rounds, port)) == {DROPPED}, (probe, port, rounds)


def test_metrics_port_only_from_the_operators_namespace(held, kubectl) -> None:
    """The job's namespace is the operator's here: the other job's pod scrapes; the other namespace cannot."""
    assert set(_states(held, _rounds(kubectl, held, "other-namespace", 0.0, 5), "metrics")) == {DROPPED}
    _until(kubectl, held, "other-job", held["since"], {"metrics": REACHED, "rendezvous": {DROPPED}})


def test_a_pod_with_the_jobs_label_reaches_pod_0(held, kubectl) -> None:
    rounds = _until(kubectl, held, "same-job", held["since"], {"rendezvous": {"open"}, "master": REACHED})
    print(f"same-job probe: {rounds[-1]}")


def test_the_isolation_policy_alone_drops_everyone_and_without_both_the_same_probes_connect(
        held, operator_release, jobs_ns, kubectl) -> None:
    """Operator scaled to 0 and the job's own policy deleted: the namespace's isolation policy alone drops every
    probe, the one with the job's label too (policies add up, and this one admits nothing: a job's pod is closed
    before its own policy exists). With that one deleted too the same probes reach pod 0; once the operator is
    back and has re-created both, they are dropped again."""
    release = f"app.kubernetes.io/instance={operator_release['release']}"
    deployments = json.loads(kubectl("get", "deployment", "-l", release, "-o", "json", namespace=jobs_ns).stdout)
    replicas = {d["metadata"]["name"]: d["spec"].get("replicas", 1) for d in deployments["items"]}
    assert replicas, f"no operator Deployment labelled {release}"
    isolation = get(kubectl, jobs_ns, "networkpolicy", launch.ISOLATION_POLICY_NAME)
    assert isolation is not None and not isolation["metadata"].get("ownerReferences")
    try:
        kubectl("scale", "deployment", *replicas, "--replicas=0", namespace=jobs_ns)
        wait_for(lambda: not _pods(kubectl, jobs_ns, release), timeout=120, what="the operator's pods to go")
        kubectl("delete", "networkpolicy", launch.network_policy_name(JOB), namespace=jobs_ns)
        alone = time.time()
        for probe in ("other-namespace", "other-job", "same-job"):
            _until(kubectl, held, probe, alone, {"rendezvous": {DROPPED}, "master": {DROPPED}})
        kubectl("delete", "networkpolicy", launch.ISOLATION_POLICY_NAME, namespace=jobs_ns)
        gone = time.time()
        for probe in ("other-namespace", "other-job"):
            rounds = _until(kubectl, held, probe, gone, {"rendezvous": {"open"}, "master": REACHED})
            print(f"{probe} without the policies: {rounds[-1]}")
    finally:
        for name, n in replicas.items():
            kubectl("scale", "deployment", name, f"--replicas={n}", namespace=jobs_ns)
    back = wait_for(lambda: get(kubectl, jobs_ns, "networkpolicy", launch.network_policy_name(JOB)),
                    timeout=300, interval=2, what="the operator to re-create the NetworkPolicy")
    assert back["spec"] == held["policy"]["spec"]
    isolation_back = wait_for(lambda: get(kubectl, jobs_ns, "networkpolicy", launch.ISOLATION_POLICY_NAME),
                              timeout=60, interval=2, what="the operator to re-create the isolation policy")
    assert isolation_back["spec"] == isolation["spec"]
    again = time.time()
    for probe in ("other-namespace", "other-job"):
        _until(kubectl, held, probe, again, {"rendezvous": {DROPPED}, "master": {DROPPED}})


def test_the_job_succeeds(held, jobs_ns, kubectl) -> None:
    """Released (the Service its rank 0 waits for resolves), both ranks all-reduce again and exit 0."""
    apply(kubectl, jobs_ns, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"{JOB}-release"},
                             "spec": {"ports": [{"port": 80}]}})
    job = _wait_phase(kubectl, jobs_ns, JOB, {"Succeeded"}, timeout=600)
    assert job["status"].get("succeededReplicas") == 2, job["status"]


@pytest.fixture(scope="module")
def guarded_isvc(operator_release, images, jobs_ns, other_ns, kubectl) -> Iterator[dict[str, Any]]:
    """An InferenceService with ``spec.networkPolicy`` (clients labelled ``np-client=yes`` in its namespace)
    serving a freshly trained model; probe pods aimed at its pod's HTTP and gRPC ports."""
    apply(kubectl, jobs_ns, {
        "apiVersion": "aiaas.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "np-model"},
        "spec": {"trainer": {"model": {"architecture": "cnn"}, "dataset": {"kind": "digits"},
                             "hyperparameters": {"epochs": 1, "batchSize": 32, "seed": 4}},
                 "topology": {"nodes": 1, "nprocPerNode": 1, "resources": workloads.SMALL},
                 "storage": {"size": "1Gi", "storageClassName": "local-path"}}})
    _wait_phase(kubectl, jobs_ns, "np-model", {"Succeeded"}, timeout=900)
    apply(kubectl, jobs_ns, {
        "apiVersion": "aiaas.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "np-guarded"},
        "spec": {"model": {"trainingJob": "np-model"}, "resources": workloads.SMALL,
                 "networkPolicy": {"allowFrom": [{"podSelector": {"matchLabels": {"np-client": "yes"}}}]}}})
    wait_for(lambda: (get(kubectl, jobs_ns, "deployment", "np-guarded") or {}).get("status", {}).get(
        "readyReplicas"), timeout=600, interval=2, what="the model server to be Ready (the kubelet's probes)")
    pod = next(p for p in _pods(kubectl, jobs_ns, f"{launch.LABEL_ISVC}=np-guarded") if p["status"].get("podIP"))
    targets = {"http": f"{pod['status']['podIP']}:{launch.SERVER_PORT}",
               "grpc": f"{pod['status']['podIP']}:{launch.SERVER_GRPC_PORT}"}
    probes = {"listed": (jobs_ns, probe_pod("probe-isvc-listed", list(targets.values()),
                                            labels={"np-client": "yes"})),
              "unlisted": (jobs_ns, probe_pod("probe-isvc-unlisted", list(targets.values()))),
              "other-namespace": (other_ns, probe_pod("probe-isvc-other-ns", list(targets.values()),
                                                      labels={"np-client": "yes"}))}
    for ns, doc in probes.values():
        apply_pods(kubectl, ns, doc)
    for ns, doc in probes.values():
        wait_phase(kubectl, ns, doc["metadata"]["name"], {"Running"})
    yield {"targets": targets, "probes": {k: (ns, d["metadata"]["name"]) for k, (ns, d) in probes.items()}}
    for ns, doc in probes.values():
        kubectl("delete", "pod", doc["metadata"]["name"], "--wait=false", namespace=ns, check=False)


def test_inferenceservice_policy_admits_only_the_listed_clients(guarded_isvc, kubectl) -> None:
    """A listed client reaches the model server's HTTP and gRPC ports (its kubelet probes pass: it is Ready);
    an unlisted pod of the namespace and a pod of another namespace with the same label are dropped."""
    rounds = _until(kubectl, guarded_isvc, "listed", 0.0, {"http": {"open"}, "grpc": {"open"}})
    print(f"listed client: {rounds[-1]}")
    for probe in ("unlisted", "other-namespace"):
        rounds = _rounds(kubectl, guarded_isvc, probe, 0.0, 5)
        for port in ("http", "grpc"):
            assert set(_states(guarded_isvc, rounds, port)) == {DROPPED}, (probe, port, rounds)
