#!/usr/bin/env bash
# Does scraping /metrics every 100 ms slow ingestion? Runs the load
# generator against a fresh daemon per run, alternating without (A) and
# with (B) a scraper fetching GET /metrics every SCRAPE_MS, ROUNDS times
# (A B A B ...), and prints one line per run: throughput, daemon CPU per
# log, ack p50/p99, and for B the scrapes done and their latency.
#
#   perf/scrape_ab.sh                               # 2 rounds, 15 s, 40,000 logs/s
#   RATE=0 DURATION=10 perf/scrape_ab.sh            # closed loop: throughput
#
# Environment: BIN (default target/release), ROUNDS (2), DURATION (15 s),
# RATE (40000 logs/s; 0 = closed loop), CLIENTS (100), BATCH (1),
# SCRAPE_MS (100), RESULTS_DIR (default perf/results/scrape-<UTC stamp>).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BIN:-$ROOT/target/release}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-15}
RATE=${RATE:-40000}
CLIENTS=${CLIENTS:-100}
BATCH=${BATCH:-1}
SCRAPE_MS=${SCRAPE_MS:-100}
OUT=${RESULTS_DIR:-$ROOT/perf/results/scrape-$(date -u +%Y%m%dT%H%M%SZ)}
# shellcheck source=perf/common.sh
source "$ROOT/perf/common.sh"
perf_preamble "rate=$RATE clients=$CLIENTS batch=$BATCH duration=$DURATION scrape_ms=$SCRAPE_MS"

# Fetches /metrics every SCRAPE_MS until stdin closes; prints the count,
# failures and latency percentiles.
SCRAPER='
import sys, threading, time, urllib.request
url, period = sys.argv[1], float(sys.argv[2]) / 1000
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
took, failed, nxt = [], 0, time.monotonic()
while not stop.is_set():
    t = time.monotonic()
    try:
        body = urllib.request.urlopen(url, timeout=5).read()
        assert b"codi_logs_total" in body
        took.append(time.monotonic() - t)
    except Exception:
        failed += 1
    nxt += period
    stop.wait(max(0.0, nxt - time.monotonic()))
took.sort()
q = lambda p: took[min(len(took) - 1, int(p * len(took)))] * 1000 if took else 0
print(f"scrapes={len(took)} failed={failed} p50={q(0.5):.2f}ms p99={q(0.99):.2f}ms")
'

run_one() { # name scrape(0|1)
    local name=$1 scrape=$2 dir
    dir=$(mktemp -d)
    "$BIN/codi-monitor" --socket "$dir/m.sock" --db "$dir/codi.db" --admin 127.0.0.1:0 \
        >"$dir/out" 2>"$OUT/$name-daemon.log" &
    local pid=$!
    for _ in $(seq 150); do grep -q '^READY' "$dir/out" 2>/dev/null && break; sleep 0.1; done
    local admin
    admin=$(sed -n 's/^READY.* admin=\([^ ]*\).*/\1/p' "$dir/out")
    local scraper_pid="" fifo="$dir/scraper-stdin"
    if [[ $scrape == 1 ]]; then
        mkfifo "$fifo"
        python3 -c "$SCRAPER" "http://$admin/metrics" "$SCRAPE_MS" <"$fifo" >"$OUT/$name-scraper.txt" &
        scraper_pid=$!
        exec 9>"$fifo"
    fi
    "$BIN/codi-loadgen" run --socket "$dir/m.sock" --db "$dir/codi.db" --clients "$CLIENTS" \
        --rate "$RATE" --duration "$DURATION" --batch "$BATCH" --daemon-pid "$pid" \
        --json "$OUT/$name.json" >"$OUT/$name.txt" 2>&1 || echo "loadgen failed: see $OUT/$name.txt"
    if [[ -n $scraper_pid ]]; then
        exec 9>&-
        wait "$scraper_pid" || true
    fi
    kill -TERM "$pid"
    wait "$pid" || true
    rm -rf "$dir"
    python3 - "$OUT/$name.json" "$name" "$OUT/$name-scraper.txt" <<'EOF'
import json, os, sys
r = json.load(open(sys.argv[1]))
tput = r["throughput_logs_per_s"]
cpu = r["daemon"]["cpu_percent"]
ack = r["latency"]["ack"]
scr = open(sys.argv[3]).read().strip() if os.path.exists(sys.argv[3]) else "no scraper"
print(f"{sys.argv[2]:<6} {tput:>10,.0f} logs/s  daemon CPU {cpu:5.1f} %  "
      f"{cpu / 100 / tput * 1e6:6.2f} µs CPU/log  ack p50 {ack['p50_us'] / 1000:7.2f} ms  "
      f"p99 {ack['p99_us'] / 1000:8.2f} ms  stored==acked {r['stored_equals_acked']}  {scr}")
EOF
}

for round in $(seq "$ROUNDS"); do
    run_one "A$round" 0 | tee -a "$OUT/summary.txt"
    run_one "B$round" 1 | tee -a "$OUT/summary.txt"
done
echo "results in $OUT"
