#!/usr/bin/env bash
# The main job: set up, then train LeNet-5 on scikit-learn's digits with the TrainingJob in
# examples/01-cnn-digits.yaml, run locally (no cluster) from the very pod template the operator renders.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Never put the current directory on sys.path: the repo's operator/ would shadow the standard library's.
export PYTHONSAFEPATH=1
BIN=$("$ROOT/hack/setup.sh")
exec "$BIN/aiaas" run -f "${1:-$ROOT/examples/01-cnn-digits.yaml}" "${@:2}"
