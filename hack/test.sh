#!/usr/bin/env bash
# The test command (README): installs what the tests need, starts ONE real
# control plane (etcd + kube-apiserver on loopback) and ONE real one-node
# cluster (hack/cluster-up.sh: kubelet + containerd, with the images
# hack/images.sh builds imported) for the whole run, runs every test of the
# workspace against them, and tears both down however the run ends.
# Extra arguments go to `cargo test` (e.g. `hack/test.sh -p vmreplica-crds`).
# Each phase prints how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBEBUILDER_ASSETS="${KUBEBUILDER_ASSETS:-$(hack/test-deps.sh)}"
export KUBEBUILDER_ASSETS
# The real-guest tests boot Debian's kernel under qemu-system-x86_64.
VMREPLICA_GUEST_KIT="${VMREPLICA_GUEST_KIT:-$(hack/guest-kit.sh)}"
export VMREPLICA_GUEST_KIT
target="${CARGO_TARGET_DIR:-target}"
phase() { echo "test.sh: $1 took $(( $(date +%s) - $2 ))s" >&2; }

run=$(mktemp -d -t vmreplica-test.XXXXXX)
cluster="${VMREPLICA_CLUSTER_DIR:-/tmp/vmreplica-cluster}"
env_pid=""; cluster_pid=""; own_cluster=false
cleanup() {
  [ -n "$env_pid" ] && { kill "$env_pid" 2>/dev/null; wait "$env_pid" 2>/dev/null; }
  [ -n "$cluster_pid" ] && wait "$cluster_pid" 2>/dev/null
  [ "$own_cluster" = true ] && hack/cluster-down.sh "$cluster" 2>/dev/null
  rm -rf "$run"
}
trap cleanup EXIT

# The cluster starts (about 30 s, mostly waiting) while the tests build. A
# cluster given in VMREPLICA_CLUSTER_KUBECONFIG (hack/cluster-up.sh run by
# hand, its images imported) is used as it is and left running.
own_cluster=false
if [ -z "${VMREPLICA_CLUSTER_KUBECONFIG:-}" ]; then
  own_cluster=true
  ( hack/cluster-up.sh "$cluster" >"$run/cluster.path" 2>"$run/cluster.log" ) &
  cluster_pid=$!
fi
t=$(date +%s)
# The agent's fail points (crash tests) exist only with this feature; the
# release build (the images) leaves them out.
features=(--features vmreplica-agent/failpoints)
cargo build --workspace --all-targets --locked "${features[@]}"
phase "building the tests" "$t"
if [ "$own_cluster" = true ]; then
  t=$(date +%s)
  if ! wait "$cluster_pid"; then
    cluster_pid=""
    echo "test.sh: the one-node cluster did not start:" >&2
    tail -n 40 "$run/cluster.log" >&2
    exit 1
  fi
  cluster_pid=""
  VMREPLICA_CLUSTER_KUBECONFIG=$(cat "$run/cluster.path")
  hack/images.sh --import "$cluster/containerd/containerd.sock" dev >/dev/null
  phase "the cluster and its images" "$t"
fi
export VMREPLICA_CLUSTER_KUBECONFIG

"$target/debug/vmreplica-testenv" "$run/kubeconfig" 2>"$run/testenv.log" &
env_pid=$!
for _ in $(seq 1 240); do
  [ -f "$run/kubeconfig" ] && break
  if ! kill -0 "$env_pid" 2>/dev/null; then
    echo "test.sh: the control plane did not start:" >&2
    cat "$run/testenv.log" >&2
    exit 1
  fi
  sleep 0.5
done
[ -f "$run/kubeconfig" ] || { echo "test.sh: control plane not ready after 120s" >&2; cat "$run/testenv.log" >&2; exit 1; }

export VMREPLICA_TEST_KUBECONFIG="$run/kubeconfig"
status=0
t=$(date +%s)
cargo test --workspace --locked "${features[@]}" "$@" 2>&1 | tee "$run/test.log" || status=$?
phase "the tests" "$t"
# One closing line for the whole run (cargo ends on its last crate's doc tests).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i; if ($(i+1) ~ /^ignored;?$/) s += $i } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$run/test.log"
exit "$status"
