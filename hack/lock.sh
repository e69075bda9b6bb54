#!/usr/bin/env bash
# Re-lock: resolve the newest versions that pyproject.toml allows in a brand-new venv and write them to
# constraints.txt, the one list of tested versions that hack/setup.sh, .ci/run and the images install.
#
#   hack/lock.sh                 # writes constraints.txt (then run `make test` before you commit it)
#   hack/lock.sh --upgrade NAME  # same, for documentation: every run resolves the newest allowed versions
#
# The venv is thrown away afterwards; the lock lists every distribution of every extra (operator, trainer,
# server, dev) except aiaas itself. Linux-only wheels (nvidia-*, triton) are listed with environment markers so
# pip skips them elsewhere.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
"$PYTHON" -I -m venv "$TMP/venv"
"$TMP/venv/bin/python" -I -m pip install -q --upgrade pip >&2
(cd / && "$TMP/venv/bin/python" -I -m pip install -q "$ROOT[operator,trainer,server,dev]" >&2)
{
  echo "# Tested versions of every dependency of aiaas[operator,trainer,server,dev] (Python $("$TMP/venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')): written by hack/lock.sh;"
  echo "# installed with 'pip install -c constraints.txt' by hack/setup.sh, .ci/run and the images. Do not edit by hand."
  "$TMP/venv/bin/python" -I -m pip freeze --exclude-editable | grep -v '^aiaas[= @]' | \
    sed -E 's/^((nvidia-|triton==).*)$/\1 ; sys_platform == "linux"/'
} > "$ROOT/constraints.txt"
echo "wrote $ROOT/constraints.txt ($(grep -vc '^#' "$ROOT/constraints.txt") pins)" >&2
