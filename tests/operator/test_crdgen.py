"""The CRDs in crds/ are exactly what the models generate, and they are structural."""

from __future__ import annotations

from pathlib import Path

import yaml

from aiaas.operator import crdgen

REPO = Path(__file__).resolve().parents[2]


def test_checked_in_crds_match_the_models() -> None:
    for name, text in crdgen.render_files().items():
        path = REPO / "crds" / name
        assert path.exists(), f"{path} is missing: run `aiaas crds --write crds/`"
        assert path.read_text() == text, f"{path} drifted from aiaas.operator.api: run `aiaas crds --write crds/`"
    assert sorted(p.name for p in (REPO / "crds").glob("aiaas.dev_*.yaml")) == sorted(crdgen.render_files())


def _walk(node: object, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def test_schemas_are_structural_and_described() -> None:
    for crd in crdgen.crds():
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in _walk(schema):
            assert "$ref" not in node, path
            assert "title" not in node or not isinstance(node["title"], str), path
            assert node.get("additionalProperties") is not False, path
            if "properties" in node:
                assert node.get("type") == "object", path
                for field, sub in node["properties"].items():
                    if path.endswith("properties") or field in ("metadata",):
                        continue
                    assert sub.get("description"), f"{path}.properties.{field} has no description"


def test_printer_columns_and_names() -> None:
    tj, isvc = crdgen.crds()
    assert tj["spec"]["names"]["shortNames"] == ["tj", "tjob"]
    columns = {c["name"] for c in tj["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert {"Phase", "Nodes", "Progress", "Age"} <= columns
    assert tj["spec"]["versions"][0]["subresources"] == {"status": {}}
    assert "isvc" in isvc["spec"]["names"]["shortNames"]


def test_cel_rules_are_attached() -> None:
    tj = crdgen.crds()[0]
    schema = tj["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rules = schema["properties"]["spec"]["x-kubernetes-validations"]
    assert any("parallelism.data * self.topology.parallelism.model" in r["rule"] for r in rules)
    assert all(r["message"] and r["fieldPath"].startswith(".") for r in rules)
    assert any("metadata.name" in r["rule"] for r in schema["x-kubernetes-validations"])
    # Nested objects default to {} so the API server fills in defaults the rules rely on.
    topology = schema["properties"]["spec"]["properties"]["topology"]
    assert topology["default"] == {} and topology["properties"]["parallelism"]["default"] == {}


def test_crd_yaml_parses_as_two_objects() -> None:
    docs = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "crds").glob("aiaas.dev_*.yaml"))]
    assert {d["metadata"]["name"] for d in docs} == {"trainingjobs.aiaas.dev", "inferenceservices.aiaas.dev"}


def test_crd_reference_doc_is_current() -> None:
    path = REPO / "docs" / "crd-reference.md"
    assert path.read_text() == crdgen.reference_markdown(), (
        "docs/crd-reference.md drifted: run `aiaas crds --write crds/ --reference docs/crd-reference.md`"
    )
