#!/usr/bin/env bash
# Stops the cluster hack/cluster-up.sh started in DIR and undoes what it did to
# the machine, whatever state it is in (safe to run twice, or after a failed
# start): stops each component by the PID it recorded (and the containers
# containerd's shims run), unmounts what the kubelet and containerd mounted,
# restores the sysctls the kubelet changes, and removes the kubepods cgroups
# and the kubelet's files outside DIR. Then removes DIR.
set -uo pipefail
dir="${1:-${VMREPLICA_CLUSTER_DIR:-/tmp/vmreplica-cluster}}"
log() { echo "cluster-down: $*" >&2; }

# The kubelet first (it would restart containers), then the rest in reverse.
if [ -f "$dir/pids" ]; then
  for name in kubelet kube-scheduler kube-controller-manager containerd kube-apiserver etcd; do
    pid=$(awk -v n="$name" '$1 == n { print $2 }' "$dir/pids")
    [ -n "$pid" ] || continue
    kill -TERM -- "-$pid" 2>/dev/null
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null
  done
fi
# containerd's shims (and the containers under them) outlive containerd.
for shim in $(pgrep -f "containerd-shim-runc-v2 .*-address $dir/" 2>/dev/null); do
  pkill -KILL -P "$shim" 2>/dev/null
  kill -KILL "$shim" 2>/dev/null
done
# Container processes still in kubepods cgroups (e.g. when a shim died first).
for procs in /sys/fs/cgroup/*/kubepods/cgroup.procs; do
  [ -f "$procs" ] || continue
  find "$(dirname "$procs")" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null
done
sleep 0.5

# Mounts under DIR, deepest first (secrets' tmpfs, sandboxes' shm, rootfs overlays).
if [ -d "$dir" ]; then
  awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "cannot unmount $m"
  done
fi

if [ -f "$dir/sysctls" ]; then
  while IFS='=' read -r k v; do
    [ "$(sysctl -n "$k" 2>/dev/null)" = "$v" ] || sysctl -q -w "$k=$v" >/dev/null 2>&1 || log "cannot restore $k"
  done <"$dir/sysctls"
fi

# The kubelet's cgroups (kubepods, and its QoS classes), deepest first.
for root in /sys/fs/cgroup/*/; do
  [ -d "$root/kubepods" ] || continue
  find "$root/kubepods" -depth -type d -exec rmdir {} \; 2>/dev/null
done
rm -rf /var/log/pods /var/log/containers /var/lib/kubelet/device-plugins
rmdir /var/lib/kubelet 2>/dev/null
rm -rf "$dir"
exit 0
