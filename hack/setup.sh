#!/usr/bin/env bash
# Set up the Python environment aiaas needs, idempotently, and print the venv's bin directory.
#
#   hack/setup.sh           venv with aiaas (editable) + operator, trainer, server and dev extras
#   hack/setup.sh --test    also what the tests need outside Python: promtool/prometheus (Debian package
#                           `prometheus`) and the Kubernetes binaries (hack/cluster.sh build)
#
# The venv lives outside the clone, keyed by Python version (AIAAS_VENV overrides; `AIAAS_VENV=/tmp/new
# hack/setup.sh` makes a brand-new one), so the large CUDA build of torch that PyPI serves for Linux is installed
# once per machine. Versions come from constraints.txt (the tested lock; hack/lock.sh updates it), so every
# machine gets what CI tested. A stamp of pyproject.toml and constraints.txt skips pip when nothing changed.
set -euo pipefail
# The repo's operator/ folder would shadow the standard library's `operator` for any Python started here with
# the current directory on sys.path: -I (isolated mode) keeps it off.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
PYVER=$("$PYTHON" -I -c 'import sys; print("%d.%d" % sys.version_info[:2])')
CACHE=${AIAAS_CACHE:-$HOME/.cache/aiaas}
VENV=${AIAAS_VENV:-$CACHE/venv-py$PYVER}
EXTRAS=${AIAAS_EXTRAS:-operator,trainer,server,dev}
log() { echo "[setup] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.aiaas-stamp"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT/constraints.txt" | sha256sum | cut -c1-16)-$EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing aiaas[$EXTRAS] into $VENV (the first time this downloads torch: a few minutes)"
  "$VENV/bin/python" -I -m pip install -q --disable-pip-version-check --upgrade pip >&2
  "$VENV/bin/python" -I -m pip install -q --disable-pip-version-check -c "$ROOT/constraints.txt" -e "$ROOT[$EXTRAS]" >&2
  echo "$want" > "$stamp"
fi
# The editable install points at one checkout; re-point it when this is another clone (cheap, no deps).
where=$("$VENV/bin/python" -I -c 'import aiaas.operator, os; print(os.path.dirname(os.path.dirname(aiaas.operator.__file__)))' 2>/dev/null || true)
if [ "$where" != "$ROOT" ]; then
  log "pointing the editable install at $ROOT"
  "$VENV/bin/python" -I -m pip install -q --disable-pip-version-check --no-deps -e "$ROOT" >&2
fi

if [ "${1:-}" = "--test" ]; then
  if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    log "installing Debian's prometheus package (promtool and the server, for the monitoring tests)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >&2
    # the package starts a service where systemd runs; the tests start their own on other ports
    $SUDO systemctl stop prometheus >/dev/null 2>&1 || true
  fi
  "$ROOT/hack/cluster.sh" build >&2
fi
echo "$VENV/bin"
