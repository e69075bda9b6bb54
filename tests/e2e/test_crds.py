"""The generated CRDs (crds/) on a real API server: names, printer columns,
``kubectl explain``, every example accepted, bad input rejected with the
CRD's own message (OpenAPI schema and CEL rules)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from e2e_util import crd_docs, example_files, load_yaml_docs

pytestmark = pytest.mark.e2e


def _version(crd: dict) -> dict:
    return next(v for v in crd["spec"]["versions"] if v.get("storage"))


def _crd_for_kind(kind: str) -> dict:
    return next(c for c in crd_docs() if c["spec"]["names"]["kind"] == kind)


def _example_of_kind(kind: str) -> tuple[Path, dict]:
    for path in example_files():
        for doc in load_yaml_docs(path):
            if doc.get("kind") == kind:
                return path, doc
    pytest.skip(f"no example of kind {kind} in examples/")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


CRD_NAMES = [c["metadata"]["name"] for c in crd_docs()]


@pytest.mark.parametrize("crd_name", CRD_NAMES)
def test_crd_is_established_with_accepted_names(crd_name, crds, kubectl):
    crd = json.loads(kubectl("get", "crd", crd_name, "-o", "json").stdout)
    conditions = {c["type"]: c for c in crd["status"]["conditions"]}
    assert conditions["Established"]["status"] == "True"
    assert conditions["NamesAccepted"]["status"] == "True", conditions["NamesAccepted"].get("message")
    assert crd["status"]["acceptedNames"]["kind"] == crd["spec"]["names"]["kind"]


@pytest.mark.parametrize("crd_name", CRD_NAMES)
def test_every_resource_name_works_with_kubectl_get(crd_name, crds, kubectl, namespace):
    crd = next(c for c in crds if c["metadata"]["name"] == crd_name)
    names = crd["spec"]["names"]
    group = crd["spec"]["group"]
    aliases = [names["plural"], names["singular"], names["kind"].lower(), f"{names['plural']}.{group}"]
    aliases += names.get("shortNames", [])
    for alias in aliases:
        res = kubectl("get", alias, namespace=namespace, check=False)
        assert res.returncode == 0, f"kubectl get {alias}: {res.stderr}"
        assert "No resources found" in res.stderr
    for category in names.get("categories", []):
        kubectl("get", category, namespace=namespace)


@pytest.mark.parametrize("kind", sorted({c["spec"]["names"]["kind"] for c in crd_docs()}))
def test_printer_columns(kind, crds, kubectl, namespace):
    crd = _crd_for_kind(kind)
    columns = _version(crd).get("additionalPrinterColumns", [])
    if not columns:
        pytest.skip(f"{kind} has no additionalPrinterColumns")
    path, doc = _example_of_kind(kind)
    kubectl("apply", "-f", "-", input=yaml.safe_dump(doc), namespace=namespace)
    plural = crd["spec"]["names"]["plural"]
    name = doc["metadata"]["name"]

    def header(*extra: str) -> list[str]:
        out = kubectl("get", plural, name, *extra, namespace=namespace).stdout
        # Columns are separated by at least two spaces (names never contain two spaces).
        return re.split(r"\s{2,}", out.splitlines()[0].strip())

    default_cols = ["NAME"] + [c["name"].upper() for c in columns if c.get("priority", 0) == 0]
    all_cols = ["NAME"] + [c["name"].upper() for c in columns]
    assert header() == default_cols
    assert header("-o", "wide") == all_cols

    # Values come from the jsonPaths: check the spec-derived ones against the example. Empty cells are
    # blank, so cut the row at the header's column offsets (kubectl aligns them).
    head, row = kubectl("get", plural, name, "-o", "wide", namespace=namespace).stdout.splitlines()[:2]
    starts = [m.start() for m in re.finditer(r"(?:(?<=\s{2})|^)\S", head)]
    cells = [row[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    assert cells[0] == name
    for col, cell in zip(columns, cells[1:], strict=True):
        jp = col["jsonPath"]
        if not jp.startswith(".spec."):
            continue
        value = doc["spec"]
        for part in jp.removeprefix(".spec.").split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            assert cell == str(value), f"column {col['name']} ({jp}): {cell!r} != {value!r}"


@pytest.mark.parametrize("kind", sorted({c["spec"]["names"]["kind"] for c in crd_docs()}))
def test_kubectl_explain_shows_field_descriptions(kind, crds, kubectl):
    crd = _crd_for_kind(kind)
    spec_schema = _version(crd)["schema"]["openAPIV3Schema"]["properties"]["spec"]
    out = _norm(kubectl("explain", f"{kind.lower()}.spec").stdout)
    assert f"KIND: {kind}" in out
    described = {k: v["description"] for k, v in spec_schema.get("properties", {}).items() if v.get("description")}
    assert described, f"{kind}.spec has no field descriptions"
    for field, description in described.items():
        assert re.search(rf"\b{re.escape(field)}\b", out), f"field {field} missing from kubectl explain"
        assert _norm(description)[:60] in out, f"description of {field} missing from kubectl explain"

    # Nested fields are explained too.
    for field, sub in spec_schema.get("properties", {}).items():
        if sub.get("type") == "object" and sub.get("properties"):
            nested = _norm(kubectl("explain", f"{kind.lower()}.spec.{field}").stdout)
            for name, prop in sub["properties"].items():
                assert re.search(rf"\b{re.escape(name)}\b", nested)
                if prop.get("description"):
                    assert _norm(prop["description"])[:60] in nested
            break


@pytest.mark.parametrize("example", example_files(), ids=lambda p: p.name)
def test_example_is_accepted_by_the_api_server(example, crds, kubectl, namespace):
    res = kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-f", str(example), namespace=namespace, check=False
    )
    assert res.returncode == 0, res.stderr
    assert "created (server dry run)" in res.stdout
    assert not res.stderr.strip() or "Warning" not in res.stderr, res.stderr


# ------------------------------------------------------------------------------------------- bad input
TJ = {
    "apiVersion": "aiaas.dev/v1alpha1",
    "kind": "TrainingJob",
    "metadata": {"name": "bad"},
    "spec": {"topology": {"nodes": 2, "nprocPerNode": 2}},
}
ISVC = {
    "apiVersion": "aiaas.dev/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "bad"},
    "spec": {"model": {"trainingJob": "some-job"}},
}


def _with(base: dict, **changes) -> dict:
    """``_with(TJ, spec__topology__nodes=3)``: a deep copy with dotted (``__``) fields set."""
    doc = copy.deepcopy(base)
    for dotted, value in changes.items():
        node = doc
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return doc


# (label, resource, substrings the API server's error must contain)
BAD = [
    # OpenAPI schema
    ("unknown field (strict)", _with(TJ, spec__topology__nodez=3), ['unknown field "spec.topology.nodez"']),
    ("wrong type", _with(TJ, spec__topology__nodes="two"), ["spec.topology.nodes", "must be of type integer"]),
    ("enum", _with(TJ, spec__trainer={"model": {"architecture": "perceptron"}}),
     ["spec.trainer.model.architecture", 'Unsupported value: "perceptron"', '"cnn"']),
    ("minimum", _with(TJ, spec__trainer={"hyperparameters": {"epochs": 0}}),
     ["spec.trainer.hyperparameters.epochs", "greater than or equal to 1"]),
    ("zero nodes", _with(TJ, spec__topology__nodes=0), ["spec.topology.nodes", "greater than or equal to 1"]),
    # CEL rules (x-kubernetes-validations): the message names the field and the fix
    ("data x model != nodes x nprocPerNode",
     _with(TJ, spec__topology={"nodes": 2, "nprocPerNode": 2, "parallelism": {"data": 3}}),
     ["spec.topology.parallelism", "data x model must equal nodes x nprocPerNode", "omit it"]),
    ("pipeline stages do not divide the world",
     _with(TJ, spec__topology={"nodes": 3, "parallelism": {"model": 2}}),
     ["spec.topology.parallelism.model", "must divide the world size"]),
    ("more processes than GPUs",
     _with(TJ, spec__topology={"nprocPerNode": 4, "resources": {"limits": {"nvidia.com/gpu": 2}}}),
     ["spec.topology.nprocPerNode", "more processes per pod than nvidia.com/gpu per pod"]),
    ("batch does not split across ranks",
     _with(TJ, spec__trainer={"hyperparameters": {"batchSize": 30}}, spec__topology={"nodes": 4}),
     ["spec.trainer.hyperparameters.batchSize", "must split evenly across the data-parallel ranks"]),
    ("elastic bounds", _with(TJ, spec__elastic={"minNodes": 3, "maxNodes": 4}),
     ["spec.elastic", "must lie within minNodes..maxNodes"]),
    ("dataset needs a path", _with(TJ, spec__trainer={"dataset": {"kind": "text"}}),
     ["spec.trainer.dataset.path", "set path to a file"]),
    ("claim and size", _with(TJ, spec__storage={"claimName": "c", "size": "1Gi"}),
     ["spec.storage", "not both"]),
    ("name too long", _with(TJ, metadata={"name": "a" * 60}), ["metadata.name", "at most 52 characters"]),
    ("isvc: two model sources",
     _with(ISVC, spec__model={"trainingJob": "j", "storageUri": "pvc://c/p"}),
     ["spec.model", "exactly one of trainingJob"]),
    ("isvc: no model source", _with(ISVC, spec__model={}), ["spec.model", "exactly one of trainingJob"]),
    ("isvc: storageUri scheme", _with(ISVC, spec__model={"storageUri": "s3://bucket/model"}),
     ["spec.model.storageUri", "pvc://"]),
    ("isvc: minReplicas > maxReplicas", _with(ISVC, spec__minReplicas=3, spec__maxReplicas=2),
     ["spec.minReplicas", "must not exceed spec.maxReplicas"]),
]


@pytest.mark.parametrize(("label", "doc", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_resource_is_rejected_with_the_crd_message(label, doc, expected, crds, kubectl, namespace):
    res = kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-f", "-",
        input=yaml.safe_dump(doc), namespace=namespace, check=False,
    )
    assert res.returncode != 0, f"{label}: accepted by the API server:\n{res.stdout}"
    for text in expected:
        assert text in res.stderr, f"{label}: {text!r} not in the API server's message:\n{res.stderr}"


def test_valid_resource_round_trips_with_defaults(crds, kubectl, namespace):
    """The API server fills in the schema defaults (what the operator relies on)."""
    kubectl("apply", "-f", "-", input=yaml.safe_dump(_with(TJ, metadata={"name": "defaults"})), namespace=namespace)
    obj = json.loads(kubectl("get", "trainingjob", "defaults", "-o", "json", namespace=namespace).stdout)
    topo = obj["spec"]["topology"]
    assert topo["nodes"] == 2 and topo["nprocPerNode"] == 2
    assert "parallelism" in topo, "nested defaults were not applied"
