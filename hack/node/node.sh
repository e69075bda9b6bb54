# shellcheck shell=bash
# The real worker node of the local cluster, sourced by hack/cluster.sh (it
# uses that script's variables and helpers: BIN_DIR, CLUSTER_DIR, PKI, start,
# stop, alive, kctl, wait_up, ...). What lives here: the node's build list,
# configuration files, images, start-up, status and a tear-down that leaves
# nothing behind. What must not: anything about the control plane or kwok.
#
# One real node per machine (its network, iptables chains and cgroups are
# machine-wide): kubelet, containerd + runc, CNI (Debian's plugins: bridge,
# host-local, portmap; containerd sets up each pod's lo with loopback), kube-proxy (iptables), CoreDNS, the
# local-path volume provisioner and kube-network-policies (NetworkPolicy enforcement: the first packet of each
# connection to or from a pod that a policy selects goes to nfqueue NETPOL_QUEUE, where it decides; see
# hack/k8s/kube-network-policies/kube-network-policies.patch for why it is patched) run as host processes. Pods live on the bridge
# NODE_BRIDGE in POD_CIDR; the node's address NODE_IP is the bridge's own
# (the pods' gateway; `up` creates the bridge: this kernel has no dummy
# interfaces, and CNI's bridge plugin allows no second IPv4 address on it).
# No traffic leaves the machine.

NODE_NAME=aiaas-node
NODE_LABEL=aiaas.dev/real-node
NODE_BRIDGE=aiaas-cni0
POD_CIDR=10.244.0.0/24
NODE_IP=10.244.0.1
CNI_NETWORK=aiaas-pods
NODE_CGROUP_ROOT=/aiaas-node
NODE_OWNER_FILE=/run/aiaas-real-node.owner
NODE_COMPONENTS=(containerd kubelet kube-proxy kube-network-policies socat coredns local-path-provisioner)
NODE_IMAGE_BASE=localhost/aiaas-node-base:local   # /pause (sandbox) and /local-path-helper
NODE_IMAGE_TEST=localhost/aiaas-node-test:local   # /nodetest (tests/e2e/node)
CNI_BIN_DIR=/usr/lib/cni
LOCAL_PATH_NS=local-path-storage
# kube-network-policies: its nftables table (inet family), nfqueue number and metrics address (machine-wide,
# like the node's other addresses: one real node per machine).
NETPOL_TABLE=kube-network-policies
NETPOL_QUEUE=100
NETPOL_METRICS_PORT=9080
# Host directories outside the cluster dir that the node writes into (fixed
# paths in kubelet, containerd's shims, libcni): `down` removes its entries
# there, and each directory that `up` found missing.
POD_LOG_LINKS=/var/log/containers
CNI_CACHE=/var/lib/cni
SHIM_SOCKETS=/run/containerd
HOST_DIRS=("$POD_LOG_LINKS" "$CNI_CACHE" "$SHIM_SOCKETS")

node_dir() { echo "${1:-$CLUSTER_DIR}/node"; }

# --- is it wanted, can this host run it --------------------------------------

# Why this host cannot run a real node (empty when it can).
node_blocker() {
  (( $(id -u) == 0 )) || { echo "not root"; return; }
  [[ -d /sys/fs/cgroup/cpu || -f /sys/fs/cgroup/cgroup.controllers ]] || { echo "no cgroups mounted"; return; }
  local t
  for t in ip gcc buildah; do command -v "$t" >/dev/null || { echo "$t not installed"; return; }; done
}

# AIAAS_REAL_NODE: 1 = required, 0 = kwok only, unset/auto = when the host can.
real_node_wanted() {
  case ${AIAAS_REAL_NODE:-auto} in
    0|false|no) return 1 ;;
    1|true|yes)
      local why; why=$(node_blocker)
      [[ -z $why ]] || die "AIAAS_REAL_NODE=1 but this host cannot run a real node: $why"
      why=$(node_owner_running)
      [[ -z $why ]] || die "AIAAS_REAL_NODE=1 but the cluster in $why runs this machine's real node (one per machine)"
      ;;
    auto)
      local why owner; why=$(node_blocker)
      [[ -z $why ]] || { log "no real node: $why (AIAAS_REAL_NODE=0 silences this)"; return 1; }
      owner=$(node_owner_running)
      [[ -z $owner ]] || { log "no real node: the cluster in $owner runs this machine's real node (AIAAS_REAL_NODE=0 silences this)"; return 1; }
      ;;
    *) die "AIAAS_REAL_NODE must be 0, 1 or auto, not '${AIAAS_REAL_NODE}'" ;;
  esac
}

# Whether `build` builds the node's binaries: as real_node_wanted, except that another cluster's running real
# node does not matter (building touches nothing of it).
real_node_buildable() {
  local why
  case ${AIAAS_REAL_NODE:-auto} in
    0|false|no) return 1 ;;
    1|true|yes) why=$(node_blocker)
      [[ -z $why ]] || die "AIAAS_REAL_NODE=1 but this host cannot run a real node: $why" ;;
    auto) [[ -z $(node_blocker) ]] || return 1 ;;  # `up` says why (real_node_wanted)
    *) die "AIAAS_REAL_NODE must be 0, 1 or auto, not '${AIAAS_REAL_NODE}'" ;;
  esac
}

# Debian packages the node needs: runc's seccomp (cgo), the CNI plugins, iptables (kube-proxy, portmap) and
# nft (the probe for the nftables queue statement, and `down` removing kube-network-policies' table).
node_host_packages() {
  local missing=()
  [[ -f /usr/include/seccomp.h ]] || missing+=(libseccomp-dev)
  command -v socat >/dev/null || missing+=(socat)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v nft >/dev/null || missing+=(nftables)
  local p
  for p in bridge host-local loopback portmap; do
    [[ -x $CNI_BIN_DIR/$p ]] || { missing+=(containernetworking-plugins); break; }
  done
  ((${#missing[@]} == 0)) && return 0
  command -v apt-get >/dev/null || die "install ${missing[*]} (needed by the real node), or set AIAAS_REAL_NODE=0"
  log "installing ${missing[*]} with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 ||
    { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2; } ||
    die "apt-get install ${missing[*]} failed"
}

# --- build -------------------------------------------------------------------

node_build() {
  node_host_packages
  build_module containerd "$CONTAINERD_VERSION" \
    "-X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
    github.com/containerd/containerd/v2/cmd/containerd \
    github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 \
    github.com/containerd/containerd/v2/cmd/ctr
  BUILD_CGO=1 BUILD_TAGS=seccomp build_module runc "$RUNC_VERSION" \
    "-X main.version=${RUNC_VERSION#v}" github.com/opencontainers/runc
  build_module coredns "$COREDNS_VERSION" \
    "-X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" .
  build_module local-path-provisioner "$LOCAL_PATH_PROVISIONER_VERSION" \
    "-X main.VERSION=$LOCAL_PATH_PROVISIONER_VERSION" github.com/rancher/local-path-provisioner
  # the module's source from the Go module proxy plus hack/k8s/kube-network-policies/*.patch (build_module)
  build_module kube-network-policies "$KUBE_NETWORK_POLICIES_VERSION" "" sigs.k8s.io/kube-network-policies/cmd
  node_images
}

# Image archives FROM scratch (no registry is reachable), rebuilt when their
# sources change: the base image (pause + local-path helper) and the test image.
node_images() {
  local src=$ROOT/hack/node images=$TOOLS_DIR/images stamp
  mkdir -p "$images"
  stamp=$({ cat "$src"/images/*.c "$src"/nodetest/*.go; "$GO_BIN" env GOVERSION; gcc --version | head -1; } | sha256sum | cut -c1-16)
  [[ -f $images/node-base.tar && -f $images/node-test.tar && "$(cat "$images/.stamp" 2>/dev/null)" == "$stamp" ]] && return 0
  local work=$images/work; rm -rf "$work"; mkdir -p "$work"
  log "building the node images (pause, local-path helper, nodetest)"
  gcc -static -O2 -Wall -o "$work/pause" "$src/images/pause.c"
  gcc -static -O2 -Wall -o "$work/local-path-helper" "$src/images/local-path-helper.c"
  (cd "$src/nodetest" && CGO_ENABLED=0 GO111MODULE=on GOFLAGS= "$GO_BIN" build -trimpath -ldflags "-s -w" -o "$work/nodetest" main.go)
  scratch_image "$images/node-base.tar" "$NODE_IMAGE_BASE" /pause "$work/pause" "$work/local-path-helper"
  scratch_image "$images/node-test.tar" "$NODE_IMAGE_TEST" /nodetest "$work/nodetest"
  rm -rf "$work"
  echo "$stamp" > "$images/.stamp"
}

scratch_image() { # <archive> <name:tag> <entrypoint> <file>...
  local out=$1 name=$2 entry=$3 c f; shift 3
  c=$(buildah from scratch)
  for f in "$@"; do buildah copy "$c" "$f" "/${f##*/}" >/dev/null; done
  buildah config --entrypoint "[\"$entry\"]" "$c"
  rm -f "$out"
  buildah commit --rm -q "$c" "docker-archive:$out:$name" >/dev/null
}

# --- configuration -------------------------------------------------------------

node_pki() { # runs inside gen_pki's subshell (cwd = pki, cert() defined)
  local client='basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth'
  cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" "$client"
  cert kubelet-serving "/CN=$NODE_NAME" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:$NODE_IP,DNS:$NODE_NAME"
  # The API server's identity towards the kubelet (logs, exec, port-forward).
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$client"
  cert kube-proxy "/CN=system:kube-proxy" "$client"
  # CoreDNS and the provisioner are cluster add-ons of a throwaway test cluster:
  # system:masters, like kwok, instead of hand-kept RBAC rules.
  cert coredns "/O=system:masters/CN=aiaas-coredns" "$client"
  cert local-path-provisioner "/O=system:masters/CN=aiaas-local-path-provisioner" "$client"
  cert kube-network-policies "/O=system:masters/CN=aiaas-kube-network-policies" "$client"
}

node_configs() {
  local nd; nd=$(node_dir)
  mkdir -p "$nd"/{containerd,cni/net.d,cni/ipam,kubelet,pod-logs,local-path,runc}
  local k
  for k in kubelet kube-proxy coredns local-path-provisioner kube-network-policies; do write_kubeconfig "$nd/$k.kubeconfig" "$k"; done

  cat > "$nd/containerd/config.toml" <<EOF
version = 3
root = "$nd/containerd/root"
state = "$nd/containerd/state"
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = "$nd/containerd/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "$nd/containerd/opt"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$NODE_IMAGE_BASE"

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  # runc cannot lower oom_score_adj without CAP_SYS_RESOURCE (missing in VMs
  # and containers like this one): without this every sandbox fails with
  # "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "$BIN_DIR/runc"
        Root = "$nd/runc"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["$CNI_BIN_DIR"]
    conf_dir = "$nd/cni/net.d"
EOF

  cat > "$nd/cni/net.d/10-aiaas.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$CNI_NETWORK",
  "plugins": [
    {"type": "bridge", "bridge": "$NODE_BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$nd/cni/ipam",
              "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF

  : > "$nd/resolv.conf"
  cat > "$nd/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: $NODE_IP
healthzPort: 10248
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$nd/containerd/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: $NODE_CGROUP_ROOT
# This host has cgroup v1 (kubelet >= 1.35 refuses it unless told).
failCgroupV1: false
failSwapOn: false
clusterDNS: [$NODE_IP]
clusterDomain: cluster.local
resolvConf: $nd/resolv.conf
podLogsDir: $nd/pod-logs
registerWithTaints:
- {key: $NODE_LABEL, value: "true", effect: NoSchedule}
# Imported images cannot be pulled again: never garbage-collect them, and
# never evict because a shared development disk is fuller than a server's.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
serializeImagePulls: false
nodeStatusReportFrequency: 10s
EOF

  cat > "$nd/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $nd/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: $POD_CIDR
bindAddress: $NODE_IP
healthzBindAddress: $NODE_IP:10256
metricsBindAddress: $NODE_IP:10249
nodePortAddresses: [$NODE_IP/32]
# Masquerade all Service traffic: a pod reaching a Service backed by a pod on
# the same bridge then gets its replies through the gateway as well.
iptables: {masqueradeAll: true}
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF

  cat > "$nd/Corefile" <<EOF
cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {
  bind $NODE_IP
  errors
  health $NODE_IP:8080
  ready $NODE_IP:8181
  kubernetes cluster.local in-addr.arpa ip6.arpa {
    kubeconfig $nd/coredns.kubeconfig $CLUSTER_NAME
    pods insecure
    ttl 5
  }
}
# Nothing leaves the machine: every other name does not exist.
.:53 {
  bind $NODE_IP
  template ANY ANY {
    rcode NXDOMAIN
  }
}
EOF

  cat > "$nd/local-path-config.json" <<EOF
{
  "nodePathMap": [{"node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": ["$nd/local-path"]}],
  "setupCommand": "/local-path-helper",
  "teardownCommand": "/local-path-helper"
}
EOF
  cat > "$nd/local-path-helper-pod.yaml" <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: helper-pod
spec:
  containers:
  - name: helper-pod
    image: $NODE_IMAGE_BASE
    imagePullPolicy: Never
EOF
}

# Cluster objects of the node: the local-path StorageClass and the namespace of
# the provisioner's helper pods.
node_manifests() {
  cat <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $LOCAL_PATH_NS
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: local-path-provisioner
  namespace: $LOCAL_PATH_NS
---
# Not the default class: kwok's fake class stays default for the scheduling
# tests; a PVC for the real node names storageClassName: local-path.
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local-path
provisioner: rancher.io/local-path
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Delete
---
# In-cluster clients (the operator's pods) reach the API server through the
# kubernetes Service (10.96.0.1:443): kube-proxy sends them to the node address,
# where socat forwards to the API server on 127.0.0.1 (it listens nowhere else).
# The API server runs with --endpoint-reconciler-type=none, so this slice is ours.
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes-real-node
  namespace: default
  labels:
    kubernetes.io/service-name: kubernetes
    endpointslice.kubernetes.io/managed-by: hack-cluster-sh.aiaas.dev
addressType: IPv4
endpoints:
  - addresses: ["$NODE_IP"]
    conditions: {ready: true}
ports:
  - name: https
    port: $APISERVER_PORT
    protocol: TCP
EOF
}

# --- network -----------------------------------------------------------------

node_network_up() {
  local nd; nd=$(node_dir)
  ip link add "$NODE_BRIDGE" type bridge
  ip addr add "$NODE_IP/${POD_CIDR#*/}" dev "$NODE_BRIDGE"
  ip link set "$NODE_BRIDGE" up
  # Routing between pods and the node address needs forwarding; bridged
  # traffic must pass iptables (kube-proxy's Service rules). Restored by down.
  local s
  for s in net/ipv4/ip_forward net/bridge/bridge-nf-call-iptables; do
    [[ -f /proc/sys/$s ]] || continue
    echo "$s=$(cat "/proc/sys/$s")" >> "$nd/sysctl.saved"
    echo 1 > "/proc/sys/$s"
  done
}

# --- NetworkPolicy enforcement ---------------------------------------------------

# Whether this kernel has the nftables queue statement (nft_queue). Tried in a
# throwaway network namespace: the machine's own rules are not touched.
nft_queue_supported() {
  unshare --net nft -f - >/dev/null 2>&1 <<EOF
table inet aiaas_probe {
  chain c {
    type filter hook postrouting priority 0; policy accept;
    queue num $NETPOL_QUEUE bypass
  }
}
EOF
}

# kube-network-policies with the node's kubeconfig, like kube-proxy. -v=2 logs
# each verdict (only the first packet of a connection of a selected pod comes
# to it). Without nft_queue it queues through xt_NFQUEUE (the patch's flag).
netpol_start() {
  local nd xt=(); nd=$(node_dir)
  if ! nft_queue_supported; then
    log "this kernel has no nftables queue statement (CONFIG_NFT_QUEUE): kube-network-policies queues with xt_NFQUEUE through nft_compat"
    xt=(--nfqueue-xt-target)
  fi
  start kube-network-policies --kubeconfig="$nd/kube-network-policies.kubeconfig" \
    --hostname-override="$NODE_NAME" --nfqueue-id="$NETPOL_QUEUE" --disable-nri \
    --metrics-bind-address="$NODE_IP:$NETPOL_METRICS_PORT" "${xt[@]}" --v=2
}

# Enforcing: its table is installed and a reader is bound to its queue.
netpol_ready() {
  curl_ok "http://$NODE_IP:$NETPOL_METRICS_PORT/metrics" >/dev/null &&
    nft list table inet "$NETPOL_TABLE" >/dev/null 2>&1 &&
    awk -v q="$NETPOL_QUEUE" '$1 == q {found = 1} END {exit !found}' /proc/net/netfilter/nfnetlink_queue
}

# --- start ---------------------------------------------------------------------

# The cluster dir of another cluster whose real node runs (empty if none).
node_owner_running() {
  local owner; owner=$(cat "$NODE_OWNER_FILE" 2>/dev/null) || return 0
  [[ $owner != "$CLUSTER_DIR" ]] && pid_running "$owner/run/kubelet.pid" kubelet >/dev/null && echo "$owner"
  return 0
}

# Refuse a second real node on this machine; clean up after a crashed one.
node_claim() {
  local owner; owner=$(node_owner_running)
  [[ -z $owner ]] || die "the real node of the cluster in $owner runs on this machine (one per machine: its network and iptables chains are machine-wide). Stop it, or start this cluster with AIAAS_REAL_NODE=0"
  if [[ -f $NODE_OWNER_FILE ]]; then
    owner=$(cat "$NODE_OWNER_FILE")
    log "cleaning up after the real node of $owner (not running)"
    node_cleanup "$owner"
  fi
  echo "$CLUSTER_DIR" > "$NODE_OWNER_FILE"
}

node_up() {
  local nd; nd=$(node_dir)
  node_claim
  local d
  for d in "${HOST_DIRS[@]}"; do [[ -e $d ]] || echo "$d" >> "$CLUSTER_DIR/.node-created-dirs"; done
  node_configs
  nft list tables > "$nd/nft-tables.before" 2>/dev/null || true
  node_network_up
  make_cgroup_root "$NODE_CGROUP_ROOT"

  PATH=$BIN_DIR:$PATH start containerd --config "$nd/containerd/config.toml"
  wait_up containerd 60 ctr_node version
  node_load_images "$TOOLS_DIR/images/node-base.tar" "$TOOLS_DIR/images/node-test.tar"

  # shellcheck disable=SC2086
  start kubelet --config="$nd/kubelet/config.yaml" --kubeconfig="$nd/kubelet.kubeconfig" \
    --root-dir="$nd/kubelet" --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" \
    --node-labels="$NODE_LABEL=true" ${AIAAS_KUBELET_EXTRA_ARGS:-}
  start kube-proxy --config="$nd/kube-proxy.yaml"
  netpol_start
  START_BIN=$(command -v socat) start socat \
    "TCP-LISTEN:$APISERVER_PORT,bind=$NODE_IP,fork,reuseaddr" "TCP:$HOST:$APISERVER_PORT"
  start coredns -conf "$nd/Corefile"

  kctl apply -f - >/dev/null <<<"$(node_manifests)"
  start local-path-provisioner --debug start --kubeconfig="$nd/local-path-provisioner.kubeconfig" \
    --config="$nd/local-path-config.json" --helper-pod-file="$nd/local-path-helper-pod.yaml" \
    --namespace="$LOCAL_PATH_NS" --service-account-name=local-path-provisioner \
    --provisioner-name=rancher.io/local-path --helper-image="$NODE_IMAGE_BASE" \
    --configmap-name=local-path-config

  wait_up kube-proxy 60 curl_ok "http://$NODE_IP:10256/healthz"
  wait_up kube-network-policies 60 netpol_ready
  wait_up coredns 60 curl_ok "http://$NODE_IP:8181/ready"
  wait_up kubelet 120 curl_ok "http://$NODE_IP:10248/healthz"
  wait_up kubelet "$UP_TIMEOUT" kctl wait --for=condition=Ready "node/$NODE_NAME" --timeout=5s
  alive local-path-provisioner || die "local-path-provisioner exited (see $LOGS/local-path-provisioner.log)"
}

ctr_node() { "$BIN_DIR/ctr" --address "$(node_dir)/containerd/containerd.sock" "$@"; }

node_load_images() { # <docker-archive>...
  local f
  for f in "$@"; do
    [[ -f $f ]] || die "no such image archive: $f"
    ctr_node -n k8s.io images import "$f" >/dev/null 2>&1 ||
      die "importing $f into the node's containerd failed"
    log "loaded $(basename "$f") into the real node"
  done
}

# --- stop ----------------------------------------------------------------------

node_down() {
  [[ -d $(node_dir) || $(cat "$NODE_OWNER_FILE" 2>/dev/null) == "$CLUSTER_DIR" ]] || return 0
  stop local-path-provisioner kubelet coredns kube-network-policies kube-proxy socat
  node_cleanup "$CLUSTER_DIR"
}

# Remove everything a real node of the cluster in <dir> left on the machine.
# Idempotent; also for a node whose processes crashed.
node_cleanup() { # <cluster dir>
  local cdir=$1 nd; nd=$(node_dir "$1")
  kill_cgroup_tree "$NODE_CGROUP_ROOT"
  kill_shims "$nd/containerd/containerd.sock"
  if [[ $cdir == "$CLUSTER_DIR" ]]; then stop containerd; fi
  kill_components_of "$cdir"
  kill_shims "$nd/containerd/containerd.sock"
  unmount_under "$nd"
  remove_cgroups "$NODE_CGROUP_ROOT"
  ip link del "$NODE_BRIDGE" 2>/dev/null || true
  # kube-network-policies removes its table only on SIGINT; without it and its queue reader, packets of
  # selected pods would be dropped.
  command -v nft >/dev/null && nft delete table inet "$NETPOL_TABLE" 2>/dev/null || true
  [[ -x $BIN_DIR/kube-proxy ]] && "$BIN_DIR/kube-proxy" --cleanup >/dev/null 2>&1 || true
  local ipt
  for ipt in iptables ip6tables; do command -v $ipt >/dev/null && purge_chains $ipt; done
  drop_new_empty_xtables "$nd/nft-tables.before"
  if [[ -f $nd/sysctl.saved ]]; then
    local kv
    while read -r kv; do echo "${kv#*=}" > "/proc/sys/${kv%%=*}" || true; done < "$nd/sysctl.saved"
  fi
  find "$POD_LOG_LINKS" -maxdepth 1 -type l -lname "$nd/*" -delete 2>/dev/null || true
  # libcni's result cache: our network and containerd's own loopback network.
  rm -f "$CNI_CACHE/results/$CNI_NETWORK"-* "$CNI_CACHE/results/cni-loopback"-* 2>/dev/null || true
  local d
  if [[ -f $cdir/.node-created-dirs ]]; then
    while read -r d; do rm -rf "$d"; done < "$cdir/.node-created-dirs"
  fi
  rm -rf "$nd" "$cdir/.node-created-dirs"
  [[ $(cat "$NODE_OWNER_FILE" 2>/dev/null) == "$cdir" ]] && rm -f "$NODE_OWNER_FILE"
  return 0
}

# SIGKILL the node components of the cluster in <dir> that still run: after its
# kubelet crashed, or when a job's end killed only some. Each may be gone by
# the time it is killed; that must not end the script (set -e).
kill_components_of() { # <cluster dir>
  local c p
  for c in "${NODE_COMPONENTS[@]}"; do
    p=$(pid_running "$1/run/$c.pid" "$c") || continue
    kill -KILL "$p" 2>/dev/null || true
  done
}

# SIGKILL every process in the cgroup tree <root> of every v1 hierarchy (or v2).
kill_cgroup_tree() {
  local n pids
  for n in 1 2 3 4 5 6 7 8 9 10; do
    pids=$(find /sys/fs/cgroup/*"$1" /sys/fs/cgroup"$1" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u || true)
    [[ -z $pids ]] && return 0
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.3
  done
  log "processes left in cgroup $1: $pids"
}

# The kubelet's --cgroup-root must exist in every hierarchy (cgroup v1: one
# per controller; a new cpuset starts without CPUs and memory nodes).
make_cgroup_root() {
  local h
  if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then mkdir -p "/sys/fs/cgroup$1"; return; fi
  for h in /sys/fs/cgroup/*/; do
    h=${h%/}
    [[ -f $h/cgroup.procs ]] || continue
    mkdir -p "$h$1"
    if [[ -f $h/cpuset.cpus ]]; then
      cat "$h/cpuset.cpus" > "$h$1/cpuset.cpus"
      cat "$h/cpuset.mems" > "$h$1/cpuset.mems"
    fi
  done
}

remove_cgroups() {
  find /sys/fs/cgroup/*"$1" /sys/fs/cgroup"$1" -depth -type d -exec rmdir {} + 2>/dev/null || true
}

# Shims of the containerd listening on <socket> (their command line names it).
kill_shims() {
  local pid
  for pid in $(pgrep -f -- "-address $1" 2>/dev/null); do
    [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == */containerd-shim-runc-v2* ]] || continue
    kill -KILL "$pid" 2>/dev/null || true
  done
  return 0
}

unmount_under() { # <dir>: every mount at or below it, deepest first
  local m
  awk -v d="$1" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
}

# Remove the KUBE-* and CNI-* chains (kubelet, kube-proxy, portmap) and every
# rule that jumps to them. Only one real node per machine owns such chains.
purge_chains() { # <iptables command>
  local ipt=$1 t rule c chains
  for t in filter nat mangle raw; do
    $ipt -t $t -S >/dev/null 2>&1 || continue
    while read -r rule; do
      eval "$ipt -t $t ${rule/#-A/-D}" 2>/dev/null || true
    done < <($ipt -t $t -S | grep -E -- '-j (KUBE|CNI)-' | grep -vE '^-A (KUBE|CNI)-')
    chains=$($ipt -t $t -S | awk '$1 == "-N" && $2 ~ /^(KUBE|CNI)-/ {print $2}')
    for c in $chains; do $ipt -t $t -F "$c" 2>/dev/null || true; done
    for c in $chains; do $ipt -t $t -X "$c" 2>/dev/null || true; done
  done
}

# iptables-nft (Debian's iptables) keeps a table and its base chains once kube-proxy's and portmap's chains
# are gone: remove those of iptables' tables that appeared while the node ran and hold no rule now.
drop_new_empty_xtables() { # <`nft list tables` from before up>
  [[ -f $1 ]] && command -v nft >/dev/null || return 0
  local kw fam name
  while read -r kw fam name; do
    [[ $kw == table && $fam =~ ^ip6?$ && $name =~ ^(filter|nat|mangle|raw|security)$ ]] || continue
    grep -qx "table $fam $name" "$1" && continue
    nft -j list table "$fam" "$name" 2>/dev/null | grep -q '"rule"' && continue
    nft delete table "$fam" "$name" 2>/dev/null || true
  done < <(nft list tables 2>/dev/null)
}

node_status() {
  local nd; nd=$(node_dir)
  if [[ ! -d $nd ]]; then
    echo "real node               none (AIAAS_REAL_NODE=0, or this host cannot run one)"
    return 0
  fi
  echo "real node               $NODE_NAME at $NODE_IP (pods $POD_CIDR on $NODE_BRIDGE, label $NODE_LABEL=true, taint $NODE_LABEL=true:NoSchedule)"
  component_status "${NODE_COMPONENTS[@]}"
}
