#!/usr/bin/env bash
# The floor under the replica's CPU (issue: fault tolerance, "CPU per 50 MB/s
# of churn"): fio doing only the I/O a replica must do for RATE MiB/s of
# random 64 KiB guest writes, with the syscalls the agent uses (psync,
# O_DIRECT), and nothing else: no TLS, no hashing, no parsing. Printed: each
# stream's CPU (share of one core, fio's own accounting) and their sum, to
# set beside the replica's CPU in `benches/rpo.sh` at the same rate.
#   benches/replica-io-floor.sh [SECONDS] [RATE ...]   (default: 30 s, rate 50)
# The streams, each at RATE:
#   old-data      64 KiB random reads of the image (what the undo keeps)
#   new-data      64 KiB random writes to the image (the apply), O_DIRECT
#   undo          the undo file, written in 1 MiB blocks
#   segment-in    the received segment, written in 1 MiB blocks
#   segment-apply the segment read back by the apply, 1 MiB blocks
# The image is a fresh 32 GiB sparse file, as in rpo.sh: most writes land
# where nothing was, as a new replica's do. (The segment read back is a
# 1 GiB file fio lays out before the timed run.) Work files go to $BENCH_DIR
# (default /var/tmp) and are removed.
set -euo pipefail
seconds="${1:-30}"; shift || true
rates=("${@:-50}"); [ $# -eq 0 ] && rates=(50)
command -v fio >/dev/null || { echo "needs fio (hack/test-deps.sh installs it)" >&2; exit 1; }
work=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}" vmreplica-floor.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "| rate MiB/s | old-data | new-data | undo | segment-in | segment-apply | all, share of one core |"
echo "|---:|---:|---:|---:|---:|---:|---:|"
for rate in "${rates[@]}"; do
  rm -f "$work"/*
  truncate -s 32G "$work/image"
  cat >"$work/job.fio" <<EOF
[global]
ioengine=psync
direct=1
fallocate=none
time_based=1
runtime=$seconds
rate=${rate}m
[old-data]
filename=$work/image
rw=randread
bs=64k
norandommap=1
[new-data]
filename=$work/image
rw=randwrite
bs=64k
norandommap=1
[undo]
filename=$work/undo
rw=write
bs=1m
size=4g
[segment-in]
filename=$work/segment-in
rw=write
bs=1m
size=4g
[segment-apply]
filename=$work/segment-out
rw=read
bs=1m
size=1g
EOF
  fio "$work/job.fio" --output-format=json 2>/dev/null | python3 -c '
import json, sys
jobs = json.load(sys.stdin)["jobs"]
cpu = {j["jobname"]: j["usr_cpu"] + j["sys_cpu"] for j in jobs}
cells = " | ".join("%.1f%%" % cpu[n] for n in ["old-data", "new-data", "undo", "segment-in", "segment-apply"])
print("| %s | %s | %.1f%% |" % (sys.argv[1], cells, sum(cpu.values())))
' "$rate"
done
