#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian 12 machine and prints the
# directory that holds `kube-apiserver` and `etcd` (envtest's KUBEBUILDER_ASSETS).
#
# Debian ships etcd and kubectl but not kube-apiserver, so we build it once from
# Debian's own kubernetes 1.20.2 source package and cache it outside the clone:
#   ${VMREPLICA_CACHE:-~/.cache/vmreplica}/assets/{kube-apiserver,etcd}
# The same make also builds kubelet, kube-controller-manager and kube-scheduler
# (the one-node cluster of hack/cluster-up.sh) into the same directory: one
# code-generation pass serves all four. The source stays unpacked at a fixed
# path with Go's build cache linked to a kept directory, because Kubernetes'
# hack/lib/golang.sh sets GOCACHE to _output/local/go/cache itself.
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
# Network-fault tests: namespaces, veth and iptables rules they create.
command -v ip >/dev/null || need+=(iproute2)
command -v iptables >/dev/null || need+=(iptables)
# Disk-fault tests: a small ext4 on a loop device.
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
bins=(kube-apiserver kubelet kube-controller-manager kube-scheduler)
missing() { for b in "${bins[@]}"; do [ -x "$assets/$b" ] || return 0; done; return 1; }
if missing; then
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

# Helm's own code for the chart tests (hack/helm): Debian has no helm
# binary; helm-python-sdk bundles Helm v4's Go SDK.
venv="$cache/helm-venv"
if ! "$venv/bin/python" -c 'import helm_python, yaml' 2>/dev/null; then
  log "installing helm-python-sdk in $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check helm-python-sdk==0.2.2 pyyaml==6.0.3 >&2
fi

if missing; then
  started=$(date +%s)
  work="$cache/build"
  k8s="$cache/k8s-src"
  if [ ! -f "$k8s/.unpacked" ]; then
    rm -rf "$work" "$k8s" && mkdir -p "$work/apt/sources" "$work/apt/lists/partial" "$work/src"
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
    apt-get "${aptopts[@]}" update -qq 2>/dev/null
    (cd "$work/src" && apt-get "${aptopts[@]}" source --download-only kubernetes >/dev/null 2>&1)
    dsc=$(ls "$work"/src/kubernetes_*.dsc | head -n1)
    dpkg-source --no-check -x "$dsc" "$k8s" >/dev/null
    # The vendored reflect2 crashes under Go >= 1.18 on the first custom resource;
    # Debian's 1.0.2 does not.
    rm -rf "$k8s/vendor/github.com/modern-go/reflect2"
    mkdir -p "$k8s/vendor/github.com/modern-go/reflect2"
    cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go \
       /usr/share/gocode/src/github.com/modern-go/reflect2/*.s \
       "$k8s/vendor/github.com/modern-go/reflect2/" 2>/dev/null || true
    # dpkg-source leaves a copy of the upstream tarball beside the tree.
    rm -rf "$work" "$cache"/kubernetes_*.orig.tar.*
    touch "$k8s/.unpacked"
  fi
  mkdir -p "$cache/gocache" "$k8s/_output/local/go"
  ln -sfn "$cache/gocache" "$k8s/_output/local/go/cache"
  log "building ${bins[*]} (about 15 minutes on 2 cores cold, 2-3 warm)"
  (cd "$k8s" && mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes &&
     GOPATH="$k8s/.go" GOCACHE="$cache/gocache" CGO_ENABLED=0 GOFLAGS=-mod=vendor \
     make WHAT="cmd/kube-apiserver cmd/kubelet cmd/kube-controller-manager cmd/kube-scheduler" \
       >"$cache/k8s-build.log" 2>&1) || { tail -n 40 "$cache/k8s-build.log" >&2; exit 1; }
  for b in "${bins[@]}"; do
    bin=$(find "$k8s/_output" -type f -name "$b" -perm -u+x | head -n1)
    install -m 0755 "$bin" "$assets/$b.tmp" && mv "$assets/$b.tmp" "$assets/$b"
  done
  log "${bins[*]} built in $(( $(date +%s) - started ))s"
fi
echo "$assets"
