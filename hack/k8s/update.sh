#!/usr/bin/env bash
# Re-pin the Go build scaffolding under hack/k8s/ to the versions in
# hack/k8s/versions.sh: regenerates kubernetes/go.mod from the published
# k8s.io/kubernetes go.mod (gen-kubernetes-gomod.sh), sets the etcd/kwok/helm
# requirements and runs `go mod tidy` everywhere. Commit the result.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/versions.sh
source "$HERE/versions.sh"
command -v go >/dev/null || PATH=/usr/local/go/bin:$PATH
export GOFLAGS=-mod=mod
"$HERE/gen-kubernetes-gomod.sh" "$KUBE_VERSION" > "$HERE/kubernetes/go.mod.new"
mv "$HERE/kubernetes/go.mod.new" "$HERE/kubernetes/go.mod"
rm -f "$HERE/kubernetes/go.sum"
sed -i -E "s#(go.etcd.io/etcd/server/v3) v[^ ]+#\1 $ETCD_VERSION#" "$HERE/etcd/go.mod"
sed -i -E "s#(sigs.k8s.io/kwok) v[^ ]+#\1 $KWOK_VERSION#" "$HERE/kwok/go.mod"
sed -i -E "s#(helm.sh/helm/v3) v[^ ]+#\1 $HELM_VERSION#" "$HERE/helm/go.mod"
for d in etcd kubernetes kwok helm; do
  echo "go mod tidy in hack/k8s/$d" >&2
  (cd "$HERE/$d" && go mod tidy)
done
