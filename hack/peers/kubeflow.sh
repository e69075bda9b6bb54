#!/usr/bin/env bash
# Kubeflow's training operator, the peer bench/operator_bench.py --peer kubeflow
# measures aiaas against (docs/performance.md, "Against Kubeflow's training
# operator"). Not part of `hack/cluster.sh build` or CI.
#
#   hack/peers/kubeflow.sh build      build its cmd/training-operator.v1 from the
#                                     Go module proxy (version: hack/peers/kubeflow/go.mod;
#                                     cached by content in $AIAAS_CACHE/peers/bin, niced)
#                                     and copy its PyTorchJob CRD next to it
#   hack/peers/kubeflow.sh install    on the cluster of hack/cluster.sh (same env):
#                                     the CRD, namespace kubeflow, the webhook's cert
#                                     Secret and files, its ValidatingWebhookConfiguration
#   hack/peers/kubeflow.sh run [flags]  exec the operator: its defaults, PyTorchJob only,
#                                     the admin kubeconfig, local ports (+AIAAS_PORT_OFFSET)
#   hack/peers/kubeflow.sh uninstall  remove what install made (not the CRD)
#   hack/peers/kubeflow.sh binary     print the binary's path
#
# The webhook, satisfied locally: v1.8.1 runs cert-controller's rotator on the
# Secret kubeflow/training-operator-webhook-cert and waits for the certificate in
# /tmp/k8s-webhook-server/serving-certs (in a pod, the Secret's volume). install
# puts one CA and server certificate (names training-operator.kubeflow.svc,
# localhost, 127.0.0.1) in both, so the rotator finds them valid and keeps them,
# and registers the PyTorchJob webhook at https://127.0.0.1:<port>: the apiserver
# calls it for every PyTorchJob create, as in a deployment.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/../cluster.sh
source "$HERE/../cluster.sh"

MODULE=github.com/kubeflow/training-operator
VERSION=$(grep -oE "$MODULE v[0-9][^ ]*" "$HERE/kubeflow/go.mod" | cut -d' ' -f2)
PEER_DIR=$CACHE/peers  # beside cluster.sh's TOOLS_DIR: its own build lock, work dirs and bin/
BIN=${AIAAS_KUBEFLOW_BIN:-$PEER_DIR/bin/training-operator.v1}
CRD=$PEER_DIR/kubeflow-$VERSION/kubeflow.org_pytorchjobs.yaml
NS=kubeflow  # its MY_POD_NAMESPACE default
CERT_DIR=/tmp/k8s-webhook-server/serving-certs  # fixed in its pkg/cert
KF_PKI=$CLUSTER_DIR/kubeflow-pki
WEBHOOK_PORT=${AIAAS_KUBEFLOW_WEBHOOK_PORT:-$((17463 + OFF))}
METRICS_PORT=${AIAAS_KUBEFLOW_METRICS_PORT:-$((17280 + OFF))}
PROBE_PORT=${AIAAS_KUBEFLOW_PROBE_PORT:-$((17281 + OFF))}

kf_build() {
  GO_BIN=$(find_go)
  mkdir -p "$PEER_DIR"
  exec 9>"$PEER_DIR/.build.lock"
  flock 9
  renice -n 10 -p $$ >/dev/null  # a CI run shares the machine; go inherits it
  TOOLS_DIR=$PEER_DIR BIN_DIR=$PEER_DIR/bin MODULE_SRC=$HERE/kubeflow \
    build_module kubeflow "$VERSION" "" "$MODULE/cmd/training-operator.v1"
  if [[ ! -s $CRD ]]; then
    local dir
    dir=$(cd "$PEER_DIR" && GOFLAGS=-mod=mod "$GO_BIN" mod download -json "$MODULE@$VERSION" |
      sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    mkdir -p "$(dirname "$CRD")"
    cp "$dir/manifests/base/crds/$(basename "$CRD")" "$CRD"; chmod u+w "$CRD"
  fi
  flock -u 9
  echo "$BIN"
}

# A CA (PKCS#1 key: the rotator parses it so) and a server certificate its rotator accepts.
kf_certs() {
  [[ -s $KF_PKI/tls.crt ]] && return 0
  mkdir -p "$KF_PKI"
  (
    cd "$KF_PKI"
    umask 077
    openssl genrsa -traditional -out ca.key 2048 2>/dev/null
    openssl req -x509 -new -key ca.key -out ca.crt -days 3650 -subj "/O=training-operator/CN=training-operator-ca" \
      -addext "subjectAltName=DNS:training-operator-ca" 2>/dev/null
    openssl genrsa -traditional -out tls.key 2048 2>/dev/null
    openssl req -new -key tls.key -out tls.csr -subj "/CN=training-operator.$NS.svc" 2>/dev/null
    printf '%s\n' 'basicConstraints=CA:FALSE' 'keyUsage=critical,digitalSignature,keyEncipherment' \
      'extendedKeyUsage=serverAuth' "subjectAltName=DNS:training-operator.$NS.svc,DNS:localhost,IP:127.0.0.1" > tls.ext
    openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out tls.crt -days 3650 \
      -extfile tls.ext 2>/dev/null
    rm -f tls.csr tls.ext ca.srl
  )
}

webhook_yaml() {
  cat <<EOF
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata:
  name: validator.training-operator.kubeflow.org
webhooks:
- name: validator.pytorchjob.training-operator.kubeflow.org
  admissionReviewVersions: [v1]
  clientConfig:
    url: https://127.0.0.1:$WEBHOOK_PORT/validate-kubeflow-org-v1-pytorchjob
    caBundle: $(base64 -w0 < "$KF_PKI/ca.crt")
  failurePolicy: Fail
  sideEffects: None
  rules:
  - {apiGroups: [kubeflow.org], apiVersions: [v1], operations: [CREATE, UPDATE], resources: [pytorchjobs]}
EOF
}

kf_install() {
  [[ -s $CRD ]] || die "no $CRD: run hack/peers/kubeflow.sh build first"
  kctl apply --server-side --force-conflicts -f "$CRD" >/dev/null
  wait_for "the PyTorchJob CRD" 60 kctl wait --for=condition=Established crd/pytorchjobs.kubeflow.org --timeout=5s
  kf_certs
  kctl create namespace "$NS" --dry-run=client -o yaml | kctl apply -f - >/dev/null
  kctl -n "$NS" create secret generic training-operator-webhook-cert --dry-run=client -o yaml \
    --from-file="$KF_PKI/ca.crt" --from-file="$KF_PKI/ca.key" --from-file="$KF_PKI/tls.crt" \
    --from-file="$KF_PKI/tls.key" | kctl apply -f - >/dev/null
  mkdir -p "$CERT_DIR"
  cp "$KF_PKI/tls.crt" "$KF_PKI/tls.key" "$CERT_DIR/"
  webhook_yaml | kctl apply -f - >/dev/null
  log "kubeflow training operator $VERSION installed: CRD, namespace $NS, webhook at 127.0.0.1:$WEBHOOK_PORT"
}

kf_uninstall() {
  kctl delete validatingwebhookconfiguration validator.training-operator.kubeflow.org --ignore-not-found >/dev/null
  kctl delete namespace "$NS" --ignore-not-found --wait=false >/dev/null
  rm -rf "$CERT_DIR" "$KF_PKI"
  rmdir "$(dirname "$CERT_DIR")" 2>/dev/null || true
}

kf_run() {
  [[ -x $BIN ]] || die "no $BIN: run hack/peers/kubeflow.sh build first"
  exec env MY_POD_NAMESPACE="$NS" KUBECONFIG="${KUBECONFIG:-$KUBECONFIG_PATH}" "$BIN" \
    --enable-scheme=pytorchjob --webhook-server-port="$WEBHOOK_PORT" \
    --metrics-bind-address="127.0.0.1:$METRICS_PORT" --health-probe-bind-address="127.0.0.1:$PROBE_PORT" "$@"
}

cmd=${1:-}
shift || true
case $cmd in
  build) kf_build ;;
  install) kf_install ;;
  uninstall) kf_uninstall ;;
  run) kf_run "$@" ;;
  binary) echo "$BIN" ;;
  metrics-url) echo "http://127.0.0.1:$METRICS_PORT/metrics" ;;
  *) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
