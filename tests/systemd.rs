//! Running under systemd, against the real daemon: the test plays the
//! service manager with its own `$NOTIFY_SOCKET` (a Unix datagram socket in
//! the sandbox) and reads what the daemon tells it: `READY=1` only once the
//! database is open, `WATCHDOG=1` only while the writer makes progress,
//! `RELOADING=1`/`READY=1` around SIGHUP, `STOPPING=1` on SIGTERM. Then the
//! daemon's own log in journal style (`$JOURNAL_STREAM`).
//!
//! The watchdog interval is short (2 s) so the tests are, too; the margins
//! below are several pings wide and only protect against hangs.

#[allow(dead_code)]
mod common;

use codi_monitor::proto::{AckStatus, LogLevel, Payload};
use codi_monitor::store::schema;
use common::*;
use rusqlite::Connection;
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// `WATCHDOG_USEC` the daemons get: pings every second while healthy.
const WATCHDOG: Duration = Duration::from_secs(2);
/// Hang protection for a notification to arrive.
const ARRIVES_WITHIN: Duration = Duration::from_secs(30);
/// A silence this long means the pings stopped: three ping periods.
const SILENCE: Duration = Duration::from_secs(3);

/// The fake service manager: its socket, and every datagram it received.
struct Manager {
    path: PathBuf,
    messages: Receiver<String>,
}

impl Manager {
    fn new(sandbox: &Sandbox) -> Manager {
        let path = sandbox.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        let (tx, messages) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if tx.send(text).is_err() {
                    break;
                }
            }
        });
        Manager { path, messages }
    }

    /// Daemon options that point it at this manager with a watchdog.
    fn opts(&self) -> Opts {
        Opts::default()
            .env("NOTIFY_SOCKET", self.path.to_str().unwrap())
            .env("WATCHDOG_USEC", &WATCHDOG.as_micros().to_string())
    }

    /// The next datagram within `within`, if any.
    fn next(&self, within: Duration) -> Option<String> {
        match self.messages.recv_timeout(within) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => panic!("the notify socket closed"),
        }
    }

    /// Skips datagrams until one holds the line `line`; returns it (and
    /// what came before). Panics at the deadline.
    fn expect(&self, line: &str) -> (String, Vec<String>) {
        let end = Instant::now() + ARRIVES_WITHIN;
        let mut before = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some(m) if has_line(&m, line) => return (m, before),
                Some(m) => before.push(m),
                None => panic!("no `{line}` within {ARRIVES_WITHIN:?}; got {before:?}"),
            }
        }
    }

    /// Waits until `WATCHDOG=1` has not come for [`SILENCE`]; returns the
    /// datagrams of that silence. Panics if the pings never stop.
    fn expect_pings_to_stop(&self) -> Vec<String> {
        let end = Instant::now() + ARRIVES_WITHIN;
        let mut quiet_since = Instant::now();
        let mut during = Vec::new();
        while Instant::now() < end {
            let left = SILENCE.saturating_sub(quiet_since.elapsed());
            if left.is_zero() {
                return during;
            }
            match self.next(left) {
                Some(m) if has_line(&m, "WATCHDOG=1") => {
                    quiet_since = Instant::now();
                    during.clear();
                }
                Some(m) => during.push(m),
                None => {}
            }
        }
        panic!("watchdog pings went on for {ARRIVES_WITHIN:?} although the writer is stuck");
    }

    /// Counts `WATCHDOG=1` until `count` have come; panics at the deadline.
    fn expect_pings(&self, count: usize) {
        for _ in 0..count {
            self.expect("WATCHDOG=1");
        }
    }
}

fn has_line(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

/// The `STATUS=` value of a datagram.
fn status_of(message: &str) -> Option<&str> {
    message.lines().find_map(|l| l.strip_prefix("STATUS="))
}

/// Holds the ingest file's write lock, as another process could: the
/// daemon's writer then waits inside SQLite (for its 60 s busy timeout).
struct WriteLock(Connection);

impl WriteLock {
    fn take(db: &Path) -> WriteLock {
        let conn = Connection::open(schema::ingest_path(db)).expect("open the ingest file");
        conn.execute_batch("BEGIN IMMEDIATE")
            .expect("take the ingest file's write lock");
        WriteLock(conn)
    }

    fn release(self) {
        self.0.execute_batch("ROLLBACK").expect("release the lock");
    }
}

/// The daemon's threads by name.
fn thread_names(pid: i32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .expect("list the daemon's threads")
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect()
}

/// The `watchdog` component of a `Status` answer: (status, message).
fn watchdog_status(d: &Daemon) -> (String, String) {
    let answer = d.unix().call(Payload::GetStatus);
    let Payload::Status { components, .. } = answer.payload else {
        panic!("expected Status, got {answer:?}");
    };
    let c = components
        .into_iter()
        .find(|c| c.name == "watchdog")
        .expect("Status lists the watchdog");
    (c.status, c.message)
}

#[test]
fn ready_comes_only_once_the_database_is_open_then_reload_and_stop_are_announced() {
    let sandbox = Sandbox::new();
    let manager = Manager::new(&sandbox);
    // An existing database whose ingest file another process holds
    // locked: opening it (the writer reads where the last run stopped)
    // waits for that lock.
    drop(schema::open_rw(&sandbox.db(), 1).expect("create the database"));
    let lock = WriteLock::take(&sandbox.db());
    let starting = {
        let sandbox = Arc::clone(&sandbox);
        let opts = manager.opts();
        thread::spawn(move || Daemon::start(sandbox, opts))
    };
    // The listeners are bound before the database is opened: from here on
    // the daemon is waiting for the database, and must not say READY.
    assert!(
        wait_until(ARRIVES_WITHIN, || sandbox.socket().exists()),
        "the daemon never bound its socket"
    );
    let end = Instant::now() + SILENCE;
    while let Some(m) = manager.next(end.saturating_duration_since(Instant::now())) {
        assert!(
            !has_line(&m, "READY=1"),
            "READY=1 while the database could not be opened: {m:?}"
        );
    }
    lock.release();

    let (ready, _) = manager.expect("READY=1");
    // At READY the socket takes clients and the schema is current.
    UnixStream::connect(sandbox.socket()).expect("the socket accepts at READY");
    let db = Connection::open(sandbox.db()).unwrap();
    let version: i64 = db
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, schema::SCHEMA_VERSION);
    let status = status_of(&ready).expect("READY comes with a STATUS");
    assert!(
        status.starts_with("ready:")
            && status.contains(&format!("unix={}", sandbox.socket().display()))
            && status.contains(&format!("db={}", sandbox.db().display())),
        "{status}"
    );
    let mut d = starting.join().expect("the daemon started");
    // Started just after READY=1.
    assert!(
        wait_until(ARRIVES_WITHIN, || thread_names(d.pid())
            .iter()
            .any(|n| n == "codi-notify")),
        "the notification thread runs: {:?}",
        thread_names(d.pid())
    );

    d.signal(libc::SIGHUP);
    let (reloading, _) = manager.expect("RELOADING=1");
    assert!(
        reloading.lines().any(|l| l
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|v| v.parse::<u64>().is_ok())),
        "RELOADING=1 comes with MONOTONIC_USEC (systemd 253+): {reloading:?}"
    );
    let (ready, _) = manager.expect("READY=1");
    assert_eq!(status_of(&ready), Some("ready: configuration reloaded"));

    d.terminate();
    let (stopping, _) = manager.expect("STOPPING=1");
    assert!(status_of(&stopping).is_some_and(|s| s.starts_with("stopping")));
    let status = d.wait_exit();
    assert!(status.success(), "{status}; stderr:\n{}", d.stderr());
}

#[test]
fn watchdog_pings_stop_while_the_writer_is_stuck_on_a_lock_and_resume_after() {
    let sandbox = Sandbox::new();
    let manager = Manager::new(&sandbox);
    let d = Daemon::start(Arc::clone(&sandbox), manager.opts());
    manager.expect("READY=1");
    // Idle (nothing queued, no client) for over twice the limit: an idle
    // writer and idle loops are healthy, so the pings keep coming.
    manager.expect_pings(4);
    let (status, message) = watchdog_status(&d);
    assert_eq!(status, "healthy", "{message}");

    let lock = WriteLock::take(d.db_path());
    let mut client = d.unix();
    let stuck_log = log(LogLevel::Info, "watchdog", "waits for the lock");
    client.send(&stuck_log).unwrap();
    let during = manager.expect_pings_to_stop();
    let (status, message) = watchdog_status(&d);
    assert_eq!(status, "degraded", "{message}");
    assert!(
        message.contains("writer has had work without finishing a transaction"),
        "{message}"
    );
    assert!(
        during
            .iter()
            .filter_map(|m| status_of(m))
            .any(|s| s.starts_with("stuck: writer")),
        "systemctl status says what is stuck: {during:?}"
    );
    assert!(
        d.stderr()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("writer has had work")),
        "the log says what is stuck:\n{}",
        d.stderr()
    );

    lock.release();
    manager.expect("WATCHDOG=1");
    let answer = client.recv();
    assert_eq!(ack(&answer), (stuck_log.id, &AckStatus::Accepted));
    manager.expect_pings(2);
    let (status, message) = watchdog_status(&d);
    assert_eq!(status, "healthy", "{message}");
}

#[test]
fn without_notify_socket_nothing_is_started_even_with_watchdog_usec() {
    let sandbox = Sandbox::new();
    let opts = Opts::default().env("WATCHDOG_USEC", &WATCHDOG.as_micros().to_string());
    let d = Daemon::start(sandbox, opts);
    let (status, message) = watchdog_status(&d);
    assert_eq!(status, "healthy");
    assert!(message.starts_with("off"), "{message}");
    // Each thread names itself once it runs: wait for the loops, which
    // start before the notification thread would.
    let mut names = Vec::new();
    assert!(
        wait_until(ARRIVES_WITHIN, || {
            names = thread_names(d.pid());
            names.iter().any(|n| n == "codi-signals")
        }),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n == "codi-notify"), "{names:?}");
}

/// Starts a daemon whose stderr is a file, with `$JOURNAL_STREAM` set to
/// `journal_stream(dev, inode of that file)`; stops it and returns its log.
fn log_with_journal_stream(journal_stream: impl Fn(u64, u64) -> String) -> String {
    let sandbox = Sandbox::new();
    let stderr = sandbox.next_stderr();
    let meta = File::create(&stderr).unwrap().metadata().unwrap();
    let opts = Opts::default().env("JOURNAL_STREAM", &journal_stream(meta.dev(), meta.ino()));
    let token = opts.effective_token();
    let cmd = opts.command(&sandbox);
    let mut d = Daemon::spawn_logging_to(sandbox, cmd, token, stderr);
    // A warning: a wrong token.
    let mut c = d.tcp_raw();
    let answer = c.call(Payload::Authenticate {
        token: "not-the-token-at-all".into(),
    });
    assert!(
        matches!(answer.payload, Payload::Error { .. }),
        "{answer:?}"
    );
    d.terminate();
    assert!(d.wait_exit().success());
    d.stderr()
}

#[test]
fn under_journald_each_line_has_a_priority_and_no_timestamp() {
    let log = log_with_journal_stream(|dev, ino| format!("{dev}:{ino}"));
    assert!(!log.is_empty());
    // `<priority>LEVEL text`, the level matching the priority; nothing
    // before the level, so no timestamp.
    let heads = [
        "<3>ERROR ",
        "<4>WARN  ",
        "<6>INFO  ",
        "<7>DEBUG ",
        "<7>TRACE ",
    ];
    for line in log.lines() {
        assert!(
            heads.iter().any(|h| line.starts_with(h)),
            "not a journal line: {line:?}\n{log}"
        );
    }
    assert!(
        log.lines().any(|l| l.starts_with("<6>INFO  READY")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.starts_with("<4>WARN  failed Authenticate")),
        "{log}"
    );
    assert!(!log.contains("not-the-token-at-all"), "{log}");
}

#[test]
fn a_journal_stream_naming_another_file_keeps_timestamps() {
    // Inherited from a parent whose stderr was the journal; ours is not.
    let log = log_with_journal_stream(|dev, ino| format!("{dev}:{}", ino + 1));
    assert!(!log.is_empty());
    for line in log.lines() {
        // 2024-05-01T12:00:00.000Z INFO  ...
        let b = line.as_bytes();
        assert!(
            b.len() > 25 && b[0].is_ascii_digit() && b[4] == b'-' && b[10] == b'T' && b[23] == b'Z',
            "plain lines start with a timestamp: {line:?}\n{log}"
        );
    }
    assert!(!log.contains("<6>"), "{log}");
}
