"""Every example renders to valid Kubernetes objects, and the rendered pods honour the launch contract."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest

from aiaas.contract import launch
from aiaas.contract.config import TrainerConfig
from aiaas.operator import api, load
from aiaas.operator.render import (
    JobPlan,
    RenderSettings,
    ServicePlan,
    render_inferenceservice,
    render_trainingjob,
)
from aiaas.operator.render.trainingjob import artifact_uri, isolation_policy, later_kinds, pod_template

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
K8S_VERSION = "1.36.0"
SETTINGS = RenderSettings()


def render_file(path: Path, namespace: str = "team-a") -> list[dict]:
    objs = [i.obj for i in load.load_file(path)]
    out: list[dict] = []
    for obj in objs:
        obj.metadata.namespace = namespace
        obj.metadata.uid = "0f1e2d3c-4b5a-6978-8695-a4b3c2d1e0f9"
        if isinstance(obj, api.TrainingJob):
            out += render_trainingjob(obj, SETTINGS)
        else:
            out += render_inferenceservice(obj, SETTINGS, ServicePlan(storage_uri="pvc://models/cnn/artifacts"))
    return out


def job(**spec) -> api.TrainingJob:
    return api.TrainingJob.model_validate(
        {"apiVersion": api.API_VERSION, "kind": "TrainingJob", "metadata": {"name": "demo", "namespace": "ns",
                                                                              "uid": "u-1"}, "spec": spec}
    )


def by_kind(objs: list[dict]) -> dict[str, dict]:
    return {o["kind"]: o for o in objs}


def pod_spec(objs: list[dict]) -> dict:
    """The workers' pod spec: a StatefulSet's template, or a one-node job's bare pod."""
    kinds = by_kind(objs)
    return kinds["StatefulSet"]["spec"]["template"]["spec"] if "StatefulSet" in kinds else kinds["Pod"]["spec"]


def test_there_are_examples_of_every_kind() -> None:
    names = [p.name for p in EXAMPLES]
    assert len(names) >= 5 and names == sorted(names)
    kinds = {i.obj.kind for p in EXAMPLES for i in load.load_file(p)}
    assert kinds == {"TrainingJob", "InferenceService"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_renders_to_strictly_valid_objects(path: Path) -> None:
    objs = render_file(path)
    assert objs
    for obj in objs:
        if obj["apiVersion"].startswith("scheduling.volcano.sh"):
            assert obj["kind"] == "PodGroup" and obj["spec"]["minMember"] >= 1
            continue  # a CRD kind: kubernetes-validate has no schema for it
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert obj["metadata"]["ownerReferences"][0]["controller"] is True


def test_statefulset_runs_torchrun_with_kubeflow_compatible_env() -> None:
    j = job(topology={"nodes": 3, "nprocPerNode": 2, "parallelism": {"model": 2}},
            trainer={"hyperparameters": {"batchSize": 30}})
    objs = by_kind(render_trainingjob(j, SETTINGS))
    svc, sts = objs["Service"], objs["StatefulSet"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert sts["spec"]["podManagementPolicy"] == "Parallel" and sts["spec"]["replicas"] == 3
    assert sts["spec"]["serviceName"] == "demo-workers"
    c = sts["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == list(launch.RUN_ONCE_COMMAND) and c["args"][0] == "torchrun"  # run at most once per pod
    assert "--nnodes=3" in c["args"] and "--nproc-per-node=2" in c["args"]
    assert "--rdzv-endpoint=demo-0.demo-workers.ns.svc:29400" in c["args"] and c["args"][-2:] == ["-m", "aiaas.trainer"]
    env = {e["name"]: e for e in c["env"]}
    assert env["MASTER_ADDR"]["value"] == "demo-0.demo-workers.ns.svc"
    assert env["WORLD_SIZE"]["value"] == "6"
    assert env["PET_NNODES"]["value"] == "3" and env["PET_NPROC_PER_NODE"]["value"] == "2"
    assert env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['apps.kubernetes.io/pod-index']"
    )
    config = TrainerConfig.model_validate(json.loads(env[launch.ENV_CONFIG]["value"]))
    assert (config.parallelism.data, config.parallelism.model) == (3, 2)
    assert config.hyperparameters.batch_size == 30


def test_pod_is_restricted_and_has_shm_and_storage() -> None:
    pod = pod_spec(render_trainingjob(job(topology={"shmSize": "2Gi"}), SETTINGS))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = pod["containers"][0]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols[mounts["/dev/shm"]["name"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    assert launch.CHECKPOINT_DIR.startswith(next(m for m in mounts if m.startswith("/var/run/aiaas")))
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_gpu_jobs_request_gpus_and_tolerate_the_gpu_taint() -> None:
    j = job(topology={"nprocPerNode": 4, "resources": {"limits": {"nvidia.com/gpu": 4}}},
            trainer={"hyperparameters": {"batchSize": 64}})
    pod = pod_spec(render_trainingjob(j, SETTINGS))
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    cpu_pod = pod_spec(render_trainingjob(job(), SETTINGS))
    assert "tolerations" not in cpu_pod


def test_suspended_job_renders_zero_replicas_and_override_wins() -> None:
    two = {"nodes": 2}
    assert by_kind(render_trainingjob(job(topology=two, suspend=True), SETTINGS))["StatefulSet"]["spec"]["replicas"] == 0
    assert by_kind(render_trainingjob(job(topology=two), SETTINGS, JobPlan(replicas=0)))["StatefulSet"]["spec"][
        "replicas"] == 0
    assert "Pod" not in by_kind(render_trainingjob(job(suspend=True), SETTINGS))  # a one-node job: no bare pod


def test_a_one_node_job_is_a_bare_pod_with_the_statefulset_pods_identity() -> None:
    """Same template, same name, pod-index label and DNS name (hostname + subdomain) as a StatefulSet's pod 0;
    controlled by the job; an elastic job or one of several nodes is a StatefulSet."""
    one = render_trainingjob(job(), SETTINGS, JobPlan(restart_generation=2))
    kinds = [o["kind"] for o in one]
    assert "StatefulSet" not in kinds and kinds.count("Pod") == 1 and kinds[-1] == "Service"
    pod = by_kind(one)["Pod"]
    sts = by_kind(render_trainingjob(job(), SETTINGS, JobPlan(restart_generation=2, workload="StatefulSet")))
    template = sts["StatefulSet"]["spec"]["template"]
    assert pod["metadata"]["name"] == launch.worker_pod_name("demo", 0) == "demo-0"
    assert pod["metadata"]["labels"] == template["metadata"]["labels"] | {launch.POD_INDEX_LABEL: "0"}
    assert pod["metadata"]["annotations"] == template["metadata"]["annotations"]
    assert pod["metadata"]["annotations"][launch.ANNOTATION_RESTART] == "2"
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "TrainingJob"
    assert pod["metadata"]["ownerReferences"][0]["controller"] is True
    assert pod["spec"] == template["spec"] | {"hostname": "demo-0", "subdomain": "demo-workers"}
    assert launch.pod_dns_name("demo", 0, "ns") == "demo-0.demo-workers.ns.svc"
    assert [p["metadata"]["name"] for p in render_trainingjob(job(), SETTINGS, JobPlan(pods=())) if p["kind"] == "Pod"] == []
    elastic = job(topology={"nodes": 1}, elastic={"minNodes": 1, "maxNodes": 2})
    assert "StatefulSet" in by_kind(render_trainingjob(elastic, SETTINGS))


def test_elastic_job_uses_min_max_nnodes() -> None:
    j = job(topology={"nodes": 2}, elastic={"minNodes": 1, "maxNodes": 4, "maxRestarts": 5})
    c = by_kind(render_trainingjob(j, SETTINGS))["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    assert "--nnodes=1:4" in c["args"] and "--max-restarts=5" in c["args"]


def test_storage_claim_and_artifact_uri() -> None:
    j = job(topology={"nodes": 2}, storage={"size": "3Gi"})
    objs = by_kind(render_trainingjob(j, SETTINGS))
    pvc = objs["PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == "demo-storage" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert artifact_uri(j) == "pvc://demo-storage/demo/artifacts"
    existing = job(storage={"claimName": "shared"})
    assert "PersistentVolumeClaim" not in by_kind(render_trainingjob(existing, SETTINGS))
    assert artifact_uri(existing) == "pvc://shared/demo/artifacts"
    assert artifact_uri(job()).startswith("file://")


def test_gang_scheduling() -> None:
    volcano = by_kind(render_trainingjob(job(topology={"nodes": 2}, scheduling={"gang": {"provider": "volcano",
                                                                                           "queue": "q"}}), SETTINGS))
    assert volcano["PodGroup"]["spec"] == {"minMember": 2, "queue": "q"}
    assert volcano["StatefulSet"]["spec"]["template"]["spec"]["schedulerName"] == "volcano"
    kueue = by_kind(render_trainingjob(job(scheduling={"gang": {"provider": "kueue", "queue": "team"}}), SETTINGS))
    assert kueue["Pod"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team"  # Kueue's pod integration
    assert "PodGroup" not in kueue


def test_custom_command_keeps_the_env_contract() -> None:
    j = job(trainer={"command": ["python", "train.py"], "args": ["--lr", "0.1"],
                     "env": [{"name": "WORLD_SIZE", "value": "override"}, {"name": "EXTRA", "value": "1"}]})
    c = pod_spec(render_trainingjob(j, SETTINGS))["containers"][0]
    assert c["command"] == list(launch.RUN_ONCE_COMMAND)  # your command runs at most once per pod
    assert c["args"] == ["python", "train.py", "--lr", "0.1"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["WORLD_SIZE"] == "override" and env["EXTRA"] == "1" and env["MASTER_ADDR"] == "demo-0.demo-workers.ns.svc"


def test_render_is_pure_and_deterministic() -> None:
    j = job(topology={"nodes": 2})
    assert render_trainingjob(j, SETTINGS) == render_trainingjob(j, SETTINGS)
    sts = next(o for o in render_trainingjob(j, RenderSettings(trainer_image="x/y:1")) if o["kind"] == "StatefulSet")
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == "x/y:1"


def isvc(**spec) -> api.InferenceService:
    return api.InferenceService.model_validate(
        {"apiVersion": api.API_VERSION, "kind": "InferenceService",
         "metadata": {"name": "digits", "namespace": "ns", "uid": "u-2"}, "spec": spec}
    )


def test_inferenceservice_renders_deployment_service_and_hpa() -> None:
    s = isvc(model={"storageUri": "pvc://models/cnn/v1"}, minReplicas=1, maxReplicas=3)
    objs = by_kind(render_inferenceservice(s, SETTINGS))
    dep = objs["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert {"name": "model", "mountPath": "/mnt/models", "readOnly": True, "subPath": "cnn/v1"} in c["volumeMounts"]
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert objs["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] == 3
    assert objs["Service"]["spec"]["ports"][0]["port"] == 80
    fixed = by_kind(render_inferenceservice(isvc(model={"storageUri": "pvc://m/x"}, replicas=2), SETTINGS))
    assert "HorizontalPodAutoscaler" not in fixed and fixed["Deployment"]["spec"]["replicas"] == 2


def test_inferenceservice_waiting_for_its_job_renders_no_deployment() -> None:
    objs = render_inferenceservice(isvc(model={"trainingJob": "train"}), SETTINGS)
    assert [o["kind"] for o in objs] == ["Service"]
    assert [o["kind"] for o in render_inferenceservice(isvc(model={"trainingJob": "train"}), SETTINGS,
                                                       ServicePlan("pvc://c/train/artifacts"))] == ["Service", "Deployment"]


def test_a_job_and_a_service_of_one_name_render_no_object_of_the_same_kind_and_name() -> None:
    """examples/05 after examples/01 in one namespace: the InferenceService's Service keeps the plain name
    (http://<name>.<ns>.svc), the job's headless Service and its pods' DNS names use another."""
    j = job(topology={"nodes": 2})
    svc = api.InferenceService.model_validate(
        {"apiVersion": api.API_VERSION, "kind": "InferenceService",
         "metadata": {"name": "demo", "namespace": "ns", "uid": "u-2"}, "spec": {"model": {"trainingJob": "demo"}}})
    job_objs = {(o["kind"], o["metadata"]["name"]) for o in render_trainingjob(j, SETTINGS)}
    svc_objs = {(o["kind"], o["metadata"]["name"])
                for o in render_inferenceservice(svc, SETTINGS, ServicePlan(storage_uri="pvc://m/demo/artifacts"))}
    assert ("Service", "demo") in svc_objs and not job_objs & svc_objs
    sts = by_kind(render_trainingjob(j, SETTINGS))["StatefulSet"]
    assert ("Service", sts["spec"]["serviceName"]) in job_objs
    assert launch.pod_dns_name("demo", 0, "ns") == f"demo-0.{sts['spec']['serviceName']}.ns.svc"


def test_the_network_policy_admits_only_the_jobs_pods_and_the_scrapers_on_metrics_ports() -> None:
    """Issue 12, item 5: torchrun's c10d store and the master port accept unauthenticated data."""
    settings = RenderSettings(operator_namespace="aiaas-system",
                              monitoring_namespace_selector={"kubernetes.io/metadata.name": "monitoring"})
    j = job(topology={"nodes": 2, "nprocPerNode": 2})
    np = by_kind(render_trainingjob(j, settings))["NetworkPolicy"]
    assert np["metadata"]["name"] == launch.network_policy_name("demo") != "demo"
    assert np["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    spec = np["spec"]
    assert spec["podSelector"] == {"matchLabels": {launch.LABEL_JOB: "demo"}} and spec["policyTypes"] == ["Ingress"]
    peers, scrapers = spec["ingress"]
    assert peers == {"from": [{"podSelector": {"matchLabels": {launch.LABEL_JOB: "demo"}}}]}  # no namespaceSelector
    assert scrapers["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "aiaas-system"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    ports = {p["port"] for p in scrapers["ports"]}
    assert ports == {launch.METRICS_PORT, launch.METRICS_PORT + 1}
    assert launch.RDZV_PORT not in ports and launch.MASTER_PORT not in ports
    kubernetes_validate.validate(np, K8S_VERSION, strict=True)


def test_without_scrapers_or_when_turned_off() -> None:
    np = by_kind(render_trainingjob(job(), SETTINGS))["NetworkPolicy"]
    assert len(np["spec"]["ingress"]) == 1, "no namespace is allowed in unless configured"
    assert "NetworkPolicy" not in by_kind(render_trainingjob(job(), RenderSettings(network_policy=False)))


def test_the_namespaces_isolation_policy_closes_every_trainer_pod_and_is_owned_by_no_job() -> None:
    """Policies add up: this one admits nothing, so a job's pod is unreachable before its own policy exists;
    with it, the job's policy decides alone what reaches the pod."""
    iso = isolation_policy("team-a", SETTINGS)
    assert iso["metadata"]["name"] == launch.ISOLATION_POLICY_NAME and iso["metadata"]["namespace"] == "team-a"
    assert "ownerReferences" not in iso["metadata"]
    selector = iso["spec"]["podSelector"]
    assert selector == {"matchExpressions": [{"key": launch.LABEL_JOB, "operator": "Exists"}]}
    assert iso["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in iso["spec"], "no ingress at all"
    pod_labels = pod_template(job(), SETTINGS, JobPlan())["metadata"]["labels"]
    assert launch.LABEL_JOB in pod_labels, "every trainer pod is selected"
    kubernetes_validate.validate(iso, K8S_VERSION, strict=True)
    assert isolation_policy("team-a", RenderSettings(network_policy=False)) is None


def test_only_a_bare_pods_own_policy_may_come_after_it() -> None:
    """A StatefulSet's pods rendezvous with each other, so their policy comes before them."""
    assert later_kinds("StatefulSet") == ("Service",)
    assert set(later_kinds("Pod")) == {"NetworkPolicy", "Service"}
