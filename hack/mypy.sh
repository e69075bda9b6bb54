#!/usr/bin/env bash
# mypy over the aiaas packages. The repo maps folders to packages (operator/ -> aiaas.operator, a name that
# would shadow the standard library's `operator` if checked as a top-level folder), which mypy cannot read from
# pyproject, so we check through a tree of symlinks laid out as the installed package.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TREE=$ROOT/.aiaas/typecheck
rm -rf "$TREE"; mkdir -p "$TREE/aiaas"
ln -s "$ROOT/aiaas/__init__.py" "$TREE/aiaas/__init__.py"
for pkg in contract operator trainer server; do ln -s "$ROOT/$pkg" "$TREE/aiaas/$pkg"; done
cd "$ROOT"
exec mypy --config-file "$ROOT/pyproject.toml" "$@" "$TREE/aiaas"
