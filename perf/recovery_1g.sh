#!/usr/bin/env bash
# How fast does the daemon serve again on a damaged 1 GiB database? Builds a
# store of ROWS logs (about 1.07 GB at the default) with the daemon's own
# schema (the daemon creates it, the sqlite3 shell fills it), overwrites
# three leaf pages in the middle of `logs`, starts the daemon on it and
# prints when it is READY, when a log is accepted, the ack latency of a
# load run while the salvage goes on, and when the salvage finished with
# its counts. With COLD=1 the page cache is dropped first (needs root):
# the start-up check then does not finish in its 2 s, the background check
# finds the damage and stops the daemon (exit code 3), and the script
# starts it again as systemd would.
#
#   perf/recovery_1g.sh
#
# Environment: BIN (default target/release), ROWS (2700000), COLD (0),
# WORK (a temp directory; needs about 2.5 GB).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BIN:-$ROOT/target/release}
ROWS=${ROWS:-2700000}
COLD=${COLD:-0}
WORK=${WORK:-$(mktemp -d)}
command -v sqlite3 >/dev/null || { echo "needs sqlite3" >&2; exit 2; }
echo "date: $(date -u +%FT%TZ)  nproc: $(nproc)  $(grep MemTotal /proc/meminfo)  load: $(cat /proc/loadavg)"
echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)  rows=$ROWS cold=$COLD"

now_ms() { echo $(($(date +%s%N) / 1000000)); }
start() { # -> pid; waits for READY
    rm -f "$WORK/out"
    "$BIN/codi-monitor" --socket "$WORK/m.sock" --db "$WORK/data/codi.db" --admin "" \
        >"$WORK/out" 2>>"$WORK/err" &
    pid=$!
    until grep -qs '^READY' "$WORK/out"; do
        kill -0 "$pid" 2>/dev/null || { tail -5 "$WORK/err"; exit 1; }
        sleep 0.05
    done
}
start
kill -TERM "$pid"
wait "$pid" || true
sqlite3 "$WORK/data/codi.db" <<SQL
PRAGMA synchronous = OFF;
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < $ROWS)
INSERT INTO logs (id, uuid, timestamp, level, component, session_id, message, metadata, created_at, uid)
SELECT x, randomblob(16), 1764700000000000 + x * 1000, 'info', 'bench', 'sess-' || (x % 1000),
  'message ' || x || ' ' || substr(hex(randomblob(120)), 1, 230), NULL, 1764700000000000 + x * 1000, 0 FROM c;
PRAGMA wal_checkpoint(TRUNCATE);
SQL
python3 - "$WORK/data/codi.db" <<'PY'
import sqlite3, sys
path = sys.argv[1]
pages = [r[0] for r in sqlite3.connect(f"file:{path}?mode=ro", uri=True).execute(
    "SELECT pageno FROM dbstat WHERE name = 'logs' AND pagetype = 'leaf' ORDER BY pageno")]
mid = len(pages) // 2
with open(path, "r+b") as f:
    for p in pages[mid:mid + 3]:
        f.seek((p - 1) * 4096)
        f.write(b"\xa5" * 4096)
print(f"database {path}: {len(pages)} leaf pages of logs; 3 overwritten from the middle")
PY
sync
if [[ $COLD == 1 ]]; then echo 3 >/proc/sys/vm/drop_caches; fi
t0=$(now_ms)
start
echo "READY after $(($(now_ms) - t0)) ms"
if [[ $COLD == 1 ]]; then
    wait "$pid" || echo "stopped with exit code $? after $(($(now_ms) - t0)) ms (damage found in the background)"
    t0=$(now_ms)
    start
    echo "restarted: READY after $(($(now_ms) - t0)) ms"
fi
"$BIN/codi2" --socket "$WORK/m.sock" log -c after "a log while salvaging"
echo "a log accepted after $(($(now_ms) - t0)) ms"
"$BIN/codi-loadgen" run --socket "$WORK/m.sock" --clients 50 --rate 2000 --duration 20 \
    --daemon-pid "$pid" --quiet | grep -E "acknowledged|ack latency|daemon"
until "$BIN/codi2" --socket "$WORK/m.sock" status --json | grep -q " salvaged, up to "; do sleep 0.5; done
echo "salvage finished after $(($(now_ms) - t0)) ms"
grep "recovery finished" "$WORK/err" | head -1
kill -TERM "$pid"
wait "$pid" || true
rm -rf "$WORK"
