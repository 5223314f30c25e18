#!/usr/bin/env python3
"""The big-row attack of issue point 2, measured by hand against any build.

Starts the given `codi-monitor` in a fresh temporary directory (Unix socket
only), sends `--logs` LogEntry requests each carrying `--kib` KiB of binary
metadata (one frame each, so at most about 1 MiB), then one
`QueryLogs {limit: 100}`, and prints what was acknowledged, what the query
answered and the daemon's resident set size (VmRSS) before the attack,
after the logs and at its peak while the query ran (sampled every 5 ms).

    python3 scripts/big_rows_rss.py --daemon target/debug/codi-monitor

With `--pool` it instead opens `--conns` connections that each pipeline
`--queries` large `QueryLogs` without reading a byte of their answers, and
then checks that a bystander's query is still answered.

Uses tests/conformance/codi_wire.py (PyPI `msgpack` only, no Rust code).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests/conformance"))
import codi_wire as wire  # noqa: E402


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start(binary: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    sock = str(workdir / "m.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODI_")}
    env["HOME"] = str(workdir)
    proc = subprocess.Popen(
        [binary, "--socket", sock, "--db", str(workdir / "codi.db"), "--workers", "2"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=open(workdir / "daemon.stderr", "wb"), env=env, cwd=workdir)
    line = proc.stdout.readline()
    if not line.startswith(b"READY"):
        raise SystemExit(f"no READY line: {line!r}")
    return proc, sock


class Peak(threading.Thread):
    """Samples a process's RSS until stopped; keeps the largest value."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, rss_kib(pid), threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.005)


def big_rows(proc: subprocess.Popen, sock: str, logs: int, kib: int) -> None:
    conn = wire.Conn.unix(sock)
    conn.sock.settimeout(300)
    conn.send("Ping")
    conn.recv()
    before = rss_kib(proc.pid)
    blob = bytes(range(256)) * (kib * 4)
    accepted = rejected = 0
    reason = ""
    for i in range(logs):
        conn.send({"LogEntry": wire.log_fields(message=f"big {i}", metadata={"blob": blob})})
        status = conn.recv()["payload"]["Acknowledgment"]["status"]
        if status == "Accepted":
            accepted += 1
        else:
            rejected += 1
            reason = status["Rejected"]
    conn.send({"LogEntry": wire.log_fields(message="small, after the big ones")})
    conn.recv()
    after_logs = rss_kib(proc.pid)
    peak = Peak(proc.pid)
    peak.start()
    started = time.monotonic()
    conn.send({"QueryLogs": {"filter": {}, "limit": 100}})
    answer = conn.recv()["payload"]
    took = time.monotonic() - started
    time.sleep(0.05)
    peak.stop.set()
    peak.join()
    results = answer.get("LogResults")
    print(f"{logs} logs of {kib} KiB binary metadata: {accepted} accepted, {rejected} rejected")
    if reason:
        print(f"  reason: {reason}")
    if results is None:
        print(f"  query answered {answer}")
    else:
        print(f"  QueryLogs limit 100: {len(results['entries'])} entries, "
              f"total_count {results['total_count']}, {took:.2f} s")
    print(f"  RSS before {before} KiB, after the logs {after_logs} KiB, "
          f"peak during the query {peak.peak} KiB (+{peak.peak - before} KiB)")


def pool(proc: subprocess.Popen, sock: str, conns: int, queries: int) -> None:
    writer = wire.Conn.unix(sock)
    writer.sock.settimeout(300)
    row = "q" * 100_000
    for i in range(40):
        writer.send({"LogEntry": wire.log_fields(message=f"{i} {row}")})
        writer.recv()
    before = rss_kib(proc.pid)
    peak = Peak(proc.pid)
    peak.start()
    hostile = []
    for _ in range(conns):
        c = wire.Conn.unix(sock)
        c.sock.setblocking(False)
        data = b"".join(wire.request_frame({"QueryLogs": {"filter": {}, "limit": 1000}})[1]
                        for _ in range(queries))
        try:
            c.sock.send(data)
        except BlockingIOError:
            pass
        hostile.append(c)
    time.sleep(3)
    started = time.monotonic()
    writer.send({"QueryLogs": {"filter": {}, "limit": 5}})
    answer = writer.recv()["payload"]
    took = time.monotonic() - started
    peak.stop.set()
    peak.join()
    kind = next(iter(answer)) if isinstance(answer, dict) else answer
    detail = (len(answer["LogResults"]["entries"]) if kind == "LogResults"
              else answer.get("Error", answer))
    print(f"{conns} connections x {queries} pipelined QueryLogs, never read:")
    print(f"  bystander's query: {kind} ({detail}) in {took:.2f} s")
    print(f"  RSS before {before} KiB, peak {peak.peak} KiB (+{peak.peak - before} KiB)")
    for c in hostile:
        c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--daemon", required=True, help="codi-monitor binary")
    ap.add_argument("--logs", type=int, default=20)
    ap.add_argument("--kib", type=int, default=900)
    ap.add_argument("--pool", action="store_true")
    ap.add_argument("--conns", type=int, default=40)
    ap.add_argument("--queries", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="codi-bigrows") as tmp:
        proc, sock = start(args.daemon, Path(tmp))
        try:
            if args.pool:
                pool(proc, sock, args.conns, args.queries)
            else:
                big_rows(proc, sock, args.logs, args.kib)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
