#!/usr/bin/env bash
# What does retention cost acknowledgments while it deletes a big backlog?
# Builds once a store holding ROWS logs that are 400 days old (the daemon's
# own schema, filled with the sqlite3 shell), then runs the load generator
# against a copy of it, alternating a daemon without retention (A) and one
# with storage.retention_days = 30 (B), which deletes the whole backlog in
# bounded passes while the load runs, ROUNDS times. One line per run:
# throughput, daemon CPU per log, ack p50/p99/max, stored == acked, and
# for B the logs expired during the run.
#
#   perf/retention_ab.sh                   # 1,000,000 old rows, 2 rounds, 20 s, 10,000 logs/s
#
# Environment: BIN (default target/release), ROWS (1000000), ROUNDS (2),
# DURATION (20 s), RATE (10000), CLIENTS (100), RESULTS_DIR (default
# perf/results/retention-<UTC stamp>). Needs sqlite3.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BIN:-$ROOT/target/release}
ROWS=${ROWS:-1000000}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-20}
RATE=${RATE:-10000}
CLIENTS=${CLIENTS:-100}
OUT=${RESULTS_DIR:-$ROOT/perf/results/retention-$(date -u +%Y%m%dT%H%M%SZ)}
# shellcheck source=perf/common.sh
source "$ROOT/perf/common.sh"
command -v sqlite3 >/dev/null || { echo "needs sqlite3 (apt-get install sqlite3)" >&2; exit 2; }
perf_preamble "rows=$ROWS rate=$RATE clients=$CLIENTS duration=$DURATION"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start_daemon() { # dir config -> sets pid
    "$BIN/codi-monitor" --socket "$1/m.sock" --db "$1/data/codi.db" --admin "" --config "$2" \
        >"$1/out" 2>"$1/err" &
    pid=$!
    for _ in $(seq 300); do grep -q '^READY' "$1/out" 2>/dev/null && break; sleep 0.1; done
}
# The backlog: the daemon creates the schema, the shell fills it.
mkdir -p "$work/seed"
printf '[storage]\nretention_days = 0\n' >"$work/keep.toml"
printf '[storage]\nretention_days = 30\n' >"$work/expire.toml"
start_daemon "$work/seed" "$work/keep.toml"
kill -TERM "$pid"
wait "$pid" || true
old_us=$(( ($(date +%s) - 400 * 86400) * 1000000 ))
sqlite3 "$work/seed/data/codi.db" <<SQL
PRAGMA synchronous = OFF;
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < $ROWS)
INSERT INTO logs (id, uuid, timestamp, level, component, session_id, message, metadata, created_at, uid)
SELECT x, randomblob(16), $old_us + x, 'info', 'backlog', 'sess-' || (x % 1000),
  'old message ' || x || ' ' || substr(hex(randomblob(80)), 1, 150), NULL, $old_us + x, 0 FROM c;
PRAGMA wal_checkpoint(TRUNCATE);
SQL
echo "backlog: $ROWS rows, $(du -h "$work/seed/data/codi.db" | cut -f1)" | tee -a "$OUT/machine.txt"

run_one() { # name config
    local name=$1 config=$2 dir=$work/run
    rm -rf "$dir"
    cp -r "$work/seed" "$dir"
    rm -f "$dir/out" "$dir/err" "$dir/m.sock"
    start_daemon "$dir" "$config"
    "$BIN/codi-loadgen" run --socket "$dir/m.sock" --db "$dir/data/codi.db" --clients "$CLIENTS" \
        --rate "$RATE" --duration "$DURATION" --daemon-pid "$pid" --quiet \
        --json "$OUT/$name.json" >"$OUT/$name.txt" 2>&1 || echo "loadgen failed: see $OUT/$name.txt"
    local left
    left=$(sqlite3 "file:$dir/data/codi.db?mode=ro" "SELECT count(*) FROM logs WHERE component = 'backlog'")
    kill -TERM "$pid"
    wait "$pid" || true
    cp "$dir/err" "$OUT/$name-daemon.log"
    python3 - "$OUT/$name.json" "$name" "$ROWS" "$left" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
tput = r["throughput_logs_per_s"]
cpu = r["daemon"]["cpu_percent"]
ack = r["latency"]["ack"]
expired = int(sys.argv[3]) - int(sys.argv[4])
print(f"{sys.argv[2]:<4} {tput:>9,.0f} logs/s  daemon CPU {cpu:5.1f} %  "
      f"{cpu / 100 / tput * 1e6:6.2f} µs CPU/log  ack p50 {ack['p50_us'] / 1000:6.2f} ms  "
      f"p99 {ack['p99_us'] / 1000:7.2f} ms  max {ack['max_us'] / 1000:7.2f} ms  "
      f"stored==acked {r['stored_equals_acked']}  backlog expired during the run: {expired:,}")
PY
}

for round in $(seq "$ROUNDS"); do
    run_one "A$round" "$work/keep.toml" | tee -a "$OUT/summary.txt"
    run_one "B$round" "$work/expire.toml" | tee -a "$OUT/summary.txt"
done
echo "results in $OUT"
