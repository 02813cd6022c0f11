#!/usr/bin/env bash
# The run command (README): a local control plane with vmreplica's API, the
# examples applied, and what `kubectl get` shows of them.
#   hack/local-up.sh          show it and tear everything down
#   hack/local-up.sh --keep   keep it running; prints a KUBECONFIG to use; Ctrl-C ends it
set -euo pipefail
cd "$(dirname "$0")/.."
keep=false; [ "${1:-}" = "--keep" ] && keep=true

KUBEBUILDER_ASSETS="${KUBEBUILDER_ASSETS:-$(hack/test-deps.sh)}"
export KUBEBUILDER_ASSETS
target="${CARGO_TARGET_DIR:-target}"
cargo build -q --locked -p vmreplica-tests --bin vmreplica-testenv -p vmreplica-controller

run=$(mktemp -d -t vmreplica-local.XXXXXX)
"$target/debug/vmreplica-testenv" "$run/kubeconfig" 2>"$run/control-plane.log" &
env_pid=$!
trap 'kill $env_pid 2>/dev/null; wait $env_pid 2>/dev/null; rm -rf "$run"' EXIT
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
if $keep; then
  say "running; in another shell: export KUBECONFIG=$KUBECONFIG   (Ctrl-C ends it)"
  wait "$env_pid"
fi
