#!/usr/bin/env bash
# Write-path benchmark (issue: agent write path). Runs fio's nbd engine against
#   (a) vmreplica-agent's export, logging every write, and
#   (b) qemu-nbd serving the same kind of image on the same filesystem,
# side by side, alternating which goes first, and prints throughput and p99
# latency ratios (agent / qemu-nbd) as a Markdown table.
#   benches/write-path.sh [RUNTIME_SECONDS] [REPEATS]
# Environment: FIO_SIZE (region fio touches, default 1G), WORKLOADS (default:
# the four of the issue, as "rw bs iodepth" separated by commas), AGENT_BIN.
# Each workload gets a fresh 64 GiB sparse image, so the agent's log never
# reaches the resync threshold (half the disk).
set -euo pipefail
cd "$(dirname "$0")/.."
runtime="${1:-8}"
repeats="${2:-2}"
fio_size="${FIO_SIZE:-1G}"
workloads="${WORKLOADS:-randwrite 4k 1,randwrite 4k 16,write 1m 8,randread 4k 16}"
command -v fio >/dev/null || { echo "needs fio (hack/test-deps.sh installs it)" >&2; exit 1; }
# AGENT_BIN: another agent build to measure (e.g. an older commit's, to show
# a change did not slow the write path); default: this checkout's release build.
if [ -z "${AGENT_BIN:-}" ]; then
  cargo build -q --release -p vmreplica-agent
fi
agent_bin="${AGENT_BIN:-${CARGO_TARGET_DIR:-target}/release/vmreplica-agent}"
work=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}" vmreplica-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

start_targets() {
  rm -rf "$work"/* && truncate -s 64G "$work/agent.img" "$work/qemu.img"
  "$agent_bin" serve --vm bench --disk "root=$work/agent.img" --socket "$work/agent.sock" >/dev/null 2>"$work/agent.log" &
  pids+=($!)
  qemu-nbd -f raw --cache=writeback --aio=threads -e 64 -t -x root -k "$work/qemu.sock" "$work/qemu.img" &
  pids+=($!)
  for _ in $(seq 100); do [ -S "$work/agent.sock" ] && [ -S "$work/qemu.sock" ] && return; sleep 0.1; done
  echo "targets did not start" >&2; exit 1
}
stop_targets() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }

run_fio() { # target rw bs iodepth -> "bw_bytes p99_ns"
  local sock="$work/$1.sock"
  fio --name=b --ioengine=nbd --uri="nbd+unix:///root?socket=$sock" --rw="$2" --bs="$3" \
      --iodepth="$4" --size="$fio_size" --time_based --runtime="$runtime" --ramp_time=1 \
      --randrepeat=0 --output-format=json >"$work/fio.json" 2>/dev/null
  python3 - "$work/fio.json" "$2" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]  # fio's nbd engine prints a banner first
side = j["read"] if "read" in sys.argv[2] else j["write"]
print(side["bw_bytes"], side["clat_ns"]["percentile"]["99.000000"])
PY
}

echo "| workload | agent MiB/s | qemu-nbd MiB/s | throughput ratio | agent p99 µs | qemu-nbd p99 µs | p99 ratio |"
echo "|---|---:|---:|---:|---:|---:|---:|"
IFS=, read -ra wl <<<"$workloads"
for w in "${wl[@]}"; do
  set -- $w
  a_bw=0; q_bw=0; a_lat=0; q_lat=0
  for r in $(seq "$repeats"); do
    start_targets
    # Reads need data to read: fill the region on both first.
    if [ "$1" = randread ]; then
      for t in agent qemu; do
        fio --name=fill --ioengine=nbd --uri="nbd+unix:///root?socket=$work/$t.sock" --rw=write --bs=1m \
            --iodepth=8 --size="$fio_size" >/dev/null 2>&1
      done
    fi
    order="agent qemu"; [ $((r % 2)) = 0 ] && order="qemu agent"
    for t in $order; do
      read -r bw lat < <(run_fio "$t" "$1" "$2" "$3")
      if [ "$t" = agent ]; then a_bw=$((a_bw + bw)); a_lat=$((a_lat + lat)); else q_bw=$((q_bw + bw)); q_lat=$((q_lat + lat)); fi
    done
    grep -q "resync" "$work/agent.log" && echo "warning: the agent hit the resync threshold" >&2
    stop_targets
  done
  python3 - "$1 $2 QD$3" "$repeats" "$a_bw" "$q_bw" "$a_lat" "$q_lat" <<'PY'
import sys
name, n, a_bw, q_bw, a_lat, q_lat = sys.argv[1], *map(int, sys.argv[2:])
mib = 1 << 20
print(f"| {name} | {a_bw/n/mib:.0f} | {q_bw/n/mib:.0f} | {a_bw/q_bw:.2f}x | {a_lat/n/1000:.0f} | {q_lat/n/1000:.0f} | {a_lat/q_lat:.2f}x |")
PY
done
