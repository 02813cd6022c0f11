#!/usr/bin/env bash
# The run command (README): a local control plane with vmreplica's API and the
# examples applied, then an agent serving a disk over NBD: writes through the
# export are logged, sealed into segments, and replaying the segments onto the
# starting image gives the live disk byte for byte.
#   hack/local-up.sh          show it and tear everything down
#   hack/local-up.sh --keep   keep it running; prints a KUBECONFIG to use; Ctrl-C ends it
set -euo pipefail
cd "$(dirname "$0")/.."
keep=false; [ "${1:-}" = "--keep" ] && keep=true

KUBEBUILDER_ASSETS="${KUBEBUILDER_ASSETS:-$(hack/test-deps.sh)}"
export KUBEBUILDER_ASSETS
target="${CARGO_TARGET_DIR:-target}"
cargo build -q --locked -p vmreplica-tests --bin vmreplica-testenv -p vmreplica-controller -p vmreplica-agent

run=$(mktemp -d -t vmreplica-local.XXXXXX)
"$target/debug/vmreplica-testenv" "$run/kubeconfig" 2>"$run/control-plane.log" &
env_pid=$!
agent_pid=""
trap 'kill $env_pid $agent_pid 2>/dev/null; wait 2>/dev/null; rm -rf "$run"' EXIT
for _ in $(seq 1 240); do
  [ -f "$run/kubeconfig" ] && break
  kill -0 "$env_pid" 2>/dev/null || { cat "$run/control-plane.log" >&2; exit 1; }
  sleep 0.5
done
export KUBECONFIG="$run/kubeconfig"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "control plane up; vmreplica CRDs installed"
kubectl get crds
say "the controller checks its CRDs before it starts"
"$target/debug/vmreplica-controller" || true
say "applying examples/ (site A: the protected VM; site B: replica server and authorisation)"
kubectl create namespace finance >/dev/null
kubectl apply --server-side -n finance -f examples/
say "kubectl get vmr,rplan -n finance ; kubectl get rsrv,authz"
kubectl get vmr,rplan -n finance
kubectl get rsrv,authz
say "the apiserver itself refuses a bad spec (frequency 0, disk path with ..)"
kubectl apply --server-side -n finance -f - <<'YAML' || true
apiVersion: vmreplica.io/v1alpha1
kind: VMReplication
metadata: {name: bad}
spec:
  replicationFrequencySeconds: 0
  disks: [{name: root, path: /var/lib/vm/../../etc/shadow}]
YAML
agent="$target/debug/vmreplica-agent"
disk="$run/ledger-db-root.img"
say "an agent serves a 256 MiB disk over NBD and seals its log every second"
truncate -s 256M "$disk" && cp "$disk" "$run/base.img"
"$agent" serve --vm ledger-db --disk "root=$disk" --socket "$run/nbd.sock" --seal-interval 1 \
  >/dev/null 2>"$run/agent.log" &
agent_pid=$!
for _ in $(seq 50); do [ -S "$run/nbd.sock" ] && break; sleep 0.1; done
url="nbd+unix:///root?socket=$run/nbd.sock"
say "qemu-io writes through the export (what the VM's QEMU would do)"
qemu-io -f raw -c 'write -P 0xa1 0 1M' -c 'write -P 0xb2 64M 4M' -c 'write -z 1M 1M' -c flush "$url" | grep -v ops
sleep 2
qemu-io -f raw -c 'write -P 0xc3 128M 8M' -c 'discard 64M 1M' "$url" | grep -v ops
sleep 2
kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true; agent_pid=""
say "the sealed log segments (verified: CRC per record, BLAKE3 per segment)"
"$agent" inspect "$disk.vmrlog"/*.seg
say "replaying them onto the starting image reproduces the disk"
"$agent" replay --image "$run/base.img" "$disk.vmrlog"/*.seg
qemu-img compare -f raw -F raw "$run/base.img" "$disk"

if $keep; then
  say "running; in another shell: export KUBECONFIG=$KUBECONFIG   (Ctrl-C ends it)"
  wait "$env_pid"
fi
