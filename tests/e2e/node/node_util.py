"""Helpers of the real-node tests (tests/e2e/node): pod manifests for the test
image, the namespace annotations that steer pods to the real node, waiting for
pod phases.

The names here mirror hack/node/node.sh (label, image, StorageClass); nothing
here starts or stops a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from e2e_util import wait_for

REAL_NODE_LABEL = "aiaas.dev/real-node"
TEST_IMAGE = "localhost/aiaas-node-test:local"  # /nodetest, built and loaded by hack/cluster.sh up
LOCAL_PATH_CLASS = "local-path"

# Namespace annotations: PodNodeSelector and PodTolerationRestriction add the
# node selector and the toleration to every pod of the namespace.
STEER_ANNOTATIONS = {
    "scheduler.alpha.kubernetes.io/node-selector": f"{REAL_NODE_LABEL}=true",
    "scheduler.alpha.kubernetes.io/defaultTolerations": json.dumps(
        [{"key": REAL_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}]
    ),
}

Kubectl = Callable[..., Any]


def pod(
    name: str,
    args: Sequence[str],
    *,
    labels: dict[str, str] | None = None,
    restart: str = "Never",
    volumes: Sequence[dict] = (),
    mounts: Sequence[dict] = (),
    port: int | None = None,
    **spec: Any,
) -> dict:
    """A pod running ``/nodetest <args>`` of the test image."""
    container: dict[str, Any] = {
        "name": "main",
        "image": TEST_IMAGE,
        "imagePullPolicy": "Never",
        "command": ["/nodetest", *args],
        "volumeMounts": list(mounts),
    }
    if port is not None:
        container["ports"] = [{"containerPort": port}]
        container["readinessProbe"] = {"tcpSocket": {"port": port}, "periodSeconds": 1}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 2,
            "containers": [container],
            "volumes": list(volumes),
            **spec,
        },
    }


def apply(kubectl: Kubectl, namespace: str, *docs: dict) -> None:
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)}),
            namespace=namespace)


def get(kubectl: Kubectl, namespace: str | None, *what: str) -> dict[str, Any] | None:
    """``kubectl get <what> -o json`` parsed; None when it fails (e.g. not found)."""
    r = kubectl("get", *what, "-o", "json", namespace=namespace, check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def install_operator(helm: Callable[..., Any], values_dir: Path, namespace: str, prefix: str,
                     image: str | None = None) -> Iterator[str]:
    """`helm install` of charts/aiaas watching ``namespace`` (and installed there), its pods on the real node,
    ``image`` the operator image (default: the chart's); yields the release name (``prefix`` and a random
    suffix: its cluster-wide objects are unique per run), uninstalls it afterwards."""
    release = f"{prefix}-{uuid.uuid4().hex[:4]}"
    values: dict[str, Any] = {
        "operator": {"watchNamespaces": [namespace], "workloadImagePullPolicy": "IfNotPresent"},
        "nodeSelector": {REAL_NODE_LABEL: "true"},
        "tolerations": [{"key": REAL_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
    }
    if image:
        repo, _, tag = image.rpartition(":")
        values["image"] = {"repository": repo, "tag": tag, "pullPolicy": "IfNotPresent"}
    path = values_dir / f"{release}.yaml"
    path.write_text(json.dumps(values))  # JSON is YAML
    helm("install", release, str(REPO / "charts" / "aiaas"), "--namespace", namespace, "--values", str(path),
         "--wait", "--timeout", "300s", timeout=360)
    yield release
    helm("uninstall", release, "--namespace", namespace, "--wait", check=False, timeout=180)


def get_pod(kubectl: Kubectl, namespace: str, name: str) -> dict:
    return json.loads(kubectl("get", "pod", name, "-o", "json", namespace=namespace).stdout)


def wait_phase(kubectl: Kubectl, namespace: str, name: str, phases: set[str], timeout: float = 180) -> dict:
    """Wait until the pod is in one of ``phases``; fail at once on an unexpected end."""

    def reached() -> Any:  # the pod, or None: not yet
        p = get_pod(kubectl, namespace, name)
        phase = p["status"].get("phase")
        if phase in phases:
            return p
        if phase in ("Succeeded", "Failed"):
            logs = kubectl("logs", name, namespace=namespace, check=False)
            raise AssertionError(f"pod {name} ended {phase}, wanted {phases}: {logs.stdout}{logs.stderr}")
        return None

    try:
        return wait_for(reached, timeout=timeout, interval=1, what=f"pod {name} to be {'/'.join(sorted(phases))}")
    except TimeoutError:
        describe = kubectl("describe", "pod", name, namespace=namespace, check=False).stdout
        raise AssertionError(f"pod {name} never became {phases}:\n{describe}") from None


def wait_ready(kubectl: Kubectl, namespace: str, name: str, timeout: float = 180) -> dict:
    def ready() -> Any:  # the pod, or None: not yet
        p = get_pod(kubectl, namespace, name)
        conds = p["status"].get("conditions", [])
        return p if any(c["type"] == "Ready" and c["status"] == "True" for c in conds) else None

    return wait_for(ready, timeout=timeout, interval=1, what=f"pod {name} to be Ready")


def logs(kubectl: Kubectl, namespace: str, name: str) -> str:
    return kubectl("logs", name, namespace=namespace).stdout


# `nodetest get` notes each failed attempt on stderr, which `kubectl logs` interleaves with the bodies:
# a fresh Service's first connect may be refused until kube-proxy has written its rules.
GET_RETRY_NOTE = " (retrying)"


def responses(kubectl: Kubectl, namespace: str, name: str) -> list[str]:
    """The bodies a `nodetest get` pod printed, one per URL, without its notes about retried attempts."""
    return [line for line in logs(kubectl, namespace, name).splitlines() if not line.endswith(GET_RETRY_NOTE)]


# The restricted Pod Security Standard for a pod of the test image (FROM scratch: no user of its own).
RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": 65534, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
# `nodetest probe`: what a TCP connect attempt met. A dropped SYN times out (a NetworkPolicy at work); a
# reached pod answers, with a connection or, when nothing listens on the port, a refusal.
REACHED = frozenset({"open", "refused"})
DROPPED = "timeout"


def probe_pod(name: str, targets: Sequence[str], *, labels: dict[str, str] | None = None,
              timeout_ms: int = 3000) -> dict:
    """A pod (restricted) that tries a TCP connect to each ``host:port`` about once a second and logs one
    line per round (``nodetest probe``)."""
    doc = pod(name, ["probe", str(timeout_ms), *targets], labels=labels, securityContext=RESTRICTED_POD)
    doc["spec"]["containers"][0]["securityContext"] = RESTRICTED_CONTAINER
    return doc


def probe_rounds(kubectl: Kubectl, namespace: str, name: str, since: float = 0.0) -> list[dict[str, str]]:
    """The rounds of a probe pod that began at or after ``since`` (seconds since the epoch; the pods share
    the test's clock: the real node is this machine): ``{"host:port": "open"|"refused"|"timeout"|...}``."""
    out = kubectl("logs", name, namespace=namespace, check=False).stdout
    rounds = []
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "probe" and int(words[1]) / 1000 >= since:
            rounds.append(dict(w.split("=", 1) for w in words[2:]))
    return rounds


REPO = Path(__file__).resolve().parents[3]


def build_and_load(only: str | None = None) -> dict[str, str]:
    """{short name: image} of this tree's images (``only``: one of them), built if missing (cached by content, so
    `make test`'s build is reused) and loaded into the real node's containerd."""
    if os.geteuid() != 0:
        pytest.skip("building the images needs root here (buildah); run `make images` as root")
    env = {**os.environ, "AIAAS_IMAGES": only} if only else None
    out = subprocess.run([str(REPO / "hack" / "images.sh"), "build"], capture_output=True, text=True, check=False,
                         timeout=3600, env=env)
    assert out.returncode == 0, f"hack/images.sh build failed:\n{out.stderr[-3000:]}"
    built = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    load = subprocess.run([str(REPO / "hack" / "cluster.sh"), "load-images", *built.values()],
                          capture_output=True, text=True, timeout=1200, check=False)
    assert load.returncode == 0, load.stderr[-3000:]
    return {name.split("/")[-1].split(":")[0]: name for name in built}


def restricted_namespace(kubectl: Kubectl, prefix: str) -> Iterator[str]:
    """A new namespace (Pod Security "restricted") whose pods all land on the real node; deleted afterwards."""
    ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    kubectl("annotate", "namespace", ns, *(f"{k}={v}" for k, v in STEER_ANNOTATIONS.items()))
    yield ns
    kubectl("delete", "namespace", ns, "--wait=false", check=False)
