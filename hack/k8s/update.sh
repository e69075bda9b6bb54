#!/usr/bin/env bash
# Re-pin the Go build scaffolding under hack/k8s/ to the versions in
# hack/k8s/versions.sh: regenerates kubernetes/go.mod from the published
# k8s.io/kubernetes go.mod (gen-kubernetes-gomod.sh), sets the etcd/kwok/helm
# requirements (and the real node's: containerd, runc, coredns,
# local-path-provisioner, kube-network-policies: its patch must still apply) and
# runs `go mod tidy` everywhere. Commit the result.
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
sed -i -E "s#(github.com/containerd/containerd/v2) v[^ ]+#\1 $CONTAINERD_VERSION#" "$HERE/containerd/go.mod"
sed -i -E "s#(github.com/opencontainers/runc) v[^ ]+#\1 $RUNC_VERSION#" "$HERE/runc/go.mod"
sed -i -E "s#(github.com/coredns/coredns) v[^ ]+#\1 $COREDNS_VERSION#" "$HERE/coredns/go.mod"
sed -i -E "s#(github.com/rancher/local-path-provisioner) v[^ ]+#\1 $LOCAL_PATH_PROVISIONER_VERSION#" "$HERE/local-path-provisioner/go.mod"
for d in etcd kubernetes kwok helm containerd runc coredns local-path-provisioner; do
  echo "go mod tidy in hack/k8s/$d" >&2
  (cd "$HERE/$d" && go mod tidy)
done
# kube-network-policies builds a patched copy of its module in ./upstream (hack/cluster.sh patched_source)
sed -i -E "s#(sigs.k8s.io/kube-network-policies) v[^ ]+#\1 $KUBE_NETWORK_POLICIES_VERSION#" "$HERE/kube-network-policies/go.mod"
knp=$HERE/kube-network-policies
dir=$(go mod download -json "sigs.k8s.io/kube-network-policies@$KUBE_NETWORK_POLICIES_VERSION" |
  sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
rm -rf "$knp/upstream"; cp -r "$dir" "$knp/upstream"; chmod -R u+w "$knp/upstream"
(cd "$knp/upstream" && GIT_CEILING_DIRECTORIES=$knp git apply -p1 ../kube-network-policies.patch)
echo "go mod tidy in hack/k8s/kube-network-policies" >&2
(cd "$knp" && go mod tidy)
rm -rf "$knp/upstream"
