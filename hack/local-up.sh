#!/usr/bin/env bash
# The run command (README): a local control plane with vmreplica's API and the
# examples applied; the controller configures site B's agent from a
# ReplicationServer and an AuthorizationEntry; a VMReplication makes site A's
# agent serve a disk over NBD and replicate every write to site B over mutual
# TLS; `kubectl get vmr` follows it to Replicating; site B's controller creates
# the Replica object; site B's replica ends up equal to site A's disk, with a
# recovery point per replication cycle. The VM is a real guest (Debian's
# kernel under qemu-system-x86_64, its disk the agent's NBD export) writing an
# ext4 filesystem: a write-ahead log fsynced record by record, and files. A
# test failover at site B boots the guest on test disks of a point while
# replication goes on; then a planned failover moves the VM to site B with no
# data lost, where it boots and checks its filesystem, its log and its files;
# replication is reversed: the guest's writes at site B reach site A's own
# disk, no copy.
#   hack/local-up.sh          show it and tear everything down
#   hack/local-up.sh --keep   keep it running; prints a KUBECONFIG to use; Ctrl-C ends it
set -euo pipefail
cd "$(dirname "$0")/.."
keep=false; [ "${1:-}" = "--keep" ] && keep=true

KUBEBUILDER_ASSETS="${KUBEBUILDER_ASSETS:-$(hack/test-deps.sh)}"
export KUBEBUILDER_ASSETS
kit="${VMREPLICA_GUEST_KIT:-$(hack/guest-kit.sh)}"
target="${CARGO_TARGET_DIR:-target}"
cargo build -q --locked -p vmreplica-tests -p vmreplica-controller -p vmreplica-agent --bins

run=$(mktemp -d -t vmreplica-local.XXXXXX)
"$target/debug/vmreplica-testenv" "$run/kubeconfig" 2>"$run/control-plane.log" &
env_pid=$!
agent_pid=""; replica_pid=""; controller_pid=""
trap 'kill $env_pid $agent_pid $replica_pid $controller_pid 2>/dev/null; wait 2>/dev/null; rm -rf "$run"' EXIT
for _ in $(seq 1 240); do
  [ -f "$run/kubeconfig" ] && break
  kill -0 "$env_pid" 2>/dev/null || { cat "$run/control-plane.log" >&2; exit 1; }
  sleep 0.5
done
export KUBECONFIG="$run/kubeconfig"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "control plane up; vmreplica CRDs installed"
kubectl get crds
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
kubectl delete -n finance -f examples/ >/dev/null
say "(examples removed again: the live objects below are the demo's own)"
agent="$target/debug/vmreplica-agent"
"$target/debug/vmreplica-devcerts" "$run/certs" replica=replica.site-b.example.com,127.0.0.1 \
  primary=host1.site-a.example.com,127.0.0.1 controller=vmreplica-controller
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
disk="$run/site-a/ledger-db-root.img"
mkdir -p "$run/site-a" "$run/site-b"
wait_ready() { for _ in $(seq 100); do grep -q "$2" "$1" 2>/dev/null && return; sleep 0.1; done; cat "$1" >&2; exit 1; }
# wait_until TRIES 'shell condition': re-checks every 0.2 s; the step after it shows the outcome.
wait_until() { local n=$1; shift; for _ in $(seq "$n"); do eval "$*" && return; sleep 0.2; done; }
# guest DRIVE WORKLOAD [vmr.ARG=...]: boots the guest on DRIVE (QEMU -drive) and
# prints what it reports (hack/guest/init); the WAL's acknowledgements summed up.
guest() {
  local drive=$1 workload=$2; shift 2
  timeout 300 qemu-system-x86_64 -accel "$(cat "$kit/accel")" -m 256 -nodefaults -no-user-config -display none \
    -serial stdio -no-reboot -kernel "$kit/vmlinuz" -initrd "$kit/initrd.img" \
    -append "console=ttyS0 panic=-1 quiet vmr.workload=$workload $*" -drive "$drive" </dev/null 2>&1 \
    | tr -d '\r' | tee -a "$run/guest.console" | awk '/^VMR ACK/ {n++; last=$3; next} /^VMR/ {print "  guest: " substr($0, 5)} END {if (n) print "  guest: " n " WAL records acknowledged (fsync returned), the last " last}'
}
nbd_drive() { echo "driver=nbd,server.type=unix,server.path=$1,export=site-a.ledger-db/root,if=virtio,cache=none"; }
# field NAMESPACE JSONPATH: a field of the demo's VMReplication ledger-db there.
field() { kubectl get vmr -n "$1" ledger-db -o jsonpath="{$2}" 2>/dev/null; }

say "the controller starts; site B's agent (both roles, as on any node) announces itself with a Lease and waits for its rules"
kubectl create namespace vmreplica-system >/dev/null
kubectl create namespace site-b >/dev/null
"$target/debug/vmreplica-controller" --namespace vmreplica-system --tls-dir "$run/certs/controller" --metrics 127.0.0.1:0 \
  --poll-seconds 2 2>"$run/controller.log" &
controller_pid=$!
ctl_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$agent" serve --listen "127.0.0.1:$port" --tls-dir "$run/certs/replica" --control-listen "127.0.0.1:$ctl_port" \
  --socket "$run/nbd-b.sock" --disk-root "$run/site-b" \
  --resolve host1.site-a.example.com=127.0.0.1 --retry-seconds 1 \
  --lease-namespace vmreplica-system --node site-b-node1 --node-label vmreplica.io/site=b \
  --advertise-host 127.0.0.1 >"$run/replica.out" 2>"$run/replica.log" &
replica_pid=$!
wait_ready "$run/replica.out" ready
kubectl get lease -n vmreplica-system

say "site B's ReplicationServer and an AuthorizationEntry for *.site-a.example.com (trust group finance)"
kubectl apply --server-side -f - <<YAML
apiVersion: vmreplica.io/v1alpha1
kind: ReplicationServer
metadata: {name: local-site-b}
spec:
  nodeSelector: {vmreplica.io/site: b}
  port: $port
---
apiVersion: vmreplica.io/v1alpha1
kind: AuthorizationEntry
metadata: {name: local-site-a}
spec:
  allowedPrimaryServer: "*.site-a.example.com"
  replicaStorageLocation: $run/site-b
  trustGroup: finance
  replicaNamespace: site-b
YAML
wait_until 100 '[ "$(kubectl get rsrv local-site-b -o jsonpath="{.status.agentsSummary}")" = 1/1 ]'
say "the controller pushed them to the agent, which accepted (kubectl get rsrv)"
kubectl get rsrv local-site-b

say "site A: its agent (both roles too: it can receive reverse replication) announces itself"
truncate -s 256M "$disk"
ctl_a=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
port_a=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$agent" serve --listen "127.0.0.1:$port_a" --control-listen "127.0.0.1:$ctl_a" --tls-dir "$run/certs/primary" \
  --socket "$run/nbd.sock" \
  --disk-root "$run/site-a" --resolve replica.site-b.example.com=127.0.0.1 --retry-seconds 1 \
  --lease-namespace vmreplica-system --node site-a-node1 --node-label vmreplica.io/site=a --advertise-host 127.0.0.1 \
  >"$run/primary.out" 2>"$run/primary.log" &
agent_pid=$!
wait_ready "$run/primary.out" ready

say "site A: a VMReplication protects the 256 MiB disk, replicated every 2 seconds to site B"
kubectl create namespace site-a >/dev/null
kubectl apply --server-side -n site-a -f - <<YAML
apiVersion: vmreplica.io/v1alpha1
kind: VMReplication
metadata: {name: ledger-db}
spec:
  role: Primary
  node: site-a-node1
  disks: [{name: root, path: $disk}]
  replicaServer: {name: replica.site-b.example.com, port: $port}
  replicationFrequencySeconds: 2
YAML
wait_until 150 '[ "$(field site-a .status.state)" = Replicating ]'
say "the initial copy is done: kubectl get vmr -n site-a"
kubectl get vmr -n site-a
url="nbd+unix:///site-a.ledger-db/root?socket=$run/nbd.sock"

say "the VM boots on the export (QEMU -drive driver=nbd,...): it makes an ext4 filesystem, then writes its log and files"
guest "$(nbd_drive "$run/nbd.sock")" mkfs
guest "$(nbd_drive "$run/nbd.sock")" write vmr.records=20 vmr.files=4
replica="$run/site-b/site-a.ledger-db/root"
wait_until 100 'qemu-img compare -q -f raw -F raw "$replica/disk.img" "$disk" 2>/dev/null'
say "site B's replica equals site A's disk"
qemu-img compare -f raw -F raw "$replica/disk.img" "$disk"
say "its recovery points (one per replication cycle)"
python3 - "$replica/replica.json" <<'PY'
import json, sys, datetime
s = json.load(open(sys.argv[1]))
print(f"replica of {s['vmId']}/{s['diskId']} from {s['primary']} (trust group {s['trustGroup']}), applied through sequence {s['appliedThrough']}")
for p in s["points"]:
    t = datetime.datetime.fromtimestamp(p["timeMs"] / 1000, datetime.timezone.utc).strftime("%H:%M:%S")
    print(f"  point at sequence {p['seq']:>3}  sealed {t}  {p['kind']}")
PY
say "site B's controller created the Replica object, with its recovery points: kubectl get vmr -A"
wait_until 100 '[ -n "$(field site-b ".status.recoveryPoints[0].id")" ]'
kubectl get vmr -A
kubectl get vmr -n site-b ledger-db -o jsonpath='{range .status.recoveryPoints[*]}  point {.id}  {.time}  {.kind}{"\n"}{end}'

say "a test failover at site B (spec.failover type Test): the newest point as test disks"
kubectl patch vmr -n site-b ledger-db --type merge -p '{"spec":{"failover":{"id":"drill-1","type":"Test"}}}' >/dev/null
wait_until 150 '[ "$(field site-b .status.lastFailover.phase)" = Completed ]'
kubectl get vmr -n site-b ledger-db -o jsonpath='{.status.lastFailover}' | python3 -m json.tool
test_disk="$replica/materialized/ledger-db-test.img"
say "the test disk equals site A's disk; replication goes on: the VM writes more at A, which reaches the replica, not the test disk"
qemu-img compare -f raw -F raw "$test_disk" "$disk"
guest "$(nbd_drive "$run/nbd.sock")" write vmr.records=10
wait_until 100 'qemu-img compare -q -f raw -F raw "$replica/disk.img" "$disk" 2>/dev/null'
qemu-img compare -f raw -F raw "$replica/disk.img" "$disk"
qemu-img compare -q -f raw -F raw "$test_disk" "$disk" || echo "test disk differs from site A's disk now, as it should"
say "a test VM boots on the test disk (an isolated copy): it checks its filesystem, log and files"
guest "file=$test_disk,format=raw,if=virtio,cache=none" verify
say "removing the request stops the test failover and deletes its disks"
kubectl patch vmr -n site-b ledger-db --type merge -p '{"spec":{"failover":null}}' >/dev/null
wait_until 100 '[ "$(field site-b .status.lastFailover.phase)" = Cancelled ]'
kubectl get vmr -n site-b ledger-db -o jsonpath='{.status.lastFailover.phase}: {.status.lastFailover.message}{"\n"}'
[ -e "$test_disk" ] && echo "test disk still there?!" || echo "test disk deleted"

say "planned failover, first at site A: stop the VM, make the disks read-only, ship the last log"
kubectl patch vmr -n site-a ledger-db --type merge -p '{"spec":{"failover":{"id":"move-1","type":"Planned"}}}' >/dev/null
wait_until 150 '[ "$(field site-a .status.state)" = SyncedReplicationComplete ]'
kubectl get vmr -n site-a ledger-db -o jsonpath='{.status.lastFailover.phase}: {.status.lastFailover.message}{"\n"}'
qemu-io -f raw -c 'write -P 0xee 0 4k' "$url" 2>&1 | head -1 || true
say "site A accepts site B as a primary (for reverse replication): a ReplicationServer and an entry"
mkdir -p "$run/site-a-replicas"
kubectl apply --server-side -f - <<YAML
apiVersion: vmreplica.io/v1alpha1
kind: ReplicationServer
metadata: {name: local-site-a}
spec:
  nodeSelector: {vmreplica.io/site: a}
  port: $port_a
---
apiVersion: vmreplica.io/v1alpha1
kind: AuthorizationEntry
metadata: {name: local-site-b}
spec:
  allowedPrimaryServer: replica.site-b.example.com
  replicaStorageLocation: $run/site-a-replicas
  trustGroup: finance
  replicaNamespace: site-a
YAML
say "then at site B: promote the replica (epoch + 1), serve it as the VM's disk, and reverse replication to site A"
kubectl patch vmr -n site-b ledger-db --type merge -p "{\"spec\":{\"replicationFrequencySeconds\":2,\"failover\":{\"id\":\"move-1\",\"type\":\"Planned\",
  \"reverseReplication\":true,\"reverseReplicaServer\":{\"name\":\"host1.site-a.example.com\",\"port\":$port_a}}}}" >/dev/null
wait_until 150 '[ "$(field site-b .status.lastFailover.phase)" = Completed ]'
kubectl get vmr -A
kubectl get vmr -n site-b ledger-db -o jsonpath='{.status.lastFailover.message}{"\n"}'
say "no data lost: site B's disk (served at nbd+unix:///site-a.ledger-db/root?socket=…/nbd-b.sock) equals site A's"
qemu-img compare -f raw -F raw "nbd+unix:///site-a.ledger-db/root?socket=$run/nbd-b.sock" "$disk"
say "the VM boots at site B on that disk: a clean filesystem, all 30 log records, every file"
guest "$(nbd_drive "$run/nbd-b.sock")" verify
say "it writes on at site B; that reaches site A's own disk (no copy was made), and site A's object shows it receives"
guest "$(nbd_drive "$run/nbd-b.sock")" write vmr.records=5
wait_until 150 'qemu-img compare -q -f raw -F raw "nbd+unix:///site-a.ledger-db/root?socket=$run/nbd-b.sock" "$disk" 2>/dev/null'
qemu-img compare -f raw -F raw "nbd+unix:///site-a.ledger-db/root?socket=$run/nbd-b.sock" "$disk"
wait_until 100 '[ "$(field site-a .status.primaryServer)" = replica.site-b.example.com ]'
kubectl get vmr -A

say "its status as an operator sees it: kubectl describe vmr -n site-a ledger-db (events at the end)"
kubectl describe vmr -n site-a ledger-db | sed -n '/^Status:/,$p'
kill "$agent_pid" "$replica_pid" "$controller_pid"; wait "$agent_pid" "$replica_pid" "$controller_pid" 2>/dev/null || true
agent_pid=""

if $keep; then
  say "running; in another shell: export KUBECONFIG=$KUBECONFIG   (Ctrl-C ends it)"
  wait "$env_pid"
fi
