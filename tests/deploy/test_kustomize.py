"""deploy/ (kustomize) produces the same objects as the Helm chart, and they are strictly valid."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest
import yaml
from deploy_util import (
    MONITORING_VALUES,
    NAMESPACE,
    REPO,
    helm_template,
    key,
    kustomize,
    normalise,
    tool,
    validate,
)

HELM, KUBECTL = tool("helm"), tool("kubectl")
pytestmark = pytest.mark.skipif(HELM is None or KUBECTL is None,
                                reason="helm/kubectl not found: run hack/cluster.sh build (or put them on PATH)")


def _diff(a: dict, b: dict) -> str:
    return "\n".join(difflib.unified_diff(yaml.safe_dump(a).splitlines(), yaml.safe_dump(b).splitlines(),
                                          "helm", "kustomize", lineterm=""))


@pytest.mark.parametrize("directory, values", [("default", {}), ("monitoring", MONITORING_VALUES)])
def test_kustomize_matches_helm_with_default_values(directory: str, values: dict, tmp_path: Path) -> None:
    assert HELM and KUBECTL
    helm = normalise(helm_template(HELM, values=values or None, tmp=tmp_path))
    kust_objs = kustomize(KUBECTL, directory)
    # the kustomize base also creates its namespace (Helm: `--create-namespace`)
    namespaces = [o for o in kust_objs if o["kind"] == "Namespace"]
    assert [n["metadata"]["name"] for n in namespaces] == [NAMESPACE]
    kust = normalise(o for o in kust_objs if o["kind"] != "Namespace")
    assert sorted(helm) == sorted(kust), (
        f"only in helm: {sorted(set(helm) - set(kust))}; only in kustomize: {sorted(set(kust) - set(helm))}")
    diffs = [f"{k}:\n{_diff(helm[k], kust[k])}" for k in sorted(helm) if helm[k] != kust[k]]
    assert not diffs, "\n\n".join(diffs)


@pytest.mark.parametrize("directory", ["default", "monitoring"])
def test_kustomize_objects_are_strictly_valid(directory: str) -> None:
    assert KUBECTL
    objs = kustomize(KUBECTL, directory)
    for obj in objs:
        validate(obj)
    assert len({key(o) for o in objs}) == len(objs)


def test_namespace_meets_the_restricted_pod_security_standard() -> None:
    ns = yaml.safe_load((REPO / "deploy" / "namespaced" / "namespace.yaml").read_text())
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
