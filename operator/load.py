"""Read resources from YAML and turn validation errors into messages that name the field and the fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from aiaas.contract.errors import validation_errors

from . import api

KINDS: dict[str, type[api.TrainingJob] | type[api.InferenceService]] = {
    "TrainingJob": api.TrainingJob,
    "InferenceService": api.InferenceService,
}

class InvalidResource(ValueError):
    """A resource failed validation; ``errors`` holds one message per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}:\n" + "\n".join(f"  - {e}" for e in errors))


@dataclass
class Loaded:
    source: str
    obj: api.TrainingJob | api.InferenceService


def parse(doc: dict[str, Any], source: str = "<input>") -> api.TrainingJob | api.InferenceService:
    """One manifest dict -> its API object, or :class:`InvalidResource` with every problem listed."""
    if not isinstance(doc, dict):
        raise InvalidResource(source, ["a resource must be a YAML mapping with apiVersion, kind, metadata, spec"])
    kind = doc.get("kind")
    if kind not in KINDS:
        raise InvalidResource(source, [f"kind: {kind!r} is not one of {', '.join(KINDS)}"])
    if doc.get("apiVersion") != api.API_VERSION:
        raise InvalidResource(source, [f"apiVersion: {doc.get('apiVersion')!r} must be {api.API_VERSION}"])
    name = (doc.get("metadata") or {}).get("name", "?")
    try:
        return KINDS[kind].model_validate(doc)
    except ValidationError as err:
        raise InvalidResource(f"{source}: {kind}/{name}", validation_errors(err)) from None


def read_documents(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """The non-empty YAML documents of a file ('-' for stdin), each with a label for messages."""
    import sys

    text = sys.stdin.read() if str(path) == "-" else Path(path).read_text()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise InvalidResource(str(path), [f"not valid YAML: {err}"]) from None
    return [(f"{path}#{i}" if len(docs) > 1 else str(path), d) for i, d in enumerate(docs)]


def load_file(path: str | Path) -> list[Loaded]:
    return [Loaded(source, parse(doc, source)) for source, doc in read_documents(path)]
