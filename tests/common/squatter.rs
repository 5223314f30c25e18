//! A process of another user listening where a client looks for the daemon.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The user the tests hand files and listeners to: `nobody`.
pub const OTHER_UID: u32 = 65534;

/// Listens like a daemon would but never answers, and counts what it is
/// sent: what a local user who got there first could do.
const SQUATTER_PY: &str = r#"
import os, select, socket, sys
kind, where, drop = sys.argv[1], sys.argv[2], sys.argv[3] == "drop"
if kind == "unix":
    s = socket.socket(socket.AF_UNIX)
    s.bind(where)
else:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(where)))
if drop:
    os.setgid(65534)
    os.setuid(65534)
s.listen(64)
print("READY", s.getsockname()[1] if kind == "tcp" else where, os.getuid(), flush=True)
conns, accepted, total = [], 0, 0
while True:
    r, _, _ = select.select([s, sys.stdin] + conns, [], [])
    if sys.stdin in r:
        break
    for c in r:
        if c is s:
            conns.append(s.accept()[0])
            accepted += 1
        else:
            d = c.recv(65536)
            total += len(d)
            if not d:
                conns.remove(c)
for c in conns:
    c.setblocking(False)
    try:
        while True:
            d = c.recv(65536)
            if not d:
                break
            total += len(d)
    except BlockingIOError:
        pass
print("ACCEPTED", accepted, "BYTES", total, flush=True)
"#;

/// A Python 3 that other users may run too (a pyenv shim below `/root`
/// is not one).
fn python3() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// What a squatter saw once the client was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Squatted {
    /// Connections accepted.
    pub accepted: u64,
    /// Bytes received over all of them.
    pub bytes: u64,
}

/// A process of [`OTHER_UID`] listening where a client might look for
/// the daemon.
pub struct Squatter {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    /// The TCP port, for a TCP squatter.
    pub port: u16,
}

/// Where a [`Squatter`] listens and how it becomes the other user.
pub enum SquatAt<'a> {
    /// A Unix socket, bound and listened on as the other user.
    Unix(&'a Path),
    /// A Unix socket bound as this user (so the file is ours) and listened
    /// on as the other user, whom `SO_PEERCRED` then names.
    UnixBoundByUs(&'a Path),
    /// Loopback TCP on this port (0: any), as the other user.
    Tcp(u16),
}

impl Squatter {
    /// Starts listening; returns once it does.
    pub fn start(at: SquatAt) -> Squatter {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(python3());
        cmd.arg("-c").arg(SQUATTER_PY);
        match at {
            SquatAt::Unix(p) => cmd.arg("unix").arg(p).arg("as-other"),
            SquatAt::UnixBoundByUs(p) => cmd.arg("unix").arg(p).arg("drop"),
            SquatAt::Tcp(port) => cmd.arg("tcp").arg(port.to_string()).arg("as-other"),
        };
        if !matches!(at, SquatAt::UnixBoundByUs(_)) {
            cmd.uid(OTHER_UID).gid(OTHER_UID);
        }
        let mut child = cmd
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python3 (needed for the squatter tests)");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).expect("squatter output");
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            words.first(),
            Some(&"READY"),
            "squatter did not start: {line:?}"
        );
        assert_eq!(words.get(2), Some(&"65534"), "squatter runs as {line:?}");
        let port = words[1].parse().unwrap_or(0);
        Squatter { child, out, port }
    }

    /// Stops it and says what it got.
    pub fn finish(mut self) -> Squatted {
        drop(self.child.stdin.take());
        let mut line = String::new();
        self.out.read_line(&mut line).expect("squatter report");
        let _ = self.child.wait();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["ACCEPTED", a, "BYTES", b] => Squatted {
                accepted: a.parse().unwrap(),
                bytes: b.parse().unwrap(),
            },
            _ => panic!("squatter report: {line:?}"),
        }
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
