"""The TrainingJob and InferenceService APIs (group ``aiaas.dev``, version ``v1alpha1``) as pydantic models.

These models are the single source of truth: the CRD YAML in ``crds/`` is generated from them (``aiaas crds``),
``aiaas validate`` checks a file with them, and the renderers take them as input. Every field has a
description, which becomes ``kubectl explain`` text. Cross-field checks live in :data:`TRAININGJOB_RULES` and
:data:`INFERENCESERVICE_RULES`: each rule is written once as CEL (enforced by the API server at
``kubectl apply`` time) and once in Python (for ``aiaas validate`` and the operator), with the same message.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import Field, WithJsonSchema, model_validator

from aiaas.contract.base import Model
from aiaas.contract.config import (
    CheckpointPolicy,
    DatasetKind,
    DatasetSpec,
    Hyperparameters,
    ModelSpec,
    Precision,
    Strategy,
)

GROUP = "aiaas.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
GPU_RESOURCE = "nvidia.com/gpu"
MAX_JOB_NAME_LENGTH = 52  # StatefulSet pods get "<name>-<ordinal>" and a "<name>-<hash>" revision label (63 max)
DNS_1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

# A Kubernetes quantity: an integer or a string such as "500m", "2Gi".
Quantity = Annotated[
    int | str,
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
        }
    ),
]
# A Kubernetes object we pass through unchanged (affinity, valueFrom, ...): the API server keeps its fields.
KubeObject = Annotated[
    dict[str, Any], WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True})
]


# ----------------------------------------------------------------------------------------------- conditions
class ConditionType(str, Enum):
    """TrainingJob condition types, as in Kubeflow's PyTorchJob (plus Suspended, as in Trainer v2)."""

    created = "Created"
    running = "Running"
    restarting = "Restarting"
    succeeded = "Succeeded"
    failed = "Failed"
    suspended = "Suspended"


class Phase(str, Enum):
    pending = "Pending"
    created = "Created"
    running = "Running"
    restarting = "Restarting"
    succeeded = "Succeeded"
    failed = "Failed"
    suspended = "Suspended"


class ServiceConditionType(str, Enum):
    """InferenceService condition types, as in KServe."""

    ready = "Ready"
    predictor_ready = "PredictorReady"
    model_ready = "ModelReady"
    canary_ready = "CanaryReady"  # only with spec.canary


class Condition(Model):
    """A status condition, shaped like metav1.Condition."""

    type: str = Field(description="Condition type, e.g. Running, Succeeded, Failed.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field("", description="One-word CamelCase reason for the last transition.")
    message: str = Field("", description="What happened, in words a human can act on.")
    last_transition_time: str | None = Field(None, description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="The .metadata.generation this was based on.")


class ObjectMeta(Model):
    """The part of metadata the operator reads; other metadata fields are kept as they are."""

    model_config = Model.model_config | {"extra": "allow"}

    name: str = Field(description="Name of the resource.")
    namespace: str | None = Field(None, description="Namespace of the resource.")
    uid: str | None = Field(None, description="UID assigned by the API server.")
    generation: int | None = Field(None, description="Generation assigned by the API server.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations.")


# ------------------------------------------------------------------------------------------ shared pieces
class EnvVar(Model):
    """An environment variable, as in a Pod's container."""

    name: str = Field(description="Variable name.", min_length=1)
    value: str | None = Field(None, description="Literal value.")
    value_from: KubeObject | None = Field(None, description="Source of the value (secretKeyRef, fieldRef, ...).")


class Resources(Model):
    """Per-pod compute resources, as in a container's resources. GPUs: ``nvidia.com/gpu``."""

    requests: dict[str, Quantity] = Field(default_factory=dict, description="Minimum resources per pod.")
    limits: dict[str, Quantity] = Field(
        default_factory=dict, description="Maximum resources per pod; GPUs must be set here (or in requests)."
    )

    def gpus(self) -> int:
        """GPUs per pod (extended resources are set as limits; requests default to them)."""
        return int(str(self.limits.get(GPU_RESOURCE, 0)))


class Toleration(Model):
    """A toleration, as in a Pod spec."""

    key: str | None = Field(None, description="Taint key.")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(None, description="Effect.")
    toleration_seconds: int | None = Field(None, description="How long a NoExecute taint is tolerated.")


class GangProvider(str, Enum):
    volcano = "volcano"
    kueue = "kueue"


class Gang(Model):
    """All-or-nothing scheduling, so a job never holds half its GPUs while waiting for the rest."""

    provider: GangProvider = Field(
        description="volcano: create a Volcano PodGroup and use the volcano scheduler; "
        "kueue: label the workload with the Kueue queue (Kueue admits it by unsuspending)."
    )
    queue: str | None = Field(None, description="Volcano queue or Kueue LocalQueue name.")
    min_available: int | None = Field(
        None, ge=1, description="Pods that must be schedulable together (default: elastic.minNodes or nodes)."
    )


class Scheduling(Model):
    """Where the pods may run."""

    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods require.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints the pods tolerate.")
    affinity: KubeObject | None = Field(None, description="Pod affinity, as in a Pod spec.")
    priority_class_name: str | None = Field(None, description="PriorityClass of the pods.")
    scheduler_name: str | None = Field(None, description="Scheduler to use (default: the cluster's).")
    gang: Gang | None = Field(None, description="Gang scheduling through Volcano or Kueue.")


# ------------------------------------------------------------------------------------------- TrainingJob
class TrainerSpec(Model):
    """What runs in each pod: the built-in trainer (model, dataset, hyper-parameters) or your own command."""

    image: str | None = Field(
        None, description="Container image; default: the operator's trainer image (set in the Helm chart)."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Image pull policy."
    )
    model: ModelSpec = Field(default_factory=ModelSpec, description="The network the built-in trainer trains.")
    dataset: DatasetSpec = Field(default_factory=DatasetSpec, description="The data the built-in trainer reads.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="Optimisation.")
    precision: Precision = Field(Precision.auto, description="auto: bf16 autocast where supported, else fp32.")
    command: list[str] | None = Field(
        None,
        description="Run your own command instead of the built-in trainer (e.g. [torchrun, train.py]). "
        "It gets the same MASTER_ADDR/WORLD_SIZE/RANK/PET_* environment as a Kubeflow PyTorchJob.",
    )
    args: list[str] = Field(default_factory=list, description="Extra arguments for the command.")
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables.")
    volumes: list[KubeObject] = Field(
        default_factory=list, description="Extra pod volumes (e.g. a PersistentVolumeClaim with your data)."
    )
    volume_mounts: list[KubeObject] = Field(
        default_factory=list, description="Where the extra volumes are mounted in the trainer container."
    )


class ParallelismSpec(Model):
    """How processes split the work. data x model must equal nodes x nprocPerNode."""

    data: int | None = Field(
        None, ge=1, le=4096, description="Data-parallel degree; default: (nodes x nprocPerNode) / model."
    )
    model: int = Field(1, ge=1, le=64, description="Model-parallel (pipeline) degree: stages across ranks.")
    strategy: Strategy = Field(Strategy.ddp, description="ddp (replicated weights) or fsdp (fully sharded).")
    microbatches: int = Field(4, ge=1, le=1024, description="Micro-batches per step when model > 1.")


class Topology(Model):
    """How many pods, how many processes in each, and what each pod gets."""

    nodes: int = Field(1, ge=1, le=1024, description="Number of pods (torchrun nodes).")
    nproc_per_node: int = Field(
        1, ge=1, le=64, description="Processes per pod; on GPU jobs at most the GPUs per pod."
    )
    resources: Resources = Field(default_factory=Resources, description="Resources of each pod.")
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec, description="Data/model split.")
    shm_size: Quantity = Field("1Gi", description="Size of the memory-backed /dev/shm of each pod.")

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def data_degree(self) -> int:
        return self.parallelism.data or max(1, self.world_size // self.parallelism.model)


class ElasticPolicy(str, Enum):
    fixed = "Fixed"
    auto = "Auto"


class Elastic(Model):
    """Elastic training: the job keeps running while the pod count stays within [minNodes, maxNodes]."""

    min_nodes: int = Field(ge=1, le=1024, description="Fewest pods the job trains with.")
    max_nodes: int = Field(ge=1, le=1024, description="Most pods the job trains with.")
    max_restarts: int = Field(
        3, ge=0, le=1000, description="Times torchrun re-forms the group on membership changes."
    )
    policy: ElasticPolicy = Field(
        ElasticPolicy.fixed,
        description="Fixed (default): the job asks for spec.topology.nodes pods and keeps training while at least "
        "minNodes of them are ready, as Kubeflow's PyTorchJob elasticPolicy. Auto: the operator sizes the job by "
        "the cluster's capacity: it starts at spec.topology.nodes, adds one pod at a time up to maxNodes while "
        "each new pod gets scheduled, and shrinks to the pods that fit (never below minNodes) when a pod stays "
        "unschedulable for scaleDownGraceSeconds, e.g. after its node was cordoned and drained. A shrink that "
        "removes a running pod restarts the gang from the last checkpoint; status.elastic and Resized Events "
        "say why.",
    )
    scale_down_grace_seconds: int = Field(
        60, ge=0, le=86400,
        description="Auto: how long a pod may stay unschedulable (PodScheduled=False) before the job shrinks to "
        "the pods that fit.",
    )
    scale_up_retry_seconds: int = Field(
        300, ge=0, le=86400,
        description="Auto: after a shrink, wait this long before trying to grow again (a pod added to grow "
        "that stays unschedulable shrinks the job back).",
    )

    @property
    def auto(self) -> bool:
        return self.policy == ElasticPolicy.auto


class MemoryAutoscaling(Model):
    """Raise the pods' memory after an OOM kill, up to a ceiling."""

    factor: float = Field(
        2.0, gt=1, le=16,
        description="After a pod was OOMKilled, multiply the memory request and limit of every pod by this and "
        "restart the gang from the last checkpoint.",
    )
    max: Quantity = Field(
        description="The most memory (limit) per pod the operator may set, e.g. 16Gi. An OOM kill at this limit "
        "fails the job."
    )


class Autoscaling(Model):
    """Resources the operator adjusts by itself."""

    memory: MemoryAutoscaling | None = Field(
        None,
        description="Raise memory after an OOM kill. Without it, an OOMKilled pod fails the job with a message "
        "naming this field (retrying at the same size would be killed again).",
    )


class CleanPodPolicy(str, Enum):
    all = "All"
    running = "Running"
    none = "None"


class RunPolicy(Model):
    """How failures, time limits and clean-up are handled (as in Kubeflow's runPolicy)."""

    backoff_limit: int = Field(
        3, ge=0, le=1000, description="Restarts of the whole gang from the last checkpoint before the job fails."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Fail the job (reason DeadlineExceeded) after this many seconds of running."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the job this many seconds after it succeeded or failed."
    )
    clean_pod_policy: CleanPodPolicy = Field(
        CleanPodPolicy.running,
        description="What happens to the pods when the job finishes. Running (default): the StatefulSet is "
        "scaled to 0 (a one-node job's pod is deleted) so nothing holds GPUs; it and the headless Service stay, "
        "and each pod's outcome stays in status and Events. All: the Service is deleted too. None: the pods stay for `kubectl logs --previous` "
        "and exec until the job is deleted or its TTL passes (they keep their GPUs).",
    )


class Storage(Model):
    """The volume for checkpoints and the exported model, mounted at /var/run/aiaas in every pod."""

    claim_name: str | None = Field(None, description="An existing PersistentVolumeClaim to use.")
    size: Quantity | None = Field(None, description="Create a PersistentVolumeClaim of this size.")
    storage_class_name: str | None = Field(None, description="StorageClass of the created claim.")
    access_modes: list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]] = Field(
        default_factory=list,
        description="Access modes of the created claim; default ReadWriteMany for several nodes.",
    )


class TrainingJobSpec(Model):
    """Desired state of a TrainingJob."""

    trainer: TrainerSpec = Field(default_factory=TrainerSpec, description="What each process runs.")
    topology: Topology = Field(default_factory=Topology, description="Pods, processes and parallelism.")
    elastic: Elastic | None = Field(None, description="Elastic bounds; omit for a fixed-size job.")
    autoscaling: Autoscaling = Field(
        default_factory=Autoscaling, description="What the operator adjusts by itself (memory after an OOM kill)."
    )
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Failures, deadlines, clean-up.")
    suspend: bool = Field(
        False, description="Scale the job to zero, keeping its checkpoints; set false to resume (Kueue does this)."
    )
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Node selection and gang scheduling.")
    checkpoint: CheckpointPolicy = Field(default_factory=CheckpointPolicy, description="Checkpointing.")
    storage: Storage = Field(
        default_factory=Storage,
        description="Where checkpoints and the model artifact live. Without a claim, an emptyDir is used: "
        "checkpoints survive container restarts but not pod deletion, and the model cannot be served.",
    )


class Progress(Model):
    """How far training is, from rank 0's metrics."""

    epoch: int | None = Field(None, description="Current epoch (0-based).")
    step: int | None = Field(None, description="Optimizer steps done.")
    total_steps: int | None = Field(None, description="Optimizer steps planned.")
    loss: float | None = Field(None, description="Latest training loss.")
    metric: float | None = Field(None, description="Latest evaluation accuracy.")
    samples_per_second: float | None = Field(None, description="Training throughput over all ranks.")
    summary: str | None = Field(None, description="Human summary, e.g. '120/500 (24%)'.")
    updated: str | None = Field(None, description="When this was read (RFC 3339).")


class Artifact(Model):
    """Where the trained model is."""

    uri: str = Field(description="Location, e.g. pvc://claim/job/artifacts.")
    version: str | None = Field(None, description="Version of the model (the step it was exported at).")


class ElasticStatus(Model):
    """How the operator sized an elastic job with policy Auto."""

    current_nodes: int | None = Field(None, description="Pods of the job that are scheduled now.")
    desired_nodes: int | None = Field(None, description="Pods the operator asks for (the StatefulSet's replicas).")
    reason: str | None = Field(None, description="ScalingUp (a new pod waits to be scheduled), ScaledUp or "
                               "ScaledDown (the last resize).")
    message: str | None = Field(None, description="Why, e.g. 'grew 2→3: pod job-2 scheduled'.")
    last_resize_time: str | None = Field(None, description="When the job last grew or shrank (RFC 3339).")


class MemoryStatus(Model):
    """The memory the operator gave each pod after OOM kills (instead of spec.topology.resources)."""

    request: str | None = Field(None, description="Memory request per pod.")
    limit: str | None = Field(None, description="Memory limit per pod.")
    message: str | None = Field(None, description="Why, e.g. 'raised 256Mi→512Mi: pod job-0 was OOMKilled'.")
    last_resize_time: str | None = Field(None, description="When the memory was last raised (RFC 3339).")


class TrainingJobStatus(Model):
    """Observed state of a TrainingJob, written by the operator."""

    phase: Phase | None = Field(None, description="Pending, Created, Running, Restarting, Succeeded, Failed, Suspended.")
    reason: str | None = Field(None, description="Reason of the current phase.")
    message: str | None = Field(None, description="What is happening, in words.")
    conditions: list[Condition] = Field(default_factory=list, description="Conditions, newest state of each type.")
    replicas: int | None = Field(None, description="Pods asked for.")
    ready_replicas: int | None = Field(None, description="Pods ready.")
    active_replicas: int | None = Field(None, description="Pods running.")
    succeeded_replicas: int | None = Field(None, description="Pods whose trainer finished successfully.")
    failed_replicas: int | None = Field(None, description="Pods whose trainer failed.")
    restart_count: int | None = Field(None, description="Gang restarts so far (the restart generation).")
    resize_count: int | None = Field(
        None, description="Gang restarts the operator made to resize the job (elastic Auto shrink, memory raised "
        "after an OOM kill); restartCount includes them, backoffLimit does not count them."
    )
    elastic: ElasticStatus | None = Field(None, description="Elastic sizing (spec.elastic.policy Auto).")
    memory: MemoryStatus | None = Field(None, description="Memory raised after OOM kills (spec.autoscaling.memory).")
    start_time: str | None = Field(None, description="When the job started running.")
    completion_time: str | None = Field(None, description="When the job finished.")
    last_reconcile_time: str | None = Field(None, description="When the operator last looked at the job.")
    progress: Progress | None = Field(None, description="Training progress.")
    artifact: Artifact | None = Field(None, description="The exported model, once the job succeeded.")
    observed_generation: int | None = Field(None, description="The .metadata.generation last acted on.")


class TrainingJob(Model):
    """A distributed PyTorch training run: a torchrun StatefulSet (one node: a pod) with a headless Service."""

    api_version: Literal["aiaas.dev/v1alpha1"] = Field("aiaas.dev/v1alpha1", description="aiaas.dev/v1alpha1")
    kind: Literal["TrainingJob"] = Field("TrainingJob", description="TrainingJob")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: TrainingJobSpec = Field(default_factory=TrainingJobSpec, description="Desired state.")
    status: TrainingJobStatus | None = Field(None, description="Observed state.")

    @model_validator(mode="after")
    def _rules(self) -> TrainingJob:
        check_rules(TRAININGJOB_RULES, self)
        return self


# --------------------------------------------------------------------------------------- InferenceService
class ModelSource(Model):
    """Which model to serve: a finished TrainingJob's artifact, or a storage URI."""

    name: str | None = Field(
        None, max_length=253, description="Model name in the inference URL; default: the service name."
    )
    training_job: str | None = Field(
        None, max_length=253, description="Name of a TrainingJob in the same namespace; served once it has Succeeded."
    )
    storage_uri: str | None = Field(
        None, max_length=1024,
        description="Artifact location: pvc://<claim>/<path> (mounted read-only at /mnt/models).",
    )


class Protocol(str, Enum):
    v2 = "v2"
    v1 = "v1"


class ExplainMethod(str, Enum):
    integrated_gradients = "integratedGradients"


MAX_EXPLAIN_STEPS = 512  # the model server's bound on --explain-steps


class ExplainerSpec(Model):
    """Explanations: POST /v2/models/<name>/explain (and /v1/models/<name>:explain) answer attributions."""

    method: ExplainMethod = Field(
        ExplainMethod.integrated_gradients,
        description="integratedGradients: Integrated Gradients (Captum) over the input, or over the embedding of "
        "token models. Passed to the server as --explain-method integrated-gradients.",
    )
    steps: int = Field(
        32, ge=1, le=MAX_EXPLAIN_STEPS,
        description="Integration steps of one explanation, also the most a request may ask for "
        "(--explain-steps). More steps: more exact attributions, proportionally more compute.",
    )


class SecretKeySelector(Model):
    """A key of a Secret in the InferenceService's namespace."""

    name: str = Field(
        max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", description="Name of the Secret."
    )
    key: str = Field(
        max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key in the Secret that holds the token."
    )


class AuthSpec(Model):
    """Bearer-token authentication of the model server."""

    token_secret_ref: SecretKeySelector = Field(
        description="The Secret key holding the token. The operator never reads it: it names it in the pod spec, "
        "the kubelet mounts it read-only and the server reads it at start (--auth-token-file). Every endpoint but "
        "health, readiness and /metrics then wants 'Authorization: Bearer <token>' (gRPC: 'authorization' "
        "metadata). The token is read once: restart the pods (kubectl rollout restart) after changing it."
    )


class CanarySpec(Model):
    """A second model version that takes a share of the traffic before it replaces the current one."""

    model: ModelSource = Field(
        description="The canary's model, in the same form as spec.model (served under spec.model's name). "
        "Promote it by moving it to spec.model and removing spec.canary; roll back by removing spec.canary."
    )
    traffic_percent: int = Field(
        ge=0, le=100,
        description="Share of the replicas (and so of the requests the Service spreads over them) that serve "
        "the canary: canary = round(total x percent / 100), at least 1 when percent > 0; the stable version "
        "keeps the rest, at least 1 when percent < 100. total is spec.replicas (with autoscaling, minReplicas "
        "and maxReplicas are split the same way, one HorizontalPodAutoscaler per version).",
    )


class NetworkPeer(Model):
    """Who may connect: pods matching podSelector in namespaces matching namespaceSelector (both: the
    intersection; podSelector alone: this namespace), as a NetworkPolicy peer."""

    namespace_selector: KubeObject | None = Field(
        None, description="Label selector of namespaces ({} selects all), as in a NetworkPolicy peer."
    )
    pod_selector: KubeObject | None = Field(
        None, description="Label selector of pods ({} selects all), as in a NetworkPolicy peer."
    )


class NetworkPolicySpec(Model):
    """A NetworkPolicy that admits only the listed clients to the server's HTTP and gRPC ports."""

    allow_from: list[NetworkPeer] = Field(
        min_length=1, max_length=32,
        description="Clients allowed to reach the model server (e.g. [{podSelector: {}}] for this namespace, "
        "[{namespaceSelector: {matchLabels: {team: a}}}] for a team's namespaces). Everything else is refused "
        "once your network plugin enforces NetworkPolicies (kubelet probes are not affected).",
    )


class InferenceServiceSpec(Model):
    """Desired state of an InferenceService."""

    model: ModelSource = Field(description="The model to serve.")
    image: str | None = Field(None, description="Server image; default: the operator's server image.")
    protocol: Protocol = Field(Protocol.v2, description="v2: Open Inference Protocol (v1 :predict is also served).")
    replicas: int = Field(1, ge=0, le=1000, description="Replicas when not autoscaling.")
    min_replicas: int | None = Field(None, ge=1, le=1000, description="Autoscaling lower bound.")
    max_replicas: int | None = Field(None, ge=1, le=1000, description="Autoscaling upper bound.")
    scale_target: int = Field(80, ge=1, le=100, description="Target average CPU utilisation (%) when autoscaling.")
    resources: Resources = Field(default_factory=Resources, description="Resources of each replica.")
    max_batch_size: int = Field(32, ge=1, le=4096, description="Largest batch the server forms from requests.")
    max_batch_delay_ms: float = Field(2.0, ge=0, le=1000, description="Longest a request waits for a batch.")
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Where replicas may run.")
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables.")
    explainer: ExplainerSpec | None = Field(
        None, description="Turns on explanations (POST .../explain); default: off."
    )
    auth: AuthSpec | None = Field(None, description="Bearer-token authentication; default: open to anyone who can "
                                  "reach the Service.")
    canary: CanarySpec | None = Field(
        None, description="A canary version beside the stable one (spec.model), behind the same Service."
    )
    network_policy: NetworkPolicySpec | None = Field(
        None, description="Admit only the listed clients (a NetworkPolicy); default: none, every pod may connect."
    )

    @property
    def total_replicas(self) -> int:
        """The replicas asked for when not autoscaling (the HPA's lower bound when autoscaling)."""
        return self.min_replicas if self.min_replicas is not None else self.replicas


class ServedModel(Model):
    """The model being served."""

    source: str | None = Field(None, description="trainingjob/<name> or the storage URI.")
    uri: str | None = Field(None, description="Resolved artifact location.")
    version: str | None = Field(None, description="Model version.")


class TrackStatus(Model):
    """One version (stable or canary) of the service: its model and its replicas."""

    model: ServedModel | None = Field(None, description="The model this version serves.")
    traffic_percent: int | None = Field(None, description="Share of the replicas it was given (%).")
    replicas: int | None = Field(None, description="Replicas asked for.")
    ready_replicas: int | None = Field(None, description="Replicas ready.")


class InferenceServiceStatus(Model):
    """Observed state of an InferenceService."""

    phase: str | None = Field(None, description="WaitingForModel, Deploying, Ready or Failed.")
    url: str | None = Field(None, description="In-cluster URL of the service (REST).")
    grpc_address: str | None = Field(None, description="In-cluster host:port of the gRPC endpoint.")
    reason: str | None = Field(None, description="Reason of the current phase.")
    message: str | None = Field(None, description="What is happening, in words.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready, PredictorReady, ModelReady (and CanaryReady with a canary)."
    )
    replicas: int | None = Field(None, description="Replicas asked for (both versions).")
    ready_replicas: int | None = Field(None, description="Replicas ready (both versions).")
    model: ServedModel | None = Field(None, description="The model being served (the stable version).")
    stable: TrackStatus | None = Field(None, description="The stable version (spec.model), with a canary.")
    canary: TrackStatus | None = Field(None, description="The canary version (spec.canary.model).")
    observed_generation: int | None = Field(None, description="The .metadata.generation last acted on.")


class InferenceService(Model):
    """A model server answering the Open Inference Protocol: a Deployment, a Service and maybe an HPA."""

    api_version: Literal["aiaas.dev/v1alpha1"] = Field("aiaas.dev/v1alpha1", description="aiaas.dev/v1alpha1")
    kind: Literal["InferenceService"] = Field("InferenceService", description="InferenceService")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: InferenceServiceSpec = Field(description="Desired state.")
    status: InferenceServiceStatus | None = Field(None, description="Observed state.")

    @model_validator(mode="after")
    def _rules(self) -> InferenceService:
        check_rules(INFERENCESERVICE_RULES, self)
        return self

    @property
    def model_name(self) -> str:
        return self.spec.model.name or self.metadata.name


# ------------------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    """A cross-field rule, written as CEL for the API server and as Python for ``aiaas validate``.

    ``path`` is the schema node the CEL rule sits on (relative to the resource root), ``field`` the field the
    message is about. ``check`` gets the parsed resource and returns an error message or None.
    """

    path: str  # "" (root) or "spec"
    field: str
    cel: str
    message: str
    check: Callable[[Any], str | None]


def _custom_command(job: TrainingJob) -> bool:
    """Does the job run its own command? Then rules about the built-in trainer (its data/model split, batch,
    dataset) do not apply: the built-in trainer does not run."""
    return bool(job.spec.trainer.command)


def _topology_error(job: TrainingJob) -> str | None:
    if _custom_command(job):
        return None
    t = job.spec.topology
    p = t.parallelism
    if t.world_size % p.model:
        return (
            f"spec.topology.parallelism.model: {p.model} pipeline stages do not divide the world size "
            f"{t.world_size} (nodes {t.nodes} x nprocPerNode {t.nproc_per_node}); choose a model degree that "
            "divides it"
        )
    if p.data is not None and p.data * p.model != t.world_size:
        return (
            f"spec.topology.parallelism: data x model = {p.data} x {p.model} = {p.data * p.model} must equal "
            f"nodes x nprocPerNode = {t.nodes} x {t.nproc_per_node} = {t.world_size}; change data, or omit "
            "it to use (nodes x nprocPerNode) / model"
        )
    return None


def _gpu_error(job: TrainingJob) -> str | None:
    t = job.spec.topology
    gpus = t.resources.gpus()
    if gpus and t.nproc_per_node > gpus:
        return (
            f"spec.topology.nprocPerNode: {t.nproc_per_node} processes per pod but only {gpus} {GPU_RESOURCE} "
            "per pod; each process needs its own GPU: lower nprocPerNode or raise the GPU limit"
        )
    return None


def _batch_error(job: TrainingJob) -> str | None:
    if _custom_command(job) or _topology_error(job):
        return None  # one message per mistake: fix the topology first
    data = job.spec.topology.data_degree
    batch = job.spec.trainer.hyperparameters.batch_size
    if batch % data:
        return (
            f"spec.trainer.hyperparameters.batchSize: the global batch {batch} does not split evenly across "
            f"{data} data-parallel ranks; use a multiple of {data}"
        )
    return None


def _elastic_error(job: TrainingJob) -> str | None:
    e, n = job.spec.elastic, job.spec.topology.nodes
    if e is not None and not (e.min_nodes <= n <= e.max_nodes):
        return (
            f"spec.elastic: nodes ({n}) must lie within minNodes..maxNodes ({e.min_nodes}..{e.max_nodes}); "
            "adjust the bounds or spec.topology.nodes"
        )
    return None


def _memory_error(job: TrainingJob) -> str | None:
    r = job.spec.topology.resources
    if job.spec.autoscaling.memory is not None and "memory" not in r.limits and "memory" not in r.requests:
        return ("spec.autoscaling.memory: the operator raises a memory it knows; set "
                "spec.topology.resources.limits.memory (or requests.memory) to start from")
    return None


def _dataset_error(job: TrainingJob) -> str | None:
    if _custom_command(job):
        return None
    d = job.spec.trainer.dataset
    if d.kind in (DatasetKind.mnist.value, DatasetKind.text.value) and not d.path:
        return f"spec.trainer.dataset.path: the {d.kind} dataset reads files; set path to a file or directory"
    return None


def _name_error(obj: TrainingJob | InferenceService) -> str | None:
    name = obj.metadata.name
    if len(name) > MAX_JOB_NAME_LENGTH or not re.match(DNS_1035, name):
        return (
            f"metadata.name: {name!r} must be at most {MAX_JOB_NAME_LENGTH} characters of lower-case letters, "
            "digits and '-', starting with a letter (it names the Service and the pods)"
        )
    return None


def _storage_error(job: TrainingJob) -> str | None:
    s = job.spec.storage
    if s.claim_name and s.size is not None:
        return "spec.storage: set claimName (use an existing claim) or size (create one), not both"
    return None


_PVC_URI = r"^pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/.*)?$"


def _model_error(m: ModelSource | None, where: str) -> str | None:
    if m is None:
        return None
    if bool(m.training_job) == bool(m.storage_uri):
        return f"{where}: set exactly one of trainingJob (a TrainingJob's name) or storageUri (pvc://claim/path)"
    if m.storage_uri and not re.match(_PVC_URI, m.storage_uri):
        return f"{where}.storageUri: {m.storage_uri!r} is not of the form pvc://<claim>/<path>"
    return None


def _source_error(svc: InferenceService) -> str | None:
    return _model_error(svc.spec.model, "spec.model")


def _canary_source_error(svc: InferenceService) -> str | None:
    return _model_error(svc.spec.canary.model if svc.spec.canary else None, "spec.canary.model")


def _canary_name_error(svc: InferenceService) -> str | None:
    c = svc.spec.canary
    if c is not None and c.model.name is not None and c.model.name != svc.model_name:
        return (f"spec.canary.model.name: the canary answers under the service's model name {svc.model_name!r} "
                f"(clients keep their URLs), not {c.model.name!r}; leave name out")
    return None


def _peer_error(svc: InferenceService) -> str | None:
    n = svc.spec.network_policy
    if n is not None and any(p.namespace_selector is None and p.pod_selector is None for p in n.allow_from):
        return ("spec.networkPolicy.allowFrom: every entry needs namespaceSelector, podSelector or both "
                "({} selects all)")
    return None


def _replicas_error(svc: InferenceService) -> str | None:
    lo, hi = svc.spec.min_replicas, svc.spec.max_replicas
    if lo is not None and hi is not None and lo > hi:
        return f"spec.minReplicas ({lo}) must not exceed spec.maxReplicas ({hi})"
    return None


_WORLD = "self.topology.nodes * self.topology.nprocPerNode"
_DATA = f"(has(self.topology.parallelism.data) ? self.topology.parallelism.data : ({_WORLD}) / self.topology.parallelism.model)"
_GPUS = "int(string(self.topology.resources.limits['nvidia.com/gpu']))"
# CEL: rules about the built-in trainer hold only when it runs (no spec.trainer.command).
_BUILTIN = "(has(self.trainer.command) && size(self.trainer.command) > 0) || "
_NAME_RULE = f"size(self.metadata.name) <= {MAX_JOB_NAME_LENGTH} && self.metadata.name.matches('{DNS_1035}')"
_NAME_MSG = (
    f"metadata.name must be at most {MAX_JOB_NAME_LENGTH} characters of lower-case letters, digits and '-', "
    "starting with a letter (it names the Service and the pods)"
)

# The API server's messages are static: CEL's cost estimator rejects messageExpressions that build strings
# from numbers. `aiaas validate` (the Python side) says the same with the actual values filled in.
TRAININGJOB_RULES: tuple[Rule, ...] = (
    Rule("", "metadata.name", _NAME_RULE, _NAME_MSG, _name_error),
    Rule(
        "spec",
        "spec.topology.parallelism.model",
        f"{_BUILTIN}({_WORLD}) % self.topology.parallelism.model == 0",
        "spec.topology.parallelism.model: the pipeline stages must divide the world size (nodes x nprocPerNode); "
        "choose a model degree that divides it",
        _topology_error,
    ),
    Rule(
        "spec",
        "spec.topology.parallelism",
        f"{_BUILTIN}!has(self.topology.parallelism.data) || "
        f"self.topology.parallelism.data * self.topology.parallelism.model == {_WORLD}",
        "spec.topology.parallelism: data x model must equal nodes x nprocPerNode; change data, or omit it to use "
        "(nodes x nprocPerNode) / model",
        _topology_error,
    ),
    Rule(
        "spec",
        "spec.topology.nprocPerNode",
        "!has(self.topology.resources) || !has(self.topology.resources.limits) || "
        f"!('nvidia.com/gpu' in self.topology.resources.limits) || {_GPUS} == 0 || "
        f"self.topology.nprocPerNode <= {_GPUS}",
        "spec.topology.nprocPerNode: more processes per pod than nvidia.com/gpu per pod; each process needs its own "
        "GPU: lower nprocPerNode or raise the GPU limit",
        _gpu_error,
    ),
    Rule(
        "spec",
        "spec.trainer.hyperparameters.batchSize",
        f"{_BUILTIN}({_WORLD}) % self.topology.parallelism.model != 0 || (has(self.topology.parallelism.data) && "
        f"self.topology.parallelism.data * self.topology.parallelism.model != {_WORLD}) || {_DATA} == 0 || "
        f"self.trainer.hyperparameters.batchSize % {_DATA} == 0",
        "spec.trainer.hyperparameters.batchSize: the global batch must split evenly across the data-parallel "
        "ranks; use a multiple of the data-parallel degree",
        _batch_error,
    ),
    Rule(
        "spec",
        "spec.elastic",
        "!has(self.elastic) || (self.elastic.minNodes <= self.topology.nodes && "
        "self.topology.nodes <= self.elastic.maxNodes)",
        "spec.elastic: spec.topology.nodes must lie within minNodes..maxNodes; adjust the bounds or the node count",
        _elastic_error,
    ),
    Rule(
        "spec",
        "spec.autoscaling.memory",
        "!has(self.autoscaling) || !has(self.autoscaling.memory) || (has(self.topology.resources) && "
        "((has(self.topology.resources.limits) && 'memory' in self.topology.resources.limits) || "
        "(has(self.topology.resources.requests) && 'memory' in self.topology.resources.requests)))",
        "spec.autoscaling.memory: the operator raises a memory it knows; set spec.topology.resources.limits.memory "
        "(or requests.memory) to start from",
        _memory_error,
    ),
    Rule(
        "spec",
        "spec.trainer.dataset.path",
        f"{_BUILTIN}!(self.trainer.dataset.kind in ['mnist', 'text']) || has(self.trainer.dataset.path)",
        "spec.trainer.dataset.path: the mnist and text datasets read files; set path to a file or directory",
        _dataset_error,
    ),
    Rule(
        "spec",
        "spec.storage",
        "!has(self.storage) || !(has(self.storage.claimName) && has(self.storage.size))",
        "spec.storage: set claimName (use an existing claim) or size (create one), not both",
        _storage_error,
    ),
)

INFERENCESERVICE_RULES: tuple[Rule, ...] = (
    Rule("", "metadata.name", _NAME_RULE, _NAME_MSG, _name_error),
    Rule(
        "spec",
        "spec.model",
        "has(self.model.trainingJob) != has(self.model.storageUri)",
        "spec.model: set exactly one of trainingJob (a TrainingJob's name) or storageUri (pvc://claim/path)",
        lambda s: _source_error(s) if bool(s.spec.model.training_job) == bool(s.spec.model.storage_uri) else None,
    ),
    Rule(
        "spec",
        "spec.model.storageUri",
        f"!has(self.model.storageUri) || self.model.storageUri.matches('{_PVC_URI}')",
        "spec.model.storageUri: must be of the form pvc://<claim>/<path>",
        lambda s: _source_error(s) if s.spec.model.storage_uri else None,
    ),
    Rule(
        "spec",
        "spec.minReplicas",
        "!(has(self.minReplicas) && has(self.maxReplicas)) || self.minReplicas <= self.maxReplicas",
        "spec.minReplicas must not exceed spec.maxReplicas",
        _replicas_error,
    ),
    Rule(
        "spec",
        "spec.canary.model",
        "!has(self.canary) || has(self.canary.model.trainingJob) != has(self.canary.model.storageUri)",
        "spec.canary.model: set exactly one of trainingJob (a TrainingJob's name) or storageUri (pvc://claim/path)",
        lambda s: _canary_source_error(s) if s.spec.canary and bool(s.spec.canary.model.training_job) == bool(
            s.spec.canary.model.storage_uri) else None,
    ),
    Rule(
        "spec",
        "spec.canary.model.storageUri",
        "!has(self.canary) || !has(self.canary.model.storageUri) || "
        f"self.canary.model.storageUri.matches('{_PVC_URI}')",
        "spec.canary.model.storageUri: must be of the form pvc://<claim>/<path>",
        lambda s: _canary_source_error(s) if s.spec.canary and s.spec.canary.model.storage_uri else None,
    ),
    Rule(
        "",
        "spec.canary.model.name",
        "!has(self.spec.canary) || !has(self.spec.canary.model.name) || self.spec.canary.model.name == "
        "(has(self.spec.model.name) ? self.spec.model.name : self.metadata.name)",
        "spec.canary.model.name: the canary answers under the service's model name (clients keep their URLs); "
        "leave name out",
        _canary_name_error,
    ),
    Rule(
        "spec",
        "spec.networkPolicy.allowFrom",
        "!has(self.networkPolicy) || self.networkPolicy.allowFrom.all(p, has(p.namespaceSelector) || "
        "has(p.podSelector))",
        "spec.networkPolicy.allowFrom: every entry needs namespaceSelector, podSelector or both ({} selects all)",
        _peer_error,
    ),
)


class RuleViolation(ValueError):
    """Cross-field rules failed; ``errors`` holds one user-facing message per rule."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


def check_rules(rules: tuple[Rule, ...], obj: Any) -> None:
    errors: list[str] = []
    for rule in rules:
        msg = rule.check(obj)
        if msg and msg not in errors:
            errors.append(msg)
    if errors:
        raise RuleViolation(errors)
