#!/usr/bin/env bash
# Capacity scenarios for codi-monitor (issue 3), each against a fresh daemon.
#
#   perf/scenarios.sh                          # all scenarios, 60 s each
#   DURATION=10 SCENARIOS="a d f" perf/scenarios.sh
#
# Scenarios:
#   a  1,000 clients, 100,000 logs/s, LogEntry, Unix socket, pings, + ceiling
#   b  ramp: highest rate that holds (ack p99 <= 1 s and acked >= 90 % of
#      offered), batch 1 and batch 100, 100 clients, + ceiling right after
#   c  1 KB messages, batch 100, closed loop, 100 clients, + ceiling (1 KB rows)
#   d  mixed: 50,000 logs/s from 500 clients, queries, 1,000 idle, pings
#      (max_connections = 4000)
#   e  as (a) over loopback TCP
#   f  overload: 300,000 logs/s offered in batches of 100 from 200 clients,
#      daemon RSS sampled every second into f-rss.csv
#
# Environment:
#   DURATION      seconds of load per scenario (default 60)
#   SCENARIOS     subset to run, e.g. "a b" (default "a b c d e f")
#   STEP_DURATION seconds per ramp step in (b) (default 10, or DURATION if smaller)
#   RAMP_RATES    offered rates of the ramp (default 20000 ... 600000)
#   CEILING_ROWS  rows for the ceiling of a, b, e (default 1000000)
#   CEILING_ROWS_1K  rows for the ceiling of c, 1 KB each (default 300000)
#   CEILING       inline (default): `run --ceiling-rows`, daemon/ceiling in the
#                 same run; separate: plain `run`, then `codi-loadgen ceiling`
#                 in a fresh private dir once the daemon has stopped
#                 (<name>-ceiling.json; perf_table.py computes the ratio);
#                 off: no ceiling (b always uses a separate ceiling)
#   RESULTS_DIR   where results go (default perf/results/<UTC timestamp>)
#   KEEP_DB=1     keep the daemons' databases (default: deleted at exit)
#
# Results: <dir>/machine.txt, and per scenario <name>.json (loadgen --json),
# <name>-hist/ (.hgrm, .hlog), <name>.txt (loadgen summary), <name>-daemon.log
# (daemon stdout/stderr). Ramp steps are under <dir>/b-steps/; the step that
# held last is copied to b1.* / b100.*, its ceiling to b1-ceiling.json /
# b100-ceiling.json, and the ramp's verdict is b-ramp.json.
# Then: scripts/perf_table.py <dir>; scripts/plot_latency.py <dir>.
#
# Exit status: 0 if every loadgen run passed its checks (stored == acked, no
# protocol error) and every daemon exited 0 on SIGTERM; 1 otherwise. One
# loadgen failure is explained rather than counted: more rows stored than
# acknowledged, by no more than the requests still unanswered when the
# loadgen's 10 s drain ended (expected in the overload scenario f, whose
# windows hold far more than 10 s of the writer's work).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$ROOT/target/release
MONITOR=$BIN/codi-monitor
LOADGEN=$BIN/codi-loadgen
for b in "$MONITOR" "$LOADGEN"; do
    if [[ ! -x $b ]]; then
        echo "missing $b: run 'cargo build --release --bins' first" >&2
        exit 2
    fi
done

DURATION=${DURATION:-60}
SCENARIOS=${SCENARIOS:-a b c d e f}
if [[ -z ${STEP_DURATION:-} ]]; then
    STEP_DURATION=10
    if python3 -c "import sys; sys.exit(0 if float('$DURATION') < 10 else 1)"; then
        STEP_DURATION=$DURATION
    fi
fi
RAMP_RATES=${RAMP_RATES:-20000 40000 60000 80000 100000 130000 160000 200000 250000 300000 400000 500000 600000}
CEILING_ROWS=${CEILING_ROWS:-1000000}
CEILING_ROWS_1K=${CEILING_ROWS_1K:-300000}
CEILING=${CEILING:-inline}
case $CEILING in inline|separate|off) ;; *) echo "CEILING must be inline, separate or off" >&2; exit 2 ;; esac
READY_TIMEOUT=${READY_TIMEOUT:-15}   # seconds to wait for READY
STOP_TIMEOUT=${STOP_TIMEOUT:-60}     # seconds to wait for exit after SIGTERM

for s in $SCENARIOS; do
    case $s in a|b|c|d|e|f) ;; *) echo "unknown scenario '$s' (a b c d e f)" >&2; exit 2 ;; esac
done

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${RESULTS_DIR:-$ROOT/perf/results/$STAMP}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# Everything the script starts in the background is listed here, and only
# these are signalled at exit.
OWN_PIDS=()
TMP_DIRS=()
FAILED=0

cleanup() {
    local pid deadline=$((SECONDS + 10))
    # SIGTERM first (timeout(1) passes it on to its loadgen; the daemon
    # drains and exits), SIGKILL whatever is left after 10 s.
    for pid in "${OWN_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${OWN_PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
        wait "$pid" 2>/dev/null || true
    done
    if [[ ${KEEP_DB:-0} != 1 ]]; then
        local d
        for d in "${TMP_DIRS[@]}"; do rm -rf "$d"; done
    elif ((${#TMP_DIRS[@]})); then
        echo "databases kept in: ${TMP_DIRS[*]}" >&2
    fi
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

forget_pid() {
    local keep=() p
    for p in "${OWN_PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    OWN_PIDS=("${keep[@]}")
}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------- machine
{
    echo "date:      $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "host:      $(uname -n) $(uname -srm)"
    echo "nproc:     $(nproc)"
    echo "cpu:       $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "uptime:    $(uptime)"
    echo "commit:    $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (dirty)')"
    echo "monitor:   $MONITOR ($(date -u -r "$MONITOR" '+%Y-%m-%d %H:%M:%S UTC'))"
    echo "loadgen:   $LOADGEN ($(date -u -r "$LOADGEN" '+%Y-%m-%d %H:%M:%S UTC'))"
    echo "duration:  $DURATION s; ramp steps $STEP_DURATION s; scenarios: $SCENARIOS"
    echo "nofile:    soft $(ulimit -Sn) hard $(ulimit -Hn)"
    echo "free -g:"
    free -g
    echo "tmp fs:"
    df -h "${TMPDIR:-/tmp}"
} >"$OUT/machine.txt"
log "results: $OUT"

# ---------------------------------------------------------------- daemon
# start_daemon NAME [extra monitor args...]
# Sets DPID, DDIR (0700), DSOCK, DDB, DTCP (the TCP address, if any).
start_daemon() {
    local name=$1; shift
    DDIR=$(mktemp -d "${TMPDIR:-/tmp}/codi-perf-$name.XXXXXX")
    TMP_DIRS+=("$DDIR")
    chmod 0700 "$DDIR"
    DSOCK=$DDIR/monitor.sock
    DDB=$DDIR/codi.db
    DTCP=
    local dlog=$OUT/$name-daemon.log
    "$MONITOR" --socket "$DSOCK" --db "$DDB" "$@" --log-level warn >"$dlog" 2>&1 &
    DPID=$!
    OWN_PIDS+=("$DPID")
    local deadline=$((SECONDS + READY_TIMEOUT)) line
    while :; do
        line=$(grep -m1 '^READY ' "$dlog" 2>/dev/null || true)
        [[ -n $line ]] && break
        if ! kill -0 "$DPID" 2>/dev/null; then
            log "$name: daemon exited before READY:"; cat "$dlog" >&2
            return 1
        fi
        if ((SECONDS >= deadline)); then
            log "$name: no READY within ${READY_TIMEOUT}s"; cat "$dlog" >&2
            return 1
        fi
        sleep 0.05
    done
    if [[ $line =~ tcp=([^[:space:]]+) ]]; then DTCP=${BASH_REMATCH[1]}; fi
    log "$name: daemon pid $DPID: $line"
}

# stop_daemon NAME: SIGTERM to our daemon, wait (bounded), record its status.
stop_daemon() {
    local name=$1 rc deadline=$((SECONDS + STOP_TIMEOUT))
    kill -TERM "$DPID" 2>/dev/null || true
    while kill -0 "$DPID" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    if kill -0 "$DPID" 2>/dev/null; then
        log "$name: daemon $DPID still running ${STOP_TIMEOUT}s after SIGTERM: SIGKILL"
        kill -KILL "$DPID" 2>/dev/null || true
    fi
    rc=0; wait "$DPID" 2>/dev/null || rc=$?
    forget_pid "$DPID"
    echo "$name daemon_exit=$rc" >>"$OUT/status.txt"
    if ((rc != 0)); then
        log "$name: daemon exited $rc"; FAILED=1
    fi
    if [[ ${KEEP_DB:-0} != 1 ]]; then rm -rf "$DDIR"; fi
}

# loadgen NAME DIR [run args...]: one loadgen run against the current daemon.
# Returns the loadgen's exit status (also recorded in status.txt).
loadgen() {
    local name=$1 dir=$2; shift 2
    local rc=0 lpid
    # The bound covers the load, the 10 s drain, the count and a ceiling.
    # In the background, so that a signal to this script is handled at once.
    timeout --signal=TERM --kill-after=10 "$(python3 -c "print(int(float('$DURATION') + float('$STEP_DURATION') + 600))")" \
        "$LOADGEN" run --socket "$DSOCK" --db "$DDB" --daemon-pid "$DPID" \
        --json "$dir/$name.json" --hist-dir "$dir/$name-hist" --quiet "$@" \
        >"$dir/$name.txt" 2>&1 &
    lpid=$!
    OWN_PIDS+=("$lpid")
    wait "$lpid" || rc=$?
    forget_pid "$lpid"
    cat "$dir/$name.txt"
    local note=
    if ((rc == 1)) && [[ -f $dir/$name.json ]]; then
        note=$(python3 - "$dir/$name.json" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
c = j["counts"]
stored, acked, unanswered = j.get("stored"), c["entries_accepted"], c["entries_unanswered"]
if (c["protocol_errors"] == 0 and stored is not None and acked < stored <= acked + unanswered):
    print(f"explained: stored {stored} > acked {acked}, by at most the {unanswered} logs unanswered at the drain deadline")
EOF
)
    fi
    if [[ -n $note ]]; then
        echo "$name loadgen_exit=$rc ($note)" >>"$OUT/status.txt"
        log "$name: loadgen exited $rc, $note"
    else
        echo "$name loadgen_exit=$rc" >>"$OUT/status.txt"
        if ((rc != 0)); then
            log "$name: loadgen exited $rc"
            FAILED=1
            if [[ ! -f $dir/$name.json ]] && grep -q 'database is locked' "$dir/$name.txt"; then
                log "$name: no JSON: the run's ceiling hit SQLITE_BUSY; CEILING=separate avoids losing the run"
            fi
        fi
    fi
    return 0
}

# ceiling_args ROWS: the run's ceiling options in inline mode.
ceiling_args() {
    if [[ $CEILING == inline ]]; then echo "--ceiling-rows $1"; fi
}

# separate_ceiling NAME ROWS SESSIONS MESSAGE_SIZE: a standalone ceiling in a
# fresh private dir (after stop_daemon) -> $OUT/NAME-ceiling.json.
separate_ceiling() {
    local name=$1 rows=$2 sessions=$3 size=$4 cdir rc=0
    cdir=$(mktemp -d "${TMPDIR:-/tmp}/codi-perf-ceiling.XXXXXX")
    TMP_DIRS+=("$cdir")
    chmod 0700 "$cdir"
    timeout --signal=TERM --kill-after=10 900 \
        "$LOADGEN" ceiling --db "$cdir/ceiling.db" --rows "$rows" --sessions "$sessions" \
        --message-size "$size" --json "$OUT/$name-ceiling.json" >"$OUT/$name-ceiling.txt" 2>&1 || rc=$?
    cat "$OUT/$name-ceiling.txt"
    echo "$name-ceiling exit=$rc" >>"$OUT/status.txt"
    if ((rc != 0)); then log "$name: ceiling exited $rc"; FAILED=1; fi
    rm -rf "$cdir"
}

# ---------------------------------------------------------------- scenarios
scenario_a() {
    start_daemon a
    loadgen a "$OUT" --clients 1000 --rate 100000 --batch 1 --duration "$DURATION" \
        --ping-rate 200 $(ceiling_args "$CEILING_ROWS")
    stop_daemon a
    [[ $CEILING != separate ]] || separate_ceiling a "$CEILING_ROWS" 1000 150
}

scenario_e() {
    start_daemon e --tcp 127.0.0.1:0
    if [[ -z $DTCP ]]; then log "e: no tcp= in READY"; FAILED=1; stop_daemon e; return; fi
    # loadgen gets both endpoints; --transport tcp picks TCP.
    loadgen e "$OUT" --tcp "$DTCP" --transport tcp --clients 1000 --rate 100000 --batch 1 \
        --duration "$DURATION" --ping-rate 200 $(ceiling_args "$CEILING_ROWS")
    stop_daemon e
    [[ $CEILING != separate ]] || separate_ceiling e "$CEILING_ROWS" 1000 150
}

scenario_c() {
    start_daemon c
    loadgen c "$OUT" --clients 100 --rate 0 --batch 100 --message-size 1024 \
        --duration "$DURATION" $(ceiling_args "$CEILING_ROWS_1K")
    stop_daemon c
    [[ $CEILING != separate ]] || separate_ceiling c "$CEILING_ROWS_1K" 100 1024
}

scenario_d() {
    local cfg=$OUT/d-config.toml
    printf '[monitor]\nmax_connections = 4000\n' >"$cfg"
    start_daemon d --config "$cfg"
    loadgen d "$OUT" --clients 500 --rate 50000 --batch 1 --duration "$DURATION" \
        --query-interval 100 --idle 1000 --ping-rate 200
    stop_daemon d
}

scenario_f() {
    start_daemon f
    local csv=$OUT/f-rss.csv pid=$DPID
    echo "t_s,vmrss_kib,vmhwm_kib" >"$csv"
    (
        t0=${EPOCHREALTIME/[.,]/}
        while kill -0 "$pid" 2>/dev/null; do
            rss=$(awk '/^VmRSS:/{print $2}' "/proc/$pid/status" 2>/dev/null || true)
            hwm=$(awk '/^VmHWM:/{print $2}' "/proc/$pid/status" 2>/dev/null || true)
            [[ -n $rss ]] || break
            now=${EPOCHREALTIME/[.,]/}
            printf '%d.%d,%s,%s\n' $(((now - t0) / 1000000)) $(((now - t0) / 100000 % 10)) "$rss" "$hwm" >>"$csv"
            sleep 1
        done
    ) &
    local sampler=$!
    OWN_PIDS+=("$sampler")
    loadgen f "$OUT" --clients 200 --rate 300000 --batch 100 --window 64 --duration "$DURATION"
    kill -TERM "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    forget_pid "$sampler"
    stop_daemon f
    python3 - "$csv" <<'EOF' >&2
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
if rows:
    r = [int(x["vmrss_kib"]) for x in rows]
    half = r[len(r) // 2:]
    print(f"f: RSS samples {len(r)}: first {r[0]/1024:.1f} MiB, max {max(r)/1024:.1f} MiB, "
          f"last {r[-1]/1024:.1f} MiB; second half min {min(half)/1024:.1f} max {max(half)/1024:.1f} MiB")
EOF
}

# One ramp step's verdict: prints "held" or the reason it did not hold.
step_verdict() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
try:
    j = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"no-json({e.__class__.__name__})"); sys.exit()
rate = float(sys.argv[2])
p99 = j["latency"]["ack"]["p99_us"]
tput = j["throughput_logs_per_s"] or 0
reasons = []
if not j.get("stored_equals_acked"):
    reasons.append("stored!=acked")
if p99 is None or p99 > 1_000_000:
    reasons.append(f"ack-p99={p99}us")
if tput < 0.9 * rate:
    reasons.append(f"acked={tput:.0f}/s<90%")
print("held" if not reasons else ",".join(reasons))
EOF
}

scenario_b() {
    local steps=$OUT/b-steps batch
    mkdir -p "$steps"
    local ramp_json="{"
    for batch in 1 100; do
        local held= rate verdict name stopped="end of RAMP_RATES"
        for rate in $RAMP_RATES; do
            name=batch$batch-r$rate
            start_daemon "b-$name"
            loadgen "$name" "$steps" --clients 100 --rate "$rate" --batch "$batch" \
                --duration "$STEP_DURATION"
            stop_daemon "b-$name"
            mv "$OUT/b-$name-daemon.log" "$steps/$name-daemon.log"
            verdict=$(step_verdict "$steps/$name.json" "$rate")
            echo "b batch=$batch rate=$rate verdict=$verdict" >>"$OUT/status.txt"
            log "b: batch $batch at $rate logs/s: $verdict"
            if [[ $verdict != held ]]; then stopped="$rate: $verdict"; break; fi
            held=$rate
        done
        local tag=b$batch
        if [[ -n $held ]]; then
            cp "$steps/batch$batch-r$held.json" "$OUT/$tag.json"
            cp "$steps/batch$batch-r$held.txt" "$OUT/$tag.txt"
            cp -r "$steps/batch$batch-r$held-hist" "$OUT/$tag-hist"
            # The ceiling right after, spread over as many sessions as clients.
            separate_ceiling "$tag" "$CEILING_ROWS" 100 150
        fi
        ramp_json+="\"batch$batch\": {\"held_rate\": ${held:-null}, \"stopped_at\": \"$stopped\", \"step_s\": $STEP_DURATION},"
    done
    ramp_json="${ramp_json%,}}"
    echo "$ramp_json" | python3 -m json.tool >"$OUT/b-ramp.json"
    cat "$OUT/b-ramp.json" >&2
}

for s in $SCENARIOS; do
    log "=== scenario $s (duration $DURATION s) ==="
    "scenario_$s"
done

log "done: $OUT"
log "table: scripts/perf_table.py $OUT   plot: scripts/plot_latency.py $OUT"
exit "$FAILED"
