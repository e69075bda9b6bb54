"""The torchrun launch contract: written once, used by the renderer, the local runner and the trainer.

Env names follow torchrun (``PET_*``) and Kubeflow's PyTorchJob (``MASTER_ADDR``, ``MASTER_PORT``,
``WORLD_SIZE``, ``RANK``), so scripts written for either run unchanged.
"""

from __future__ import annotations

# Ports inside a training pod.
RDZV_PORT = 29400  # torchrun c10d rendezvous on pod 0
MASTER_PORT = 23456  # MASTER_PORT for scripts that init the process group themselves (Kubeflow's default)
METRICS_PORT = 9090  # Prometheus metrics of local rank 0 (local rank r serves METRICS_PORT + r)

# Ports inside an inference pod.
SERVER_PORT = 8080  # Open Inference Protocol REST
SERVER_GRPC_PORT = 8081  # Open Inference Protocol gRPC (inference.GRPCInferenceService)
SERVER_METRICS_PATH = "/metrics"

# Paths inside a training pod.
CHECKPOINT_DIR = "/var/run/aiaas/checkpoints"
ARTIFACT_DIR = "/var/run/aiaas/artifacts"
DATA_DIR = "/var/run/aiaas/data"
TERMINATION_LOG = "/dev/termination-log"
MODEL_DIR = "/mnt/models"  # where an inference pod finds the artifact (KServe's convention)
AUTH_TOKEN_DIR = "/var/run/secrets/aiaas"  # an inference pod's bearer-token Secret, mounted read-only
AUTH_TOKEN_FILE = f"{AUTH_TOKEN_DIR}/token"  # passed to the server as --auth-token-file

# Container names: the operator reads the trainer's status by name.
TRAINER_CONTAINER = "trainer"
SERVER_CONTAINER = "server"

# Environment variables the trainer reads.
ENV_CONFIG = "AIAAS_TRAINER_CONFIG"  # the TrainerConfig as JSON
ENV_CONFIG_FILE = "AIAAS_TRAINER_CONFIG_FILE"  # or a path to it
ENV_TERMINATION_LOG = "AIAAS_TERMINATION_LOG"  # where to write the outcome (default TERMINATION_LOG)
ENV_JOB_NAME = "AIAAS_JOB_NAME"
ENV_POD_NAME = "POD_NAME"
ENV_NAMESPACE = "POD_NAMESPACE"

# torchrun / PyTorchJob compatible variables the pod carries.
ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"
ENV_WORLD_SIZE = "WORLD_SIZE"  # number of processes in the whole job
ENV_NNODES = "PET_NNODES"
ENV_NPROC_PER_NODE = "PET_NPROC_PER_NODE"
ENV_NODE_RANK = "PET_NODE_RANK"
ENV_RDZV_ENDPOINT = "PET_RDZV_ENDPOINT"
ENV_RDZV_BACKEND = "PET_RDZV_BACKEND"
ENV_RDZV_ID = "PET_RDZV_ID"
ENV_MAX_RESTARTS = "PET_MAX_RESTARTS"
ENV_RANK = "RANK"  # the pod's node rank, as PyTorchJob sets it (torchrun overrides it for its workers)
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"  # set by Kubernetes >= 1.28 on StatefulSet pods, by us on bare ones

# Exit codes: how the operator tells success, a retryable failure and a permanent error apart.
EXIT_SUCCESS = 0
EXIT_RETRYABLE = 1  # anything unexpected: restart the gang from the last checkpoint
EXIT_PERMANENT = 78  # EX_CONFIG: bad config or missing data; restarting cannot help
EXIT_PREEMPTED = 143  # SIGTERM: suspended, preempted or scaled down; resume later

# Labels and annotations on every child object.
GROUP = "aiaas.dev"
LABEL_JOB = "aiaas.dev/job-name"
LABEL_ISVC = "aiaas.dev/inferenceservice"
LABEL_ROLE = "aiaas.dev/role"
LABEL_TRACK = "aiaas.dev/track"  # an inference pod's version: stable or canary (one Deployment each)
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "aiaas-operator"
ANNOTATION_CONFIG_HASH = "aiaas.dev/config-hash"
ANNOTATION_RESTART = "aiaas.dev/restart-count"
HEADLESS_SERVICE_SUFFIX = "workers"  # <job>-workers: the headless Service of a TrainingJob


# Finished work is never run twice. A StatefulSet pod restarts its container under restartPolicy Always, even
# after exit 0, before the operator has seen the exit and scaled the job down: without a guard the trainer (or
# your command) would start again and could overwrite a finished artifact. The renderer wraps every training
# container's command in RUN_ONCE_SCRIPT: after a successful run it keeps the termination message in a marker
# on the pod's /tmp volume (it lives as long as the pod); a restarted container finds the marker, reports the
# same outcome again and exits 0 without running anything. SIGTERM and SIGINT are passed on to the command.
ENV_RUN_ONCE_MARKER = "AIAAS_RUN_ONCE_MARKER"  # the local runner points it at the pod's own directory
RUN_ONCE_MARKER = "/tmp/.aiaas-finished"
RUN_ONCE_NAME = "aiaas-run-once"  # $0 of the wrapper, how it is recognised
RUN_ONCE_SCRIPT = (
    f'marker="${{{ENV_RUN_ONCE_MARKER}:-{RUN_ONCE_MARKER}}}"; '
    f'log="${{{ENV_TERMINATION_LOG}:-{TERMINATION_LOG}}}"; '
    'if [ -f "$marker" ]; then '
    'echo "aiaas: this pod already finished its work; not running it again" >&2; '
    'cat "$marker" > "$log" 2>/dev/null; exit 0; fi; '
    '"$@" & child=$!; '
    "trap 'kill -TERM \"$child\" 2>/dev/null' TERM INT; "
    'wait "$child"; code=$?; '
    'while kill -0 "$child" 2>/dev/null; do wait "$child"; code=$?; done; '
    'if [ "$code" -eq 0 ]; then cat "$log" > "$marker" 2>/dev/null || : > "$marker"; fi; '
    'exit "$code"'
)


RUN_ONCE_COMMAND = ("/bin/sh", "-c", RUN_ONCE_SCRIPT, RUN_ONCE_NAME)  # the container's command; args follow


def unwrap_run_once(argv: list[str]) -> list[str]:
    """The command inside the RUN_ONCE_COMMAND wrapper (argv itself when it is not wrapped)."""
    n = len(RUN_ONCE_COMMAND)
    return argv[n:] if tuple(argv[:n]) == RUN_ONCE_COMMAND else argv


def headless_service_name(job_name: str) -> str:
    """The headless Service that gives a job's pods their DNS names. Never the plain job name: an
    InferenceService's Service takes its plain name (users call ``http://<isvc>.<ns>.svc``), and a TrainingJob
    and an InferenceService may share a name in one namespace."""
    return f"{job_name}-{HEADLESS_SERVICE_SUFFIX}"


def network_policy_name(job_name: str) -> str:
    """A TrainingJob's NetworkPolicy (suffixed, like its headless Service, so no other kind's child collides)."""
    return f"{job_name}-{HEADLESS_SERVICE_SUFFIX}"


# The namespace's NetworkPolicy that isolates every TrainingJob pod in it (no ingress at all) until its job's own
# policy admits what the job needs: shared by the jobs of a namespace, owned by none of them.
ISOLATION_POLICY_NAME = "aiaas-trainer-isolation"


def worker_pod_name(job_name: str, ordinal: int) -> str:
    """A job's worker pod: ``<job>-<ordinal>``, as a StatefulSet names its pods (a bare pod gets the same)."""
    return f"{job_name}-{ordinal}"


def pod_dns_name(job_name: str, ordinal: int, namespace: str | None) -> str:
    """The stable DNS name of a job's worker pod behind its headless Service (without a namespace, the
    short name that resolves inside the pod's own namespace)."""
    short = f"{worker_pod_name(job_name, ordinal)}.{headless_service_name(job_name)}"
    return f"{short}.{namespace}.svc" if namespace else short


def node_rank_from_pod_name(pod_name: str) -> int:
    """The node rank is the pod's ordinal: the number after the last dash of the pod name."""
    tail = pod_name.rsplit("-", 1)[-1]
    if not tail.isdigit():
        raise ValueError(f"pod name {pod_name!r} does not end in a StatefulSet ordinal")
    return int(tail)
