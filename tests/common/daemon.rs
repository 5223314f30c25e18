//! A running daemon process: its READY line, signals, exit and logs.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::*;

/// What the READY line announced.
#[derive(Debug, Clone)]
pub struct Ready {
    /// `unix=` path.
    pub unix: Option<PathBuf>,
    /// `tcp=` address.
    pub tcp: Option<SocketAddr>,
    /// `db=` path.
    pub db: PathBuf,
    /// `admin=` address.
    pub admin: Option<SocketAddr>,
}

fn parse_ready(line: &str) -> Ready {
    let mut fields = line.split_whitespace();
    assert_eq!(fields.next(), Some("READY"), "not a READY line: {line}");
    let mut unix = None;
    let mut tcp = None;
    let mut db = None;
    let mut admin = None;
    for field in fields {
        let (key, value) = field
            .split_once('=')
            .unwrap_or_else(|| panic!("malformed READY field `{field}` in {line}"));
        match key {
            "unix" => unix = Some(PathBuf::from(value)),
            "tcp" => tcp = Some(value.parse().expect("tcp= is a socket address")),
            "db" => db = Some(PathBuf::from(value)),
            "admin" => admin = Some(value.parse().expect("admin= is a socket address")),
            other => panic!("unknown READY field `{other}` in {line}"),
        }
    }
    Ready {
        unix,
        tcp,
        db: db.unwrap_or_else(|| panic!("READY line without db=: {line}")),
        admin,
    }
}

/// A running daemon; killed on drop if still alive.
pub struct Daemon {
    /// Its sandbox (shared with restarts).
    pub sandbox: Arc<Sandbox>,
    /// What it announced.
    pub ready: Ready,
    /// The token its TCP clients authenticate with.
    pub token: Option<String>,
    child: Child,
    stderr_path: PathBuf,
    exit: Option<ExitStatus>,
}

impl Daemon {
    /// Starts a daemon in a fresh sandbox with default options.
    pub fn start_default() -> Daemon {
        Daemon::start(Sandbox::new(), Opts::default())
    }

    /// Starts a daemon in `sandbox` and waits for its READY line.
    pub fn start(sandbox: Arc<Sandbox>, opts: Opts) -> Daemon {
        let cmd = opts.command(&sandbox);
        Daemon::spawn_command(sandbox, cmd, opts.effective_token())
    }

    /// Runs `cmd` (from [`Opts::command`], perhaps adjusted) and waits for
    /// its READY line; TCP clients authenticate with `token`.
    pub fn spawn_command(sandbox: Arc<Sandbox>, cmd: Command, token: Option<String>) -> Daemon {
        let stderr_path = sandbox.next_stderr();
        File::create(&stderr_path).expect("create stderr file");
        Daemon::spawn_logging_to(sandbox, cmd, token, stderr_path)
    }

    /// [`spawn_command`](Self::spawn_command) with stderr appended to the
    /// existing file `stderr_path` (so a test may know its inode first).
    pub fn spawn_logging_to(
        sandbox: Arc<Sandbox>,
        mut cmd: Command,
        token: Option<String>,
        stderr_path: PathBuf,
    ) -> Daemon {
        let stderr = fs::OpenOptions::new()
            .append(true)
            .open(&stderr_path)
            .expect("open stderr file");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn codi-monitor");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Nobody listens any more; keep draining so the daemon
                    // never blocks on a full pipe.
                    continue;
                }
            }
        });
        let end = Instant::now() + START_DEADLINE;
        let ready = loop {
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(line) if line.starts_with("READY") => break parse_ready(&line),
                Ok(other) => panic!("unexpected stdout line before READY: {other}"),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = child.try_wait().expect("try_wait") {
                        panic!(
                            "codi-monitor exited with {status} before READY; stderr:\n{}",
                            fs::read_to_string(&stderr_path).unwrap_or_default()
                        );
                    }
                    if Instant::now() >= end {
                        let _ = child.kill();
                        let _ = child.wait();
                        panic!(
                            "no READY line within {START_DEADLINE:?}; stderr:\n{}",
                            fs::read_to_string(&stderr_path).unwrap_or_default()
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().expect("wait");
                    panic!(
                        "codi-monitor closed stdout ({status}) before READY; stderr:\n{}",
                        fs::read_to_string(&stderr_path).unwrap_or_default()
                    );
                }
            }
        };
        Daemon {
            sandbox,
            ready,
            token,
            child,
            stderr_path,
            exit: None,
        }
    }

    /// Stops this daemon (SIGTERM, then waits) and starts a new one on the
    /// same sandbox with `opts`.
    pub fn restart(mut self, opts: Opts) -> Daemon {
        self.terminate();
        let status = self.wait_exit();
        assert!(status.success(), "daemon exited with {status} on SIGTERM");
        Daemon::start(Arc::clone(&self.sandbox), opts)
    }

    /// The Unix socket path from READY.
    pub fn socket(&self) -> &Path {
        self.ready.unix.as_deref().expect("Unix listener is on")
    }

    /// The TCP address from READY.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.ready.tcp.expect("TCP listener is on")
    }

    /// The admin endpoint's address from READY.
    #[allow(dead_code)]
    pub fn admin_addr(&self) -> SocketAddr {
        self.ready.admin.expect("the admin endpoint is on")
    }

    /// `GET path` from the admin endpoint.
    #[allow(dead_code)]
    pub fn http_get(&self, path: &str) -> HttpResponse {
        http_request(
            self.admin_addr(),
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
        )
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// The database path from READY.
    pub fn db_path(&self) -> &Path {
        &self.ready.db
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A client over the Unix socket.
    pub fn unix(&self) -> Client {
        Client::unix(self.socket())
    }

    /// A client over TCP, authenticated with the daemon's token if it has
    /// one.
    pub fn tcp(&self) -> Client {
        let mut c = Client::tcp(self.tcp_addr());
        if let Some(token) = &self.token {
            c.authenticate(token);
        }
        c
    }

    /// A client over TCP that has not authenticated.
    pub fn tcp_raw(&self) -> Client {
        Client::tcp(self.tcp_addr())
    }

    /// Opens the database for inspection.
    pub fn db(&self) -> Db {
        Db::open(self.db_path())
    }

    /// Sends a signal.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
    }

    /// SIGSTOP, then waits (hang-protected) until every thread is stopped:
    /// the files are then still while the test looks at them.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
        let task_dir = format!("/proc/{}/task", self.pid());
        let all_stopped = || {
            let Ok(tasks) = fs::read_dir(&task_dir) else {
                return false;
            };
            tasks.flatten().all(|task| {
                // The state follows the parenthesised command name.
                fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                    stat.rsplit_once(") ")
                        .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
                })
            })
        };
        assert!(
            wait_until(READ_TIMEOUT, all_stopped),
            "daemon did not stop on SIGSTOP"
        );
    }

    /// SIGCONT after [`freeze`](Self::freeze).
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGKILL, and reaps the process.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let status = self.child.wait().expect("wait after SIGKILL");
        self.exit = Some(status);
    }

    /// `codi2 status --json` against this daemon: whether it exited 0, and
    /// the document.
    #[allow(dead_code)]
    pub fn codi2_status_json(&self) -> (bool, serde_json::Value) {
        let out = run({
            let mut cmd = self.sandbox.codi2();
            cmd.arg("--socket")
                .arg(self.socket())
                .args(["status", "--json"]);
            cmd
        });
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let json = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "codi2 status --json is not JSON ({e}): {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), json)
    }

    /// SIGTERM.
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Waits (hang-protected) for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        let mut status = None;
        let exited = wait_until(EXIT_DEADLINE, || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        assert!(
            exited,
            "daemon did not exit within {EXIT_DEADLINE:?}; stderr:\n{}",
            self.stderr()
        );
        self.exit = status;
        status.unwrap()
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.exit.is_none() && self.child.try_wait().expect("try_wait").is_none()
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The daemon's resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS line")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exit.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
