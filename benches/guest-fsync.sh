#!/usr/bin/env bash
# Guest benchmark (issue: a real guest end to end). Boots the guest kit's
# Debian kernel with its ext4 disk on
#   (a) vmreplica-agent's NBD export (logging every write), and
#   (b) qemu-nbd serving the same kind of image on the same filesystem,
# side by side, alternating which goes first, and times inside the guest a
# write-ahead log (a record appended and fsynced, RECORDS times) and a dd of
# MIB MiB with O_DIRECT. Prints a Markdown table with the ratios agent / qemu-nbd.
#   benches/guest-fsync.sh [REPEATS]
# Environment: RECORDS (default 300), MIB (default 64), AGENT_BIN.
# The guest runs under the kit's accelerator (TCG on machines where KVM
# guests hang): guest CPU time is part of every number, for both targets alike.
set -euo pipefail
cd "$(dirname "$0")/.."
repeats="${1:-3}"
records="${RECORDS:-300}"
mib="${MIB:-64}"
kit="${VMREPLICA_GUEST_KIT:-$(hack/guest-kit.sh)}"
if [ -z "${AGENT_BIN:-}" ]; then
  cargo build -q --release -p vmreplica-agent
fi
agent_bin="${AGENT_BIN:-${CARGO_TARGET_DIR:-target}/release/vmreplica-agent}"
accel=$(cat "$kit/accel")
work=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}" vmreplica-guest-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

start_targets() {
  rm -rf "${work:?}"/* && truncate -s 1G "$work/agent.img" "$work/qemu.img"
  mkfs.ext4 -F -q "$work/agent.img" && mkfs.ext4 -F -q "$work/qemu.img"
  "$agent_bin" serve --vm bench --disk "root=$work/agent.img" --socket "$work/agent.sock" >/dev/null 2>"$work/agent.log" &
  pids+=($!)
  qemu-nbd -f raw --cache=writeback --aio=threads -e 8 -t -x root -k "$work/qemu.sock" "$work/qemu.img" &
  pids+=($!)
  for _ in $(seq 100); do [ -S "$work/agent.sock" ] && [ -S "$work/qemu.sock" ] && return; sleep 0.1; done
  echo "targets did not start" >&2; exit 1
}

run_guest() { # target -> "wal_ms dd_ms"
  local out="$work/$1.console"
  timeout 600 qemu-system-x86_64 -accel "$accel" -m 256 -smp 1 -nodefaults -no-user-config \
    -display none -serial stdio -no-reboot -kernel "$kit/vmlinuz" -initrd "$kit/initrd.img" \
    -append "console=ttyS0 panic=-1 quiet vmr.workload=bench vmr.records=$records vmr.mib=$mib" \
    -drive "driver=nbd,server.type=unix,server.path=$work/$1.sock,export=root,if=virtio,cache=none" \
    </dev/null >"$out" 2>&1
  grep -q "VMR ERROR" "$out" && { echo "the guest failed on $1:" >&2; cat "$out" >&2; exit 1; }
  local wal dd
  wal=$(sed -n 's/.*VMR BENCH wal .* ms=\([0-9]*\).*/\1/p' "$out")
  dd=$(sed -n 's/.*VMR BENCH dd .* ms=\([0-9]*\).*/\1/p' "$out")
  [ "${wal:-0}" -gt 0 ] && [ "${dd:-0}" -gt 0 ] || { echo "no timings from $1:" >&2; cat "$out" >&2; exit 1; }
  echo "$wal $dd"
}

start_targets
a_wal=0; q_wal=0; a_dd=0; q_dd=0
for r in $(seq "$repeats"); do
  order="agent qemu"; [ $((r % 2)) = 0 ] && order="qemu agent"
  for t in $order; do
    read -r wal dd < <(run_guest "$t")
    echo "run $r $t: wal ${wal} ms, dd ${dd} ms" >&2
    if [ "$t" = agent ]; then a_wal=$((a_wal + wal)); a_dd=$((a_dd + dd)); else q_wal=$((q_wal + wal)); q_dd=$((q_dd + dd)); fi
  done
done
python3 - "$records" "$mib" "$repeats" "$a_wal" "$q_wal" "$a_dd" "$q_dd" "$accel" <<'PY'
import sys
records, mib, n, a_wal, q_wal, a_dd, q_dd = map(int, sys.argv[1:8])
accel = sys.argv[8]
print(f"| in the guest ({accel}, mean of {n}) | agent | qemu-nbd | ratio agent / qemu-nbd |")
print("|---|---:|---:|---:|")
al, ql = a_wal / n / records, q_wal / n / records
print(f"| WAL append + fsync, ms per record ({records} records) | {al:.2f} | {ql:.2f} | {al / ql:.2f}x latency |")
at, qt = mib * 1000 * n / a_dd, mib * 1000 * n / q_dd
print(f"| dd {mib} MiB O_DIRECT bs=1M, MiB/s | {at:.1f} | {qt:.1f} | {at / qt:.2f}x throughput |")
PY
