#!/usr/bin/env bash
# The hub comes back after an outage: how fast does the backlog drain, what
# does draining cost ingestion, and how many parts does ClickHouse make?
# 1. A daemon whose hub is unreachable (a closed port) takes BACKLOG_RATE
#    logs/s for BACKLOG_SECONDS: the backlog stays in its database.
# 2. It is restarted with the real test hub (scripts/hub, on these same
#    cores) while the load generator goes on at RATE logs/s for DURATION
#    seconds; the hub's count of this host's logs is polled every 0.5 s.
# Prints: the backlog, how long the hub took to hold it, the drain rate as
# a multiple of RATE, ingestion's throughput and ack p50/p99 meanwhile, and
# the active parts of `logs` per replica and partition afterwards.
#
#   perf/hub_backlog.sh        # 1,000,000 logs of backlog, then 10,000/s for 60 s
#
# Environment: BIN (default target/release), BACKLOG_RATE (50000),
# BACKLOG_SECONDS (20), RATE (10000), DURATION (60), CLIENTS (1000),
# RESULTS_DIR (default perf/results/hub-backlog-<UTC stamp>).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BIN:-$ROOT/target/release}
BACKLOG_RATE=${BACKLOG_RATE:-50000}
BACKLOG_SECONDS=${BACKLOG_SECONDS:-20}
RATE=${RATE:-10000}
DURATION=${DURATION:-60}
CLIENTS=${CLIENTS:-1000}
OUT=${RESULTS_DIR:-$ROOT/perf/results/hub-backlog-$(date -u +%Y%m%dT%H%M%SZ)}
# shellcheck source=perf/common.sh
source "$ROOT/perf/common.sh"
perf_preamble "backlog=${BACKLOG_RATE}/s x ${BACKLOG_SECONDS}s, then rate=$RATE for ${DURATION}s, clients=$CLIENTS"

work=$(mktemp -d)
hub_dir=$(mktemp -d)
chmod 755 "$hub_dir" # scripts/hub runs the servers as the clickhouse user when root
pid=
cleanup() {
    [[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    "$ROOT/scripts/hub" stop "$hub_dir" >/dev/null 2>&1 || true
    rm -rf "$work" "$hub_dir"
}
trap cleanup EXIT
"$ROOT/scripts/hub" start "$hub_dir" >/dev/null
"$ROOT/scripts/hub" schema "$hub_dir" >/dev/null
hub_url=$(cat "$hub_dir/url")
host="backlog-$$"
sql() { curl -sS "$hub_url/" --data-binary "$1"; }

start_daemon() { # url
    printf '[server_hub]\nenabled = true\nurl = "%s"\nhost_id = "%s"\nbackoff_min = "1s"\nbackoff_max = "2s"\n' \
        "$1" "$host" >"$work/monitor.toml"
    "$BIN/codi-monitor" --socket "$work/m.sock" --db "$work/data/codi.db" --admin "" \
        --config "$work/monitor.toml" >"$work/out" 2>>"$work/err" &
    pid=$!
    for _ in $(seq 300); do grep -q '^READY' "$work/out" 2>/dev/null && break; sleep 0.1; done
}
stop_daemon() {
    kill -TERM "$pid"
    wait "$pid" || true
    pid=
}

# 1. The outage: a port nothing listens on.
dead_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
start_daemon "http://127.0.0.1:$dead_port"
"$BIN/codi-loadgen" run --socket "$work/m.sock" --db "$work/data/codi.db" --clients "$CLIENTS" \
    --rate "$BACKLOG_RATE" --window 8 --duration "$BACKLOG_SECONDS" --quiet \
    --json "$OUT/backlog.json" >"$OUT/backlog.txt" 2>&1
stop_daemon
backlog=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["stored"])' "$OUT/backlog.json")
echo "backlog: $backlog logs the hub does not have" | tee -a "$OUT/summary.txt"

# 2. The hub is back; ingestion goes on meanwhile.
start_daemon "$hub_url"
t0=$(date +%s.%N)
"$BIN/codi-loadgen" run --socket "$work/m.sock" --db "$work/data/codi.db" --clients "$CLIENTS" \
    --rate "$RATE" --window 1 --duration "$DURATION" --daemon-pid "$pid" --quiet \
    --json "$OUT/drain.json" >"$OUT/drain.txt" 2>&1 &
loadgen=$!
drained=
: >"$OUT/hub-count.tsv"
while kill -0 "$loadgen" 2>/dev/null; do
    n=$(sql "SELECT count() FROM codi.logs WHERE host_id = '$host' FORMAT TSV" 2>/dev/null || echo 0)
    now=$(date +%s.%N)
    elapsed=$(awk -v a="$now" -v b="$t0" 'BEGIN { printf "%.1f", a - b }')
    printf '%s\t%s\n' "$elapsed" "$n" >>"$OUT/hub-count.tsv"
    if [[ -z $drained ]] && ((n >= backlog)); then
        drained=$elapsed
    fi
    sleep 0.5
done
wait "$loadgen" || echo "loadgen failed: see $OUT/drain.txt"
stop_daemon
cp "$work/err" "$OUT/daemon.log"
sql "SELECT database, partition, count() FROM system.parts WHERE active AND table = 'logs'
     GROUP BY database, partition ORDER BY database, partition FORMAT TSV" >"$OUT/parts.tsv"
python3 - "$OUT/drain.json" "$backlog" "${drained:-nan}" "$RATE" "$OUT/parts.tsv" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
backlog, drained, rate = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
ack = r["latency"]["ack"]
parts = [l.split("\t") for l in open(sys.argv[5]).read().splitlines() if l]
most = max((int(p[2]) for p in parts), default=0)
print(f"drained {backlog:,} logs in {drained:.1f} s = {backlog / drained:,.0f} logs/s "
      f"= {backlog / drained / rate:.1f}x the ingest rate of {rate:,}/s")
print(f"ingestion meanwhile: {r['throughput_logs_per_s']:,.0f} logs/s, ack p50 "
      f"{ack['p50_us'] / 1000:.2f} ms, p99 {ack['p99_us'] / 1000:.2f} ms, "
      f"stored==acked {r['stored_equals_acked']}, daemon CPU {r['daemon']['cpu_percent']:.1f} %")
print(f"active parts of logs afterwards: {len(parts)} (replica, partition) pairs, at most {most} in one")
PY
echo "results in $OUT"
