"""Fixtures for end-to-end tests against a real Kubernetes API server.

Which cluster
-------------
* ``AIAAS_E2E_USE_EXISTING=1``: use the cluster that ``KUBECONFIG`` (or
  ``~/.kube/config``) points at, e.g. a kind cluster made by hack/kind.sh.
  Opt-in on purpose: a developer's ``KUBECONFIG`` often points at a real
  cluster, and these tests create and delete namespaces and CRDs.
* otherwise: the local control plane of ``hack/cluster.sh`` (etcd,
  kube-apiserver, controller-manager, scheduler, kwok fake nodes). It is
  started once per session and stopped at the end, unless it was already
  running before the session or ``AIAAS_KEEP_CLUSTER=1``.

Either way the session puts the built kubectl/helm (if present) first on PATH,
and, for tests that ask for it, applies ``crds/`` (server-side) and waits for
the CRDs to be Established.

Fixtures
--------
``k8s_cluster``  session info: kubeconfig path, kubectl/helm paths, local or not
``crds``         session: crds/ applied and Established (list of CRD documents)
``e2e_cluster``  ``k8s_cluster`` with ``crds`` applied: what aiaas tests use
``kubectl``      ``kubectl(*args, check=True, input=None, namespace=None, timeout=120)``
                 -> CompletedProcess[str]; raises KubectlError (shows stderr) if check
``namespace``    a fresh namespace per test, deleted afterwards
``k8s_api``      a ``kubernetes.client.ApiClient`` for the cluster

Tests must not depend on the local harness; run them on kind with
``AIAAS_E2E_USE_EXISTING=1 KUBECONFIG=... pytest -m e2e``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_util import CRDS_DIR, REPO_ROOT, KubectlError, crd_docs, run, wait_for

CLUSTER_SH = REPO_ROOT / "hack" / "cluster.sh"
LOCAL_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok", "helm")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _use_existing() -> bool:
    return _truthy("AIAAS_E2E_USE_EXISTING")


def _bin_dir() -> Path | None:
    if not CLUSTER_SH.exists():
        return None
    proc = subprocess.run([str(CLUSTER_SH), "bin-dir"], capture_output=True, text=True)
    return Path(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip() else None


def _local_binaries_built() -> bool:
    d = _bin_dir()
    return d is not None and all((d / b).is_file() for b in LOCAL_BINARIES)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The session cluster is set up inside the first e2e test, so that test's
    # pytest-timeout also covers the one-time build of the control plane
    # (tens of minutes on a small machine). Give that test room.
    if _use_existing() or _local_binaries_built():
        return
    for item in items:
        if item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.timeout(3 * 3600))
            break


@dataclass(frozen=True)
class E2ECluster:
    kubeconfig: str
    kubectl: str
    helm: str | None
    local: bool  # started by hack/cluster.sh for/before this session

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": self.kubeconfig}


def _cluster_sh(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return run([str(CLUSTER_SH), *args], check=False, timeout=timeout)


@pytest.fixture(scope="session")
def k8s_cluster() -> Iterator[E2ECluster]:
    saved_env = {k: os.environ.get(k) for k in ("KUBECONFIG", "PATH")}
    started_here = False
    bin_dir = _bin_dir()

    if _use_existing():
        kubeconfig = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
        if not Path(kubeconfig.split(os.pathsep)[0]).exists():
            pytest.fail(f"AIAAS_E2E_USE_EXISTING=1 but kubeconfig {kubeconfig} does not exist")
        local = False
    else:
        if shutil.which("go") is None and not Path("/usr/local/go/bin/go").exists() and not _local_binaries_built():
            pytest.skip("e2e: no Go toolchain to build the local cluster; set AIAAS_E2E_USE_EXISTING=1 and KUBECONFIG")
        status = _cluster_sh("status", timeout=60)
        if status.returncode != 0:
            up = _cluster_sh("up", timeout=3 * 3600)
            if up.returncode != 0:
                pytest.fail(f"hack/cluster.sh up failed:\n{up.stdout}\n{up.stderr}")
            started_here = True
        kubeconfig = _cluster_sh("kubeconfig", timeout=30).stdout.strip()
        bin_dir = _bin_dir()
        local = True

    if bin_dir is not None and (bin_dir / "kubectl").is_file():
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["KUBECONFIG"] = kubeconfig
    kubectl_bin = shutil.which("kubectl")
    if kubectl_bin is None:
        pytest.fail("kubectl not found: run hack/cluster.sh build, or put kubectl on PATH")
    cluster = E2ECluster(kubeconfig=kubeconfig, kubectl=kubectl_bin, helm=shutil.which("helm"), local=local)

    try:
        run([kubectl_bin, "version"], timeout=60)
        yield cluster
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if started_here and not _truthy("AIAAS_KEEP_CLUSTER"):
            _cluster_sh("down", timeout=300)


@pytest.fixture(scope="session")
def crds(k8s_cluster: E2ECluster) -> list[dict]:
    """crds/ applied (server-side) and Established; returns the CRD documents."""
    docs = crd_docs()
    if not docs:
        pytest.skip("no CustomResourceDefinitions in crds/")
    try:
        _apply_crds(k8s_cluster)
    except KubectlError as exc:
        pytest.fail(f"the API server rejects {CRDS_DIR}:\n{exc.stderr}", pytrace=False)
    return docs


@pytest.fixture(scope="session")
def e2e_cluster(k8s_cluster: E2ECluster, crds: list[dict]) -> E2ECluster:
    """The session cluster with the aiaas CRDs installed."""
    return k8s_cluster


def _apply_crds(cluster: E2ECluster) -> None:
    run(
        [cluster.kubectl, "apply", "--server-side", "--force-conflicts", "--field-manager=aiaas-e2e", "-f", str(CRDS_DIR)],
        timeout=120,
    )
    for doc in crd_docs():
        run(
            [cluster.kubectl, "wait", "--for=condition=Established", "--timeout=60s", f"crd/{doc['metadata']['name']}"],
            timeout=90,
        )
    # Established is not quite "served by discovery yet"; kubectl caches discovery.
    for doc in crd_docs():
        group = doc["spec"]["group"]
        plural = doc["spec"]["names"]["plural"]
        wait_for(
            lambda g=group, p=plural: run([cluster.kubectl, "get", f"{p}.{g}", "-A", "-o", "name"], check=False).returncode == 0,
            timeout=60,
            what=f"{plural}.{group} to be served",
        )


KubectlFn = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def kubectl(k8s_cluster: E2ECluster) -> KubectlFn:
    """``kubectl("get", "pods", namespace=ns, check=True, input=None, timeout=120)``."""

    def _kubectl(
        *args: str,
        check: bool = True,
        input: str | None = None,
        namespace: str | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [k8s_cluster.kubectl, f"--kubeconfig={k8s_cluster.kubeconfig}"]
        if namespace:
            cmd.append(f"--namespace={namespace}")
        return run([*cmd, *args], check=check, input=input, timeout=timeout)

    return _kubectl


@pytest.fixture(scope="session")
def helm(k8s_cluster: E2ECluster) -> KubectlFn:
    """``helm("install", ..., check=True)`` with the session kubeconfig."""
    if k8s_cluster.helm is None:
        pytest.skip("helm not found: run hack/cluster.sh build, or put helm on PATH")
    helm_bin = k8s_cluster.helm
    kubeconfig = k8s_cluster.kubeconfig

    def _helm(*args: str, check: bool = True, input: str | None = None, timeout: float = 300):
        return run([helm_bin, f"--kubeconfig={kubeconfig}", *args], check=check, input=input, timeout=timeout)

    return _helm


def _ns_name(nodeid: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", nodeid.split("::")[-1].lower()).strip("-")
    return f"e2e-{base[:40].strip('-')}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def namespace(request: pytest.FixtureRequest, kubectl: KubectlFn) -> Iterator[str]:
    """A fresh namespace (labelled ``aiaas.e2e=true``), deleted after the test."""
    name = _ns_name(request.node.nodeid)
    kubectl("create", "namespace", name)
    kubectl("label", "namespace", name, "aiaas.e2e=true")
    # Pods are rejected until the namespace's default service account exists.
    wait_for(
        lambda: kubectl("get", "serviceaccount", "default", namespace=name, check=False).returncode == 0,
        timeout=60,
        what=f"default service account in {name}",
    )
    try:
        yield name
    finally:
        if not _truthy("AIAAS_E2E_KEEP_NAMESPACES"):
            kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture(scope="session")
def k8s_api(k8s_cluster: E2ECluster):
    """``kubernetes.client.ApiClient`` for the session cluster."""
    kubernetes = pytest.importorskip("kubernetes")
    api = kubernetes.config.new_client_from_config(config_file=k8s_cluster.kubeconfig)
    try:
        yield api
    finally:
        api.close()


__all__ = ["E2ECluster", "KubectlError"]
