"""Starts the real codi-monitor binary for the conformance suite.

The binary comes from $CODI_MONITOR_BIN (default: target/debug/codi-monitor
under the repository root). Each test module gets its own daemon in a fresh
temporary directory; every wait has a deadline.
"""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from codi_wire import Conn

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def daemon_binary() -> Path:
    configured = os.environ.get("CODI_MONITOR_BIN")
    path = Path(configured) if configured else REPO_ROOT / "target/debug/codi-monitor"
    if not path.is_file():
        pytest.fail(f"daemon binary {path} not found: build it (`cargo build --bins`) "
                    "or set CODI_MONITOR_BIN")
    return path


class Daemon:
    """A running codi-monitor on a Unix socket and TCP 127.0.0.1:0."""

    def __init__(self, workdir: Path, token: str | None = None):
        self.workdir = workdir
        self.socket_path = str(workdir / "m.sock")
        self.db_path = str(workdir / "codi.db")
        self.stderr_path = workdir / "daemon.stderr"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CODI_MONITOR_")}
        # Keep any per-user configuration of the machine out of the test.
        for var in ("HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_RUNTIME_DIR",
                    "XDG_STATE_HOME"):
            env[var] = str(workdir / "home")
        (workdir / "home").mkdir(mode=0o700, exist_ok=True)
        argv = [str(daemon_binary()), "--socket", self.socket_path,
                "--tcp", "127.0.0.1:0", "--db", self.db_path, "--workers", "2",
                # An ephemeral admin port: parallel daemons never share 9848.
                "--admin", "127.0.0.1:0"]
        if token is not None:
            env["CODI_MONITOR_TOKEN"] = token
        else:
            # Loopback TCP without a token must be asked for explicitly.
            config = workdir / "monitor.toml"
            config.write_text("[monitor]\nallow_unauthenticated_tcp = true\n")
            argv += ["--config", str(config)]
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                env=env, cwd=workdir)
        try:
            self.ready = self._wait_ready()
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        host, _, port = self.ready["tcp"].rpartition(":")
        self.tcp_addr = (host, int(port))

    def stderr_tail(self, n: int = 4000) -> str:
        try:
            return self.stderr_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self) -> dict:
        """Reads the one READY line from stdout, with a deadline."""
        deadline = time.monotonic() + READY_TIMEOUT
        fd = self.proc.stdout.fileno()
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no READY line within {READY_TIMEOUT}s; got {line!r}\n"
                            f"stderr:\n{self.stderr_tail()}")
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                continue
            chunk = os.read(fd, 1)
            if not chunk:
                code = self.proc.wait()
                pytest.fail(f"daemon exited ({code}) before READY; got {line!r}\n"
                            f"stderr:\n{self.stderr_tail()}")
            line += chunk
        words = line.decode().split()
        assert words[0] == "READY", line
        fields = dict(word.split("=", 1) for word in words[1:])
        assert set(fields) == {"unix", "tcp", "admin", "db"}, line
        return fields

    def connect(self, transport: str) -> Conn:
        if transport == "unix":
            return Conn.unix(self.socket_path)
        if transport == "tcp":
            return Conn.tcp(*self.tcp_addr)
        raise ValueError(transport)

    def stop(self) -> int:
        """SIGTERM, then the exit code (killed if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"daemon did not exit within {STOP_TIMEOUT}s of SIGTERM\n"
                        f"stderr:\n{self.stderr_tail()}")
        self.extra_stdout = self.proc.stdout.read()
        self.proc.stdout.close()
        return code


def start_daemon(tmp_path_factory, name: str, token: str | None = None):
    """Generator body of a daemon fixture: yields it, asserts a clean stop."""
    daemon = Daemon(tmp_path_factory.mktemp(name), token=token)
    try:
        yield daemon
    finally:
        code = daemon.stop()
    assert code == 0, f"daemon exited with {code} on SIGTERM\nstderr:\n{daemon.stderr_tail()}"
    assert daemon.extra_stdout == b"", \
        f"daemon printed more than the READY line: {daemon.extra_stdout!r}"


@pytest.fixture(params=["unix", "tcp"])
def transport(request) -> str:
    return request.param


@pytest.fixture
def connect(daemon, transport):
    """Opens connections over the test's transport; closes them afterwards."""
    conns = []

    def open_conn() -> Conn:
        conn = daemon.connect(transport)
        conns.append(conn)
        return conn

    yield open_conn
    for conn in conns:
        conn.close()


@pytest.fixture
def conn(connect) -> Conn:
    return connect()


def file_mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)
