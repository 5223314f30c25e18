//! Harness for the integration tests: runs the real `codi-monitor` binary in
//! a fresh temporary directory, talks to it with a blocking client over the
//! real sockets, and inspects its SQLite database directly.
//!
//! Every wait has a deadline that only protects against hangs; no test
//! asserts on how long something took.

use codi_monitor::client::conn::Stream;
use codi_monitor::proto::{
    decode_message, encode_message, frame_body_len, AckStatus, ErrorCode, LogFields, LogLevel,
    Message, Payload, Timestamp, HEADER_LEN,
};
use codi_monitor::store::{ingest, schema, StoreError};
use rusqlite::{Connection, OptionalExtension, Transaction};
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use uuid::Uuid;

pub mod hub;
#[path = "../../src/store/power_cut.rs"]
pub mod power_cut;

/// Hang protection for a daemon to print its READY line.
pub const START_DEADLINE: Duration = Duration::from_secs(30);
/// Hang protection for one answer on a client connection.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// Hang protection for a daemon to exit after a signal.
pub const EXIT_DEADLINE: Duration = Duration::from_secs(10);

/// The token test daemons get (through `$CODI_MONITOR_TOKEN`) unless a
/// test says otherwise: every TCP listener needs one.
pub const TEST_TOKEN: &str = "test-token-0123456789abcdef";

/// The daemon binary under test: `$CODI_TEST_DAEMON` when set (to run the
/// suite against another build, e.g. the one before a fix), else this
/// crate's own.
pub fn daemon_binary() -> PathBuf {
    std::env::var_os("CODI_TEST_DAEMON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_codi-monitor")))
}

/// The `codi2` binary under test: `$CODI_TEST_CODI2` when set (to run the
/// CLI tests against another build, e.g. the one before a fix), else this
/// crate's own.
pub fn codi2_binary() -> PathBuf {
    std::env::var_os("CODI_TEST_CODI2")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_codi2")))
}

/// Environment variables the daemon and codi2 read; cleared so the tests
/// see only what they set themselves.
const ISOLATED_ENV: &[&str] = &[
    "CODI_CONFIG",
    "CODI_MONITOR_MODE",
    "CODI_MONITOR_PORT",
    "CODI_MONITOR_TOKEN",
    "CODI_DB",
    "CODI_SESSION",
    "CODI_SOCKET",
    "CODI_MONITOR_SOCKET",
    "CODI_HUB_URL",
    "CODI_HUB_USER",
    "CODI_HUB_PASSWORD_FILE",
    // Set when the tests themselves run under systemd: a test daemon must
    // neither notify the real service manager nor log in journal style.
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
];

/// Polls `cond` until it holds or `deadline` passes; true if it held.
pub fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Raises this process's soft descriptor limit to the hard limit (children
/// inherit it) and returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    lim.rlim_cur
}

/// A temporary directory holding one daemon's socket, database, config and
/// logs; shared by successive daemons of one test (restarts).
pub struct Sandbox {
    dir: TempDir,
    spawned: AtomicUsize,
}

impl Sandbox {
    /// A fresh, empty sandbox.
    pub fn new() -> Arc<Sandbox> {
        Arc::new(Sandbox {
            dir: tempfile::Builder::new()
                .prefix("codi-it")
                .tempdir()
                .expect("create temp dir"),
            spawned: AtomicUsize::new(0),
        })
    }

    /// The sandbox's root.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh path for the next daemon's stderr.
    pub fn next_stderr(&self) -> PathBuf {
        let n = self.spawned.fetch_add(1, Ordering::Relaxed);
        self.path().join(format!("daemon-{n}.stderr"))
    }

    /// The default socket path, `<tmp>/run/m.sock`.
    pub fn socket(&self) -> PathBuf {
        self.path().join("run/m.sock")
    }

    /// The default database path, `<tmp>/data/codi.db`.
    pub fn db(&self) -> PathBuf {
        self.path().join("data/codi.db")
    }

    /// The config file path, `<tmp>/monitor.toml`.
    pub fn config(&self) -> PathBuf {
        self.path().join("monitor.toml")
    }

    /// Writes the config file.
    pub fn write_config(&self, toml: &str) {
        fs::write(self.config(), toml).expect("write config");
    }

    /// Opens the database for inspection.
    pub fn open_db(&self) -> Db {
        Db::open(&self.db())
    }

    /// A `codi2` command with an isolated environment.
    pub fn codi2(&self) -> Command {
        let mut cmd = Command::new(codi2_binary());
        for key in ISOLATED_ENV {
            cmd.env_remove(key);
        }
        cmd.env("HOME", self.path())
            .env("XDG_RUNTIME_DIR", self.path().join("xdg-run"))
            .env("XDG_DATA_HOME", self.path().join("xdg-data"))
            .env("XDG_CONFIG_HOME", self.path().join("xdg-config"))
            .current_dir(self.path());
        cmd
    }
}

/// How to start a daemon.
#[derive(Clone)]
pub struct Opts {
    /// Pass `--socket <tmp>/run/m.sock`.
    pub socket_flag: bool,
    /// Pass `--db <tmp>/data/codi.db`.
    pub db_flag: bool,
    /// `--tcp` value; `None` leaves TCP off.
    pub tcp: Option<String>,
    /// `--workers` value.
    pub workers: usize,
    /// Pass `--config <tmp>/monitor.toml` (write it first).
    pub config: bool,
    /// Extra arguments.
    pub args: Vec<OsString>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Token given through `$CODI_MONITOR_TOKEN` (before `env`, which may
    /// override it); `None` gives none.
    pub token: Option<String>,
    /// `--admin` value (default `127.0.0.1:0`, so that parallel daemons
    /// never fight over the default port); `None` passes no flag.
    pub admin: Option<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            socket_flag: true,
            db_flag: true,
            tcp: Some("127.0.0.1:0".into()),
            workers: 2,
            config: false,
            args: Vec::new(),
            env: Vec::new(),
            token: Some(TEST_TOKEN.into()),
            admin: Some("127.0.0.1:0".into()),
        }
    }
}

impl Opts {
    /// Adds an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Adds an argument after the standard ones.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Sets the `--tcp` value (or turns TCP off).
    pub fn tcp(mut self, addr: Option<&str>) -> Self {
        self.tcp = addr.map(str::to_owned);
        self
    }

    /// Sets the token (or none).
    pub fn token(mut self, token: Option<&str>) -> Self {
        self.token = token.map(str::to_owned);
        self
    }

    /// The token the daemon will hold: the last `$CODI_MONITOR_TOKEN` set,
    /// unless a token file on the command line wins.
    pub fn effective_token(&self) -> Option<String> {
        if self.args.iter().any(|a| a == "--token-file") {
            return None;
        }
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == "CODI_MONITOR_TOKEN")
            .map(|(_, v)| v.trim().to_owned())
            .or_else(|| self.token.clone())
    }

    /// Passes the sandbox's config file.
    pub fn with_config(mut self) -> Self {
        self.config = true;
        self
    }

    /// The daemon command for `sandbox`.
    pub fn command(&self, sandbox: &Sandbox) -> Command {
        let mut cmd = Command::new(daemon_binary());
        for key in ISOLATED_ENV {
            cmd.env_remove(key);
        }
        cmd.env("HOME", sandbox.path())
            .env("XDG_RUNTIME_DIR", sandbox.path().join("xdg-run"))
            .env("XDG_DATA_HOME", sandbox.path().join("xdg-data"))
            .env("XDG_CONFIG_HOME", sandbox.path().join("xdg-config"))
            .current_dir(sandbox.path());
        if self.socket_flag {
            cmd.arg("--socket").arg(sandbox.socket());
        }
        if self.db_flag {
            cmd.arg("--db").arg(sandbox.db());
        }
        if let Some(tcp) = &self.tcp {
            cmd.arg("--tcp").arg(tcp);
        }
        cmd.arg("--workers").arg(self.workers.to_string());
        if let Some(admin) = &self.admin {
            cmd.arg("--admin").arg(admin);
        }
        if self.config {
            cmd.arg("--config").arg(sandbox.config());
        }
        cmd.args(&self.args);
        if let Some(token) = &self.token {
            cmd.env("CODI_MONITOR_TOKEN", token);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs the daemon expecting it to fail before READY; returns its exit
    /// status and stderr (hang-protected).
    pub fn run_expecting_failure(&self, sandbox: &Sandbox) -> (ExitStatus, String) {
        let mut child = self
            .command(sandbox)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn codi-monitor");
        let mut status = None;
        let exited = wait_until(START_DEADLINE, || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        });
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
            panic!("codi-monitor kept running although it should have refused to start");
        }
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(
            !out.contains("READY"),
            "daemon said READY although it should refuse to start: {out}"
        );
        (status.unwrap(), err)
    }
}

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

/// An HTTP response from the admin endpoint.
#[allow(dead_code)]
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: HashMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as text.
    #[allow(dead_code)]
    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("a UTF-8 body")
    }
}

/// The value of one series (`name{labels}`) in a Prometheus exposition.
#[allow(dead_code)]
pub fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series `{name}` in:\n{text}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("`{name}`: {e}"))
}

/// Sends `request` (raw bytes) to `addr`, reads the answer to the end of
/// the stream and parses its head with `httparse`.
#[allow(dead_code)]
pub fn http_request(addr: SocketAddr, request: &[u8]) -> io::Result<HttpResponse> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    s.write_all(request)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_http_response(&raw)
}

/// Parses a complete HTTP response.
#[allow(dead_code)]
pub fn parse_http_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(bad(format!("incomplete response: {raw:?}"))),
        Err(e) => return Err(bad(format!("bad response ({e}): {raw:?}"))),
    };
    let headers: HashMap<String, String> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    Ok(HttpResponse {
        status: resp.code.unwrap_or(0),
        headers,
        body: raw[head_len..].to_vec(),
    })
}

/// A blocking protocol client with hang-protected reads.
pub struct Client {
    stream: Stream,
    buf: Vec<u8>,
}

impl Client {
    /// Connects to a Unix socket.
    pub fn unix(path: &Path) -> Client {
        let s = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        Client::from_stream(Stream::Unix(s))
    }

    /// Connects over TCP.
    pub fn tcp(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        s.set_nodelay(true).unwrap();
        Client::from_stream(Stream::Tcp(s))
    }

    /// Connects to a Unix socket, or says why not.
    #[allow(dead_code)]
    pub fn try_unix(path: &Path) -> io::Result<Client> {
        Ok(Client::from_stream(Stream::Unix(UnixStream::connect(
            path,
        )?)))
    }

    /// Connects over TCP, or says why not.
    #[allow(dead_code)]
    pub fn try_tcp(addr: SocketAddr) -> io::Result<Client> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Ok(Client::from_stream(Stream::Tcp(s)))
    }

    fn from_stream(stream: Stream) -> Client {
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    /// A second handle on the same connection (for a separate writer
    /// thread); its own read buffer starts empty.
    pub fn try_clone(&self) -> Client {
        Client::from_stream(self.stream.try_clone().expect("clone stream"))
    }

    /// Sends one message.
    pub fn send(&mut self, msg: &Message) -> io::Result<()> {
        let mut frame = Vec::new();
        encode_message(msg, &mut frame).expect("encode");
        self.stream.write_all(&frame)
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Half-closes the connection (no more requests).
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown_write();
    }

    /// The next answer; `Ok(None)` on a clean end of stream (or a reset
    /// after the daemon closed).
    pub fn try_recv(&mut self) -> io::Result<Option<Message>> {
        loop {
            match frame_body_len(&self.buf) {
                Ok(Some(n)) if self.buf.len() >= HEADER_LEN + n => {
                    let msg = decode_message(&self.buf[HEADER_LEN..HEADER_LEN + n])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                    self.buf.drain(..HEADER_LEN + n);
                    return Ok(Some(msg));
                }
                Ok(_) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "connection closed inside a frame ({} bytes)",
                            self.buf.len()
                        ),
                    ));
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset && self.buf.is_empty() => {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The next answer; panics on end of stream or timeout.
    pub fn recv(&mut self) -> Message {
        match self.try_recv() {
            Ok(Some(msg)) => msg,
            Ok(None) => panic!("connection closed while an answer was expected"),
            Err(e) => panic!("no answer: {e}"),
        }
    }

    /// Asserts the daemon closed the connection.
    pub fn expect_eof(&mut self) {
        match self.try_recv() {
            Ok(None) => {}
            Ok(Some(msg)) => panic!("expected end of stream, got {msg:?}"),
            Err(e) => panic!("expected end of stream, got error {e}"),
        }
    }

    /// Asserts the daemon ended the stream cleanly (end of stream after every
    /// answer), not with a reset.
    #[allow(dead_code)]
    pub fn expect_clean_eof(&mut self) {
        assert!(self.buf.is_empty(), "unread bytes before the end of stream");
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => {}
            other => panic!("expected a clean end of stream, got {other:?}"),
        }
    }

    /// Sends a message and returns its answer.
    pub fn request(&mut self, msg: &Message) -> Message {
        self.send(msg).expect("send request");
        self.recv()
    }

    /// Sends `payload` in a fresh message and returns the answer.
    pub fn call(&mut self, payload: Payload) -> Message {
        self.request(&Message::new(payload))
    }

    /// Sends `msg` and asserts it is acknowledged `Accepted`.
    pub fn expect_accepted(&mut self, msg: &Message) {
        let answer = self.request(msg);
        assert_accepted(&answer, msg.id);
    }

    /// Authenticates with `token`, which must be accepted.
    pub fn authenticate(&mut self, token: &str) {
        self.expect_accepted(&Message::new(Payload::Authenticate {
            token: token.into(),
        }));
    }

    /// A ping that must come back `Accepted`.
    pub fn ping(&mut self) {
        self.expect_accepted(&Message::new(Payload::Ping));
    }
}

/// A `LogEntry` message.
pub fn log(level: LogLevel, component: &str, message: &str) -> Message {
    Message::new(Payload::LogEntry(fields(level, component, message)))
}

/// Log fields without metadata or session.
pub fn fields(level: LogLevel, component: &str, message: &str) -> LogFields {
    LogFields {
        level,
        component: component.into(),
        message: message.into(),
        metadata: None,
        session_id: None,
    }
}

/// A message with a fixed timestamp.
pub fn at(micros: i64, payload: Payload) -> Message {
    Message {
        id: Uuid::now_v7(),
        timestamp: Timestamp::from_micros(micros),
        payload,
    }
}

/// The acknowledgment's request id and status; panics on anything else.
pub fn ack(answer: &Message) -> (Uuid, &AckStatus) {
    match &answer.payload {
        Payload::Acknowledgment { request_id, status } => (*request_id, status),
        other => panic!("expected an Acknowledgment, got {other:?}"),
    }
}

/// True if `answer` accepts request `id`.
#[allow(dead_code)]
pub fn is_accepted(answer: &Message, id: Uuid) -> bool {
    matches!(&answer.payload,
        Payload::Acknowledgment { request_id, status: AckStatus::Accepted } if *request_id == id)
}

/// Asserts `answer` accepts request `id`.
pub fn assert_accepted(answer: &Message, id: Uuid) {
    let (request_id, status) = ack(answer);
    assert_eq!(request_id, id, "request_id must echo the request's id");
    assert_eq!(status, &AckStatus::Accepted, "status for {id}");
}

/// Asserts `answer` rejects request `id` with a non-empty reason; returns it.
pub fn assert_rejected(answer: &Message, id: Uuid) -> String {
    let (request_id, status) = ack(answer);
    assert_eq!(request_id, id, "request_id must echo the request's id");
    match status {
        AckStatus::Rejected(reason) => {
            assert!(!reason.trim().is_empty(), "a rejection must say why");
            reason.clone()
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
}

/// Asserts `answer` is an `Error` with `code`; returns its message.
pub fn assert_error(answer: &Message, code: ErrorCode) -> String {
    match &answer.payload {
        Payload::Error {
            code: got, message, ..
        } => {
            assert_eq!(got, &code, "error code (message: {message})");
            message.clone()
        }
        other => panic!("expected Error {code}, got {other:?}"),
    }
}

/// One row of the `logs` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Row id.
    pub id: i64,
    /// Message id.
    pub uuid: Uuid,
    /// Sender's timestamp, micros.
    pub timestamp: i64,
    /// Level name.
    pub level: String,
    /// Component.
    pub component: String,
    /// Session.
    pub session_id: Option<String>,
    /// Text.
    pub message: String,
    /// Metadata JSON text.
    pub metadata: Option<String>,
    /// Daemon's storage time, micros.
    pub created_at: i64,
}

/// One row of the `sessions` table.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRow {
    /// Identity.
    pub identity: String,
    /// Agent type.
    pub agent_type: Option<String>,
    /// Start, micros.
    pub started_at: i64,
    /// End, micros.
    pub ended_at: Option<i64>,
    /// Workspace.
    pub workspace: Option<String>,
}

/// A direct connection to the daemon's database, for inspection only.
pub struct Db {
    conn: Connection,
}

impl Db {
    /// Opens an existing database and its ingest file read-only (never
    /// creates one), as the daemon's readers do.
    pub fn open(path: &Path) -> Db {
        let conn = match schema::open_ro(path) {
            Ok(conn) => conn,
            // An older daemon under test (`$CODI_TEST_DAEMON`, a build from
            // before a fix) keeps an older schema: read its tables as they
            // are, without the `all_logs` view.
            Err(StoreError::SchemaMismatch { found, .. })
                if found < schema::SCHEMA_VERSION
                    && std::env::var_os("CODI_TEST_DAEMON").is_some() =>
            {
                open_older(path)
            }
            Err(e) => panic!("open {}: {e}", path.display()),
        };
        Db { conn }
    }

    /// A read transaction that sees every stored log once, in the view
    /// `all_logs` (indexed table and ingest file together).
    pub fn snapshot(&self) -> Transaction<'_> {
        ingest::begin_read(&self.conn).unwrap()
    }

    /// Stored logs.
    pub fn count_logs(&self) -> i64 {
        self.snapshot()
            .query_row("SELECT COUNT(*) FROM all_logs", [], |r| r.get(0))
            .unwrap()
    }

    /// Stored logs with this uuid.
    pub fn count_uuid(&self, id: Uuid) -> i64 {
        self.snapshot()
            .query_row(
                "SELECT COUNT(*) FROM all_logs WHERE uuid = ?",
                [id.as_bytes().as_slice()],
                |r| r.get(0),
            )
            .unwrap()
    }

    /// Every stored uuid.
    pub fn uuids(&self) -> HashSet<Uuid> {
        let tx = self.snapshot();
        let mut stmt = tx.prepare("SELECT uuid FROM all_logs").unwrap();
        let rows = stmt
            .query_map([], |r| r.get::<_, Vec<u8>>(0))
            .unwrap()
            .map(|b| Uuid::from_slice(&b.unwrap()).expect("16-byte uuid"));
        rows.collect()
    }

    /// The row with this uuid, if stored.
    pub fn row(&self, id: Uuid) -> Option<Row> {
        self.snapshot()
            .query_row(
                "SELECT id, uuid, timestamp, level, component, session_id, message, metadata, \
                 created_at FROM all_logs WHERE uuid = ?",
                [id.as_bytes().as_slice()],
                |r| {
                    Ok(Row {
                        id: r.get(0)?,
                        uuid: Uuid::from_slice(&r.get::<_, Vec<u8>>(1)?).unwrap(),
                        timestamp: r.get(2)?,
                        level: r.get(3)?,
                        component: r.get(4)?,
                        session_id: r.get(5)?,
                        message: r.get(6)?,
                        metadata: r.get(7)?,
                        created_at: r.get(8)?,
                    })
                },
            )
            .optional()
            .unwrap()
    }

    /// The session row, if stored.
    pub fn session(&self, id: &str) -> Option<SessionRow> {
        self.conn
            .query_row(
                "SELECT identity, agent_type, started_at, ended_at, workspace \
                 FROM sessions WHERE id = ?",
                [id],
                |r| {
                    Ok(SessionRow {
                        identity: r.get(0)?,
                        agent_type: r.get(1)?,
                        started_at: r.get(2)?,
                        ended_at: r.get(3)?,
                        workspace: r.get(4)?,
                    })
                },
            )
            .optional()
            .unwrap()
    }

    /// Rows in the indexed `logs` table and in the ingest file's table
    /// (merged or not).
    pub fn table_counts(&self) -> (i64, i64) {
        let tx = self.snapshot();
        let count = |table: &str| -> i64 {
            tx.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        };
        (count("main.logs"), count("ingest.ingest_logs"))
    }

    /// `PRAGMA integrity_check`'s answer (every attached file).
    pub fn integrity_check(&self) -> String {
        self.conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap()
    }

    /// How often each stored uuid is seen (through `all_logs`).
    pub fn uuid_counts(&self) -> HashMap<Uuid, u32> {
        let tx = self.snapshot();
        let mut stmt = tx.prepare("SELECT uuid FROM all_logs").unwrap();
        let mut counts = HashMap::new();
        for uuid in stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap() {
            let uuid = Uuid::from_slice(&uuid.unwrap()).expect("16-byte uuid");
            *counts.entry(uuid).or_insert(0) += 1;
        }
        counts
    }
}

/// Copies the database `db` and its ingest file into the directory `to` as
/// a power cut could leave them ([`power_cut::copy_cut`]) and returns the
/// copy's database path.
pub fn copy_as_after_power_cut(db: &Path, to: &Path) -> PathBuf {
    power_cut::copy_cut(&[db, &schema::ingest_path(db)], to);
    to.join(db.file_name().unwrap())
}

/// A database (and its ingest file) an older daemon wrote, read-only.
fn open_older(path: &Path) -> Connection {
    use rusqlite::OpenFlags;
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    conn.busy_timeout(schema::BUSY_TIMEOUT).unwrap();
    let ingest = schema::ingest_path(path);
    conn.execute(
        "ATTACH DATABASE ?1 AS ingest",
        [format!("file:{}?mode=ro", ingest.display())],
    )
    .unwrap_or_else(|e| panic!("attach {}: {e}", ingest.display()));
    conn
}

/// Runs a command with stdin and returns its output (hang-protected by
/// the command itself finishing; the tests only run short commands).
pub fn run_with_stdin(mut cmd: Command, stdin: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let feeder = thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let output = wait_output(child);
    feeder.join().unwrap();
    output
}

/// Runs a command without stdin and returns its output.
pub fn run(mut cmd: Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_output(child)
}

/// Collects a child's output, killing it if it outlives the hang deadline.
fn wait_output(mut child: Child) -> Output {
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let mut status = None;
    if !wait_until(START_DEADLINE, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    }) {
        let _ = child.kill();
        status = Some(child.wait().unwrap());
    }
    Output {
        status: status.unwrap(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

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
