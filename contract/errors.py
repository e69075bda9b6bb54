"""How a validation error reads, wherever it is shown: ``aiaas validate``, a resource's status, the trainer.

One message per problem, each naming the field (``spec.topology.nodes``, ``volumes[0].name``) and, where it
helps, the fix or the value that was given. Imports only pydantic.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import ValidationError

HINTS = {
    "extra_forbidden": "unknown field: remove it or check its spelling (`kubectl explain` lists the fields)",
    "missing": "required field is missing",
}


def field_path(loc: Iterable[int | str]) -> str:
    """('spec', 'volumes', 0, 'name') -> 'spec.volumes[0].name'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_errors(err: ValidationError) -> list[str]:
    """One message per problem. A validator that raises an error with an ``errors`` list (several rules
    broken at once) contributes each of them as it is."""
    messages: list[str] = []
    for e in err.errors():
        several = getattr((e.get("ctx") or {}).get("error"), "errors", None)
        if e["type"] == "value_error" and isinstance(several, list):
            messages.extend(str(m) for m in several)
            continue
        msg = HINTS.get(e["type"], str(e["msg"]).removeprefix("Value error, "))
        if e["type"] not in HINTS and "input" in e and not isinstance(e["input"], dict | list):
            msg += f" (got {e['input']!r})"
        where = field_path(e["loc"])
        messages.append(f"{where}: {msg}" if where else msg)
    return messages


def one_line(err: ValidationError) -> str:
    """The messages of :func:`validation_errors` on one line (for a status message or an exception)."""
    return "; ".join(validation_errors(err))
