//! Integration tests: the real `codi-monitor` (and `codi2`) binaries, each
//! test with its own daemon in its own temporary directory, spoken to over
//! the real Unix and TCP sockets, with the database inspected directly.
//!
//! No assertion depends on timing: deadlines only protect against hangs.
//!
//! This file: codi2 against a daemon and without one.

#[allow(dead_code)]
mod common;

use codi_monitor::proto::{LogFilter, LogLevel};
use common::*;
use std::sync::Arc;
use std::time::Duration;

/// Test 10: codi2 against a daemon and without one.
mod cli {
    use super::*;

    fn codi2(sandbox: &Sandbox, args: &[&str]) -> std::process::Command {
        let mut cmd = sandbox.codi2();
        cmd.arg("--socket")
            .arg(sandbox.socket())
            .arg("--db")
            .arg(sandbox.db())
            .args(args);
        cmd
    }

    fn show(out: &std::process::Output) -> String {
        format!(
            "status {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    #[test]
    fn log_without_a_daemon_writes_directly_and_the_daemon_serves_it() {
        let sandbox = Sandbox::new();
        let out = run(codi2(
            &sandbox,
            &["log", "-l", "warn", "-c", "t", "offline entry"],
        ));
        assert!(out.status.success(), "{}", show(&out));
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(
            stderr.contains("direct"),
            "codi2 should say it wrote directly: {}",
            show(&out)
        );

        let d = Daemon::start(Arc::clone(&sandbox), Opts::default());
        let mut c = d.unix();
        let answer = c.request(&query(
            LogFilter {
                component: Some("t".into()),
                ..LogFilter::default()
            },
            10,
        ));
        let (entries, total) = results(&answer);
        assert_eq!(total, 1);
        assert_eq!(entries[0].message, "offline entry");
        assert_eq!(entries[0].level, LogLevel::Warn);
    }

    /// A daemon holds the database from its start to its exit, socket or
    /// not (it is starting, or stopping): codi2 waits rather than write
    /// beside it, and writes once the daemon is gone.
    #[test]
    fn codi2_writes_nothing_while_a_daemon_holds_the_database_and_writes_once_it_is_gone() {
        use codi_monitor::store::lock::DatabaseLock;
        let sandbox = Sandbox::new();
        let held = DatabaseLock::acquire(&sandbox.db()).unwrap();
        // Each look codi2 takes at the database opens its writers' lock.
        let mut looks = inotify::Inotify::init().unwrap();
        looks
            .watches()
            .add(sandbox.path().join("data"), inotify::WatchMask::OPEN)
            .unwrap();
        let mut cmd = codi2(&sandbox, &["--timeout", "20s", "log", "after the daemon"]);
        let waiting = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut buffer = [0u8; 4096];
        let mut seen = 0;
        let looked_twice = wait_until(Duration::from_secs(20), || {
            if let Ok(events) = looks.read_events(&mut buffer) {
                seen += events
                    .filter(|e| e.name.is_some_and(|n| n == "codi.db.writers-lock"))
                    .count();
            }
            seen >= 2
        });
        assert!(
            looked_twice,
            "codi2 did not look at the database's lock again"
        );
        assert!(
            !sandbox.db().exists(),
            "codi2 wrote while a daemon held the database"
        );
        drop(held);
        let out = waiting.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("wrote directly"),
            "{}",
            show(&out)
        );
        assert_eq!(stored_messages(&sandbox), ["after the daemon"]);
    }

    /// A stream written directly goes on through a daemon that starts
    /// meanwhile: its next write finds the database held and goes to the
    /// daemon's socket.
    #[test]
    fn a_stream_in_standalone_mode_goes_on_through_a_daemon_that_starts() {
        use std::io::Write;
        let sandbox = Sandbox::new();
        let mut cmd = codi2(&sandbox, &["--timeout", "20s", "log", "-c", "handoff", "-"]);
        let mut streaming = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = streaming.stdin.take().unwrap();
        writeln!(stdin, "written directly").unwrap();
        assert!(
            wait_until(Duration::from_secs(20), || ingest_rows(&sandbox) == 1),
            "the first line is stored directly"
        );
        let d = Daemon::start(Arc::clone(&sandbox), Opts::default());
        writeln!(stdin, "through the daemon").unwrap();
        drop(stdin);
        let out = streaming.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", show(&out));
        assert_eq!(
            stored_messages(&sandbox),
            ["written directly", "through the daemon"]
        );
        let mut c = d.unix();
        let answer = c.request(&query(
            LogFilter {
                component: Some("handoff".into()),
                ..LogFilter::default()
            },
            10,
        ));
        assert_eq!(results(&answer).1, 2, "the daemon serves both");
        let received = || {
            let metrics = d.http_get("/metrics").text();
            series(&metrics, "codi_logs_received_total")
        };
        assert_eq!(received(), 1.0, "the second line came through the daemon");
    }

    #[test]
    fn codi2_names_a_daemon_that_holds_the_database_and_does_not_answer() {
        use codi_monitor::store::lock::DatabaseLock;
        let sandbox = Sandbox::new();
        let _held = DatabaseLock::acquire(&sandbox.db()).unwrap();
        let out = run(codi2(&sandbox, &["--timeout", "1s", "log", "never stored"]));
        assert_eq!(out.status.code(), Some(3), "{}", show(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let holder = format!("held by process {}", std::process::id());
        assert!(stderr.contains(&holder), "{}", show(&out));
        assert!(!sandbox.db().exists(), "nothing written: {}", show(&out));
    }

    #[test]
    fn log_ping_status_and_stdin_through_a_daemon() {
        let sandbox = Sandbox::new();
        let d = Daemon::start(Arc::clone(&sandbox), Opts::default());
        let db = d.db();

        let out = run(codi2(
            &sandbox,
            &["log", "-l", "error", "-c", "cli", "online entry"],
        ));
        assert!(out.status.success(), "{}", show(&out));
        assert!(
            !String::from_utf8_lossy(&out.stderr)
                .to_lowercase()
                .contains("direct"),
            "with a daemon running codi2 must not write directly: {}",
            show(&out)
        );
        let rows: Vec<(String, String)> = db
            .snapshot()
            .prepare("SELECT level, message FROM all_logs WHERE component = 'cli'")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(rows, vec![("Error".to_owned(), "online entry".to_owned())]);

        let out = run(codi2(&sandbox, &["ping"]));
        assert!(out.status.success(), "{}", show(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.chars().any(|ch| ch.is_ascii_digit()),
            "ping prints a round trip: {}",
            show(&out)
        );

        let out = run(codi2(&sandbox, &["status"]));
        assert!(out.status.success(), "{}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("writer"),
            "status lists the components: {}",
            show(&out)
        );

        let out = run_with_stdin(
            codi2(&sandbox, &["log", "-c", "stdin", "-"]),
            b"first line\nsecond line\nthird line\n",
        );
        assert!(out.status.success(), "{}", show(&out));
        let mut lines: Vec<String> = db
            .snapshot()
            .prepare("SELECT message FROM all_logs WHERE component = 'stdin' ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        lines.sort();
        assert_eq!(lines, ["first line", "second line", "third line"]);

        let out = run(codi2(&sandbox, &["logs", "--json"]));
        assert!(out.status.success(), "{}", show(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let messages: Vec<String> = stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
                v["message"].as_str().unwrap_or_default().to_owned()
            })
            .collect();
        assert!(messages.contains(&"online entry".to_owned()), "{stdout}");
        assert!(messages.contains(&"third line".to_owned()), "{stdout}");
    }

    /// `codi2` for the trust tests: no `--socket` (that would rule out
    /// every other endpoint), the sandbox database, an empty config file,
    /// and a short timeout so that a build that does talk to a squatter
    /// gives up quickly.
    fn codi2_plain(sandbox: &Sandbox, args: &[&str]) -> std::process::Command {
        let empty = sandbox.path().join("empty.toml");
        std::fs::write(&empty, "").unwrap();
        let mut cmd = sandbox.codi2();
        cmd.arg("--config")
            .arg(&empty)
            .arg("--db")
            .arg(sandbox.db())
            .arg("--timeout")
            .arg("1s")
            .args(args);
        cmd
    }

    /// Rows in the ingest file, 0 while it is not there (or not yet made).
    fn ingest_rows(sandbox: &Sandbox) -> i64 {
        let ingest = sandbox.path().join("data/codi.db-ingest");
        rusqlite::Connection::open_with_flags(&ingest, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| c.query_row("SELECT count(*) FROM ingest_logs", [], |r| r.get(0)))
            .unwrap_or(0)
    }

    fn stored_messages(sandbox: &Sandbox) -> Vec<String> {
        sandbox
            .open_db()
            .snapshot()
            .prepare("SELECT message FROM all_logs ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// Lets the other user reach into the sandbox (search only, no write).
    fn let_others_in(sandbox: &Sandbox) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(sandbox.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    }

    fn is_root() -> bool {
        unsafe { libc::geteuid() == 0 }
    }

    /// Security issue: with XDG_RUNTIME_DIR unset the socket lives in a
    /// /tmp directory that another user may create first; codi2 sent them
    /// the log and exited 0.
    #[test]
    fn a_socket_in_a_directory_another_user_owns_is_not_sent_the_log() {
        if !is_root() {
            return; // needs to act as another user
        }
        let sandbox = Sandbox::new();
        let_others_in(&sandbox);
        let squat = sandbox.path().join("codi-1000");
        std::fs::create_dir(&squat).unwrap();
        std::os::unix::fs::chown(&squat, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
        let socket = squat.join("monitor.sock");
        let squatter = Squatter::start(SquatAt::Unix(&socket));

        let mut cmd = codi2_plain(&sandbox, &["log", "for my own daemon only"]);
        cmd.env("CODI_SOCKET", &socket);
        let out = run(cmd);
        let got = squatter.finish();
        assert_eq!(
            got.bytes,
            0,
            "the squatter was sent {got:?}; {}",
            show(&out)
        );
        assert_eq!(got.accepted, 0, "{}", show(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}", show(&out));
        assert!(
            stderr.contains(&format!("not using unix:{}", socket.display()))
                && stderr.contains("owned by uid 65534"),
            "codi2 names the socket and why: {}",
            show(&out)
        );
        assert!(stderr.contains("wrote directly"), "{}", show(&out));
        assert_eq!(stored_messages(&sandbox), ["for my own daemon only"]);
    }

    /// The path may be fine and the listener still a stranger's: the kernel
    /// names who listens (SO_PEERCRED).
    #[test]
    fn a_listener_of_another_user_behind_a_trusted_path_is_not_sent_the_log() {
        if !is_root() {
            return;
        }
        let sandbox = Sandbox::new();
        let run_dir = sandbox.path().join("run");
        std::fs::create_dir(&run_dir).unwrap();
        let socket = run_dir.join("m.sock");
        let squatter = Squatter::start(SquatAt::UnixBoundByUs(&socket));

        let out = run(codi2(
            &sandbox,
            &["--timeout", "1s", "log", "not for uid 65534"],
        ));
        let got = squatter.finish();
        assert_eq!(
            got.bytes,
            0,
            "the squatter was sent {got:?}; {}",
            show(&out)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}", show(&out));
        assert!(
            stderr.contains(&format!("the process listening on {}", socket.display()))
                && stderr.contains("belongs to uid 65534"),
            "{}",
            show(&out)
        );
        assert_eq!(stored_messages(&sandbox), ["not for uid 65534"]);
    }

    /// Security issue: with the socket absent codi2 fell back to
    /// 127.0.0.1:9847, where any local user may listen.
    #[test]
    fn without_a_socket_codi2_never_tries_default_tcp() {
        let listener = loop_until_bound("127.0.0.1:9847");
        listener.set_nonblocking(true).unwrap();
        let sandbox = Sandbox::new();
        let mut cmd = codi2_plain(&sandbox, &["log", "stays here"]);
        cmd.env("CODI_SOCKET", sandbox.path().join("none.sock"))
            .env("CODI_MONITOR_TOKEN", TEST_TOKEN);
        let out = run(cmd);
        let connected = listener.accept();
        assert!(
            matches!(&connected, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "codi2 connected to 127.0.0.1:9847 ({connected:?}); {}",
            show(&out)
        );
        assert!(out.status.success(), "{}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("wrote directly"),
            "{}",
            show(&out)
        );
        assert_eq!(stored_messages(&sandbox), ["stays here"]);
    }

    /// Binds `addr`, waiting a while if another test run holds it.
    fn loop_until_bound(addr: &str) -> std::net::TcpListener {
        let mut last = None;
        let bound = wait_until(
            Duration::from_secs(30),
            || match std::net::TcpListener::bind(addr) {
                Ok(l) => {
                    last = Some(Ok(l));
                    true
                }
                Err(e) => {
                    last = Some(Err(e));
                    false
                }
            },
        );
        match last {
            Some(Ok(l)) if bound => l,
            other => panic!("cannot listen on {addr} for the test: {other:?}"),
        }
    }

    /// Even an explicit --tcp on loopback: the token goes only to a
    /// listener of a trusted user.
    #[test]
    fn explicit_loopback_tcp_of_another_user_is_not_sent_the_token() {
        if !is_root() {
            return;
        }
        let squatter = Squatter::start(SquatAt::Tcp(0));
        let sandbox = Sandbox::new();
        let addr = format!("127.0.0.1:{}", squatter.port);
        let mut cmd = codi2_plain(&sandbox, &["--tcp", &addr, "log", "not for them"]);
        cmd.env("CODI_MONITOR_TOKEN", TEST_TOKEN);
        let out = run(cmd);
        let got = squatter.finish();
        assert_eq!(
            got.bytes,
            0,
            "the squatter was sent {got:?}; {}",
            show(&out)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("not using tcp:{addr}"))
                && stderr.contains("belongs to uid 65534")
                && stderr.contains("token"),
            "codi2 says why: {}",
            show(&out)
        );
        assert!(out.status.success(), "{}", show(&out));
        assert_eq!(stored_messages(&sandbox), ["not for them"]);
    }

    /// And a daemon of this user on explicit loopback TCP still works.
    #[test]
    fn explicit_loopback_tcp_of_this_user_is_used_with_the_token() {
        let sandbox = Sandbox::new();
        let d = Daemon::start(Arc::clone(&sandbox), Opts::default());
        let addr = d.tcp_addr().to_string();
        let mut cmd = codi2_plain(&sandbox, &["--tcp", &addr, "log", "over tcp"]);
        cmd.env("CODI_MONITOR_TOKEN", TEST_TOKEN);
        let out = run(cmd);
        assert!(out.status.success(), "{}", show(&out));
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("direct"),
            "{}",
            show(&out)
        );
        let answer = d.unix().request(&query(LogFilter::default(), 10));
        let (entries, _) = results(&answer);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].message, "over tcp");
    }

    /// Security issue: a message with a newline printed a forged row, and
    /// its escape sequence reached the terminal.
    #[test]
    fn a_message_with_controls_is_one_row_with_visible_escapes() {
        let sandbox = Sandbox::new();
        let forged = "ok\n2026-01-01 FORGED ERROR row\x1b[31m";
        let out = run(codi2(&sandbox, &["log", "-c", "inj\r", forged]));
        assert!(out.status.success(), "{}", show(&out));

        let out = run(codi2(&sandbox, &["logs"]));
        assert!(out.status.success(), "{}", show(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(stdout.lines().count(), 1, "one log, one row: {stdout:?}");
        assert!(
            stdout.contains("ok\\n2026-01-01 FORGED ERROR row\\x1b[31m"),
            "{stdout:?}"
        );
        assert!(stdout.contains("inj\\r"), "{stdout:?}");
        assert!(
            !stdout.contains('\x1b') && !stdout.contains('\r'),
            "{stdout:?}"
        );

        let out = run(codi2(&sandbox, &["logs", "--json"]));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(v["message"], forged, "--json keeps the exact text");
        assert_eq!(v["component"], "inj\r");
    }
}
