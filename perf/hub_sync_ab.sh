#!/usr/bin/env bash
# What does hub sync cost ingestion, and how soon is a log on the hub?
# Starts the test hub of scripts/hub (ClickHouse 18.16 + ZooKeeper, 2 x 2
# replicas, on these same cores), then for each rate in RATES alternates a
# daemon without hub sync (A) and one shipping to the hub (B), ROUNDS
# times, each under the load generator for DURATION seconds. One line per
# run: throughput, daemon CPU per log, ack p50/p99, stored == acked; for B
# also how long the hub took to hold every log after the load stopped, the
# hub's CPU during the run, and the sync latency (a log's commit to the
# hub's 2xx for its batch, from codi_sync_latency_seconds: p50 and p99
# interpolated inside the histogram's buckets, as Prometheus'
# histogram_quantile does; bounds 50/100/250/500/750 ms, 1/1.5/2/3/4/5 s...).
#
#   perf/hub_sync_ab.sh            # RATES="10000 100000", 2 rounds of 20 s
#
# Environment: BIN (default target/release), RATES ("10000 100000"),
# ROUNDS (2), DURATION (20), CLIENTS (1000), HUB_EXTRA (more [server_hub]
# lines for B, e.g. 'batch_size = 100000'), RESULTS_DIR (default
# perf/results/hub-sync-<UTC stamp>). The window is 1 answer in flight per
# client at 10,000/s and 8 above (as issue 14's table).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BIN:-$ROOT/target/release}
RATES=${RATES:-10000 100000}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-20}
CLIENTS=${CLIENTS:-1000}
HUB_EXTRA=${HUB_EXTRA:-}
OUT=${RESULTS_DIR:-$ROOT/perf/results/hub-sync-$(date -u +%Y%m%dT%H%M%SZ)}
# shellcheck source=perf/common.sh
source "$ROOT/perf/common.sh"
perf_preamble "rates=$RATES rounds=$ROUNDS duration=$DURATION clients=$CLIENTS hub_extra=${HUB_EXTRA//$'\n'/; }"

work=$(mktemp -d)
hub_dir=$(mktemp -d)
chmod 755 "$hub_dir" # scripts/hub runs the servers as the clickhouse user when root
cleanup() {
    "$ROOT/scripts/hub" stop "$hub_dir" >/dev/null 2>&1 || true
    rm -rf "$work" "$hub_dir"
}
trap cleanup EXIT
"$ROOT/scripts/hub" start "$hub_dir" >/dev/null
"$ROOT/scripts/hub" schema "$hub_dir" >/dev/null
hub_url=$(cat "$hub_dir/url")
ch_pid=$(cat "$hub_dir/clickhouse/clickhouse-server.pid")
echo "hub: $hub_url (clickhouse-server pid $ch_pid)" | tee -a "$OUT/machine.txt"

hub_count() { # host -> rows of host on the hub (FINAL)
    curl -sS "$hub_url/" --data-binary \
        "SELECT count() FROM codi.logs FINAL WHERE host_id = '$1' FORMAT TSV" 2>/dev/null || echo 0
}
cpu_ticks() { # pid -> utime + stime in clock ticks
    awk '{print $14 + $15}' "/proc/$1/stat"
}

run_one() { # name rate window sync(0|1)
    local name=$1 rate=$2 window=$3 sync=$4 dir=$work/$1
    local host="perf-$1-$$"
    mkdir -p "$dir"
    if ((sync)); then
        printf '[server_hub]\nenabled = true\nurl = "%s"\nhost_id = "%s"\n%s\n' "$hub_url" "$host" \
            "$HUB_EXTRA" >"$dir/monitor.toml"
    else
        printf '[server_hub]\nenabled = false\n' >"$dir/monitor.toml"
    fi
    "$BIN/codi-monitor" --socket "$dir/m.sock" --db "$dir/data/codi.db" --admin 127.0.0.1:0 \
        --config "$dir/monitor.toml" >"$dir/out" 2>"$dir/err" &
    local pid=$!
    for _ in $(seq 300); do grep -q '^READY' "$dir/out" 2>/dev/null && break; sleep 0.1; done
    local admin
    admin=$(sed -n 's/^READY.* admin=\([^ ]*\).*/\1/p' "$dir/out")
    local hub_before
    hub_before=$(cpu_ticks "$ch_pid")
    "$BIN/codi-loadgen" run --socket "$dir/m.sock" --db "$dir/data/codi.db" --clients "$CLIENTS" \
        --rate "$rate" --window "$window" --duration "$DURATION" --daemon-pid "$pid" --quiet \
        --json "$OUT/$name.json" >"$OUT/$name.txt" 2>&1 || echo "loadgen failed: see $OUT/$name.txt"
    local hub_ticks=$(($(cpu_ticks "$ch_pid") - hub_before))
    local stored catch_up=-1 hub_rows=0
    stored=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["stored"])' "$OUT/$name.json" 2>/dev/null || echo 0)
    if ((sync)); then
        local t0=$SECONDS
        for _ in $(seq 1200); do
            hub_rows=$(hub_count "$host")
            ((hub_rows >= stored)) && { catch_up=$((SECONDS - t0)); break; }
            sleep 0.1
        done
        curl -sS "http://$admin/metrics" >"$OUT/$name.metrics" || true
    fi
    kill -TERM "$pid"
    wait "$pid" || true
    cp "$dir/err" "$OUT/$name-daemon.log"
    python3 - "$OUT/$name.json" "$name" "$sync" "$catch_up" "$hub_rows" "$hub_ticks" \
        "$(getconf CLK_TCK)" "$DURATION" "$OUT/$name.metrics" <<'PY'
import json, os, re, sys
r = json.load(open(sys.argv[1]))
name, sync, catch_up, hub_rows = sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
hub_cpu = int(sys.argv[6]) / int(sys.argv[7]) / float(sys.argv[8]) * 100
tput = r["throughput_logs_per_s"]
cpu = r["daemon"]["cpu_percent"]
ack = r["latency"]["ack"]
line = (f"{name:<10} {tput:>9,.0f} logs/s  daemon CPU {cpu:5.1f} %  "
        f"{cpu / 100 / max(tput, 1) * 1e6:6.2f} µs/log  ack p50 {ack['p50_us'] / 1000:6.2f} ms  "
        f"p99 {ack['p99_us'] / 1000:8.2f} ms  stored==acked {r['stored_equals_acked']}")
if sync:
    buckets = []
    path = sys.argv[9]
    if os.path.exists(path):
        for l in open(path):
            m = re.match(r'codi_sync_latency_seconds_bucket\{le="([^"]+)"\} (\d+)', l)
            if m:
                buckets.append((float("inf") if m[1] == "+Inf" else float(m[1]), int(m[2])))
    def quantile(q):
        total = buckets[-1][1] if buckets else 0
        if total == 0:
            return float("nan")
        rank, lo, below = q * total, 0.0, 0
        for le, n in buckets:
            if n >= rank:
                if le == float("inf"):
                    return lo
                return lo + (le - lo) * (rank - below) / max(n - below, 1)
            lo, below = le, n
        return lo
    line += (f"  | hub has all {hub_rows:,} after {catch_up} s  hub CPU {hub_cpu:5.1f} %  "
             f"sync latency p50 {quantile(0.5):.2f} s  p99 {quantile(0.99):.2f} s")
print(line)
PY
}

for rate in $RATES; do
    window=8
    ((rate <= 10000)) && window=1
    for round in $(seq "$ROUNDS"); do
        run_one "A-$rate-$round" "$rate" "$window" 0 | tee -a "$OUT/summary.txt"
        run_one "B-$rate-$round" "$rate" "$window" 1 | tee -a "$OUT/summary.txt"
    done
done
echo "results in $OUT"
