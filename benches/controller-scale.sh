#!/usr/bin/env bash
# The controller at scale (BENCHMARKS.md): VMS VMReplications (default 1000) on
# AGENTS primary agents (default 10) and one replica agent, against a fresh
# local apiserver; release builds. Prints a Markdown table.
#   benches/controller-scale.sh [VMS] [AGENTS] [STEADY_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
KUBEBUILDER_ASSETS="${KUBEBUILDER_ASSETS:-$(hack/test-deps.sh)}"
export KUBEBUILDER_ASSETS
cargo build -q --release --locked -p vmreplica-agent -p vmreplica-controller --bins
cargo bench -q --locked -p vmreplica-tests --bench controller_scale -- "${1:-1000}" "${2:-10}" "${3:-120}"
