#!/usr/bin/env bash
# Builds the controller and agent images from Debian packages, offline from any
# container registry, and prints the directory holding them as OCI archives:
#   ${VMREPLICA_CACHE:-~/.cache/vmreplica}/images/{vmreplica-controller,vmreplica-agent}.tar
# named localhost/vmreplica/<component>:<TAG> (TAG defaults to "dev").
#
#   hack/images.sh [--import CONTAINERD_SOCKET] [TAG]
#
# The root filesystem is Debian bookworm's libc, libgcc, base-files,
# base-passwd and dash, written by mmdebstrap (cached; rebuilt when this
# script changes); buildah adds the release binary and writes the archive.
# --import loads both into that containerd's k8s.io namespace (what the
# kubelet runs). `Containerfile` at the top of the repository builds the same
# images with docker, podman or buildah from a registry's debian:bookworm-slim.
#
# The controller runs as user 65532 (nonroot). The agent runs as root: it
# opens and locks disk images owned by the node's hypervisor, creates the NBD
# and guest-agent sockets QEMU connects to in host directories, and keeps its
# logs beside the disks (DESIGN: "Data path"); the chart gives it no other
# privilege (no privileged mode, all capabilities dropped but those).
set -euo pipefail
cd "$(dirname "$0")/.."
import=""
if [ "${1:-}" = --import ]; then import=$2; shift 2; fi
tag="${1:-dev}"
cache="${VMREPLICA_CACHE:-$HOME/.cache/vmreplica}"
out="$cache/images"
target="${CARGO_TARGET_DIR:-target}"
log() { echo "images: $*" >&2; }
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
mkdir -p "$out"

need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v buildah >/dev/null || need+=(buildah)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

started=$(date +%s)
cargo build -q --release --locked -p vmreplica-controller -p vmreplica-agent

stamp=$(sha256sum "$0" | cut -c1-16)
rootfs="$out/rootfs-bookworm.tar"
if [ ! -f "$rootfs" ] || [ "$(cat "$out/rootfs.stamp" 2>/dev/null)" != "$stamp" ]; then
  log "writing the root filesystem with mmdebstrap"
  # --format: mmdebstrap guesses it from the name, and a name not ending in
  # .tar makes a directory (an earlier version of this script kept one).
  rm -rf "$rootfs" "$rootfs.tmp"
  # The machine's own Debian sources (its mirror), for bookworm.
  mmdebstrap --quiet --format=tar --variant=extract --include=libc6,libgcc-s1,base-files,base-passwd,dash \
    --dpkgopt='path-exclude=/usr/share/{doc,man,locale,info}/*' \
    bookworm "$rootfs.tmp" http://deb.debian.org/debian >/dev/null
  mv "$rootfs.tmp" "$rootfs"
  echo "$stamp" >"$out/rootfs.stamp"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bah() { buildah --root "$cache/buildah/root" --runroot "$work/run" --storage-driver vfs "$@"; }
image() { # component user
  local name="localhost/vmreplica/$1:$tag" c
  c=$(bah from scratch)
  bah add "$c" "$rootfs" / >/dev/null
  bah copy --chmod 0755 "$c" "$target/release/$1" "/usr/local/bin/$1" >/dev/null
  bah config --entrypoint "[\"/usr/local/bin/$1\"]" --cmd '' --user "$2" \
    --label org.opencontainers.image.source=vmreplica \
    --label "org.opencontainers.image.version=$tag" "$c"
  bah commit -q --rm "$c" "$name" >/dev/null
  rm -f "$out/$1.tar"
  bah push -q "$name" "oci-archive:$out/$1.tar:$name"
  bah rmi "$name" >/dev/null
  log "$name -> $out/$1.tar ($(du -h "$out/$1.tar" | cut -f1))"
}
image vmreplica-controller 65532:65532
image vmreplica-agent 0:0

if [ -n "$import" ]; then
  for c in vmreplica-controller vmreplica-agent; do
    ctr --address "$import" -n k8s.io images import --base-name "localhost/vmreplica/$c" "$out/$c.tar" >/dev/null
  done
  log "imported into $import"
fi
log "built in $(( $(date +%s) - started ))s"
echo "$out"
