"""TrainingJob -> headless Service + its torchrun workers (+ PersistentVolumeClaim, + Volcano PodGroup,
+ NetworkPolicy).

The workers of a job of several nodes (or an elastic one) are a StatefulSet. A one-node job's worker is a bare
Pod the operator creates itself (:func:`workload_kind`): it needs nothing a StatefulSet gives (no peers to
number, no size to change), and a StatefulSet's pod waits for kube-controller-manager, whose client shares
20 requests/s among ~4 requests per StatefulSet (docs/performance.md). Both get the same pod template, the
same pod name (``<job>-<ordinal>``) and DNS name (hostname + subdomain = the headless Service).

The renderer draws what a :class:`JobPlan` asks for (size, restart generation, which children exist); the
operator's reconciler makes the plan, so nothing edits a rendered manifest afterwards.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from aiaas.contract import launch
from aiaas.contract.config import Parallelism, TrainerConfig
from aiaas.operator import api

from .common import (
    base_labels,
    container_security_context,
    env_list,
    metadata,
    pod_security_context,
    resources,
    scheduling,
)
from .settings import RenderSettings

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
STORAGE_MOUNT = "/var/run/aiaas"
# In apply order: what pods need when they start (their NetworkPolicy, volume claim and PodGroup) before the
# StatefulSet; the headless Service last, since pods need its DNS names only at rendezvous, and its apply would
# otherwise delay every job's pods by a round trip.
CHILD_KINDS = ("NetworkPolicy", "PersistentVolumeClaim", "PodGroup", "StatefulSet", "Pod", "Service")
WORKLOAD_KINDS = ("StatefulSet", "Pod")  # a job's workers: one of them, never both


def later_kinds(workload: str) -> tuple[str, ...]:
    """The children that may come after the others of every new job (see Result.later_kinds): the headless
    Service, and a bare pod's own NetworkPolicy. A one-node job's pod talks to no other pod, and the namespace's
    isolation policy (:func:`isolation_policy`, applied before any pod) keeps it unreachable until its job's
    policy admits the scrapers. A StatefulSet's pods rendezvous with each other: their policy comes first."""
    return ("Service",) if workload == "StatefulSet" else ("NetworkPolicy", "Service")


@dataclass(frozen=True)
class JobPlan:
    """What the operator decided about a job's children. The default renders the job as written."""

    replicas: int | None = None  # the number of workers; None: spec.topology.nodes (0 while suspended)
    restart_generation: int | None = None  # stamped on the pod template; pods of another one are stale
    children: tuple[str, ...] = CHILD_KINDS  # the kinds to render (a finished job keeps only its workload)
    memory_request: str | None = None  # raised after an OOM kill; None: spec.topology.resources
    memory_limit: str | None = None
    workload: str | None = None  # StatefulSet or Pod; None: workload_kind(job)
    # bare pods only: the ordinals to create (a pod's spec cannot change, so one that exists is never
    # rendered again); None: every ordinal below replicas
    pods: tuple[int, ...] | None = None


def workload_kind(job: api.TrainingJob) -> str:
    """How a fresh job's workers run: a bare Pod for a one-node job that is not elastic, else a StatefulSet."""
    return "Pod" if job.spec.topology.nodes == 1 and job.spec.elastic is None else "StatefulSet"


def trainer_config(job: api.TrainingJob) -> TrainerConfig:
    """The configuration every training process of this job gets."""
    t, spec = job.spec.trainer, job.spec
    return TrainerConfig(
        job_name=job.metadata.name,
        model=t.model,
        dataset=t.dataset,
        hyperparameters=t.hyperparameters,
        parallelism=Parallelism(
            data=spec.topology.data_degree,
            model=spec.topology.parallelism.model,
            strategy=spec.topology.parallelism.strategy,
            microbatches=spec.topology.parallelism.microbatches,
        ),
        checkpoint=spec.checkpoint,
        precision=t.precision,
        checkpoint_dir=launch.CHECKPOINT_DIR,
        artifact_dir=launch.ARTIFACT_DIR,
        metrics_port=launch.METRICS_PORT,
    )


def claim_name(job: api.TrainingJob) -> str | None:
    """The PersistentVolumeClaim holding checkpoints and artifacts, if the job has one."""
    s = job.spec.storage
    if s.claim_name:
        return s.claim_name
    if s.size is not None:
        return f"{job.metadata.name}-storage"
    return None


def artifact_uri(job: api.TrainingJob) -> str:
    """Where the exported model ends up: ``pvc://<claim>/<job>/artifacts``, or a pod-local path."""
    claim = claim_name(job)
    if claim:
        return f"pvc://{claim}/{job.metadata.name}/artifacts"
    return f"file://{launch.ARTIFACT_DIR}"


def _rank0_host(job: api.TrainingJob) -> str:
    return launch.pod_dns_name(job.metadata.name, 0, job.metadata.namespace)


def torchrun_args(job: api.TrainingJob) -> list[str]:
    """torchrun's flags: static world or elastic bounds, c10d rendezvous on pod 0's stable DNS name."""
    t = job.spec.topology
    nnodes = f"{job.spec.elastic.min_nodes}:{job.spec.elastic.max_nodes}" if job.spec.elastic else str(t.nodes)
    max_restarts = job.spec.elastic.max_restarts if job.spec.elastic else 0
    return [
        f"--nnodes={nnodes}",
        f"--nproc-per-node={t.nproc_per_node}",
        f"--node-rank=$({launch.ENV_NODE_RANK})",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={_rank0_host(job)}:{launch.RDZV_PORT}",
        f"--rdzv-id={job.metadata.uid or job.metadata.name}",
        f"--max-restarts={max_restarts}",
        "-m",
        "aiaas.trainer",
    ]


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _env(job: api.TrainingJob, config_json: str) -> list[dict[str, Any]]:
    t = job.spec.topology
    nnodes = f"{job.spec.elastic.min_nodes}:{job.spec.elastic.max_nodes}" if job.spec.elastic else str(t.nodes)
    pod_index = f"metadata.labels['{launch.POD_INDEX_LABEL}']"
    env: list[dict[str, Any]] = [
        _field_env(launch.ENV_POD_NAME, "metadata.name"),
        _field_env(launch.ENV_NAMESPACE, "metadata.namespace"),
        _field_env(launch.ENV_NODE_RANK, pod_index),
        _field_env(launch.ENV_RANK, pod_index),
        {"name": launch.ENV_MASTER_ADDR, "value": _rank0_host(job)},
        {"name": launch.ENV_MASTER_PORT, "value": str(launch.MASTER_PORT)},
        {"name": launch.ENV_WORLD_SIZE, "value": str(t.world_size)},
        {"name": launch.ENV_NNODES, "value": nnodes},
        {"name": launch.ENV_NPROC_PER_NODE, "value": str(t.nproc_per_node)},
        {"name": launch.ENV_RDZV_BACKEND, "value": "c10d"},
        {"name": launch.ENV_RDZV_ENDPOINT, "value": f"{_rank0_host(job)}:{launch.RDZV_PORT}"},
        {"name": launch.ENV_RDZV_ID, "value": job.metadata.uid or job.metadata.name},
        {"name": launch.ENV_JOB_NAME, "value": job.metadata.name},
        {"name": launch.ENV_CONFIG, "value": config_json},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    user = env_list(job.spec.trainer.env)
    overridden = {e["name"] for e in user}
    return [e for e in env if e["name"] not in overridden] + user


def _ports(job: api.TrainingJob) -> list[dict[str, Any]]:
    ports = [
        {"name": "rdzv", "containerPort": launch.RDZV_PORT, "protocol": "TCP"},
        {"name": "master", "containerPort": launch.MASTER_PORT, "protocol": "TCP"},
    ]
    for local_rank in range(job.spec.topology.nproc_per_node):
        name = "metrics" if local_rank == 0 else f"metrics-{local_rank}"
        ports.append({"name": name, "containerPort": launch.METRICS_PORT + local_rank, "protocol": "TCP"})
    return ports


def _volumes(job: api.TrainingJob) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    shm = str(job.spec.topology.shm_size)
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    claim = claim_name(job)
    if claim:
        volumes.append({"name": "storage", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": "storage", "mountPath": STORAGE_MOUNT, "subPath": job.metadata.name})
    else:
        volumes.append({"name": "storage", "emptyDir": {}})
        mounts.append({"name": "storage", "mountPath": STORAGE_MOUNT})
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": "/tmp"})
    return volumes + list(job.spec.trainer.volumes), mounts + list(job.spec.trainer.volume_mounts)


def config_hash(config_json: str) -> str:
    return hashlib.sha256(config_json.encode()).hexdigest()[:16]


def job_labels(job: api.TrainingJob) -> dict[str, str]:
    labels = base_labels("trainer", job.metadata.name) | {launch.LABEL_JOB: job.metadata.name}
    gang = job.spec.scheduling.gang
    if gang and gang.provider == api.GangProvider.kueue.value and gang.queue:
        labels[KUEUE_QUEUE_LABEL] = gang.queue
    return labels


def selector(job: api.TrainingJob) -> dict[str, str]:
    return {launch.LABEL_JOB: job.metadata.name}


def headless_service(job: api.TrainingJob) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(job, launch.headless_service_name(job.metadata.name), job_labels(job)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # pod 0's name resolves before it is ready: no worker race
            "selector": selector(job),
            "ports": [
                {"name": p["name"], "port": p["containerPort"], "targetPort": p["containerPort"], "protocol": "TCP"}
                for p in _ports(job)
            ],
        },
    }


def _container(job: api.TrainingJob, settings: RenderSettings, plan: JobPlan, config_json: str,
               mounts: list[dict[str, Any]]) -> dict[str, Any]:
    trainer = job.spec.trainer
    container: dict[str, Any] = {
        "name": launch.TRAINER_CONTAINER,
        "image": trainer.image or settings.trainer_image,
        "imagePullPolicy": trainer.image_pull_policy or settings.image_pull_policy,
        # the pod runs its work at most once (contract.launch.RUN_ONCE_SCRIPT): command = the wrapper,
        # args = what you asked for (torchrun ... -m aiaas.trainer, or your own command and args)
        "command": list(launch.RUN_ONCE_COMMAND),
        "args": (trainer.command or ["torchrun"]) + (torchrun_args(job) if not trainer.command else [])
        + list(trainer.args),
        "env": _env(job, config_json),
        "ports": _ports(job),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        "terminationMessagePath": launch.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    res = resources(job.spec.topology.resources)
    for part, value in (("requests", plan.memory_request), ("limits", plan.memory_limit)):
        if value is not None:
            res[part] = {**res.get(part, {}), "memory": value}
    if res:
        container["resources"] = res
    return container


def pod_template(job: api.TrainingJob, settings: RenderSettings, plan: JobPlan) -> dict[str, Any]:
    """Every worker's pod, a StatefulSet's or a bare one: metadata (labels, annotations) and spec."""
    config_json = json.dumps(trainer_config(job).dump(), sort_keys=True, separators=(",", ":"))
    volumes, mounts = _volumes(job)
    pod_annotations = {launch.ANNOTATION_CONFIG_HASH: config_hash(config_json)}
    if plan.restart_generation is not None:
        pod_annotations[launch.ANNOTATION_RESTART] = str(plan.restart_generation)
    gang = job.spec.scheduling.gang
    if gang and gang.provider == api.GangProvider.volcano.value:
        pod_annotations[VOLCANO_GROUP_ANNOTATION] = job.metadata.name
    pod_spec: dict[str, Any] = {
        # a StatefulSet allows no other policy, and a bare pod keeps the same contract: the kubelet restarts
        # the trainer, the run-once wrapper keeps finished work from running again, the operator decides
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(settings.run_as_user),
        "containers": [_container(job, settings, plan, config_json, mounts)],
        "volumes": volumes,
        **scheduling(job.spec.scheduling, job.spec.topology.resources.gpus()),
    }
    if settings.service_account_name:
        pod_spec["serviceAccountName"] = settings.service_account_name
    return {"metadata": {"labels": job_labels(job) | {launch.LABEL_ROLE: "worker"}, "annotations": pod_annotations},
            "spec": pod_spec}


def _replicas(job: api.TrainingJob, plan: JobPlan) -> int:
    if plan.replicas is not None:
        return plan.replicas
    return 0 if job.spec.suspend else job.spec.topology.nodes


def statefulset(job: api.TrainingJob, settings: RenderSettings, plan: JobPlan) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(job, job.metadata.name, job_labels(job)),
        "spec": {
            "replicas": _replicas(job, plan),
            "serviceName": launch.headless_service_name(job.metadata.name),
            "podManagementPolicy": "Parallel",  # all nodes start together; torchrun's rendezvous waits for them
            "updateStrategy": {"type": "OnDelete"},  # the operator restarts the gang as a whole, never one by one
            "selector": {"matchLabels": selector(job)},
            "template": pod_template(job, settings, plan),
        },
    }


def worker_pods(job: api.TrainingJob, settings: RenderSettings, plan: JobPlan) -> list[dict[str, Any]]:
    """The bare pods ``plan`` asks for: what the StatefulSet controller would make of the same template (name,
    pod-index label, hostname and subdomain for the stable DNS name), controlled by the job itself."""
    template = pod_template(job, settings, plan)
    ordinals = plan.pods if plan.pods is not None else tuple(range(_replicas(job, plan)))
    pods = []
    for ordinal in ordinals:
        name = launch.worker_pod_name(job.metadata.name, ordinal)
        labels = template["metadata"]["labels"] | {launch.POD_INDEX_LABEL: str(ordinal)}
        spec = template["spec"] | {"hostname": name, "subdomain": launch.headless_service_name(job.metadata.name)}
        pods.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": metadata(job, name, labels, template["metadata"]["annotations"]), "spec": spec})
    return pods


def storage_claim(job: api.TrainingJob) -> dict[str, Any] | None:
    s = job.spec.storage
    if s.claim_name or s.size is None:
        return None
    modes = list(s.access_modes) or (["ReadWriteMany"] if job.spec.topology.nodes > 1 else ["ReadWriteOnce"])
    spec: dict[str, Any] = {"accessModes": modes, "resources": {"requests": {"storage": str(s.size)}}}
    if s.storage_class_name:
        spec["storageClassName"] = s.storage_class_name
    name = claim_name(job)
    assert name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(job, name, job_labels(job)),
        "spec": spec,
    }


def pod_group(job: api.TrainingJob) -> dict[str, Any] | None:
    gang = job.spec.scheduling.gang
    if not gang or gang.provider != api.GangProvider.volcano.value:
        return None
    min_member = gang.min_available or (job.spec.elastic.min_nodes if job.spec.elastic else job.spec.topology.nodes)
    spec: dict[str, Any] = {"minMember": min_member}
    if gang.queue:
        spec["queue"] = gang.queue
    if job.spec.scheduling.priority_class_name:
        spec["priorityClassName"] = job.spec.scheduling.priority_class_name
    return {
        "apiVersion": "scheduling.volcano.sh/v1beta1",
        "kind": "PodGroup",
        "metadata": metadata(job, job.metadata.name, job_labels(job)),
        "spec": spec,
    }


def network_policy(job: api.TrainingJob, settings: RenderSettings) -> dict[str, Any] | None:
    """Ingress to the job's pods: anything from the job's own pods (torchrun's c10d store and the master port
    accept unauthenticated, unpickled data; NCCL/gloo use ephemeral ports between the pods), the metrics ports
    from the operator's namespace and the monitoring namespaces; nothing else."""
    if not settings.network_policy:
        return None
    metrics_ports = [{"protocol": "TCP", "port": p["containerPort"]} for p in _ports(job)
                     if p["name"].startswith("metrics")]
    scrapers: list[dict[str, Any]] = []
    if settings.operator_namespace:
        scrapers.append({"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": settings.operator_namespace}}})
    if settings.monitoring_namespace_selector:
        scrapers.append({"namespaceSelector": {"matchLabels": dict(settings.monitoring_namespace_selector)}})
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": {"matchLabels": selector(job)}}]}]
    if scrapers:
        ingress.append({"from": scrapers, "ports": metrics_ports})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(job, launch.network_policy_name(job.metadata.name), job_labels(job)),
        "spec": {"podSelector": {"matchLabels": selector(job)}, "policyTypes": ["Ingress"], "ingress": ingress},
    }


def isolation_policy(namespace: str, settings: RenderSettings) -> dict[str, Any] | None:
    """The namespace's deny-all-ingress policy over every TrainingJob pod (any pod with the job-name label).
    Policies add up: a job's own :func:`network_policy` opens what its pods need, this one closes everything
    else, also before that policy exists. So a pod may be created before its job's policy without ever being
    reachable by anyone else. No owner: every job of the namespace relies on it, and it outlives them."""
    if not settings.network_policy:
        return None
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": launch.ISOLATION_POLICY_NAME, "namespace": namespace,
                     "labels": base_labels("trainer-isolation", launch.ISOLATION_POLICY_NAME)},
        "spec": {"podSelector": {"matchExpressions": [{"key": launch.LABEL_JOB, "operator": "Exists"}]},
                 "policyTypes": ["Ingress"]},
    }


def render_trainingjob(job: api.TrainingJob, settings: RenderSettings, plan: JobPlan = JobPlan()
                       ) -> list[dict[str, Any]]:
    """The job's children that ``plan`` asks for, in apply order; of its workers' kinds only its workload."""
    workload = plan.workload or workload_kind(job)
    kinds = set(plan.children) - (set(WORKLOAD_KINDS) - {workload})
    objs = [
        network_policy(job, settings) if "NetworkPolicy" in kinds else None,
        storage_claim(job) if "PersistentVolumeClaim" in kinds else None,
        pod_group(job) if "PodGroup" in kinds else None,
        statefulset(job, settings, plan) if "StatefulSet" in kinds else None,
        *(worker_pods(job, settings, plan) if "Pod" in kinds else ()),
        headless_service(job) if "Service" in kinds else None,
    ]
    return [o for o in objs if o is not None]
