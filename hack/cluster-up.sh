#!/usr/bin/env bash
# Starts a real one-node Kubernetes cluster on loopback for the chart, RBAC and
# hook-Job tests, and prints the path of its admin kubeconfig:
#
#   etcd                      127.0.0.1:12379
#   kube-apiserver            https://127.0.0.1:16443  (Node,RBAC; NodeRestriction)
#   kube-controller-manager   127.0.0.1, --port=0, no leader election
#   kube-scheduler            127.0.0.1, --port=0, no leader election
#   containerd + runc         own root, state and socket; loopback-only CNI
#   kubelet                   node "127.0.0.1", host-network pods only
#
# Everything lives under DIR (default /tmp/vmreplica-cluster): certificates,
# data, logs (DIR/log/*.log) and the PIDs hack/cluster-down.sh stops. Nothing is
# installed as a system service and /etc is not edited. Pods use the host
# network; no address outside 127.0.0.0/8 is used. The kubelet runs with
# AWS_EC2_METADATA_DISABLED=true: its built-in cloud credential provider would
# otherwise ask 169.254.169.254 at start-up.
#
# The binaries come from hack/test-deps.sh (built from Debian's kubernetes
# 1.20.2 source); containerd, runc, the CNI plugins and buildah from Debian.
# The pause image is built from that same source (build/pause/linux/pause.c)
# and imported, so no registry is ever asked for an image.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-${VMREPLICA_CLUSTER_DIR:-/tmp/vmreplica-cluster}}"
cache="${VMREPLICA_CACHE:-$HOME/.cache/vmreplica}"
log() { echo "cluster-up: $*" >&2; }
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
[ "$(id -u)" = 0 ] || { log "the kubelet and containerd need root"; exit 1; }
started=$(date +%s)

if [ -f "$dir/pids" ]; then
  log "a cluster is already recorded in $dir: stopping it first"
  hack/cluster-down.sh "$dir"
fi

assets=$(hack/test-deps.sh)
need=()
command -v containerd >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
[ -x /usr/lib/cni/loopback ] || need+=(containernetworking-plugins)
command -v buildah >/dev/null || need+=(buildah)
command -v openssl >/dev/null || need+=(openssl)
command -v conntrack >/dev/null || need+=(conntrack)
command -v iptables >/dev/null || need+=(iptables)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

mkdir -p "$dir"/{pki,log,etcd,containerd,cni,kubelet,kubelet-certs,flexvolume}
: >"$dir/pids"
pki="$dir/pki"

# --- certificates: one CA; the apiserver serves 127.0.0.1; every component
# has its own client certificate with the identity RBAC and the Node
# authorizer expect.
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=vmreplica-cluster-ca" \
  -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
leaf() { # name subject [subjectAltName]
  local ext="$pki/$1.ext"
  printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n' >"$ext"
  [ -n "${3:-}" ] && echo "subjectAltName=$3" >>"$ext"
  openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$pki/$1.key" -out "$pki/$1.csr" 2>/dev/null
  openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 30 -extfile "$ext" -out "$pki/$1.crt" 2>/dev/null
}
leaf apiserver "/CN=kube-apiserver" "IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
leaf admin "/O=system:masters/CN=vmreplica-admin"
leaf apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
leaf controller-manager "/CN=system:kube-controller-manager"
leaf scheduler "/CN=system:kube-scheduler"
leaf kubelet "/O=system:nodes/CN=system:node:127.0.0.1"
openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null

server=https://127.0.0.1:16443
kubeconfig() { # name cert
  cat >"$dir/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: vmreplica
  cluster: {server: $server, certificate-authority: $pki/ca.crt}
users:
- name: $1
  user: {client-certificate: $pki/$2.crt, client-key: $pki/$2.key}
contexts:
- name: $1
  context: {cluster: vmreplica, user: $1}
current-context: $1
EOF
}
kubeconfig admin admin
kubeconfig controller-manager controller-manager
kubeconfig scheduler scheduler
kubeconfig kubelet kubelet

# Runs a component in the background (its own session, so cluster-down.sh
# can stop it and its children) and records its PID.
run() { # name cmd...
  local name=$1; shift
  setsid "$@" >"$dir/log/$name.log" 2>&1 </dev/null &
  echo "$name $!" >>"$dir/pids"
}
wait_for() { # what seconds command...
  local what=$1 secs=$2; shift 2
  for _ in $(seq 1 $((secs * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  log "$what not ready after ${secs}s; the last lines of its logs:"
  tail -n 20 "$dir"/log/*.log >&2
  exit 1
}

# --- the sysctls the kubelet sets, kept so cluster-down.sh restores them.
for k in vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops \
         kernel.keys.root_maxkeys kernel.keys.root_maxbytes; do
  echo "$k=$(sysctl -n "$k")"
done >"$dir/sysctls"

run etcd "$assets/etcd" --data-dir="$dir/etcd" --unsafe-no-fsync \
  --listen-client-urls=http://127.0.0.1:12379 --advertise-client-urls=http://127.0.0.1:12379 \
  --listen-peer-urls=http://127.0.0.1:12380 --initial-advertise-peer-urls=http://127.0.0.1:12380 \
  --initial-cluster=default=http://127.0.0.1:12380 --listen-metrics-urls=http://127.0.0.1:12381

run kube-apiserver "$assets/kube-apiserver" --etcd-servers=http://127.0.0.1:12379 \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port=16443 --insecure-port=0 \
  --cert-dir="$pki" --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
  --client-ca-file="$pki/ca.crt" \
  --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
  --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
  --kubelet-preferred-address-types=InternalIP,Hostname \
  --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
  --service-cluster-ip-range=10.96.0.0/24 --allow-privileged=true --endpoint-reconciler-type=none
kc() { kubectl --kubeconfig "$dir/admin.kubeconfig" "$@"; }
wait_for kube-apiserver 90 kc get --raw /readyz

# --- containerd, with a configuration of its own (nothing under /etc).
cat >"$dir/containerd/config.toml" <<EOF
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$dir/containerd/containerd.sock"
[ttrpc]
  address = "$dir/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/vmreplica/pause:3.2"
  # Without it every pod fails with "can't get final child's PID from pipe":
  # the sandbox lacks CAP_SYS_RESOURCE.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
EOF
# The only CNI plugin: loopback. Pods use the host network.
echo '{"cniVersion": "0.4.0", "name": "loopback", "plugins": [{"type": "loopback"}]}' \
  >"$dir/cni/10-loopback.conflist"
run containerd containerd --config "$dir/containerd/config.toml"
ctr_() { ctr --address "$dir/containerd/containerd.sock" -n k8s.io "$@"; }
wait_for containerd 30 ctr_ version

# --- the pause image, built from the Kubernetes source test-deps.sh keeps.
pause_tar="$cache/images/pause-3.2.tar"
if [ ! -f "$pause_tar" ]; then
  mkdir -p "$cache/images"
  b=$(mktemp -d)
  gcc -Os -static -o "$b/pause" "$cache/k8s-src/build/pause/linux/pause.c"
  bah() { buildah --root "$cache/buildah/root" --runroot "$b/run" --storage-driver vfs "$@"; }
  c=$(bah from scratch)
  bah copy "$c" "$b/pause" /pause >/dev/null
  bah config --entrypoint '["/pause"]' --user 65535:65535 "$c"
  bah commit -q "$c" localhost/vmreplica/pause:3.2 >/dev/null
  bah rm "$c" >/dev/null
  bah push -q localhost/vmreplica/pause:3.2 "oci-archive:$pause_tar.tmp:localhost/vmreplica/pause:3.2"
  mv "$pause_tar.tmp" "$pause_tar"
  rm -rf "$b"
fi
ctr_ images import --base-name localhost/vmreplica/pause "$pause_tar" >/dev/null

# --- controller-manager and scheduler.
run kube-controller-manager "$assets/kube-controller-manager" \
  --kubeconfig="$dir/controller-manager.kubeconfig" \
  --authentication-kubeconfig="$dir/controller-manager.kubeconfig" \
  --authorization-kubeconfig="$dir/controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 --port=0 --leader-elect=false \
  --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
  --use-service-account-credentials=true --flex-volume-plugin-dir="$dir/flexvolume" \
  --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key"
run kube-scheduler "$assets/kube-scheduler" --kubeconfig="$dir/scheduler.kubeconfig" \
  --authentication-kubeconfig="$dir/scheduler.kubeconfig" \
  --authorization-kubeconfig="$dir/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --port=0 --leader-elect=false

# --- the kubelet.
cat >"$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
healthzBindAddress: 127.0.0.1
healthzPort: 10248
port: 10250
readOnlyPort: 0
cgroupDriver: cgroupfs
failSwapOn: false
makeIPTablesUtilChains: false
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
evictionHard: {memory.available: 100Mi, nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
EOF
run kubelet env AWS_EC2_METADATA_DISABLED=true "$assets/kubelet" \
  --config="$dir/kubelet.yaml" --kubeconfig="$dir/kubelet.kubeconfig" \
  --container-runtime=remote --container-runtime-endpoint="unix://$dir/containerd/containerd.sock" \
  --root-dir="$dir/kubelet" --cert-dir="$dir/kubelet-certs" \
  --hostname-override=127.0.0.1 --node-ip=127.0.0.1 --v=1
node_ready() { kc get node 127.0.0.1 -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' | grep -qx True; }
wait_for "the node" 120 node_ready
# The default ServiceAccount exists once the controller-manager has made it.
wait_for "the default ServiceAccount" 60 kc -n default get serviceaccount default
log "ready in $(( $(date +%s) - started ))s (logs in $dir/log)"
echo "$dir/admin.kubeconfig"
