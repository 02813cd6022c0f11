#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian 12 machine and prints the
# directory that holds `kube-apiserver` and `etcd` (envtest's KUBEBUILDER_ASSETS).
#
# Debian ships etcd and kubectl but not kube-apiserver, so we build it once from
# Debian's own kubernetes 1.20.2 source package and cache it outside the clone:
#   ${VMREPLICA_CACHE:-~/.cache/vmreplica}/assets/{kube-apiserver,etcd}
# A second run finds the cache and does nothing but the (idempotent) apt check.
set -euo pipefail

cache="${VMREPLICA_CACHE:-$HOME/.cache/vmreplica}"
assets="$cache/assets"
mkdir -p "$assets"
log() { echo "test-deps: $*" >&2; }

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Runtime tools: etcd, kubectl (tests run `kubectl explain`), qemu-utils (NBD
# clients), fio (benchmarks). Build tools only when the apiserver must be built.
need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v kubectl >/dev/null || need+=(kubernetes-client)
command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v fio >/dev/null || need+=(fio)
command -v openssl >/dev/null || need+=(openssl)
if [ ! -x "$assets/kube-apiserver" ]; then
  command -v go >/dev/null || need+=(golang-go)
  command -v rsync >/dev/null || need+=(rsync)
  [ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] || need+=(golang-github-modern-go-reflect2-dev)
  command -v dpkg-source >/dev/null || need+=(dpkg-dev)
fi
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -qq "${need[@]}" >/dev/null
fi
ln -sf "$(command -v etcd)" "$assets/etcd"

if [ ! -x "$assets/kube-apiserver" ]; then
  started=$(date +%s)
  work="$cache/build"
  rm -rf "$work" && mkdir -p "$work/apt/sources" "$work/apt/lists/partial" "$work/src"
  # A private deb-src list derived from the system's own sources; the system's
  # apt configuration and state are never touched.
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources >"$work/apt/sources/debian-src.sources"
  else
    sed -n 's/^deb /deb-src /p' /etc/apt/sources.list >"$work/apt/sources/debian-src.list"
  fi
  aptopts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/apt/sources"
           -o "Dir::State::Lists=$work/apt/lists")
  log "fetching Debian's kubernetes source package"
  apt-get "${aptopts[@]}" update -qq
  (cd "$work/src" && apt-get "${aptopts[@]}" source --download-only kubernetes >/dev/null)
  dsc=$(ls "$work"/src/kubernetes_*.dsc | head -n1)
  (cd "$work/src" && dpkg-source --no-check -x "$dsc" k8s >/dev/null)
  k8s="$work/src/k8s"
  # The vendored reflect2 crashes under Go >= 1.18 on the first custom resource;
  # Debian's 1.0.2 does not.
  rm -rf "$k8s/vendor/github.com/modern-go/reflect2"
  mkdir -p "$k8s/vendor/github.com/modern-go/reflect2"
  cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go \
     /usr/share/gocode/src/github.com/modern-go/reflect2/*.s \
     "$k8s/vendor/github.com/modern-go/reflect2/" 2>/dev/null || true
  log "building kube-apiserver (about 6 minutes on 2 cores)"
  (cd "$k8s" && mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes &&
     GOPATH="$k8s/.go" GOCACHE="$cache/gocache" CGO_ENABLED=0 GOFLAGS=-mod=vendor \
     make WHAT=cmd/kube-apiserver >"$work/build.log" 2>&1) || { tail -n 40 "$work/build.log" >&2; exit 1; }
  bin=$(find "$k8s/_output" -type f -name kube-apiserver -perm -u+x | head -n1)
  install -m 0755 "$bin" "$assets/kube-apiserver.tmp" && mv "$assets/kube-apiserver.tmp" "$assets/kube-apiserver"
  rm -rf "$work"
  log "kube-apiserver built in $(( $(date +%s) - started ))s"
fi
echo "$assets"
