"""Generate the CustomResourceDefinitions (apiextensions.k8s.io/v1) from the pydantic models in :mod:`api`.

The pydantic JSON schema (draft 2020-12) is turned into a *structural* OpenAPI v3 schema as the API server
wants it: references inlined, ``Optional`` unwrapped, titles dropped, exclusive bounds rewritten, defaults for
nested objects added (so the API server fills in nested defaults and the CEL rules can rely on them), and the
cross-field rules attached as ``x-kubernetes-validations``. Pure: models in, dicts out.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from . import api

CRD_FILES = {
    "TrainingJob": "aiaas.dev_trainingjobs.yaml",
    "InferenceService": "aiaas.dev_inferenceservices.yaml",
}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline ``$ref``s and normalise one schema node, recursively."""
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        # The field's own description wins over the model's docstring.
        target.update({k: v for k, v in node.items() if k != "title"})
        node = target
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        branches = [b for b in node["anyOf"] if b != {"type": "null"}]
        if len(branches) == 1:
            del node["anyOf"]
            merged = dict(branches[0])
            merged.update(node)
            if merged.get("default", 0) is None:
                del merged["default"]
            return _resolve(merged, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs") or (key == "additionalProperties" and value is False):
            continue  # structural schemas prune unknown fields instead (and Strict field validation reports them)
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "properties":
            out[key] = {name: _resolve(sub, defs) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "anyOf", "allOf"):
            out[key] = _resolve(value, defs)
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" in out:
        required = set(out.get("required", []))
        for name, sub in out["properties"].items():
            # Nested objects that have defaults inside get an empty default, so the API server materialises
            # them (and their defaults) even when the user leaves them out.
            if (
                name not in required
                and sub.get("type") == "object"
                and "default" not in sub
                and "properties" in sub
                and not sub.get("required")
                and _has_defaults(sub)
            ):
                sub["default"] = {}
    if out.get("type") == "array" and out.get("items", {}).get("properties", {}).get("type") and "status" in out.get(
        "items", {}
    ).get("properties", {}):
        out["x-kubernetes-list-type"] = "map"
        out["x-kubernetes-list-map-keys"] = ["type"]
    return out


def _has_defaults(schema: dict[str, Any]) -> bool:
    return any("default" in s or _has_defaults(s) for s in schema.get("properties", {}).values())


def _attach_rules(schema: dict[str, Any], rules: tuple[api.Rule, ...]) -> None:
    for rule in rules:
        node = schema
        for part in filter(None, rule.path.split(".")):
            node = node["properties"][part]
        entry: dict[str, Any] = {"rule": rule.cel, "message": rule.message}
        if rule.path:  # fieldPath is relative to the node the rule sits on; the API server prints the field
            entry["fieldPath"] = rule.field.removeprefix(rule.path)
            entry["message"] = rule.message.removeprefix(f"{rule.field}: ")
            entry["reason"] = "FieldValueInvalid"
        node.setdefault("x-kubernetes-validations", []).append(entry)


def openapi_schema(model: type[api.Model], rules: tuple[api.Rule, ...]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema = _resolve(raw, raw.get("$defs", {}))
    schema["properties"]["metadata"] = {"type": "object"}
    schema["required"] = [r for r in schema.get("required", []) if r not in ("metadata", "apiVersion", "kind")]
    if not schema["required"]:
        del schema["required"]
    for key in ("apiVersion", "kind"):
        schema["properties"][key] = {"type": "string", "description": schema["properties"][key]["description"]}
    schema["properties"]["status"].pop("default", None)
    # The API server validates a default against the rules on the same node, before nested defaults apply.
    schema["properties"]["spec"].pop("default", None)
    _attach_rules(schema, rules)
    return schema


def _crd(kind: str, plural: str, short_names: list[str], model: type[api.Model], rules: tuple[api.Rule, ...],
         columns: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "aiaas", "app.kubernetes.io/part-of": "aiaas"},
        },
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["aiaas"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": openapi_schema(model, rules)},
                }
            ],
        },
    }


def crds() -> list[dict[str, Any]]:
    """The CRDs, in a stable order."""
    age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    return [
        _crd(
            "TrainingJob", "trainingjobs", ["tj", "tjob"], api.TrainingJob, api.TRAININGJOB_RULES,
            [
                {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                {"name": "Nodes", "type": "integer", "jsonPath": ".spec.topology.nodes"},
                # an Auto-sized elastic job: the pods scheduled now (empty for a fixed-size job)
                {"name": "Size", "type": "integer", "jsonPath": ".status.elastic.currentNodes"},
                {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
                {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "priority": 1},
                {"name": "Accuracy", "type": "number", "jsonPath": ".status.progress.metric", "priority": 1},
                {"name": "Restarts", "type": "integer", "jsonPath": ".status.restartCount", "priority": 1},
                {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
                age,
            ],
        ),
        _crd(
            "InferenceService", "inferenceservices", ["aisvc", "isvc"], api.InferenceService,
            api.INFERENCESERVICE_RULES,
            [
                {"name": "URL", "type": "string", "jsonPath": ".status.url"},
                {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"},
                {"name": "Replicas", "type": "integer", "jsonPath": ".status.readyReplicas"},
                {"name": "Model", "type": "string", "jsonPath": ".status.model.source", "priority": 1},
                {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
                age,
            ],
        ),
    ]


HEADER = "# Generated by `aiaas crds --write crds/` from aiaas.operator.api. Do not edit.\n"


def render_files() -> dict[str, str]:
    """File name -> YAML text of each CRD."""
    return {
        CRD_FILES[crd["spec"]["names"]["kind"]]: HEADER + yaml.safe_dump(crd, sort_keys=False, width=120)
        for crd in crds()
    }


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_files().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


def _rows(schema: dict[str, Any], path: str) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    required = set(schema.get("required", []))
    for name, sub in schema.get("properties", {}).items():
        here = f"{path}.{name}" if path else name
        kind = "quantity" if sub.get("x-kubernetes-int-or-string") else sub.get("type", "")
        if kind == "array":
            kind = f"[]{sub.get('items', {}).get('type', 'object')}"
        if "enum" in sub:
            kind += " (" + " \\| ".join(str(e) for e in sub["enum"]) + ")"
        default = "" if "default" not in sub or sub["default"] == {} else f"`{sub['default']}`"
        if name in required:
            default = "required"
        desc = " ".join(str(sub.get("description", "")).split()).replace("|", "\\|")
        rows.append((f"`{here}`", kind, default, desc))
        if sub.get("type") == "object":
            rows += _rows(sub, here)
        elif sub.get("type") == "array" and sub.get("items", {}).get("type") == "object":
            rows += _rows(sub["items"], here + "[]")
    return rows


def reference_markdown() -> str:
    """docs/crd-reference.md: every field of both CRDs with type, default and description."""
    out = ["# CRD reference", "",
           "Generated by `aiaas crds --reference docs/crd-reference.md` from `aiaas.operator.api`; the same text is",
           "what `kubectl explain` shows. Cross-field rules are listed after each kind's fields.", ""]
    rules = {"TrainingJob": api.TRAININGJOB_RULES, "InferenceService": api.INFERENCESERVICE_RULES}
    for crd in crds():
        kind = crd["spec"]["names"]["kind"]
        version = crd["spec"]["versions"][0]
        schema = version["schema"]["openAPIV3Schema"]
        out += [f"## {kind} ({api.API_VERSION})", "", str(schema.get("description", "")), "",
                f"Short names: {', '.join(crd['spec']['names']['shortNames'])}. "
                f"Printer columns: {', '.join(c['name'] for c in version['additionalPrinterColumns'])}.", "",
                "| field | type | default | description |", "|---|---|---|---|"]
        for section in ("spec", "status"):
            out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in _rows(schema["properties"][section], section)]
        out += ["", f"Rules checked by the API server (CEL) and by `aiaas validate`, on `{kind}`:", ""]
        out += [f"- {r.message}  \n  `{r.cel}`" for r in rules[kind]]
        out.append("")
    return "\n".join(out)
