"""Memory that adjusts after an OOM kill, with a real memory limit (issue 15 item 4): on the real node (kubelet,
containerd, runc, cgroup v2), a TrainingJob's container allocates more than its 256Mi limit, the kernel's OOM
killer ends it (the kubelet reports ``OOMKilled``), the operator (installed with Helm from the built image)
raises the pods' memory by spec.autoscaling.memory.factor and restarts the gang, and at 512Mi the same command
fits and the job succeeds.

The job runs its own command (spec.trainer.command, as examples/09-custom-command.yaml) in the operator image,
which has Python and a shell and no torch: only that image has to be built for this tree
(``AIAAS_IMAGES=operator hack/images.sh build``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_util import wait_for
from node_util import build_and_load, get, install_operator, restricted_namespace

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900), pytest.mark.usefixtures("e2e_cluster")]

# Allocates NEED_MIB and touches every page (bytes repetition writes them), so the cgroup really is charged.
ALLOCATE = """
import os
try:
    limit = open("/sys/fs/cgroup/memory.max").read().strip()
except OSError as err:
    limit = f"unreadable ({err})"
need = int(os.environ["NEED_MIB"])
print(f"memory.max {limit}; allocating {need} MiB", flush=True)
block = b"x" * (need << 20)
print(f"allocated {len(block) >> 20} MiB", flush=True)
"""


@pytest.fixture(scope="module")
def operator_image(real_node) -> str:
    """This tree's operator image (the job runs in it too: no trainer image needed), loaded into the real node."""
    return build_and_load("operator")["aiaas-operator"]


@pytest.fixture(scope="module")
def oom_ns(real_node, kubectl) -> Iterator[str]:
    yield from restricted_namespace(kubectl, "aiaas-oom")


@pytest.fixture(scope="module")
def operator_release(operator_image, oom_ns, helm, tmp_path_factory) -> Iterator[str]:
    yield from install_operator(helm, tmp_path_factory.mktemp("values"), oom_ns, "aiaas-oom", operator_image)


def test_a_real_oom_kill_raises_the_memory_and_the_job_then_succeeds(operator_release, operator_image, oom_ns,
                                                                    kubectl) -> None:
    name = "grows-memory"
    job = {
        "apiVersion": "aiaas.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
        "spec": {
            "trainer": {"image": operator_image, "imagePullPolicy": "IfNotPresent", "command": ["python", "-c"],
                        "args": [ALLOCATE], "env": [{"name": "NEED_MIB", "value": "320"}]},
            "topology": {"nodes": 1, "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                                                   "limits": {"memory": "256Mi"}}},
            "autoscaling": {"memory": {"factor": 2, "max": "1Gi"}},
            "runPolicy": {"backoffLimit": 0},  # a plain retry would fail the job: only the raise may restart it
        },
    }
    kubectl("apply", "-f", "-", input=json.dumps(job), namespace=oom_ns)

    def finished() -> dict[str, Any] | None:
        st = (get(kubectl, oom_ns, "trainingjob", name) or {}).get("status") or {}
        return st if st.get("phase") in ("Succeeded", "Failed") else None

    try:
        status = wait_for(finished, timeout=600, interval=2, what=f"{name} to finish")
    except TimeoutError:
        print(json.dumps((get(kubectl, oom_ns, "trainingjob", name) or {}).get("status"), indent=1))
        print(kubectl("describe", "pod", f"{name}-0", namespace=oom_ns, check=False).stdout)
        raise
    assert status["phase"] == "Succeeded", status
    assert status["resizeCount"] == 1 and status["restartCount"] == 1, status
    memory = status["memory"]
    assert (memory["request"], memory["limit"]) == ("256Mi", "512Mi"), memory
    assert f"pod {name}-0 was OOMKilled" in memory["message"], memory
    events = json.loads(kubectl("get", "events", "--field-selector", f"involvedObject.name={name}", "-o", "json",
                                namespace=oom_ns).stdout)["items"]
    resized = [e["message"] for e in events if e["reason"] == "Resized"]
    assert len(resized) == 1 and "raised memory limit 256Mi→512Mi" in resized[0], resized
    print(f"real OOM kill at 256Mi, raised to 512Mi: {resized[0]}")
