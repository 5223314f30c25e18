#!/usr/bin/env python3
"""Who writes the database while a daemon restarts (issue 14, point 4).

    perf/restart_writers.py A_BIN_DIR B_BIN_DIR

For each build, ROUNDS times: a daemon on a temp socket and database,
CALLERS threads each running `codi2 log` one call after another, and
RESTARTS restarts of the daemon as systemd does them (SIGTERM, wait for
the exit, start again, wait for READY), RESTART_EVERY seconds apart.
Every call's start and end is recorded, and whether it wrote directly
("wrote directly" on stderr). Direct writes whose whole call lies inside
a daemon's lifetime (spawn to exit) are counted: a daemon held, or was
about to take, the database meanwhile. Printed per run: calls, direct
writes, those within a daemon's lifetime, failed calls, call latency
p50/p99/max, stored == accepted, and the slowest stop (SIGTERM to exit).

Environment: ROUNDS (2), CALLERS (4), RESTARTS (5), RESTART_EVERY (1.5).
Loopback and temp files only; it stops by itself.
"""

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time


def env(name, default, kind=int):
    return kind(os.environ.get(name, default))


ROUNDS = env("ROUNDS", 2)
CALLERS = env("CALLERS", 4)
RESTARTS = env("RESTARTS", 5)
RESTART_EVERY = env("RESTART_EVERY", 1.5, float)


def start_daemon(bin_dir, socket, db):
    spawned = time.monotonic()
    proc = subprocess.Popen(
        [f"{bin_dir}/codi-monitor", "--socket", socket, "--db", db, "--admin", ""],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("READY"):
            break
    else:
        raise SystemExit(f"the daemon exited before READY ({proc.wait()})")
    return proc, spawned


def stop_daemon(proc):
    """SIGTERM, then the wait for the exit; returns (exit time, seconds the stop took)."""
    asked = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    exited = time.monotonic()
    return exited, exited - asked


def caller(bin_dir, socket, db, stop, calls, n):
    while not stop.is_set():
        message = f"caller {n} call {len(calls)}"
        began = time.monotonic()
        out = subprocess.run(
            [f"{bin_dir}/codi2", "--socket", socket, "--db", db, "log", message],
            capture_output=True,
            text=True,
        )
        ended = time.monotonic()
        calls.append((began, ended, out.returncode, "wrote directly" in out.stderr))


def stored(db):
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.execute(f"ATTACH 'file:{db}-ingest?mode=ro' AS ingest")
    n = conn.execute(
        "SELECT (SELECT count(*) FROM logs) + (SELECT count(*) FROM ingest.ingest_logs "
        "WHERE id > (SELECT coalesce(max(id), 0) FROM logs))"
    ).fetchone()[0]
    conn.close()
    return n


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


def one_run(label, bin_dir):
    with tempfile.TemporaryDirectory(prefix="codi-restart-") as tmp:
        os.chmod(tmp, 0o700)
        socket, db = f"{tmp}/m.sock", f"{tmp}/data/codi.db"
        lifetimes = []
        stops = []
        proc, spawned = start_daemon(bin_dir, socket, db)
        stop = threading.Event()
        calls = [[] for _ in range(CALLERS)]
        threads = [
            threading.Thread(target=caller, args=(bin_dir, socket, db, stop, calls[n], n))
            for n in range(CALLERS)
        ]
        for t in threads:
            t.start()
        for _ in range(RESTARTS):
            time.sleep(RESTART_EVERY)
            exited, took = stop_daemon(proc)
            lifetimes.append((spawned, exited))
            stops.append(took)
            proc, spawned = start_daemon(bin_dir, socket, db)
        time.sleep(RESTART_EVERY)
        stop.set()
        for t in threads:
            t.join()
        exited, took = stop_daemon(proc)
        lifetimes.append((spawned, exited))
        stops.append(took)
        every = [c for per in calls for c in per]
        direct = [c for c in every if c[3]]
        beside = [
            c for c in direct if any(s <= c[0] and c[1] <= e for s, e in lifetimes)
        ]
        failed = [c for c in every if c[2] != 0]
        accepted = len(every) - len(failed)
        latency = [(c[1] - c[0]) * 1000 for c in every]
        print(
            f"{label}: calls {len(every)}, direct {len(direct)}, direct within a daemon's lifetime "
            f"{len(beside)}, failed {len(failed)}, latency ms p50 {percentile(latency, 0.5):.1f} "
            f"p99 {percentile(latency, 0.99):.1f} max {max(latency):.1f}, "
            f"stored {stored(db)} accepted {accepted}, slowest stop {max(stops) * 1000:.0f} ms",
            flush=True,
        )


def main():
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: {sys.argv[0]} A_BIN_DIR B_BIN_DIR")
    a, b = (os.path.abspath(d) for d in sys.argv[1:])
    print(
        f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, nproc {os.cpu_count()}, "
        f"callers {CALLERS}, restarts {RESTARTS} every {RESTART_EVERY}s",
        flush=True,
    )
    for _ in range(ROUNDS):
        one_run("A", a)
        one_run("B", b)


if __name__ == "__main__":
    main()
