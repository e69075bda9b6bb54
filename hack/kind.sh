#!/usr/bin/env bash
# A kind cluster for aiaas (for users with Docker/Podman; the Docker-free
# alternative is hack/cluster.sh).
#
#   hack/kind.sh up       create the cluster from deploy/kind/cluster.yaml (or reuse
#                         it), advertise fake nvidia.com/gpu on the GPU workers,
#                         apply crds/, print `export KUBECONFIG=...`
#   hack/kind.sh down     delete the cluster and its kubeconfig
#   hack/kind.sh crds     (re)apply crds/ and wait until they are Established
#   hack/kind.sh kubeconfig  print the kubeconfig path
#
# Environment: AIAAS_KIND_NAME (aiaas), AIAAS_KIND_KUBECONFIG
# (~/.cache/aiaas/kind-<name>.kubeconfig), KIND_NODE_IMAGE (kind's default),
# AIAAS_KIND_GPUS_PER_NODE (8), KIND (kind), KUBECTL (kubectl, else the one
# built by hack/cluster.sh build).
#
# Then run the e2e tests against it:
#   AIAAS_E2E_USE_EXISTING=1 KUBECONFIG=$(hack/kind.sh kubeconfig) pytest -m e2e tests/e2e
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=${AIAAS_KIND_NAME:-aiaas}
CACHE=${AIAAS_CACHE:-$HOME/.cache/aiaas}
KCFG=${AIAAS_KIND_KUBECONFIG:-$CACHE/kind-$NAME.kubeconfig}
GPUS=${AIAAS_KIND_GPUS_PER_NODE:-8}
KIND=${KIND:-kind}

log() { printf '[kind] %s\n' "$*" >&2; }
die() { printf '[kind] error: %s\n' "$*" >&2; exit 1; }

find_kubectl() {
  if [[ -n ${KUBECTL:-} ]]; then echo "$KUBECTL"; return; fi
  if command -v kubectl >/dev/null 2>&1; then command -v kubectl; return; fi
  local b; b=$("$ROOT/hack/cluster.sh" bin-dir)/kubectl
  [[ -x $b ]] && { echo "$b"; return; }
  die "kubectl not found (install it, or run hack/cluster.sh build)"
}

exists() { "$KIND" get clusters 2>/dev/null | grep -qx "$NAME"; }

k() { "$KUBECTL_BIN" --kubeconfig "$KCFG" "$@"; }

apply_crds() {
  compgen -G "$ROOT/crds/*.yaml" >/dev/null || { log "no crds/*.yaml to apply"; return 0; }
  k apply --server-side --force-conflicts --field-manager=aiaas -f "$ROOT/crds/"
  k wait --for=condition=Established --timeout=60s -f "$ROOT/crds/"
}

fake_gpus() {
  local n
  for n in $(k get nodes -l nvidia.com/gpu.present=true -o name); do
    k patch "$n" --subresource=status --type=merge \
      -p "{\"status\":{\"capacity\":{\"nvidia.com/gpu\":\"$GPUS\"},\"allocatable\":{\"nvidia.com/gpu\":\"$GPUS\"}}}" >/dev/null
    log "${n#node/}: nvidia.com/gpu=$GPUS (fake)"
  done
}

up() {
  command -v "$KIND" >/dev/null 2>&1 || die "kind not found (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"
  KUBECTL_BIN=$(find_kubectl)
  mkdir -p "$(dirname "$KCFG")"
  if exists; then
    log "kind cluster '$NAME' exists; reusing it"
    "$KIND" get kubeconfig --name "$NAME" > "$KCFG"
  else
    local args=(create cluster --name "$NAME" --config "$ROOT/deploy/kind/cluster.yaml" --kubeconfig "$KCFG" --wait 120s)
    [[ -n ${KIND_NODE_IMAGE:-} ]] && args+=(--image "$KIND_NODE_IMAGE")
    "$KIND" "${args[@]}"
  fi
  chmod 600 "$KCFG"
  k wait --for=condition=Ready node --all --timeout=120s >/dev/null
  fake_gpus
  apply_crds
  echo "export KUBECONFIG=$KCFG"
}

down() {
  command -v "$KIND" >/dev/null 2>&1 || die "kind not found"
  if exists; then "$KIND" delete cluster --name "$NAME"; else log "no kind cluster '$NAME'"; fi
  rm -f "$KCFG"
}

case ${1:-up} in
  up) up ;;
  down) down ;;
  crds) KUBECTL_BIN=$(find_kubectl); apply_crds ;;
  kubeconfig) echo "$KCFG" ;;
  -h|--help|help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' ;;
  *) die "usage: $0 up|down|crds|kubeconfig" ;;
esac
