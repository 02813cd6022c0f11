#!/usr/bin/env bash
# The test command (README): installs what the tests need, starts ONE real
# control plane (etcd + kube-apiserver on loopback) for the whole run, runs every
# test of the workspace against it, and tears it down however the run ends.
# Extra arguments go to `cargo test` (e.g. `hack/test.sh -p vmreplica-crds`).
set -euo pipefail
cd "$(dirname "$0")/.."

KUBEBUILDER_ASSETS="${KUBEBUILDER_ASSETS:-$(hack/test-deps.sh)}"
export KUBEBUILDER_ASSETS
# The real-guest tests boot Debian's kernel under qemu-system-x86_64.
VMREPLICA_GUEST_KIT="${VMREPLICA_GUEST_KIT:-$(hack/guest-kit.sh)}"
export VMREPLICA_GUEST_KIT
target="${CARGO_TARGET_DIR:-target}"

# The agent's fail points (crash tests) exist only with this feature; the
# release build leaves them out.
features=(--features vmreplica-agent/failpoints)
cargo build --workspace --all-targets --locked "${features[@]}"

run=$(mktemp -d -t vmreplica-test.XXXXXX)
"$target/debug/vmreplica-testenv" "$run/kubeconfig" 2>"$run/testenv.log" &
env_pid=$!
cleanup() {
  kill "$env_pid" 2>/dev/null || true
  wait "$env_pid" 2>/dev/null || true
  rm -rf "$run"
}
trap cleanup EXIT
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
cargo test --workspace --locked "${features[@]}" "$@" 2>&1 | tee "$run/test.log" || status=$?
# One closing line for the whole run (cargo ends on its last crate's doc tests).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i; if ($(i+1) ~ /^ignored;?$/) s += $i } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$run/test.log"
exit "$status"
