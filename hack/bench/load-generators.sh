#!/usr/bin/env bash
# The independent load generators of bench/server_bench.py --client go, built from
# the Go module proxy (not part of CI):
#
#   hack/bench/load-generators.sh build   go install hey (HTTP) and ghz (gRPC) at the
#                                         versions below into $AIAAS_CACHE/bench/bin
#                                         (the module checksums are verified by go);
#                                         prints that directory
#   hack/bench/load-generators.sh bin-dir print it (empty output: not built yet)
set -euo pipefail

TOOLS=(github.com/rakyll/hey@v0.1.4 github.com/bojand/ghz/cmd/ghz@v0.93.0)
BIN=${AIAAS_CACHE:-$HOME/.cache/aiaas}/bench/bin

case ${1:-} in
  build)
    go=$(command -v go || echo /usr/local/go/bin/go)
    mkdir -p "$BIN"
    for tool in "${TOOLS[@]}"; do
      name=${tool%@*}; name=${name##*/}
      stamp=$BIN/.$name.version
      if [[ ! -x $BIN/$name || $(cat "$stamp" 2>/dev/null) != "$tool" ]]; then
        (cd /tmp && GOBIN=$BIN GOFLAGS=-mod=mod nice -n 10 "$go" install "$tool")
        echo "$tool" > "$stamp"
      fi
    done
    echo "$BIN" ;;
  bin-dir)
    [[ -x $BIN/hey && -x $BIN/ghz ]] && echo "$BIN" || true ;;
  *)
    echo "usage: $0 build|bin-dir" >&2; exit 2 ;;
esac
