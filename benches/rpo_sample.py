#!/usr/bin/env python3
"""Samples a primary agent's replication lag for benches/rpo.sh.

rpo_sample.py METRICS_URL PRIMARY_PID REPLICA_PID OUT.json

Every 0.25 s until SIGINT: lag = now - vmreplica_agent_last_replication_timestamp_seconds
(of the disk furthest behind) and vmreplica_agent_pending_bytes (summed over disks). Then writes the samples,
the bytes shipped meanwhile (raw and on the wire, MiB), each process's CPU
(percent of one core over the sampling) and peak RSS (VmHWM, MiB).
"""
import json, os, signal, sys, time, urllib.request

url, pids, out = sys.argv[1], [int(p) for p in sys.argv[2:4]], sys.argv[4]
stop = False


def on_int(*_):
    global stop
    stop = True


signal.signal(signal.SIGINT, on_int)


def metrics():
    vals = {}
    for line in urllib.request.urlopen(url, timeout=2).read().decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            vals[name] = float(value)
    return vals


def total(vals, prefix, contains=""):
    return sum(v for k, v in vals.items() if k.startswith(prefix) and contains in k)


def cpu_ticks(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def hwm_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


first = metrics()
t0, ticks0 = time.monotonic(), [cpu_ticks(p) for p in pids]
lag, pending = [], []
while not stop:
    try:
        m = metrics()
    except OSError:
        m = None
    if m:
        # The disk furthest behind.
        stamps = [v for k, v in m.items() if k.startswith("vmreplica_agent_last_replication_timestamp_seconds")]
        if stamps and min(stamps) > 0:
            lag.append(time.time() - min(stamps))
        pending.append(total(m, "vmreplica_agent_pending_bytes"))
    time.sleep(0.25)
elapsed = time.monotonic() - t0
hz = os.sysconf("SC_CLK_TCK")
cpu = [100 * (cpu_ticks(p) - t) / hz / elapsed for p, t in zip(pids, ticks0)]
last = metrics()
sent = lambda kind: (total(last, "vmreplica_agent_bytes_sent_total", f'kind="{kind}"')
                     - total(first, "vmreplica_agent_bytes_sent_total", f'kind="{kind}"')) / (1 << 20)
json.dump({"lag": lag, "pending": pending, "cpu": cpu, "rss": [hwm_mib(p) for p in pids],
           "raw_mib": sent("raw"), "wire_mib": sent("wire")}, open(out, "w"))
