#!/usr/bin/env bash
# CPU per durable log and latency (issue 14): two builds of the daemon,
# alternated in one run, at each rate, with the raw SQLite ceiling of the
# same rows measured in the same run.
#
#   perf/cpu_ab.sh A_BIN_DIR B_BIN_DIR
#   # e.g. A = the commit before (git worktree + its own CARGO_TARGET_DIR),
#   #      B = target/release
#
# For each rate in RATES, ROUNDS times: A then B, each a fresh daemon under
# `codi-loadgen run` for DURATION seconds with CLIENTS clients, 150 B
# messages, 100 pings/s, one answer in flight per client up to 10,000/s
# and 8 above. One line per run: throughput, daemon CPU (all threads,
# /proc), CPU per log, ack p50/p99, ping p99, stored == acked. Then
# `codi-loadgen ceiling` inserts CEILING_ROWS rows straight into SQLite on
# these cores, and the ceiling's CPU per row is printed beside them.
# Both builds use B's loadgen, so the instrument is the same.
#
# Environment: RATES ("1000 10000 50000 100000"), ROUNDS (2), DURATION (20),
# CLIENTS (1000), CEILING_ROWS (1000000), EXTRA_ARGS (more daemon flags for
# both), RESULTS_DIR (default perf/results/cpu-ab-<UTC stamp>).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if (($# != 2)); then
    echo "usage: $0 A_BIN_DIR B_BIN_DIR" >&2
    exit 2
fi
A_BIN=$(cd "$1" && pwd)
B_BIN=$(cd "$2" && pwd)
BIN=$B_BIN
RATES=${RATES:-1000 10000 50000 100000}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-20}
CLIENTS=${CLIENTS:-1000}
CEILING_ROWS=${CEILING_ROWS:-1000000}
EXTRA_ARGS=${EXTRA_ARGS:-}
OUT=${RESULTS_DIR:-$ROOT/perf/results/cpu-ab-$(date -u +%Y%m%dT%H%M%SZ)}
# shellcheck source=perf/common.sh
source "$ROOT/perf/common.sh"
perf_preamble "A=$A_BIN B=$B_BIN rates=$RATES rounds=$ROUNDS duration=$DURATION clients=$CLIENTS extra=$EXTRA_ARGS"
[[ -x $A_BIN/codi-monitor ]] || { echo "missing $A_BIN/codi-monitor" >&2; exit 2; }

work=$(mktemp -d)
daemon_pid=
cleanup() {
    if [[ -n $daemon_pid ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -KILL "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

run_one() { # name bin_dir rate window
    local name=$1 bin=$2 rate=$3 window=$4 dir=$work/$1
    mkdir -p "$dir"
    chmod 700 "$dir"
    # shellcheck disable=SC2086 # EXTRA_ARGS is a list of flags
    "$bin/codi-monitor" --socket "$dir/m.sock" --db "$dir/codi.db" --log-level warn \
        $EXTRA_ARGS >"$dir/out" 2>"$dir/err" &
    daemon_pid=$!
    for _ in $(seq 300); do grep -q '^READY' "$dir/out" 2>/dev/null && break; sleep 0.1; done
    timeout --signal=TERM --kill-after=10 $((DURATION + 120)) \
        "$B_BIN/codi-loadgen" run --socket "$dir/m.sock" --db "$dir/codi.db" \
        --clients "$CLIENTS" --rate "$rate" --window "$window" --duration "$DURATION" \
        --ping-rate 100 --daemon-pid "$daemon_pid" --quiet --json "$OUT/$name.json" \
        >"$OUT/$name.txt" 2>&1 || echo "loadgen failed: see $OUT/$name.txt"
    kill -TERM "$daemon_pid"
    wait "$daemon_pid" || echo "$name: daemon exited $?"
    daemon_pid=
    cp "$dir/err" "$OUT/$name-daemon.log"
    rm -rf "$dir"
    python3 - "$OUT/$name.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
tput = r["throughput_logs_per_s"]
cpu = r["daemon"]["cpu_percent"]
lat = r["latency"]
print(f"{sys.argv[2]:<12} {tput:>9,.0f} logs/s  daemon CPU {cpu:6.1f} %  "
      f"{cpu / 100 / max(tput, 1) * 1e6:6.2f} µs/log  ack p50 {lat['ack']['p50_us'] / 1000:6.2f} ms  "
      f"p99 {lat['ack']['p99_us'] / 1000:7.2f} ms  ping p99 {lat['ping']['p99_us'] / 1000:6.2f} ms  "
      f"loadgen CPU {r['loadgen']['cpu_percent']:5.1f} %  stored==acked {r['stored_equals_acked']}")
PY
}

for rate in $RATES; do
    window=8
    ((rate <= 10000)) && window=1
    for round in $(seq "$ROUNDS"); do
        run_one "A-$rate-$round" "$A_BIN" "$rate" "$window" | tee -a "$OUT/summary.txt"
        run_one "B-$rate-$round" "$B_BIN" "$rate" "$window" | tee -a "$OUT/summary.txt"
    done
done

mkdir -p "$work/ceiling"
"$B_BIN/codi-loadgen" ceiling --db "$work/ceiling/ceiling.db" --rows "$CEILING_ROWS" \
    --json "$OUT/ceiling.json" >"$OUT/ceiling.txt" 2>&1
python3 - "$OUT/ceiling.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
c = json.load(open(sys.argv[1]))
print(f"ceiling      {c['rows_per_s']:>9,.0f} rows/s  (raw SQLite, same schema and rows, "
      f"one thread, batches of {c['batch']}): {c['busy_s'] / c['rows'] * 1e6:5.2f} µs of "
      f"transaction time per row")
PY
echo "results in $OUT"
