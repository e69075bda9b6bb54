"""The Helm chart and the kustomize manifests, installed into the real control plane.

kwok plays the kubelet: the operator's pods are scheduled and become Ready without running a container. The
`helm test` pod carries the kwok annotation that makes its container exit 0, which is what a kubelet reports
when curl got the operator's /healthz and /metrics (tests/e2e/test_rbac.py and test_monitoring_prometheus.py run
the operator for real).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
from deploy_util import (  # noqa: E402
    CHART,
    DEPLOY,
    K8S_VERSION,
    MONITORING_CRDS,
    MONITORING_VALUES,
    wait_until,
    write_values,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420), pytest.mark.usefixtures("e2e_cluster")]  # CRDs applied

KWOK_EXIT = "fake.aiaas.dev/exit-code"  # hack/kwok/stages/pod-container-exit.yaml


def get_json(kubectl, namespace: str | None, *what: str) -> dict[str, Any] | None:
    r = kubectl("get", *what, "-o", "json", namespace=namespace, check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def ready_pods(kubectl, namespace: str, selector: str) -> list[dict[str, Any]]:
    pods = (get_json(kubectl, namespace, "pods", "-l", selector) or {}).get("items", [])
    return [p for p in pods if not p["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]


@pytest.fixture
def restricted(kubectl, namespace: str) -> str:
    """The test namespace, enforcing the restricted Pod Security Standard (pods that break it are refused)."""
    kubectl("label", "namespace", namespace, "--overwrite", "pod-security.kubernetes.io/enforce=restricted")
    return namespace


@pytest.fixture(scope="module")
def monitoring_crds(kubectl) -> None:
    """The Prometheus Operator's CRDs (ServiceMonitor, PodMonitor, PrometheusRule), so the API server validates
    the chart's monitoring objects. Left installed: they are cluster-wide and other runs may use them."""
    kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=aiaas-e2e", "-f", str(MONITORING_CRDS),
            timeout=120)
    for path in sorted(MONITORING_CRDS.glob("*.yaml")):
        name = yaml.safe_load(path.read_text())["metadata"]["name"]
        kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}", timeout=90)
        plural, group = name.split(".", 1)
        wait_until(lambda p=plural, g=group: kubectl("get", f"{p}.{g}", "-A", check=False).returncode == 0,
                   timeout=60, what=f"{name} to be served")


def test_helm_install_test_and_uninstall(kubectl, helm, restricted, tmp_path):
    ns, release = restricted, f"aiaas-e2e-{uuid.uuid4().hex[:6]}"
    values = write_values(tmp_path, {"tests": {"podAnnotations": {KWOK_EXIT: "0"}}})
    out = helm("install", release, str(CHART), "--namespace", ns, "--values", str(values),
               "--wait", "--timeout", "180s", timeout=240).stdout
    assert "STATUS: deployed" in out and f"helm test {release} -n {ns}" in out  # NOTES
    try:
        dep = get_json(kubectl, ns, "deployment", release)
        assert dep and dep["status"].get("readyReplicas") == 2
        selector = ",".join(f"{k}={v}" for k, v in dep["spec"]["selector"]["matchLabels"].items())
        pods = ready_pods(kubectl, ns, selector)
        assert len(pods) == 2  # admitted under the restricted Pod Security Standard, scheduled, Ready
        assert {p["spec"]["nodeName"] for p in pods}, "scheduled"
        assert all(p["spec"]["serviceAccountName"] == release for p in pods)
        # the metrics Service has both replicas behind it
        slices = get_json(kubectl, ns, "endpointslices", "-l", f"kubernetes.io/service-name={release}-metrics")
        addresses = {a for s in (slices or {}).get("items", []) for e in s.get("endpoints") or [] for a in e["addresses"]}
        assert addresses == {p["status"]["podIP"] for p in pods}
        for kind, name in [("serviceaccount", release), ("role", f"{release}-leader-election"),
                           ("poddisruptionbudget", release), ("service", f"{release}-metrics")]:
            assert get_json(kubectl, ns, kind, name), (kind, name)
        for kind, name in [("clusterrole", release), ("clusterrolebinding", release),
                           ("clusterrole", f"{release}-scanning"), ("clusterrole", f"{release}-edit")]:
            assert get_json(kubectl, None, kind, name), (kind, name)

        test = helm("test", release, "--namespace", ns, "--timeout", "120s", timeout=180).stdout
        assert "Phase: Succeeded" in " ".join(test.split()), test

        # an upgrade rolls the operator with the new flags and keeps the release healthy
        helm("upgrade", release, str(CHART), "--namespace", ns, "--reuse-values", "--set", "operator.logLevel=DEBUG",
             "--wait", "--timeout", "180s", timeout=240)
        dep = get_json(kubectl, ns, "deployment", release)
        assert dep and "--log-level=DEBUG" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
        assert dep["status"].get("updatedReplicas") == 2 and dep["status"].get("readyReplicas") == 2
    finally:
        helm("uninstall", release, "--namespace", ns, "--wait", "--timeout", "120s", timeout=180)
    assert get_json(kubectl, ns, "deployment", release) is None
    assert get_json(kubectl, None, "clusterrole", release) is None
    wait_until(lambda: not (get_json(kubectl, ns, "pods", "-l", f"app.kubernetes.io/instance={release}") or {})
               .get("items"), timeout=60, what="the operator pods to be deleted")


def test_helm_monitoring_objects_are_accepted_strictly(kubectl, helm, restricted, tmp_path, monitoring_crds):
    """ServiceMonitor, PodMonitors, PrometheusRule and the dashboard ConfigMap, validated by the API server
    against the real CRD schemas with strict field validation, then installed."""
    ns, release = restricted, f"aiaas-e2e-{uuid.uuid4().hex[:6]}"
    values = write_values(tmp_path, {**MONITORING_VALUES, "replicaCount": 1,
                                     "operator": {"watchNamespaces": [ns]}})
    rendered = helm("template", release, str(CHART), "--namespace", ns, "--kube-version", K8S_VERSION,
                    "--values", str(values)).stdout
    kubectl("apply", "--dry-run=server", "--validate=strict", "--namespace", ns, "-f", "-", input=rendered)
    helm("install", release, str(CHART), "--namespace", ns, "--values", str(values), "--wait", "--timeout", "180s",
         timeout=240)
    try:
        for kind, name in [("servicemonitor", release), ("podmonitor", f"{release}-trainer"),
                           ("podmonitor", f"{release}-server"), ("prometheusrule", release),
                           ("configmap", f"{release}-dashboard")]:
            assert get_json(kubectl, ns, kind, name), (kind, name)
        rule = get_json(kubectl, ns, "prometheusrule", release)
        assert rule and {g["name"] for g in rule["spec"]["groups"]} == {"aiaas-operator", "aiaas-training", "aiaas-inference"}
    finally:
        helm("uninstall", release, "--namespace", ns, "--wait", "--timeout", "120s", timeout=180)


def test_kustomize_applies_and_deletes(kubectl, restricted, tmp_path, monitoring_crds):
    """`kubectl apply -k deploy/monitoring` (through an overlay that moves it into the test namespace and gives
    cluster-scoped objects a unique suffix; the CRDs are already installed by the session)."""
    # a letter first: "-1e2345" would be dumped unquoted and read back by kustomize as a number
    ns, suffix = restricted, f"-k{uuid.uuid4().hex[:6]}"
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    patches = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "aiaas-system"}}] + [
        {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": n}}
        for n in ("trainingjobs.aiaas.dev", "inferenceservices.aiaas.dev")]
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(DEPLOY / "monitoring", overlay)],
        "namespace": ns,
        "nameSuffix": suffix,
        "patches": [{"patch": yaml.safe_dump({"$patch": "delete", **p})} for p in patches],
    }))
    rendered = kubectl("kustomize", str(overlay)).stdout
    kinds = [d["kind"] for d in yaml.safe_load_all(rendered) if d]
    assert "Namespace" not in kinds and "CustomResourceDefinition" not in kinds and "Deployment" in kinds
    kubectl("apply", "--server-side", "--validate=strict", "--field-manager=aiaas-e2e", "-k", str(overlay), timeout=120)
    try:
        name = f"aiaas-operator{suffix}"
        kubectl("rollout", "status", f"deployment/{name}", "--timeout=120s", namespace=ns, timeout=150)
        sa = get_json(kubectl, ns, "serviceaccount", name)
        binding = get_json(kubectl, None, "clusterrolebinding", name)
        assert sa and binding and binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": ns}]
        assert get_json(kubectl, ns, "servicemonitor", name) and get_json(kubectl, ns, "prometheusrule", name)
    finally:
        kubectl("delete", "-k", str(overlay), "--wait=true", "--timeout=120s", timeout=180, check=False)
    assert get_json(kubectl, None, "clusterrole", f"aiaas-operator{suffix}") is None
