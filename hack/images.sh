#!/usr/bin/env bash
# Build aiaas's container images with buildah (daemonless, as root) and save them as image archives.
#
#   hack/images.sh build        build what changed; print one line per image: NAME ARCHIVE
#   hack/images.sh archives     print NAME ARCHIVE for the images of this source tree (exit 1 if not built)
#   hack/images.sh push REG     tag and push both images to your registry (REG/aiaas-operator:VERSION, ...)
#   hack/images.sh load-kind    load both archives into the kind cluster (hack/kind.sh)
#   hack/images.sh wheelhouse   download the locked wheels (what the images install) and print the directory
#
# Images (the chart's and the renderer's defaults name them):
#   localhost/aiaas-operator:VERSION   operator/Dockerfile: `aiaas operator`, no torch
#   localhost/aiaas-trainer:VERSION    trainer/Dockerfile: torchrun -m aiaas.trainer and python -m aiaas.server
#
# The Dockerfiles are ordinary ones: a user with a registry builds them with docker/podman/buildah and the
# default base image (python:3.11-slim). This machine reaches no container registry, so unless AIAAS_BASE_IMAGE
# names an image that buildah already has, the base is built here from Debian's packages with mmdebstrap
# (bookworm: Python 3.11 and venv, like python:3.11-slim) and tagged localhost/aiaas-python:3.11-bookworm.
# Python packages come from a wheelhouse downloaded on the host with the versions in constraints.txt and
# mounted into the build (--no-index), so the build itself needs no network. PyPI's Linux torch is the CUDA
# build; users with the CPU index pass TORCH_INDEX (a build argument) instead.
#
# Every image is saved as a docker-archive under $AIAAS_CACHE/images/, named by a hash of what goes into it
# (Dockerfile, sources, constraints, base image): an unchanged tree is never rebuilt, on any clone.
#
# Environment: AIAAS_CACHE (default ~/.cache/aiaas), AIAAS_BASE_IMAGE (a base image buildah has; default:
# build the Debian one), AIAAS_IMAGES (default "operator trainer").
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${AIAAS_CACHE:-$HOME/.cache/aiaas}
IMAGES_DIR=$CACHE/images
VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$ROOT/aiaas/__init__.py")
BASE_TAG=localhost/aiaas-python:3.11-bookworm
BASE_PACKAGES=(python3 python3-venv passwd ca-certificates)
read -r -a WANTED <<< "${AIAAS_IMAGES:-operator trainer}"

log() { printf '[images] %s\n' "$*" >&2; }
die() { printf '[images] error: %s\n' "$*" >&2; exit 1; }

image_name() { echo "localhost/aiaas-$1:$VERSION"; }

# Sources that go into an image (the same paths its Dockerfile COPYs).
sources_of() {
  case $1 in
    operator) echo "operator/Dockerfile pyproject.toml setup.py constraints.txt aiaas contract operator" ;;
    trainer) echo "trainer/Dockerfile pyproject.toml setup.py constraints.txt aiaas contract operator trainer server" ;;
    *) die "unknown image $1 (operator or trainer)" ;;
  esac
}

# Content hash of files (sorted paths + bytes), ignoring caches.
tree_hash() {
  (cd "$ROOT" && find "$@" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z |
    xargs -0 sha256sum) | sha256sum | cut -c1-16
}

need_tools() {
  [[ $(id -u) == 0 ]] || die "buildah runs as root here (run as root, or build the Dockerfiles with your own tool)"
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v runc >/dev/null || missing+=(runc)
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  ((${#missing[@]} == 0)) && return 0
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" uidmap >&2
}

# The base image: AIAAS_BASE_IMAGE if given, else a Debian bookworm rootfs with Python 3.11 built by mmdebstrap
# from this machine's apt sources (cached as an archive keyed by the package list).
ensure_base() {
  if [[ -n ${AIAAS_BASE_IMAGE:-} ]]; then echo "$AIAAS_BASE_IMAGE"; return; fi
  local key archive
  key=$(echo "bookworm ${BASE_PACKAGES[*]}" | sha256sum | cut -c1-16)
  archive=$IMAGES_DIR/aiaas-python-$key.tar
  if buildah inspect --type image "$BASE_TAG" 2>/dev/null | grep -q "aiaas.base-key=$key"; then
    echo "$BASE_TAG"; return
  fi
  if [[ -f $archive ]]; then
    buildah pull -q "docker-archive:$archive" >/dev/null
    buildah tag "$(buildah images -q --filter reference="$BASE_TAG" | head -1)" "$BASE_TAG" 2>/dev/null || true
    echo "$BASE_TAG"; return
  fi
  local t0=$SECONDS tmp sources
  tmp=$(mktemp -d)
  sources=$(ls /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -1)
  log "building the base image $BASE_TAG from Debian bookworm (${BASE_PACKAGES[*]})"
  mmdebstrap --quiet --variant=minbase --include="$(IFS=,; echo "${BASE_PACKAGES[*]}")" \
    --dpkgopt='path-exclude=/usr/share/{doc,man,locale,info}/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm "$tmp/rootfs.tar" "$sources" >&2
  local ctr
  ctr=$(buildah from scratch)
  buildah add "$ctr" "$tmp/rootfs.tar" / >/dev/null
  buildah config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --label "aiaas.base-key=$key" --cmd python3 "$ctr"
  buildah commit -q --rm "$ctr" "$BASE_TAG" >/dev/null
  rm -rf "$tmp"
  mkdir -p "$IMAGES_DIR"
  save_archive "$BASE_TAG" "$archive"
  log "base image built in $((SECONDS - t0))s"
  echo "$BASE_TAG"
}

# What decides the wheels: the lock and the dependency lists of pyproject.toml (not its other settings).
requirements_key() {
  { cat "$ROOT/constraints.txt"
    python3 -I -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(p["dependencies"], sorted(p["optional-dependencies"].items()))' "$ROOT/pyproject.toml"; } | sha256sum | cut -c1-16
}

# Wheels of every locked dependency, downloaded once per requirements_key (pip's own resolver picks them).
ensure_wheelhouse() {
  local key dir py
  key=$(requirements_key)
  dir=$CACHE/wheelhouse-$key
  if [[ ! -f $dir/.complete ]]; then
    py=$(command -v python3)
    log "downloading the locked wheels into $dir (torch from PyPI: the large CUDA build, once)"
    rm -rf "$dir.tmp"; mkdir -p "$dir.tmp"
    # wheels an earlier lock already fetched are reused (pip download skips files already in the directory)
    find "$CACHE" -maxdepth 2 -path "$CACHE/wheelhouse-*/*.whl" -exec ln -f {} "$dir.tmp"/ \; 2>/dev/null || true
    (cd / && "$py" -I -m pip download -q --disable-pip-version-check --only-binary=:all: -d "$dir.tmp" \
      -c "$ROOT/constraints.txt" "$ROOT[operator,trainer,server]" "setuptools>=77" >&2)
    rm -f "$dir.tmp"/aiaas-*; touch "$dir.tmp/.complete"; rm -rf "$dir"; mv "$dir.tmp" "$dir"
    find "$CACHE" -maxdepth 1 -name 'wheelhouse-*' ! -path "$dir" -exec rm -rf {} +  # one wheelhouse: the lock's
  fi
  echo "$dir"
}

archive_of() { # <image> <base> -> the archive path for this tree
  local key base_id
  # the base's ID is part of the key; a failed inspect (no base yet, or buildah's storage busy) must not yield
  # another key, which would read as "not built"
  base_id=$(buildah inspect --type image --format '{{.FromImageID}}' "$2" 2>/dev/null) ||
    die "cannot inspect the base image $2 (see: buildah inspect --type image $2)"
  key=$( { tree_hash $(sources_of "$1"); echo "$2"; printf %s "$base_id"; } | sha256sum | cut -c1-16)
  echo "$IMAGES_DIR/aiaas-$1-$key.tar"
}

# Save image <name> as the docker archive <archive>: written to <archive>.tmp and renamed, so a save cut short
# never looks finished. A .tmp left by one is removed first: docker-archive refuses to write into it.
save_archive() { # <name> <archive>
  rm -f "$2.tmp"
  buildah push -q "$1" "docker-archive:$2.tmp:$1"
  mv "$2.tmp" "$2"
}

build_one() { # <image> <base> <wheelhouse>
  local image=$1 base=$2 wheels=$3 name archive t0=$SECONDS
  name=$(image_name "$image"); archive=$(archive_of "$image" "$base")
  if [[ -f $archive ]]; then echo "$name $archive"; return; fi
  log "building $name from $image/Dockerfile (base $base)"
  (cd "$ROOT" && buildah bud --quiet --layers --pull=false --network=none \
    --build-arg "BASE=$base" --build-arg "PIP_OPTIONS=--no-index --find-links=/wheels" \
    --volume "$wheels:/wheels:ro" -f "$image/Dockerfile" -t "$name" . >&2)
  mkdir -p "$IMAGES_DIR"
  rm -f "$IMAGES_DIR/aiaas-$image-"*.tar  # keep one archive per image
  save_archive "$name" "$archive"
  log "built $name in $((SECONDS - t0))s: $(du -h "$archive" | cut -f1) archive"
  echo "$name $archive"
}

cmd_build() {
  need_tools
  mkdir -p "$IMAGES_DIR"
  exec 9>"$IMAGES_DIR/.build.lock"
  flock 9  # one build at a time (buildah's storage and the archives are shared)
  local base wheels image
  base=$(ensure_base)
  wheels=$(ensure_wheelhouse)
  for image in "${WANTED[@]}"; do build_one "$image" "$base" "$wheels"; done
}

cmd_archives() {
  local base=${AIAAS_BASE_IMAGE:-$BASE_TAG} image archive rc=0
  mkdir -p "$IMAGES_DIR"
  exec 9>"$IMAGES_DIR/.build.lock"
  flock 9  # a build in progress (here or from another checkout) finishes first
  for image in "${WANTED[@]}"; do
    archive=$(archive_of "$image" "$base")
    if [[ -f $archive ]]; then echo "$(image_name "$image") $archive"; else log "$image: not built"; rc=1; fi
  done
  return $rc
}

cmd_push() {
  local registry=${1:?usage: hack/images.sh push REGISTRY (e.g. registry.example.com/ml)} image
  for image in "${WANTED[@]}"; do
    buildah push "$(image_name "$image")" "docker://$registry/aiaas-$image:$VERSION"
  done
}

cmd_load_kind() {
  local name archive
  command -v kind >/dev/null || die "kind not found"
  cmd_archives | while read -r name archive; do
    log "loading $name into kind"
    kind load image-archive "$archive" --name "${KIND_CLUSTER_NAME:-aiaas}"
  done
}

case ${1:-build} in
  build) cmd_build ;;
  archives) cmd_archives ;;
  push) shift; cmd_push "$@" ;;
  load-kind) cmd_load_kind ;;
  wheelhouse) ensure_wheelhouse ;;
  -h|--help|help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) die "unknown command ${1} (build, archives, push, load-kind)" ;;
esac
