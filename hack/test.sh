#!/usr/bin/env bash
# Set up and run every check: lint (ruff), types (mypy), then the whole pytest suite — unit tests, real
# torchrun trainings, real HTTP servers, the built wheel, the container images run with runc, and end-to-end
# tests against a real Kubernetes control plane that the e2e fixture starts (hack/cluster.sh) and stops.
# Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Never put the current directory on sys.path: the repo's operator/ would shadow the standard library's.
export PYTHONSAFEPATH=1
BIN=$("$ROOT/hack/setup.sh" --test)
export PATH="$BIN:$("$ROOT/hack/cluster.sh" bin-dir):$PATH"
cd "$ROOT"
# The images (buildah, as root; cached by content): built here, outside pytest's per-test timeout.
if [ "$(id -u)" = 0 ]; then
  echo "== images"; "$ROOT/hack/images.sh" build
else
  echo "== images: skipped (buildah and runc need root here); the image tests will skip"
fi
echo "== ruff"; ruff check .
echo "== mypy"; "$ROOT/hack/mypy.sh"
echo "== pytest"; exec pytest "$@"
