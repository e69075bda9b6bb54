#!/usr/bin/env bash
# Local Kubernetes control plane for tests and development, built from source
# via the Go module proxy (no Docker, no downloads of release tarballs).
#
#   hack/cluster.sh build     build (once per machine) etcd, kube-apiserver,
#                             kube-controller-manager, kube-scheduler, kubectl,
#                             kwok and helm into the cache (and the real node's
#                             binaries, hack/node/node.sh, when it is wanted)
#   hack/cluster.sh up        build if needed, start the cluster on 127.0.0.1,
#                             wait until it is usable, print `export KUBECONFIG=...`
#   hack/cluster.sh down      stop every process `up` started (by pid) and remove state
#   hack/cluster.sh status    show what runs (exit 0 iff the cluster is healthy)
#   hack/cluster.sh env       print export lines (KUBECONFIG, PATH with kubectl/helm)
#   hack/cluster.sh bin-dir   print the directory holding the built binaries
#   hack/cluster.sh kubeconfig print the kubeconfig path
#   hack/cluster.sh logs [component]  tail the logs
#   hack/cluster.sh load-images <docker-archive>...  import images into the
#                             real node's containerd (namespace k8s.io)
#   hack/cluster.sh ctr <args>  ctr against the real node's containerd
#
# The cluster: etcd, kube-apiserver (RBAC, service-account tokens, TLS with a
# private CA), kube-controller-manager (all controllers except cloud ones),
# kube-scheduler and kwok, which plays kubelet for fake nodes:
# $AIAAS_GPU_NODES nodes with $AIAAS_GPUS_PER_NODE nvidia.com/gpu each (label
# nvidia.com/gpu.present=true, taint nvidia.com/gpu=present:NoSchedule) and
# $AIAAS_CPU_NODES CPU-only nodes. Pod lifecycle comes from kwok Stage files in
# hack/kwok/stages/*.yaml (plus $AIAAS_KWOK_STAGES, a :-separated list of extra
# files or directories). Containers never run: pods become Running/Ready;
# pods owned by a Job complete; a pod annotated fake.aiaas.dev/exit-code exits
# with that code (see hack/kwok/stages/pod-container-exit.yaml).
# PVCs of the default StorageClass kwok-volume are bound to fake volumes.
# Objects in hack/kwok/manifests/*.yaml are applied after start.
#
# Beside the kwok nodes, one REAL worker node (hack/node/node.sh): kubelet,
# containerd + runc, CNI bridge, kube-proxy, CoreDNS and the local-path volume
# provisioner (StorageClass local-path), kube-network-policies (enforces
# NetworkPolicies), all host processes, node address
# 10.244.0.1 on the pods' bridge aiaas-cni0, no traffic leaving the machine. It is
# labelled and tainted aiaas.dev/real-node=true(:NoSchedule): only pods that
# ask for it land there. A namespace annotated
#   scheduler.alpha.kubernetes.io/node-selector: aiaas.dev/real-node=true
#   scheduler.alpha.kubernetes.io/defaultTolerations: '[{"key":"aiaas.dev/real-node","operator":"Exists","effect":"NoSchedule"}]'
# sends all its pods there (admission plugins PodNodeSelector and
# PodTolerationRestriction). Images come from `load-images` (no registry).
# Needs root and cgroups; one real node per machine.
#
# Environment (all optional):
#   AIAAS_CACHE          cache root (default ~/.cache/aiaas); binaries go to
#                        $AIAAS_CACHE/k8s-<KUBE_VERSION>/bin
#   AIAAS_CLUSTER_DIR    state, pki, kubeconfig and logs (default $AIAAS_CACHE/cluster)
#   AIAAS_ETCD_PORT (12379) AIAAS_ETCD_PEER_PORT (12380) AIAAS_APISERVER_PORT (16443)
#   AIAAS_KCM_PORT (17257) AIAAS_SCHEDULER_PORT (17259) AIAAS_KWOK_PORT (17247)
#   AIAAS_PORT_OFFSET    added to every default port: a second cluster on the same
#                        machine is AIAAS_CLUSTER_DIR=/tmp/c2 AIAAS_PORT_OFFSET=1000
#   AIAAS_GPU_NODES (2) AIAAS_GPUS_PER_NODE (8) AIAAS_CPU_NODES (2)
#   AIAAS_UP_TIMEOUT     seconds to wait for readiness (default 180)
#   AIAAS_REAL_NODE      1: require the real node; 0: kwok only; auto (default):
#                        the real node when the host can run it
#   AIAAS_KUBELET_EXTRA_ARGS  extra kubelet flags (word-split)
#   AIAAS_APISERVER_EXTRA_ARGS, AIAAS_KCM_EXTRA_ARGS, AIAAS_SCHEDULER_EXTRA_ARGS,
#   AIAAS_KWOK_EXTRA_ARGS  extra flags (word-split)
#   KUBE_VERSION ETCD_VERSION KWOK_VERSION HELM_VERSION CONTAINERD_VERSION
#   RUNC_VERSION COREDNS_VERSION LOCAL_PATH_PROVISIONER_VERSION
#   KUBE_NETWORK_POLICIES_VERSION  see hack/k8s/versions.sh
#   GO                   the go command (default: go on PATH, else /usr/local/go/bin/go)
set -euo pipefail
# The command that ends the script (set -e), for up_failed's report; errtrace:
# also inside functions.
FAILED_AT=""
set -o errtrace
trap 'FAILED_AT="${BASH_SOURCE[0]##*/}:$LINENO: $BASH_COMMAND"' ERR

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=SCRIPTDIR/k8s/versions.sh
source "$ROOT/hack/k8s/versions.sh"
# shellcheck source=SCRIPTDIR/node/node.sh
source "$ROOT/hack/node/node.sh"

CACHE=${AIAAS_CACHE:-$HOME/.cache/aiaas}
TOOLS_DIR=$CACHE/k8s-$KUBE_VERSION
BIN_DIR=$TOOLS_DIR/bin
CLUSTER_DIR=${AIAAS_CLUSTER_DIR:-$CACHE/cluster}
PKI=$CLUSTER_DIR/pki
LOGS=$CLUSTER_DIR/logs
RUN=$CLUSTER_DIR/run
KUBECONFIG_PATH=$CLUSTER_DIR/kubeconfig

HOST=127.0.0.1
OFF=${AIAAS_PORT_OFFSET:-0}
ETCD_PORT=${AIAAS_ETCD_PORT:-$((12379 + OFF))}
ETCD_PEER_PORT=${AIAAS_ETCD_PEER_PORT:-$((12380 + OFF))}
APISERVER_PORT=${AIAAS_APISERVER_PORT:-$((16443 + OFF))}
KCM_PORT=${AIAAS_KCM_PORT:-$((17257 + OFF))}
SCHEDULER_PORT=${AIAAS_SCHEDULER_PORT:-$((17259 + OFF))}
KWOK_PORT=${AIAAS_KWOK_PORT:-$((17247 + OFF))}
GPU_NODES=${AIAAS_GPU_NODES:-2}
GPUS_PER_NODE=${AIAAS_GPUS_PER_NODE:-8}
CPU_NODES=${AIAAS_CPU_NODES:-2}
UP_TIMEOUT=${AIAAS_UP_TIMEOUT:-180}
SERVICE_CIDR=10.96.0.0/16
CLUSTER_NAME=aiaas-local

COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm)

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] error: %s\n' "$*" >&2; exit 1; }

find_go() {
  if [[ -n ${GO:-} ]]; then echo "$GO"; return; fi
  if command -v go >/dev/null 2>&1; then command -v go; return; fi
  [[ -x /usr/local/go/bin/go ]] && { echo /usr/local/go/bin/go; return; }
  die "go not found (install Go >= 1.26 or set GO=/path/to/go)"
}

# ---------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------

# Hash of the scaffolding of one module dir (go.mod, go.sum, *.go) + version
# + go version (+ cgo and build tags): a stamp per binary decides whether it
# must be rebuilt.
stamp_of() { # <module dir> <version> [<stable ldflags>]
  local dir=$1 ver=$2 flags=${3:-}
  { echo "$ver"; echo "$flags"; [[ -z ${BUILD_CGO:-}${BUILD_TAGS:-} ]] || echo "cgo=${BUILD_CGO:-} tags=${BUILD_TAGS:-}"
    "$GO_BIN" env GOVERSION; cat "$dir"/go.mod "$dir"/go.sum "$dir"/*.go "$dir"/*.patch 2>/dev/null || true; } | sha256sum | cut -c1-16
}

# The name of the binary a package becomes in BIN_DIR: its last path element (a
# module's root "." and a main package named cmd are named after the module dir).
bin_name() { # <package> <module dir name>
  local b=${1##*/}
  [[ $b == . || $b == cmd ]] && b=$2
  echo "$b"
}

# A module's source from the Go module proxy, copied to <dest> and patched
# (git apply: patch(1) is not on every machine; the ceiling keeps it from
# taking a repository above <dest> for its own).
patched_source() { # <module> <version> <dest> <patch>
  local dir
  dir=$(cd "$TOOLS_DIR" && GOFLAGS=-mod=mod "$GO_BIN" mod download -json "$1@$2" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p') || true
  [[ -n $dir && -d $dir ]] || die "go mod download $1@$2 failed (is the Go module proxy reachable?)"
  rm -rf "$3"; cp -r "$dir" "$3"; chmod -R u+w "$3"
  (cd "$3" && GIT_CEILING_DIRECTORIES=$(dirname "$3") git apply -p1 "$4") || die "$4 does not apply to $1@$2: update it for this version"
}

# BUILD_CGO=1 / BUILD_TAGS=<tags> in the environment: cgo and build tags.
build_module() { # <name> <version> <ldflags> <package>...
  local name=$1 ver=$2 ldflags=$3; shift 3
  local src=${MODULE_SRC:-$ROOT/hack/k8s/$name} work=$TOOLS_DIR/work/$name  # MODULE_SRC: hack/peers/*.sh
  local stamp; stamp=$(stamp_of "$src" "$ver" "$([[ $name == kubernetes ]] || echo "$ldflags")")
  local need=0 p
  for p in "$@"; do
    local b; b=$(bin_name "$p" "$name")
    [[ -x $BIN_DIR/$b && "$(cat "$BIN_DIR/.$b.stamp" 2>/dev/null)" == "$stamp" ]] || need=1
  done
  (( need )) || return 0

  rm -rf "$work"; mkdir -p "$work" "$BIN_DIR"
  cp "$src"/go.mod "$work"/
  [[ -f $src/go.sum ]] && cp "$src"/go.sum "$work"/
  compgen -G "$src/*.go" >/dev/null && cp "$src"/*.go "$work"/
  if [[ $name == kubernetes ]] && ! grep -Eq "^[[:space:]]*(require )?k8s.io/kubernetes $ver( |\$)" "$work/go.mod"; then
    log "KUBE_VERSION=$ver differs from hack/k8s/kubernetes/go.mod: regenerating it"
    (cd "$work" && PATH=$(dirname "$GO_BIN"):$PATH "$ROOT/hack/k8s/gen-kubernetes-gomod.sh" "$ver" > go.mod.new && mv go.mod.new go.mod && rm -f go.sum)
  fi
  case $name in
    etcd) sed -i -E "s#(go.etcd.io/etcd/server/v3) v[^ ]+#\1 $ver#" "$work/go.mod" ;;
    kwok) sed -i -E "s#(sigs.k8s.io/kwok) v[^ ]+#\1 $ver#" "$work/go.mod" ;;
    helm) sed -i -E "s#(helm.sh/helm/v3) v[^ ]+#\1 $ver#" "$work/go.mod" ;;
    containerd) sed -i -E "s#(github.com/containerd/containerd/v2) v[^ ]+#\1 $ver#" "$work/go.mod" ;;
    runc) sed -i -E "s#(github.com/opencontainers/runc) v[^ ]+#\1 $ver#" "$work/go.mod" ;;
    coredns) sed -i -E "s#(github.com/coredns/coredns) v[^ ]+#\1 $ver#" "$work/go.mod" ;;
    local-path-provisioner) sed -i -E "s#(github.com/rancher/local-path-provisioner) v[^ ]+#\1 $ver#" "$work/go.mod" ;;
    kube-network-policies) sed -i -E "s#(sigs.k8s.io/kube-network-policies) v[^ ]+#\1 $ver#" "$work/go.mod"
      patched_source sigs.k8s.io/kube-network-policies "$ver" "$work/upstream" "$src/kube-network-policies.patch" ;;
  esac
  local t0=$SECONDS
  log "building $name $ver ($*)$([[ $name == kubernetes ]] && echo " — the first build takes several minutes")"
  (
    cd "$work"
    export CGO_ENABLED=${BUILD_CGO:-0} GOFLAGS=-mod=mod
    "$GO_BIN" mod tidy >/dev/null 2>&1 || "$GO_BIN" mod download
    "$GO_BIN" build -trimpath -tags "${BUILD_TAGS:-}" -ldflags "-s -w $ldflags" -o "$work/out/" "$@"
  ) >"$TOOLS_DIR/build-$name.log" 2>&1 || { tail -30 "$TOOLS_DIR/build-$name.log" >&2; die "build of $name failed, see $TOOLS_DIR/build-$name.log"; }
  for p in "$@"; do
    local b out=${p##*/}; b=$(bin_name "$p" "$name")
    [[ $out == . ]] && out=$name  # go build names it after the package path: the module dir's for "."
    mv -f "$work/out/$out" "$BIN_DIR/$b"
    echo "$stamp" > "$BIN_DIR/.$b.stamp"
  done
  log "built $name in $((SECONDS - t0))s"
}

kube_ldflags() {
  local v=$KUBE_VERSION major minor date p out=""
  [[ $v =~ ^v([0-9]+)\.([0-9]+)\. ]] || die "bad KUBE_VERSION $v"
  major=${BASH_REMATCH[1]} minor=${BASH_REMATCH[2]}
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    out+=" -X $p.gitVersion=$v -X $p.gitMajor=$major -X $p.gitMinor=$minor"
    out+=" -X $p.gitTreeState=clean -X $p.buildDate=$date"
  done
  echo "$out"
}

do_build() {
  GO_BIN=$(find_go)
  mkdir -p "$TOOLS_DIR"
  exec 9>"$TOOLS_DIR/.build.lock"
  if ! flock -n 9; then
    log "another build holds $TOOLS_DIR/.build.lock; waiting"
    flock 9
  fi
  local t0=$SECONDS
  build_module etcd "$ETCD_VERSION" "" .
  build_module kubernetes "$KUBE_VERSION" "$(kube_ldflags)" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy
  build_module kwok "$KWOK_VERSION" "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" sigs.k8s.io/kwok/cmd/kwok
  # helm assumes Kubernetes v1.20 for `template`/`lint` unless told the version it was built against
  local p kmajor=${KUBE_VERSION#v}; kmajor=${kmajor%%.*}
  local kminor=${KUBE_VERSION#v*.}; kminor=${kminor%%.*}
  local hv="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    hv+=" -X $p.k8sVersionMajor=$kmajor -X $p.k8sVersionMinor=$kminor"
  done
  build_module helm "$HELM_VERSION" "$hv" helm.sh/helm/v3/cmd/helm
  if real_node_buildable; then node_build; fi
  flock -u 9
  local b
  for b in "${BINARIES[@]}"; do [[ -x $BIN_DIR/$b ]] || die "missing $BIN_DIR/$b"; done
  (( SECONDS - t0 > 2 )) && log "binaries ready in $BIN_DIR ($((SECONDS - t0))s)"
  return 0
}

# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------

pid_of() { cat "$RUN/$1.pid" 2>/dev/null || true; }

# The pid in <pid file> when that process runs <program> (its executable's
# name): after a crash or a reboot the pid may belong to another program.
pid_running() { # <pid file> <program>
  local p exe; p=$(cat "$1" 2>/dev/null) || return 1
  [[ $p =~ ^[0-9]+$ ]] && exe=$(readlink "/proc/$p/exe" 2>/dev/null) || return 1
  exe=${exe##*/}
  [[ $exe == "$2" || $exe == "$2 (deleted)" ]] && echo "$p"
}

# alive <component>: the pid in this cluster's pid file runs the expected binary.
alive() { pid_running "$RUN/$1.pid" "$1" >/dev/null; }

start() { # <component> <args...>  (START_BIN: a program not built here, named like the component)
  local c=$1; shift
  mkdir -p "$RUN" "$LOGS"
  # setsid: own session, so ^C in the calling shell / pytest does not kill it.
  # 8>&- 9>&-: the daemons must not inherit (and so hold) the cluster and build locks.
  setsid "${START_BIN:-$BIN_DIR/$c}" "$@" >>"$LOGS/$c.log" 2>&1 </dev/null 8>&- 9>&- &
  echo $! > "$RUN/$c.pid"
  log "started $c (pid $!, log $LOGS/$c.log)"
}

# running <pid>: the process exists and is not a zombie (the cluster's
# processes are re-parented to init, which may be slow to reap them).
running() {
  kill -0 "$1" 2>/dev/null || return 1
  [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]
}

stop() { # <component>... : SIGTERM them together, wait, SIGKILL stragglers
  local c pid i pids=() names=()
  for c in "$@"; do
    pid=$(pid_of "$c")
    [[ -n $pid ]] || continue
    if alive "$c"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid"); names+=("$c")
    fi
    rm -f "$RUN/$c.pid"
  done
  for ((i = 0; i < ${#pids[@]}; i++)); do
    local n=0
    while running "${pids[i]}" && ((n++ < 150)); do sleep 0.1; done
    if running "${pids[i]}"; then
      log "${names[i]} (pid ${pids[i]}) did not stop on SIGTERM within 15s; sending SIGKILL"
      kill -KILL "${pids[i]}" 2>/dev/null || true
    fi
    log "stopped ${names[i]} (pid ${pids[i]})"
  done
}

port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

wait_for() { # <description> <timeout s> <command...>
  local what=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS >= deadline )); then
      log "timed out after ${timeout}s waiting for $what"
      return 1
    fi
    sleep 0.5
  done
}

# starting <component>: the process `start` launched for it still runs. Unlike
# alive, its program is not checked: right after `start` the child may not have
# exec'd the component's binary yet (it is still the shell or setsid, for longer
# on a busy machine), which alive took for an exit during start-up.
starting() { local p; p=$(cat "$RUN/$1.pid" 2>/dev/null) && running "$p"; }

# wait_up <component> <timeout s> <check...>: like wait_for, but fails at once
# if the component's process has exited (a bad flag, a port taken, ...).
wait_up() {
  local c=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    starting "$c" || { log "$c exited during start-up (see $LOGS/$c.log)"; return 1; }
    if (( SECONDS >= deadline )); then
      log "timed out after ${timeout}s waiting for $c"
      return 1
    fi
    sleep 0.5
  done
  alive "$c" || { log "$c exited during start-up (see $LOGS/$c.log)"; return 1; }
}

curl_ok() { curl -fsS --max-time 3 "$@"; }
etcd_healthy() { curl_ok "http://$HOST:$ETCD_PORT/health" | grep -q '"health":"true"'; }
apiserver_ready() {
  curl_ok --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "https://$HOST:$APISERVER_PORT/readyz" | grep -qx ok
}
secure_healthz() { curl_ok -k "https://$HOST:$1/healthz" | grep -qx ok; }
kwok_healthz() { curl_ok "http://$HOST:$KWOK_PORT/healthz" | grep -qx ok; }
kctl() { "$BIN_DIR/kubectl" --kubeconfig "$KUBECONFIG_PATH" "$@"; }

# ---------------------------------------------------------------------------
# pki and kubeconfigs
# ---------------------------------------------------------------------------

gen_pki() {
  mkdir -p "$PKI"; chmod 700 "$PKI"
  local d=$PKI
  (
    cd "$d"
    umask 077
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=$CLUSTER_NAME-ca" 2>/dev/null
    cert() { # <name> <subject> <extfile content>
      openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
      printf '%s\n' "$3" > "$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" \
        -days 3650 -extfile "$1.ext" 2>/dev/null
      rm -f "$1.csr" "$1.ext"
    }
    local client='basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth'
    cert apiserver "/CN=kube-apiserver" 'basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local'
    cert admin "/O=system:masters/CN=kubernetes-admin" "$client"
    cert kube-controller-manager "/CN=system:kube-controller-manager" "$client"
    cert kube-scheduler "/CN=system:kube-scheduler" "$client"
    # kwok acts for many nodes (node status, leases, pod status) and needs more
    # than the Node authorizer grants to a single kubelet identity.
    cert kwok "/O=system:masters/CN=kwok-controller" "$client"
    node_pki
    # Aggregation layer (front proxy): its own CA, as kubeadm does.
    openssl req -x509 -newkey rsa:2048 -nodes -keyout front-proxy-ca.key -out front-proxy-ca.crt -days 3650 \
      -subj "/CN=$CLUSTER_NAME-front-proxy-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout front-proxy-client.key -out front-proxy-client.csr \
      -subj "/CN=front-proxy-client" 2>/dev/null
    printf '%s\n' "$client" > front-proxy-client.ext
    openssl x509 -req -in front-proxy-client.csr -CA front-proxy-ca.crt -CAkey front-proxy-ca.key -CAcreateserial \
      -out front-proxy-client.crt -days 3650 -extfile front-proxy-client.ext 2>/dev/null
    rm -f front-proxy-client.csr front-proxy-client.ext front-proxy-ca.srl
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    rm -f ca.srl
  )
}

write_kubeconfig() { # <path> <cert name>
  local ca crt key
  ca=$(base64 -w0 < "$PKI/ca.crt"); crt=$(base64 -w0 < "$PKI/$2.crt"); key=$(base64 -w0 < "$PKI/$2.key")
  (umask 077; cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $CLUSTER_NAME
  cluster:
    server: https://$HOST:$APISERVER_PORT
    certificate-authority-data: $ca
users:
- name: $2
  user:
    client-certificate-data: $crt
    client-key-data: $key
contexts:
- name: $CLUSTER_NAME
  context:
    cluster: $CLUSTER_NAME
    user: $2
current-context: $CLUSTER_NAME
EOF
  )
}

# ---------------------------------------------------------------------------
# nodes
# ---------------------------------------------------------------------------

node_yaml() { # <name> <gpu count>
  local name=$1 gpus=$2 cpu=32 mem=128Gi itype=fake-cpu labels="" taints="" gpu_res=""
  if ((gpus > 0)); then
    cpu=96 mem=1Ti itype=fake-gpu-${gpus}x
    labels+=$'\n    nvidia.com/gpu.present: "true"'
    labels+=$'\n    nvidia.com/gpu.count: "'"$gpus"'"'
    labels+=$'\n    nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3'
    taints=$'\n  taints:\n  - key: nvidia.com/gpu\n    value: present\n    effect: NoSchedule'
    gpu_res=$'\n    nvidia.com/gpu: "'"$gpus"'"'
  fi
  local res="    cpu: \"$cpu\"
    memory: $mem
    ephemeral-storage: 1Ti
    pods: \"110\"$gpu_res"
  cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: $name
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/arch: amd64
    kubernetes.io/os: linux
    kubernetes.io/hostname: $name
    node.kubernetes.io/instance-type: $itype$labels
spec:$taints
status:
  allocatable:
$res
  capacity:
$res
EOF
}

nodes_yaml() {
  local i
  for ((i = 0; i < GPU_NODES; i++)); do node_yaml "kwok-gpu-$i" "$GPUS_PER_NODE"; done
  for ((i = 0; i < CPU_NODES; i++)); do node_yaml "kwok-cpu-$i" 0; done
}

stage_configs() {
  local f p
  for f in "$ROOT"/hack/kwok/stages/*.yaml; do echo "--config=$f"; done
  local IFS=:
  for p in ${AIAAS_KWOK_STAGES:-}; do
    [[ -z $p ]] && continue
    if [[ -d $p ]]; then
      for f in "$p"/*.yaml; do [[ -e $f ]] && echo "--config=$f"; done
    elif [[ -f $p ]]; then
      echo "--config=$p"
    else
      die "AIAAS_KWOK_STAGES entry $p does not exist"
    fi
  done
}

# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------

all_alive() { local c; for c in "${COMPONENTS[@]}"; do alive "$c" || return 1; done; }
any_pidfile() { compgen -G "$RUN/*.pid" >/dev/null; }

print_env() {
  echo "export KUBECONFIG=$KUBECONFIG_PATH"
  echo "export PATH=$BIN_DIR:\$PATH"
}

# One up/down at a time per cluster dir (e.g. two pytest sessions starting).
lock_cluster() {
  mkdir -p "$(dirname "$CLUSTER_DIR")"
  exec 8>"$CLUSTER_DIR.lock"
  if ! flock -n 8; then
    log "waiting for another hack/cluster.sh on $CLUSTER_DIR"
    flock -w 600 8 || die "timed out waiting for $CLUSTER_DIR.lock"
  fi
}

do_up() {
  local t0=$SECONDS
  lock_cluster
  if any_pidfile; then
    if all_alive && apiserver_ready; then
      log "cluster already up (apiserver https://$HOST:$APISERVER_PORT)"
      print_env
      return 0
    fi
    log "cluster is partially running or unhealthy; restarting it"
    do_down
  fi
  # decided before building: AIAAS_REAL_NODE=1 fails here when the host cannot run it or another cluster's does
  local real_node=0
  if real_node_wanted; then real_node=1; fi
  do_build
  local p
  for p in "$ETCD_PORT" "$ETCD_PEER_PORT" "$APISERVER_PORT" "$KCM_PORT" "$SCHEDULER_PORT" "$KWOK_PORT"; do
    port_busy "$p" && die "port $HOST:$p is in use by another process (override with AIAAS_*_PORT)"
  done
  # A real node of this cluster dir that crashed may have left mounts below it.
  [[ $(cat "$NODE_OWNER_FILE" 2>/dev/null) == "$CLUSTER_DIR" ]] && node_cleanup "$CLUSTER_DIR"
  rm -rf "$CLUSTER_DIR"
  mkdir -p "$CLUSTER_DIR" "$LOGS" "$RUN"
  # From here on, a failure (set -e) tears everything down again.
  trap up_failed EXIT

  gen_pki
  write_kubeconfig "$KUBECONFIG_PATH" admin
  write_kubeconfig "$CLUSTER_DIR/kube-controller-manager.kubeconfig" kube-controller-manager
  write_kubeconfig "$CLUSTER_DIR/kube-scheduler.kubeconfig" kube-scheduler
  write_kubeconfig "$CLUSTER_DIR/kwok.kubeconfig" kwok

  start etcd \
    --name=aiaas --data-dir="$CLUSTER_DIR/etcd" \
    --listen-client-urls="http://$HOST:$ETCD_PORT" --advertise-client-urls="http://$HOST:$ETCD_PORT" \
    --listen-peer-urls="http://$HOST:$ETCD_PEER_PORT" --initial-advertise-peer-urls="http://$HOST:$ETCD_PEER_PORT" \
    --initial-cluster="aiaas=http://$HOST:$ETCD_PEER_PORT" --initial-cluster-state=new \
    --unsafe-no-fsync=true --snapshot-count=10000 --quota-backend-bytes=$((2 * 1024 * 1024 * 1024)) \
    --log-level=warn
  wait_up etcd 60 etcd_healthy

  # shellcheck disable=SC2086
  start kube-apiserver \
    --etcd-servers="http://$HOST:$ETCD_PORT" \
    --bind-address=$HOST --advertise-address=$HOST --secure-port="$APISERVER_PORT" \
    --endpoint-reconciler-type=none \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$PKI/front-proxy-client.crt" --proxy-client-key-file="$PKI/front-proxy-client.key" \
    --authorization-mode=Node,RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --allow-privileged=true \
    --enable-admission-plugins=PodNodeSelector,PodTolerationRestriction \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --profiling=false \
    ${AIAAS_APISERVER_EXTRA_ARGS:-}
  wait_up kube-apiserver 120 apiserver_ready

  # shellcheck disable=SC2086
  start kube-controller-manager \
    --kubeconfig="$CLUSTER_DIR/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig="$CLUSTER_DIR/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig="$CLUSTER_DIR/kube-controller-manager.kubeconfig" \
    --authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics \
    --bind-address=$HOST --secure-port="$KCM_PORT" \
    --leader-elect=false \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --controllers='*,-service-lb-controller,-node-route-controller,-cloud-node-lifecycle-controller' \
    --profiling=false \
    ${AIAAS_KCM_EXTRA_ARGS:-}

  # shellcheck disable=SC2086
  start kube-scheduler \
    --kubeconfig="$CLUSTER_DIR/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig="$CLUSTER_DIR/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig="$CLUSTER_DIR/kube-scheduler.kubeconfig" \
    --authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics \
    --bind-address=$HOST --secure-port="$SCHEDULER_PORT" \
    --leader-elect=false \
    --profiling=false \
    ${AIAAS_SCHEDULER_EXTRA_ARGS:-}

  local stages; mapfile -t stages < <(stage_configs)
  # shellcheck disable=SC2086
  start kwok \
    --kubeconfig="$CLUSTER_DIR/kwok.kubeconfig" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --server-address="$HOST:$KWOK_PORT" \
    --node-lease-duration-seconds=40 \
    "${stages[@]}" \
    ${AIAAS_KWOK_EXTRA_ARGS:-}

  wait_up kube-controller-manager 60 secure_healthz "$KCM_PORT"
  wait_up kube-scheduler 60 secure_healthz "$SCHEDULER_PORT"
  wait_up kwok 60 kwok_healthz

  nodes_yaml > "$CLUSTER_DIR/nodes.yaml"
  kctl apply -f "$CLUSTER_DIR/nodes.yaml" >/dev/null
  # Cluster add-ons of the harness (default StorageClass, ...).
  kctl apply -f "$ROOT/hack/kwok/manifests/" >/dev/null
  wait_for "the default service account" "$UP_TIMEOUT" kctl -n default get serviceaccount default
  if ((real_node)); then node_up; fi
  wait_for "nodes to be Ready" "$UP_TIMEOUT" all_nodes_ready
  # Nodes start with the not-ready taint until the node lifecycle controller
  # sees them Ready; pods would otherwise go Pending for a few seconds.
  wait_for "node.kubernetes.io/not-ready taints to go" "$UP_TIMEOUT" no_not_ready_taints
  trap - EXIT

  log "cluster up in $((SECONDS - t0))s: $((GPU_NODES)) GPU node(s) x $GPUS_PER_NODE nvidia.com/gpu, $CPU_NODES CPU node(s)$( ((real_node)) && echo ", real node $NODE_NAME")"
  print_env
}

up_failed() {
  log "up failed${FAILED_AT:+ at $FAILED_AT}; last log lines:"
  local f
  for f in "$LOGS"/*.log; do [[ -e $f ]] && { echo "==> $f <==" >&2; tail -n 15 "$f" >&2; }; done
  do_down --keep-logs
  log "logs kept in $LOGS"
}

# One list, not `kubectl wait --all`: that waits node by node through kubectl's
# client rate limit, which with ~30 nodes or more cannot finish in its timeout.
all_nodes_ready() {
  local ready
  ready=$(kctl get nodes -o jsonpath='{range .items[*]}{.metadata.name}={range .status.conditions[?(@.type=="Ready")]}{.status}{end}{"\n"}{end}') || return 1
  [[ -n $ready ]] && ! grep -qv '=True$' <<<"$ready"  # one line per node: a node without the condition fails
}

no_not_ready_taints() {
  ! kctl get nodes -o jsonpath='{range .items[*]}{.spec.taints[*].key}{"\n"}{end}' | grep -q 'node.kubernetes.io/'
}

do_down() {
  local keep_logs=0
  [[ ${1:-} == --keep-logs ]] && keep_logs=1
  # Clients of the apiserver first, then the apiserver, etcd last.
  node_down
  stop kwok kube-scheduler kube-controller-manager
  stop kube-apiserver
  stop etcd
  if (( keep_logs )); then
    find "$CLUSTER_DIR" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} + 2>/dev/null || true
  else
    rm -rf "$CLUSTER_DIR"
  fi
  return 0
}

# component_status <component>...: a line each; exit 1 if one is not running.
component_status() {
  local c ok=0 pid rss total=0
  for c in "$@"; do
    pid=$(pid_of "$c")
    if alive "$c"; then
      rss=$(awk '/^VmRSS/{print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
      total=$((total + rss))
      printf '%-24s running (pid %s, rss %s MiB)\n' "$c" "$pid" "$((rss / 1024))"
    elif [[ -n $pid ]]; then
      printf '%-24s DEAD (pid %s; see %s)\n' "$c" "$pid" "$LOGS/$c.log"; ok=1
    else
      printf '%-24s not running\n' "$c"; ok=1
    fi
  done
  ((total > 0)) && printf '%-24s %s MiB\n' "memory (rss total)" "$((total / 1024))"
  return $ok
}

do_status() {
  local ok=0
  component_status "${COMPONENTS[@]}" || ok=1
  node_status || ok=1
  if [[ -f $PKI/admin.crt ]] && apiserver_ready; then
    echo "apiserver                https://$HOST:$APISERVER_PORT ready"
    echo "kubeconfig               $KUBECONFIG_PATH"
    kctl get nodes -L nvidia.com/gpu.present 2>/dev/null || true
  else
    echo "apiserver                not ready"; ok=1
  fi
  echo "binaries                 $BIN_DIR"
  return $ok
}

do_logs() {
  if [[ -n ${1:-} ]]; then tail -n 100 -f "$LOGS/$1.log"; else tail -n 20 "$LOGS"/*.log; fi
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

# Sourced (hack/peers/*.sh): the functions only.
[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0

cmd=${1:-}
shift || true
case $cmd in
  up) do_up ;;
  down) lock_cluster; do_down "$@" ;;
  status) do_status ;;
  build) do_build ;;
  bin-dir) echo "$BIN_DIR" ;;
  kubeconfig) echo "$KUBECONFIG_PATH" ;;
  env) print_env ;;
  logs) do_logs "$@" ;;
  load-images) (($# > 0)) || die "usage: hack/cluster.sh load-images <docker-archive>..."
    [[ -d $(node_dir) ]] || die "the cluster in $CLUSTER_DIR has no real node (AIAAS_REAL_NODE=0, or not up)"
    node_load_images "$@" ;;
  ctr) [[ -d $(node_dir) ]] || die "the cluster in $CLUSTER_DIR has no real node"
    ctr_node "$@" ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
