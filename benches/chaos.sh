#!/usr/bin/env bash
# The chaos suite, long (issue: fault tolerance): runs N randomised rounds of
# kill -9 against two real agents (agent/tests/chaos.rs) in runs of R rounds
# each, every run from its own seed, and prints one line per run and a total.
#   benches/chaos.sh [ROUNDS] [ROUNDS_PER_RUN] [FIRST_SEED]
# (default 100 rounds, 50 per run, seeds from the time). A violation stops the
# script with the seed that found it and keeps that run's directory. The test
# command runs a short version (6 rounds) of the same test on every CI run.
set -euo pipefail
cd "$(dirname "$0")/.."
total="${1:-100}"
per_run="${2:-50}"
seed="${3:-$(date +%s)}"
cargo test -q --release -p vmreplica-agent --test chaos --no-run 2>/dev/null
done_rounds=0; runs=0; started=$(date +%s)
while [ "$done_rounds" -lt "$total" ]; do
  n=$(( total - done_rounds < per_run ? total - done_rounds : per_run ))
  out=$(CHAOS_ROUNDS="$n" CHAOS_SEED="$seed" cargo test -q --release -p vmreplica-agent --test chaos \
        randomised -- --nocapture 2>&1) || { echo "$out" | grep -E "chaos:|VIOLATION|panicked" ; echo "FAILED at seed $seed" >&2; exit 1; }
  echo "$out" | grep "0 violations"
  done_rounds=$(( done_rounds + n )); runs=$(( runs + 1 )); seed=$(( seed + 1 ))
done
echo "chaos: $done_rounds rounds in $runs runs, 0 violations, $(( $(date +%s) - started )) s"
