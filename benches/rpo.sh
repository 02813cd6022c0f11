#!/usr/bin/env bash
# Replication lag under load (issue: replication keeps up). Two agents on
# loopback (release build, mutual TLS): `serve` protecting one 32 GiB sparse
# disk and replicating it every INTERVAL seconds to `receive`. fio writes
# random 64 KiB blocks through the primary's NBD export at each RATE (MiB/s,
# iodepth 8) for SECONDS; every 0.25 s the primary's metrics are sampled:
# lag = now - vmreplica_agent_last_replication_timestamp_seconds, and
# vmreplica_agent_pending_bytes. Printed per rate and compression setting:
# lag p50/p99/max, pending p50/max, what fio achieved, bytes shipped, and
# each agent's CPU (share of one core) and peak RSS. The references of the
# same minute on the same machine come first (`cargo bench ... replication
# refs`: loopback mutual TLS, BLAKE3 and zstd on one core, dd oflag=direct).
#   benches/rpo.sh [SECONDS] [RATE ...]        (default: 30 s, rates 20 50)
# Environment: INTERVAL (s, default 1), COMPRESSION (on, off, both, or
# none: the primary serving the writes without replicating, the write path's
# own CPU to subtract; default both), DATA (random: what zstd cannot shrink, the default; or compressible:
# fio's buffer_compress_percentage=60), DISKS (protected disks, default 1:
# fio writes to the first, the others replicate idle; their memory shows in
# the RSS columns), REFS=0 skips the references, AGENT_BIN.
# benches/replica-io-floor.sh gives, per rate, the CPU of the replica's I/O
# alone (fio): the floor under the replica's CPU column.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"; shift || true
rates=("${@:-20 50}"); [ $# -eq 0 ] && rates=(20 50)
interval="${INTERVAL:-1}"
case "${COMPRESSION:-both}" in both) modes=(on off) ;; on|off|none) modes=("$COMPRESSION") ;;
  *) echo "COMPRESSION must be on, off, both or none" >&2; exit 2 ;; esac
case "${DATA:-random}" in
  random) fio_data=(--refill_buffers) ;;
  compressible) fio_data=(--refill_buffers --buffer_compress_percentage=60 --buffer_compress_chunk=4k) ;;
  *) echo "DATA must be random or compressible" >&2; exit 2 ;;
esac
command -v fio >/dev/null || { echo "needs fio (hack/test-deps.sh installs it)" >&2; exit 1; }
target="${CARGO_TARGET_DIR:-target}"
if [ -z "${AGENT_BIN:-}" ]; then cargo build -q --release -p vmreplica-agent; fi
cargo build -q -p vmreplica-tests --bin vmreplica-devcerts
agent_bin="${AGENT_BIN:-$target/release/vmreplica-agent}"
work=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}" vmreplica-rpo.XXXXXX)
pids=()
stop_agents() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap 'stop_agents; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
"$target/debug/vmreplica-devcerts" "$work/certs" replica=replica.site-b.example.com \
  primary=host1.site-a.example.com >/dev/null

if [ "${REFS:-1}" != 0 ]; then
  echo "References, measured now (cargo bench -p vmreplica-agent --bench replication refs):"
  echo
  BENCH_DIR="${BENCH_DIR:-/var/tmp}" cargo bench -q -p vmreplica-agent --bench replication refs 2>/dev/null
  echo
fi

# run MODE RATE: one measurement; prints a table row.
run() {
  local mode=$1 rate=$2 d="$work/run" rport pm rm
  rm -rf "$d" && mkdir -p "$d/replicas" && truncate -s 32G "$d/disk.img"
  local disks=(--disk "root=$d/disk.img")
  for i in $(seq 2 "${DISKS:-1}"); do truncate -s 32G "$d/disk$i.img"; disks+=(--disk "d$i=$d/disk$i.img"); done
  rport=$(free_port); pm=$(free_port); rm=$(free_port)
  "$agent_bin" receive --listen "127.0.0.1:$rport" --tls-dir "$work/certs/replica" --allow-any-server \
    --storage "$d/replicas" --metrics "127.0.0.1:$rm" >/dev/null 2>"$d/replica.log" &
  pids+=($!); local rpid=$!
  for _ in $(seq 100); do grep -q "receiving replication" "$d/replica.log" && break; sleep 0.1; done
  local extra=(--replicate-to "127.0.0.1:$rport" --replica-server-name replica.site-b.example.com)
  [ "$mode" = off ] && extra+=(--no-compression)
  # Only the write path: nothing replicates, the replica agent idles.
  [ "$mode" = none ] && extra=()
  "$agent_bin" serve --vm bench "${disks[@]}" --socket "$d/nbd.sock" --interval "$interval" --retry-seconds 1 \
    --tls-dir "$work/certs/primary" --metrics "127.0.0.1:$pm" "${extra[@]}" >/dev/null 2>"$d/primary.log" &
  pids+=($!); local ppid=$!
  # The initial copy of the empty disk: the first successful cycle.
  for _ in $(seq 300); do
    [ "$mode" = none ] && break
    curl -sf "http://127.0.0.1:$pm/metrics" | grep -q '^vmreplica_agent_replication_cycles_total{.*successful' && break
    sleep 0.1
  done
  [ "$mode" = none ] || curl -sf "http://127.0.0.1:$pm/metrics" | grep -q '^vmreplica_agent_replication_cycles_total{.*successful' \
    || { echo "replication did not start:" >&2; tail -n 5 "$d/primary.log" "$d/replica.log" >&2; exit 1; }
  python3 benches/rpo_sample.py "http://127.0.0.1:$pm/metrics" "$ppid" "$rpid" "$d/samples.json" &
  local sampler=$!
  fio --name=rpo --ioengine=nbd --uri="nbd+unix:///root?socket=$d/nbd.sock" --rw=randwrite --bs=64k \
    --iodepth=8 --size=16G --rate="${rate}m" --time_based --runtime="$seconds" --randrepeat=0 \
    "${fio_data[@]}" --output-format=json >"$d/fio.json" 2>/dev/null
  kill -INT "$sampler"; wait "$sampler" || true
  python3 - "$d/samples.json" "$d/fio.json" "$mode" "$rate" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
text = open(sys.argv[2]).read()
fio = json.loads(text[text.index("{"):])["jobs"][0]["write"]  # the nbd engine prints a banner first
lag, pend = sorted(s["lag"]), sorted(s["pending"])
q = lambda v, p: v[min(len(v) - 1, int(p * len(v)))] if v else float("nan")
top = lambda v: max(v) if v else float("nan")
mib = 1 << 20
print(f"| {sys.argv[3]} | {sys.argv[4]} | {fio['bw_bytes'] / mib:.1f} | {q(lag, .5):.2f} | {q(lag, .99):.2f} | "
      f"{top(lag):.2f} | {q(pend, .5) / mib:.0f} | {top(pend) / mib:.0f} | {s['raw_mib']:.0f} / {s['wire_mib']:.0f} | "
      f"{s['cpu'][0]:.0f}% / {s['cpu'][1]:.0f}% | {s['rss'][0]:.0f} / {s['rss'][1]:.0f} |")
PY
  grep -qi "resync" "$d/primary.log" && echo "warning: the primary needed a resync (see $d/primary.log)" >&2
  stop_agents
}

echo "Lag under fio randwrite 64 KiB QD8, ${seconds} s per row, interval ${interval} s, data ${DATA:-random}:"
echo
echo "| zstd | rate MiB/s | fio MiB/s | lag p50 s | lag p99 s | lag max s | pending p50 MiB | pending max MiB | shipped raw / wire MiB | CPU primary / replica | peak RSS MiB primary / replica |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for mode in "${modes[@]}"; do
  for rate in "${rates[@]}"; do run "$mode" "$rate"; done
done
