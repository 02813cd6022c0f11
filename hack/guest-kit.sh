#!/usr/bin/env bash
# Builds the guest kit the real-guest tests boot, only from Debian's packages,
# and prints the directory holding it:
#   ${VMREPLICA_CACHE:-~/.cache/vmreplica}/guest/{vmlinuz,initrd.img,accel}
# vmlinuz is Debian's cloud kernel; initrd.img holds busybox, the virtio
# modules, e2fsprogs and qemu-ga (with their libraries) and hack/guest/init as
# /init. `accel` says which accelerator boots a guest here: kvm where a KVM
# guest boots, else tcg (on these machines /dev/kvm exists but KVM guests
# hang at boot). Rebuilt only when hack/guest/init or this script changes.
#
# Also installs qemu-system-x86 (and cpio). Installing it makes apt remove a
# qemu-utils backport, so Debian's own qemu-utils comes in the same step, and
# qemu-img, qemu-io and qemu-nbd are checked afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${VMREPLICA_CACHE:-$HOME/.cache/vmreplica}"
kit="$cache/guest"
log() { echo "guest-kit: $*" >&2; }
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86 qemu-utils/bookworm)
command -v cpio >/dev/null || need+=(cpio)
command -v mke2fs >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -qq --allow-downgrades "${need[@]}" >/dev/null
fi
for c in qemu-system-x86_64 qemu-img qemu-io qemu-nbd cpio mke2fs; do
  command -v "$c" >/dev/null || { log "$c is missing after the install"; exit 1; }
done

stamp=$(cat hack/guest/init hack/guest-kit.sh | sha256sum | cut -c1-16)
if [ -f "$kit/stamp" ] && [ "$(cat "$kit/stamp")" = "$stamp" ]; then
  echo "$kit"
  exit 0
fi
started=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$kernel_pkg" ] || { log "no kernel package behind linux-image-cloud-amd64"; exit 1; }
log "building from $kernel_pkg, busybox-static, qemu-guest-agent"
(cd "$work" && apt-get download -qq "$kernel_pkg" busybox-static qemu-guest-agent 2>/dev/null)
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/pkgs"; done
kver=$(ls "$work/pkgs/lib/modules")

tree="$work/tree"
mkdir -p "$tree"/{bin,sbin,usr/bin,usr/sbin,lib/modules,proc,sys,dev,mnt,run,tmp,etc}
cp "$work/pkgs/bin/busybox" "$tree/bin/busybox"
for applet in $("$tree/bin/busybox" --list); do
  [ -e "$tree/bin/$applet" ] || ln -s busybox "$tree/bin/$applet"
done
mods="$work/pkgs/lib/modules/$kver/kernel/drivers"
for m in virtio/virtio_ring virtio/virtio virtio/virtio_pci_modern_dev virtio/virtio_pci_legacy_dev \
         virtio/virtio_pci block/virtio_blk char/virtio_console; do
  cp "$mods/$m.ko" "$tree/lib/modules/"
done
# Dynamic binaries with the libraries ldd names (the host's are Debian 12's too).
copy_bin() {
  cp "$1" "$tree/$2"
  ldd "$1" | grep -o '/[^ ]*' | while read -r lib; do
    mkdir -p "$tree$(dirname "$lib")"
    cp -L "$lib" "$tree$lib"
  done
}
for b in mke2fs e2fsck dumpe2fs; do copy_bin "$(command -v $b)" "sbin/$b"; done
ln -s mke2fs "$tree/sbin/mkfs.ext4"
copy_bin "$work/pkgs/usr/sbin/qemu-ga" usr/sbin/qemu-ga
cp hack/guest/init "$tree/init"
chmod +x "$tree/init"

mkdir -p "$kit.new"
cp "$work/pkgs/boot/vmlinuz-$kver" "$kit.new/vmlinuz"
(cd "$tree" && find . | cpio -o -H newc --quiet) | gzip -1 > "$kit.new/initrd.img"

# Which accelerator boots a guest here (a KVM guest that hangs is given 20 s).
accel=tcg
if [ -w /dev/kvm ]; then
  if timeout 20 qemu-system-x86_64 -accel kvm -m 256 -nographic -no-reboot -kernel "$kit.new/vmlinuz" \
      -initrd "$kit.new/initrd.img" -append "console=ttyS0 panic=-1 vmr.workload=probe" 2>/dev/null \
      | grep -q "^VMR BOOTED"; then
    accel=kvm
  fi
fi
echo "$accel" > "$kit.new/accel"
echo "$stamp" > "$kit.new/stamp"
rm -rf "$kit"
mv "$kit.new" "$kit"
log "kit built in $(( $(date +%s) - started ))s (kernel $kver, accelerator $accel)"
echo "$kit"
