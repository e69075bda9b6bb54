# shellcheck shell=bash
# Pinned versions of the local control-plane toolchain (hack/cluster.sh).
# Changing a version here changes the cache key: binaries are rebuilt into
# ${AIAAS_CACHE:-$HOME/.cache/aiaas}/k8s-<KUBE_VERSION>-<hash>/bin.
# Each may be overridden from the environment.
: "${KUBE_VERSION:=v1.36.3}"   # k8s.io/kubernetes (kube-apiserver, -controller-manager, -scheduler, kubectl, kubelet, kube-proxy)
: "${ETCD_VERSION:=v3.6.16}"   # go.etcd.io/etcd/server/v3
: "${KWOK_VERSION:=v0.8.0}"    # sigs.k8s.io/kwok
: "${HELM_VERSION:=v3.21.4}"   # helm.sh/helm/v3 (built against k8s.io/* v0.36, like the server)
# The real node (hack/node/node.sh):
: "${CONTAINERD_VERSION:=v2.4.2}"   # github.com/containerd/containerd/v2 (containerd, its runc shim, ctr)
: "${RUNC_VERSION:=v1.3.5}"         # github.com/opencontainers/runc (cgo, libseccomp)
: "${COREDNS_VERSION:=v1.15.0}"     # github.com/coredns/coredns (only the plugins in hack/k8s/coredns/main.go)
: "${LOCAL_PATH_PROVISIONER_VERSION:=v0.0.30}"  # github.com/rancher/local-path-provisioner
: "${KUBE_NETWORK_POLICIES_VERSION:=v0.8.0}"   # sigs.k8s.io/kube-network-policies, patched (hack/k8s/kube-network-policies/)
