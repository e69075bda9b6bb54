"""The pure helpers of bench/operator_bench.py: the phase order, the ratios, and how the bench reads a job's
Running status, a pod's job and a request's client for the operator and for the peer (Kubeflow's training
operator). The bench itself needs a cluster; these run without one."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "operator_bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("operator_bench", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_phase_order_rotates_the_kinds_each_repeat(bench: ModuleType) -> None:
    assert bench.phase_order(["B", "O", "K"], 3) == ["B", "O", "K", "O", "K", "B", "K", "B", "O"]
    assert bench.phase_order(["B", "O"], 3) == ["B", "O", "O", "B", "B", "O"]  # the old alternation
    assert bench.phase_order(["O"], 2) == ["O", "O"]


def _result(kind: str, pod_p99: float, cpu: float, workload: bool = True) -> dict:
    stage = {"count": 10, "p50": pod_p99 / 2, "p99": pod_p99, "per_second": 100 / pod_p99}
    none = {"count": 0, "p50": math.nan, "p99": math.nan, "per_second": math.nan}
    return {"kind": kind, "cpu_seconds": cpu, "workload": stage if workload else none, "pod": stage, "pod_running": stage}


def test_ratios_pair_the_phases_of_each_repeat_and_skip_stages_a_phase_lacks(bench: ModuleType) -> None:
    results = [_result("baseline", 10, 1), _result("operator", 10, 10), _result("kubeflow", 5, 2, workload=False),
               _result("operator", 20, 10), _result("kubeflow", 5, 4, workload=False), _result("baseline", 20, 1)]
    out = bench.ratios(results, 3)
    assert set(out) == {"operator/baseline", "kubeflow/operator", "kubeflow/baseline"}
    assert out["operator/baseline"]["pod_p99"] == 1.0 and out["operator/baseline"]["cpu"] == 10.0
    assert out["kubeflow/operator"]["pod_p99"] == pytest.approx((0.5 + 0.25) / 2)  # median of two repeats
    assert out["kubeflow/baseline"]["cpu"] == 3.0
    assert "workload_p50" not in out["kubeflow/operator"] and "workload_p50" in out["operator/baseline"]


def test_job_running_reads_the_phase_or_a_true_running_condition(bench: ModuleType) -> None:
    assert bench.job_running({"status": {"phase": "Running"}})
    assert not bench.job_running({"status": {"phase": "Pending"}})
    assert not bench.job_running({})
    created = {"type": "Created", "status": "True"}
    assert bench.job_running({"status": {"conditions": [created, {"type": "Running", "status": "True"}]}})
    assert not bench.job_running({"status": {"conditions": [created, {"type": "Running", "status": "False"}]}})


def test_a_pod_is_a_workload_unless_a_statefulset_made_it(bench: ModuleType) -> None:
    def owned(kind: str) -> dict:
        return {"metadata": {"ownerReferences": [{"kind": kind, "name": "x", "controller": True}]}}

    assert bench.made_by_statefulset(owned("StatefulSet"))
    assert not bench.made_by_statefulset(owned("TrainingJob")) and not bench.made_by_statefulset(owned("PyTorchJob"))
    assert not bench.made_by_statefulset({"metadata": {}})


def test_job_of_pod_reads_either_job_label(bench: ModuleType) -> None:
    from aiaas.contract.launch import LABEL_JOB

    assert bench.job_of_pod({"metadata": {"name": "bench-00001-0", "labels": {LABEL_JOB: "bench-00001"}}}) \
        == "bench-00001"
    peer = {"metadata": {"name": "bench-00002-master-0", "labels": {bench.PEER_JOB_LABEL: "bench-00002"}}}
    assert bench.job_of_pod(peer) == "bench-00002"


def test_client_of_names_the_bench_the_peer_the_operator_and_controllers(bench: ModuleType) -> None:
    admin = "kubernetes-admin"
    assert bench.client_of(admin, "aiaas-bench") == "aiaas-bench"
    assert bench.client_of(admin, "training-operator.v1/v0.0.0 (linux/amd64) kubernetes/$Format") == "kubeflow"
    assert bench.client_of(admin, "OpenAPI-Generator/33.1.0/python") == "operator"
    assert bench.client_of("system:serviceaccount:kube-system:statefulset-controller",
                           "kube-controller-manager/v1.36.3") == "statefulset-controller"


def test_the_peers_pod_gets_the_image_and_requests_of_the_operators(bench: ModuleType) -> None:
    container = bench.trainer_container()
    job = bench.pytorchjob_manifest("bench-00001", container)
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]
    assert master["replicas"] == 1
    (pod,) = master["template"]["spec"]["containers"]
    assert pod["name"] == "pytorch"  # the peer's webhook requires it
    assert pod["image"] == container["image"]
    assert pod["resources"]["requests"] == {"cpu": "10m", "memory": "16Mi"}


def test_a_job_of_several_pods_is_one_master_and_workers_for_the_peer_and_nodes_for_us(bench: ModuleType) -> None:
    container = bench.trainer_container()
    replicas = bench.pytorchjob_manifest("bench-00001", container, pods=4)["spec"]["pytorchReplicaSpecs"]
    assert {role: spec["replicas"] for role, spec in replicas.items()} == {"Master": 1, "Worker": 3}
    assert set(bench.pytorchjob_manifest("bench-00001", container)["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    assert bench.job_manifest("bench-00001", pods=4)["spec"]["topology"]["nodes"] == 4


def test_requests_are_counted_across_the_audit_logs_rotation(bench: ModuleType, tmp_path: Path) -> None:
    """The API server renames a full audit log to ``<stem>-<time><suffix>``: a phase's requests are counted in
    the backups made since it began too, not in older ones."""
    import json
    import os

    def line(ns: str, verb: str) -> str:
        return json.dumps({"stage": "ResponseComplete", "verb": verb, "userAgent": "python-requests/2",
                           "user": {"username": "kubernetes-admin"},
                           "objectRef": {"namespace": ns, "resource": "pods"}}) + "\n"

    (tmp_path / "audit-2026-12-07T10-00-00.000.log").write_text(line("ns", "create") * 5)
    os.utime(tmp_path / "audit-2026-12-07T10-00-00.000.log", (100.0, 100.0))  # rotated before the phase
    (tmp_path / "audit-2026-12-07T16-47-52.970.log").write_text(line("ns", "create") * 3 + line("other", "get"))
    (tmp_path / "audit.log").write_text(line("ns", "patch") * 2)
    counts = bench.audit_counts(str(tmp_path / "audit.log"), "ns", since=1000.0)
    assert counts == {"operator create pods": 3, "operator patch pods": 2}, counts
