"""Read resources from YAML and turn validation errors into messages that name the field and the fix."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from . import api

KINDS: dict[str, type[api.TrainingJob] | type[api.InferenceService]] = {
    "TrainingJob": api.TrainingJob,
    "InferenceService": api.InferenceService,
}

_HINTS = {
    "extra_forbidden": "unknown field: remove it or check its spelling (`kubectl explain` lists the fields)",
    "missing": "required field is missing",
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


def _loc(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def format_errors(err: ValidationError) -> list[str]:
    messages: list[str] = []
    for e in err.errors():
        where = _loc(e["loc"])
        if e["type"] == "value_error" and isinstance(e.get("ctx", {}).get("error"), api.RuleViolation):
            messages.extend(e["ctx"]["error"].errors)
            continue
        msg = _HINTS.get(e["type"], e["msg"])
        if e["type"] not in _HINTS and "input" in e and not isinstance(e["input"], dict | list):
            msg += f" (got {e['input']!r})"
        messages.append(f"{where}: {msg}" if where else msg)
    return messages


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
        raise InvalidResource(f"{source}: {kind}/{name}", format_errors(err)) from None


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
