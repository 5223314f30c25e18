#!/usr/bin/env bash
# What does an online backup cost ingestion? Against a fresh daemon per run,
# prefilled with PREFILL_SECONDS of closed-loop batches, the load generator
# offers RATE logs/s; runs alternate without (A) and with (B) `codi-monitor
# backup` copying both files again and again (--force) for the whole run,
# ROUNDS times (A B A B ...). One line per run: throughput, daemon CPU per
# log, ack p50/p99, stored == acked, and for B the backups taken and their
# duration.
#
#   perf/backup_ab.sh                       # 2 rounds, 15 s, 10,000 logs/s
#
# Environment: BIN (default target/release), ROUNDS (2), DURATION (15 s),
# RATE (10000), CLIENTS (100), PREFILL_SECONDS (5), RESULTS_DIR (default
# perf/results/backup-<UTC stamp>).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BIN:-$ROOT/target/release}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-15}
RATE=${RATE:-10000}
CLIENTS=${CLIENTS:-100}
PREFILL_SECONDS=${PREFILL_SECONDS:-5}
OUT=${RESULTS_DIR:-$ROOT/perf/results/backup-$(date -u +%Y%m%dT%H%M%SZ)}
# shellcheck source=perf/common.sh
source "$ROOT/perf/common.sh"
perf_preamble "rate=$RATE clients=$CLIENTS duration=$DURATION prefill=${PREFILL_SECONDS}s"

run_one() { # name backup(0|1)
    local name=$1 backup=$2 dir
    dir=$(mktemp -d)
    "$BIN/codi-monitor" --socket "$dir/m.sock" --db "$dir/codi.db" --admin "" \
        >"$dir/out" 2>"$OUT/$name-daemon.log" &
    local pid=$!
    for _ in $(seq 150); do grep -q '^READY' "$dir/out" 2>/dev/null && break; sleep 0.1; done
    "$BIN/codi-loadgen" run --socket "$dir/m.sock" --clients 10 --rate 0 --batch 100 \
        --duration "$PREFILL_SECONDS" --quiet >"$OUT/$name-prefill.txt" 2>&1
    local backups_pid=""
    if [[ $backup == 1 ]]; then
        (
            n=0 total=0
            while [[ ! -e $dir/stop ]]; do
                t0=$(date +%s%N)
                "$BIN/codi-monitor" backup "$dir/backup" --db "$dir/codi.db" --force >/dev/null
                total=$((total + $(date +%s%N) - t0)) n=$((n + 1))
            done
            echo "backups=$n mean=$((total / (n > 0 ? n : 1) / 1000000))ms size=$(du -sh "$dir/backup" | cut -f1)"
        ) >"$OUT/$name-backups.txt" 2>&1 &
        backups_pid=$!
    fi
    "$BIN/codi-loadgen" run --socket "$dir/m.sock" --db "$dir/codi.db" --clients "$CLIENTS" \
        --rate "$RATE" --duration "$DURATION" --daemon-pid "$pid" --quiet \
        --json "$OUT/$name.json" >"$OUT/$name.txt" 2>&1 || echo "loadgen failed: see $OUT/$name.txt"
    touch "$dir/stop"
    [[ -z $backups_pid ]] || wait "$backups_pid" || true
    kill -TERM "$pid"
    wait "$pid" || true
    rm -rf "$dir"
    python3 - "$OUT/$name.json" "$name" "$OUT/$name-backups.txt" <<'PY'
import json, os, sys
r = json.load(open(sys.argv[1]))
tput = r["throughput_logs_per_s"]
cpu = r["daemon"]["cpu_percent"]
ack = r["latency"]["ack"]
b = open(sys.argv[3]).read().strip() if os.path.exists(sys.argv[3]) else "no backups"
print(f"{sys.argv[2]:<4} {tput:>9,.0f} logs/s  daemon CPU {cpu:5.1f} %  "
      f"{cpu / 100 / tput * 1e6:6.2f} µs CPU/log  ack p50 {ack['p50_us'] / 1000:6.2f} ms  "
      f"p99 {ack['p99_us'] / 1000:7.2f} ms  stored==acked {r['stored_equals_acked']}  {b}")
PY
}

for round in $(seq "$ROUNDS"); do
    run_one "A$round" 0 | tee -a "$OUT/summary.txt"
    run_one "B$round" 1 | tee -a "$OUT/summary.txt"
done
echo "results in $OUT"
