"""What the renderer produces is accepted by a real API server and works with
the real controllers and scheduler: the workers' pods are created (by the
StatefulSet controller, or as a one-node job's bare pod), GPU pods go to GPU nodes only, and a request the cluster cannot hold stays Pending with
the scheduler's reason."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from e2e_util import example_files, load_yaml_docs, wait_for

pytestmark = pytest.mark.e2e

launch = pytest.importorskip("aiaas.contract.launch")
load = pytest.importorskip("aiaas.operator.load")
render = pytest.importorskip("aiaas.operator.render")


def _tj_examples() -> list[Path]:
    return [p for p in example_files() if any(d.get("kind") == "TrainingJob" for d in load_yaml_docs(p))]


def _tj_doc(path: Path) -> dict:
    return next(d for d in load_yaml_docs(path) if d.get("kind") == "TrainingJob")


def _render(doc: dict, namespace: str) -> list[dict]:
    job = load.parse(copy.deepcopy(doc))
    objs = render.render_trainingjob(job, render.RenderSettings())
    for o in objs:
        o["metadata"]["namespace"] = namespace
    return objs


def _served_kinds(kubectl) -> set[tuple[str, str]]:
    """(group, kind) pairs the API server serves."""
    out = kubectl("api-resources", "-o", "wide", "--no-headers").stdout
    kinds = set()
    for line in out.splitlines():
        cols = line.split()
        # NAME [SHORTNAMES] APIVERSION NAMESPACED KIND VERBS [CATEGORIES]
        idx = next(i for i, c in enumerate(cols) if c in ("true", "false"))
        api_version, kind = cols[idx - 1], cols[idx + 1]
        kinds.add((api_version.rpartition("/")[0], kind))
    return kinds


def _group_kind(obj: dict) -> tuple[str, str]:
    return obj["apiVersion"].rpartition("/")[0], obj["kind"]


def _apply(kubectl, objs: list[dict], namespace: str) -> None:
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}),
            namespace=namespace)


WORKER_KINDS = ("StatefulSet", "Pod")  # a job's workers: a StatefulSet, or a one-node job's bare pod
APPLIED_KINDS = ("Service", *WORKER_KINDS)


def _sts(objs: list[dict]) -> dict | None:
    return next((o for o in objs if o["kind"] == "StatefulSet"), None)


def _pod_spec(objs: list[dict]) -> dict:
    """The workers' pod spec: the StatefulSet's template, or the bare pod's own."""
    sts = _sts(objs)
    return sts["spec"]["template"]["spec"] if sts else next(o for o in objs if o["kind"] == "Pod")["spec"]


def _selector(doc: dict) -> dict[str, str]:
    return {launch.LABEL_JOB: doc["metadata"]["name"]}


def _pods(kubectl, namespace: str, selector: dict[str, str]) -> list[dict]:
    sel = ",".join(f"{k}={v}" for k, v in selector.items())
    return json.loads(kubectl("get", "pods", "-l", sel, "-o", "json", namespace=namespace).stdout)["items"]


def _nodes(kubectl) -> list[dict]:
    return json.loads(kubectl("get", "nodes", "-o", "json").stdout)["items"]


def _gpus(node: dict) -> int:
    return int(node["status"].get("allocatable", {}).get("nvidia.com/gpu", "0"))


def _pod_gpus(pod_spec: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in pod_spec["containers"])


def _scheduled_condition(pod: dict) -> dict:
    return next((c for c in pod["status"].get("conditions", []) if c["type"] == "PodScheduled"), {})


def _gpu_variant(doc: dict, *, nodes: int, gpus_per_pod: int) -> dict:
    """The example, made schedulable by the default scheduler alone (no gang scheduler, no claim),
    with ``nodes`` pods of ``gpus_per_pod`` GPUs each (one process per GPU)."""
    doc = copy.deepcopy(doc)
    spec = doc["spec"]
    spec.get("scheduling", {}).pop("gang", None)
    spec.get("scheduling", {}).pop("schedulerName", None)
    spec.pop("storage", None)
    spec.pop("elastic", None)
    topo = spec["topology"]
    topo["nodes"] = nodes
    topo["nprocPerNode"] = gpus_per_pod
    topo.setdefault("resources", {}).setdefault("limits", {})["nvidia.com/gpu"] = gpus_per_pod
    topo.get("parallelism", {}).pop("data", None)
    topo.get("parallelism", {}).pop("model", None)
    hp = spec.setdefault("trainer", {}).setdefault("hyperparameters", {})
    hp["batchSize"] = nodes * gpus_per_pod * 4
    return doc


def _gpu_example() -> dict:
    for p in _tj_examples():
        doc = _tj_doc(p)
        if doc["spec"].get("topology", {}).get("resources", {}).get("limits", {}).get("nvidia.com/gpu"):
            return doc
    pytest.skip("no TrainingJob example requests nvidia.com/gpu")


# -------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("example", _tj_examples(), ids=lambda p: p.name)
def test_rendered_children_apply_and_pods_are_created(example, kubectl, namespace):
    doc = _tj_doc(example)
    objs = _render(doc, namespace)
    served = _served_kinds(kubectl)
    applied = [o for o in objs if _group_kind(o) in served]
    skipped = [o["kind"] for o in objs if _group_kind(o) not in served]
    kinds = {o["kind"] for o in applied}
    assert "Service" in kinds and len(kinds & set(WORKER_KINDS)) == 1, (kinds, skipped)
    _apply(kubectl, applied, namespace)

    sts = _sts(objs)
    replicas = doc["spec"]["topology"].get("nodes", 1)
    assert sts is None or sts["spec"]["replicas"] == replicas
    name = doc["metadata"]["name"]
    pods = wait_for(
        lambda: (p := _pods(kubectl, namespace, _selector(doc))) and len(p) == replicas and p,
        timeout=90,
        what=f"{replicas} pods of TrainingJob {name}",
    )
    assert sorted(p["metadata"]["name"] for p in pods) == [f"{name}-{i}" for i in range(replicas)]
    template = _pod_spec(objs)["containers"][0]
    svc = next(o for o in objs if o["kind"] == "Service")
    for pod in pods:
        if sts is not None:
            assert pod["metadata"]["ownerReferences"][0]["kind"] == "StatefulSet"
        else:  # the bare pod carries what the StatefulSet controller would give it: its DNS name, its index
            assert pod["spec"]["hostname"] == pod["metadata"]["name"]
            assert pod["spec"]["subdomain"] == svc["metadata"]["name"]
            assert pod["metadata"]["labels"][launch.POD_INDEX_LABEL] == pod["metadata"]["name"].rsplit("-", 1)[1]
        container = pod["spec"]["containers"][0]
        assert container["image"] == template["image"]
        assert container["args"] == template.get("args", [])
        if "resources" in template:
            for section in ("limits", "requests"):
                for res, qty in template["resources"].get(section, {}).items():
                    assert str(container["resources"][section][res]) == str(qty)

    live = json.loads(kubectl("get", "service", svc["metadata"]["name"], "-o", "json", namespace=namespace).stdout)
    assert live["spec"]["clusterIP"] == "None", "the torchrun rendezvous needs a headless Service"
    assert len(_pods(kubectl, namespace, live["spec"]["selector"])) == replicas
    assert sts is None or sts["spec"]["serviceName"] == svc["metadata"]["name"]


@pytest.mark.parametrize("example", example_files(), ids=lambda p: p.name)
def test_aiaas_render_cli_output_passes_server_dry_run(example, kubectl, namespace):
    """``aiaas render -f`` prints multi-document YAML the API server accepts as is."""
    proc = subprocess.run(
        [sys.executable, "-m", "aiaas.operator", "render", "-f", str(example), "-n", namespace],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    served = _served_kinds(kubectl)
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d and _group_kind(d) in served]
    if not docs:
        pytest.skip(f"{example.name} renders nothing this cluster serves")
    res = kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-f", "-",
        input=yaml.safe_dump_all(docs), namespace=namespace, check=False,
    )
    assert res.returncode == 0, res.stderr


def test_gpu_pods_land_only_on_gpu_nodes(kubectl, namespace):
    nodes = _nodes(kubectl)
    gpu_nodes = {n["metadata"]["name"]: _gpus(n) for n in nodes if _gpus(n) > 0}
    if not gpu_nodes:
        pytest.skip("no node advertises nvidia.com/gpu")
    doc = _gpu_example()
    want_pods = min(doc["spec"]["topology"].get("nodes", 1), len(gpu_nodes))
    per_pod = min(int(doc["spec"]["topology"]["resources"]["limits"]["nvidia.com/gpu"]), min(gpu_nodes.values()))
    doc = _gpu_variant(doc, nodes=want_pods, gpus_per_pod=per_pod)
    objs = [o for o in _render(doc, namespace) if o["kind"] in APPLIED_KINDS]
    assert _pod_gpus(_pod_spec(objs)) == per_pod
    _apply(kubectl, objs, namespace)

    selector = _selector(doc)
    pods = wait_for(
        lambda: (p := _pods(kubectl, namespace, selector)) and len(p) == want_pods
        and all(x["spec"].get("nodeName") for x in p) and p,
        timeout=90,
        what="the GPU pods to be scheduled",
    )
    for pod in pods:
        assert pod["spec"]["nodeName"] in gpu_nodes, f"{pod['metadata']['name']} on non-GPU node {pod['spec']['nodeName']}"


def test_gpu_job_larger_than_the_cluster_leaves_a_pod_pending(kubectl, namespace):
    """One more full-node pod than there are GPU nodes: the extra pod stays Pending, and says why."""
    nodes = _nodes(kubectl)
    gpu_nodes = {n["metadata"]["name"]: _gpus(n) for n in nodes if _gpus(n) > 0}
    if not gpu_nodes:
        pytest.skip("no node advertises nvidia.com/gpu")
    per_pod = min(gpu_nodes.values())
    if any(g >= 2 * per_pod for g in gpu_nodes.values()):
        pytest.skip("GPU nodes of unequal size; this test wants one full-node pod per node")
    want = len(gpu_nodes) + 1
    doc = _gpu_variant(_gpu_example(), nodes=want, gpus_per_pod=per_pod)
    objs = [o for o in _render(doc, namespace) if o["kind"] in APPLIED_KINDS]
    _apply(kubectl, objs, namespace)
    selector = _selector(doc)

    def settled():
        pods = _pods(kubectl, namespace, selector)
        if len(pods) != want:
            return None
        placed = [p for p in pods if p["spec"].get("nodeName")]
        pending = [p for p in pods if _scheduled_condition(p).get("reason") == "Unschedulable"]
        return len(placed) == len(gpu_nodes) and len(pending) == 1 and (placed, pending[0])

    placed, pending = wait_for(settled, timeout=90, what="all GPU nodes full and one pod Unschedulable")
    assert {p["spec"]["nodeName"] for p in placed} == set(gpu_nodes), "one full-node pod per GPU node"
    cond = _scheduled_condition(pending)
    assert pending["status"]["phase"] == "Pending"
    assert cond["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in cond["message"], cond["message"]


def test_gpu_request_no_node_can_hold_stays_pending(kubectl, namespace):
    nodes = _nodes(kubectl)
    gpu_nodes = [n for n in nodes if _gpus(n) > 0]
    if not gpu_nodes:
        pytest.skip("no node advertises nvidia.com/gpu")
    too_many = max(_gpus(n) for n in gpu_nodes) + 1
    doc = _gpu_variant(_gpu_example(), nodes=1, gpus_per_pod=too_many)
    objs = [o for o in _render(doc, namespace) if o["kind"] in APPLIED_KINDS]
    _apply(kubectl, objs, namespace)
    selector = _selector(doc)

    def unschedulable():
        pods = _pods(kubectl, namespace, selector)
        return pods and _scheduled_condition(pods[0]).get("reason") == "Unschedulable" and pods[0]

    pod = wait_for(unschedulable, timeout=90, what="PodScheduled=False, reason Unschedulable")
    cond = _scheduled_condition(pod)
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")
    assert cond["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in cond["message"], cond["message"]
