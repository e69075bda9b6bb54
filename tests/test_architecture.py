"""The layering in DESIGN.md: which package may import what. Checked on the source (every import statement,
also those inside functions), so a lazy import cannot sneak past, and once more at run time."""

from __future__ import annotations

import ast
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
# pure modules (API models, renderers, CRD generation, status logic) never talk to the API server
PURE = ["operator/api.py", "operator/crdgen.py", "operator/load.py", "operator/render", "operator/status",
        "operator/status.py"]
PURE_FORBIDDEN = ("aiaas.operator.k8s", "kubernetes", "kopf")


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


def test_pure_modules_never_touch_the_api_server() -> None:
    files: list[Path] = []
    for entry in PURE:
        p = REPO / entry
        files += sorted(p.rglob("*.py")) if p.is_dir() else ([p] if p.exists() else [])
    assert len(files) >= 5
    assert violations(files, PURE_FORBIDDEN) == []


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
