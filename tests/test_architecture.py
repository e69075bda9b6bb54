"""The layering in docs/architecture.md: which package and which operator module may import what. Checked on
the source (every import statement, also those inside functions), so a lazy import cannot sneak past, and once
more at run time. The operator's rooms are read from the table in docs/architecture.md, so the document and the
code cannot drift apart: a module missing from it, or listed but gone, fails here."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# folder -> module prefixes its code must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "operator": ("torch", "numpy", "sklearn", "aiaas.trainer", "aiaas.server"),
    "contract": ("torch", "numpy", "kubernetes", "kopf", "aiaas.operator", "aiaas.trainer", "aiaas.server"),
    "trainer": ("kubernetes", "kopf", "aiaas.operator", "aiaas.server"),
    "server": ("kubernetes", "kopf", "aiaas.operator"),
}
PURE_FORBIDDEN = ("aiaas.operator.k8s", "kubernetes", "kopf")
ARCHITECTURE = REPO / "docs" / "architecture.md"
ROW = re.compile(r"^\| (?P<modules>`operator/[^|]+) \| (?P<what>[^|]+) \| (?P<imports>[^|]+) \|$")


def rooms() -> dict[str, tuple[bool, set[str]]]:
    """docs/architecture.md's table: module path -> (pure?, operator modules it may import)."""
    out: dict[str, tuple[bool, set[str]]] = {}
    for line in ARCHITECTURE.read_text().splitlines():
        m = ROW.match(line)
        if not m:
            continue
        allowed = {a.strip() for a in m["imports"].split(",") if a.strip() not in ("—", "")}
        for module in re.findall(r"`(operator/[^`]+)`", m["modules"]):
            out[module.rstrip("/")] = ("**pure**" in m["what"], allowed)
    return out


def module_files(room: str) -> list[Path]:
    p = REPO / room
    return sorted(p.rglob("*.py")) if p.is_dir() else [p]


def package_of(path: Path) -> str:
    """operator/render/common.py -> aiaas.operator.render (folders map to aiaas.<folder>)."""
    return ".".join(["aiaas", *path.parent.relative_to(REPO).parts])


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    package = package_of(path)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = (node.module or "") if not node.level else (f"{base}.{node.module}" if node.module else base)
            # `from . import k8s` imports the module aiaas.operator.k8s: record module.name too
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return found


def violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for f in files:
        for line, module in imports_of(f):
            if any(module == p or module.startswith(p + ".") for p in forbidden):
                bad.append(f"{f.relative_to(REPO)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layering(folder: str) -> None:
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, folder
    assert violations(files, FORBIDDEN[folder]) == []


def test_the_architecture_document_lists_every_operator_module() -> None:
    documented = set(rooms())
    real = {str(p.relative_to(REPO)) for p in (REPO / "operator").glob("*.py")} | {
        str(p.relative_to(REPO)) for p in (REPO / "operator").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert documented == real, "update the table in docs/architecture.md"


def test_pure_modules_never_touch_the_api_server() -> None:
    files = [f for room, (pure, _) in rooms().items() if pure for f in module_files(room)]
    assert len(files) >= 10
    assert violations(files, PURE_FORBIDDEN) == []


def test_operator_modules_import_only_what_their_room_allows() -> None:
    bad = []
    for room, (_, allowed) in rooms().items():
        own = room.removeprefix("operator/").removesuffix(".py")
        for f in module_files(room):
            for line, module in imports_of(f):
                if not module.startswith("aiaas.operator."):
                    continue
                top = module.removeprefix("aiaas.operator.").split(".")[0]
                if top != own and top not in allowed and f"{top}" not in ("__init__",):
                    bad.append(f"{f.relative_to(REPO)}:{line} imports {module} (allowed: {sorted(allowed)})")
    assert bad == [], "import against the flow, or update docs/architecture.md"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    f = REPO / "operator" / "_probe_for_test.py"
    f.write_text("def f():\n    import torch\n    from .k8s import x\n    from . import k8s\n")
    try:
        assert violations([f], ("torch",)) == ["operator/_probe_for_test.py:2 imports torch"]
        assert [v.split(" imports ")[0] for v in violations([f], ("aiaas.operator.k8s",))] == [
            "operator/_probe_for_test.py:3", "operator/_probe_for_test.py:3", "operator/_probe_for_test.py:4"]
    finally:
        f.unlink()


def test_operator_cli_does_not_load_torch_at_run_time() -> None:
    code = ("import sys, aiaas.operator.cli, aiaas.operator.render, aiaas.operator.crdgen; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
