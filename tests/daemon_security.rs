//! Integration tests: the real `codi-monitor` (and `codi2`) binaries, each
//! test with its own daemon in its own temporary directory, spoken to over
//! the real Unix and TCP sockets, with the database inspected directly.
//!
//! No assertion depends on timing: deadlines only protect against hangs.
//!
//! This file: authentication and file permissions.

#[allow(dead_code)]
mod common;

use codi_monitor::proto::{encode_message, ErrorCode, LogLevel, Message, Payload};
use common::*;
use std::sync::Arc;
use std::time::Duration;

/// Tests 8 and 9: authentication and file permissions.
mod security {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const SECRET: &str = "secret-0123456789";

    fn auth(token: &str) -> Message {
        Message::new(Payload::Authenticate {
            token: token.into(),
        })
    }

    #[test]
    fn tcp_requires_the_token_and_unix_does_not() {
        let d = Daemon::start(
            Sandbox::new(),
            Opts::default().env("CODI_MONITOR_TOKEN", SECRET),
        );
        let db = d.db();

        let mut c = d.tcp_raw();
        c.send(&Message::new(Payload::Ping)).unwrap();
        assert_error(&c.recv(), ErrorCode::Unauthorized);
        c.expect_eof();

        let mut c = d.tcp_raw();
        let sneaky = log(LogLevel::Info, "auth", "before authenticating");
        c.send(&sneaky).unwrap();
        assert_error(&c.recv(), ErrorCode::Unauthorized);
        c.expect_eof();
        assert_eq!(db.count_uuid(sneaky.id), 0);

        for wrong in [
            "wrong",
            "",
            "secret-0123456789 ",
            "Secret-0123456789",
            "secret-0123456789secret-0123456789",
            "secret-012345678",
        ] {
            let mut c = d.tcp_raw();
            let answer = c.request(&auth(wrong));
            assert_error(&answer, ErrorCode::Unauthorized);
            c.expect_eof();
        }

        let mut c = d.tcp_raw();
        let right = auth(SECRET);
        assert_accepted(&c.request(&right), right.id);
        let entry = log(LogLevel::Info, "auth", "authenticated");
        c.expect_accepted(&entry);
        c.ping();
        assert_eq!(db.count_uuid(entry.id), 1);

        let mut u = d.unix();
        u.expect_accepted(&log(LogLevel::Info, "auth", "over unix"));
        assert_eq!(db.count_logs(), 2);
    }

    #[test]
    fn loopback_tcp_without_a_token_is_refused_unless_allowed_and_then_warned() {
        let sandbox = Sandbox::new();
        let (status, stderr) = Opts::default().token(None).run_expecting_failure(&sandbox);
        assert!(!status.success());
        assert!(
            stderr.contains("needs a token") && stderr.contains("allow_unauthenticated_tcp"),
            "the refusal should name the token and the opt-in: {stderr}"
        );
        sandbox.write_config("[monitor]\nallow_unauthenticated_tcp = true\n");
        let d = Daemon::start(
            Arc::clone(&sandbox),
            Opts::default().token(None).with_config(),
        );
        d.tcp_raw().ping();
        assert!(
            d.stderr().contains("listens without a token"),
            "no warning at start: {}",
            d.stderr()
        );
    }

    #[test]
    fn short_tokens_are_refused() {
        let sandbox = Sandbox::new();
        let (status, stderr) = Opts::default()
            .token(Some("1"))
            .tcp(Some("0.0.0.0:0"))
            .run_expecting_failure(&sandbox);
        assert!(!status.success());
        assert!(stderr.contains("must be at least 16"), "{stderr}");
    }

    #[test]
    fn wildcard_tcp_without_a_token_is_refused() {
        let sandbox = Sandbox::new();
        let (status, stderr) = Opts::default()
            .token(None)
            .tcp(Some("0.0.0.0:0"))
            .run_expecting_failure(&sandbox);
        assert!(!status.success());
        assert!(
            stderr.to_lowercase().contains("token"),
            "the refusal should mention the token: {stderr}"
        );
        assert!(!sandbox.socket().exists());
    }

    #[test]
    fn wildcard_tcp_with_a_token_starts() {
        let d = Daemon::start(
            Sandbox::new(),
            Opts::default()
                .tcp(Some("0.0.0.0:0"))
                .env("CODI_MONITOR_TOKEN", SECRET),
        );
        let addr = d.tcp_addr();
        assert!(addr.ip().is_unspecified(), "READY shows {addr}");
        let mut c = Client::tcp(([127, 0, 0, 1], addr.port()).into());
        let right = auth(SECRET);
        assert_accepted(&c.request(&right), right.id);
        c.ping();
    }

    #[test]
    fn token_file_is_honoured() {
        let sandbox = Sandbox::new();
        let token_file = sandbox.path().join("token");
        std::fs::write(&token_file, "from-file-0123456789\n").unwrap();
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let opts = Opts::default().arg("--token-file").arg(&token_file);
        let d = Daemon::start(sandbox, opts);
        let mut c = d.tcp_raw();
        assert_error(&c.request(&auth("wrong")), ErrorCode::Unauthorized);
        let mut c = d.tcp_raw();
        let right = auth("from-file-0123456789");
        assert_accepted(&c.request(&right), right.id);
    }

    #[test]
    fn socket_and_database_are_private() {
        let d = Daemon::start_default();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        let socket = d.socket();
        assert_eq!(mode(socket), 0o600, "socket mode");
        let socket_dir = socket.parent().unwrap();
        assert_eq!(
            mode(socket_dir) & 0o022,
            0,
            "socket directory is writable by others"
        );
        assert_eq!(mode(d.db_path()), 0o600, "database mode");
        assert_eq!(
            mode(d.db_path().parent().unwrap()),
            0o700,
            "database dir mode"
        );
        d.unix().expect_accepted(&log(LogLevel::Info, "perm", "x"));
        for suffix in ["-wal", "-shm"] {
            let mut side = d.db_path().as_os_str().to_owned();
            side.push(suffix);
            let side = std::path::PathBuf::from(side);
            if side.exists() {
                assert_eq!(
                    mode(&side) & 0o077,
                    0,
                    "{} is readable by others",
                    side.display()
                );
            }
        }
    }

    #[test]
    fn second_daemon_on_the_same_socket_refuses() {
        let d = Daemon::start_default();
        let opts = Opts {
            db_flag: false,
            ..Opts::default()
        }
        .arg("--db")
        .arg(d.sandbox.path().join("other/codi.db"));
        let (status, stderr) = opts.run_expecting_failure(&d.sandbox);
        assert!(!status.success());
        assert!(
            stderr.contains("already running"),
            "stderr should say another daemon is already running: {stderr}"
        );
        assert!(
            d.socket().exists(),
            "the first daemon's socket is untouched"
        );
        d.unix().ping();
    }

    #[test]
    fn stale_socket_from_kill_9_is_replaced() {
        let sandbox = Sandbox::new();
        let mut d = Daemon::start(Arc::clone(&sandbox), Opts::default());
        d.unix().ping();
        d.kill9();
        assert!(
            sandbox.socket().exists(),
            "kill -9 leaves the socket behind"
        );
        let d = Daemon::start(Arc::clone(&sandbox), Opts::default());
        d.unix().ping();
    }

    #[test]
    fn world_writable_socket_directory_is_refused() {
        let sandbox = Sandbox::new();
        let dir = sandbox.socket().parent().unwrap().to_owned();
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let (status, stderr) = Opts::default().run_expecting_failure(&sandbox);
        assert!(!status.success());
        assert!(stderr.contains(&dir.display().to_string()), "{stderr}");
    }

    #[test]
    fn socket_directory_owned_by_another_user_is_refused() {
        // Only root can hand a directory to another user.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let sandbox = Sandbox::new();
        let dir = sandbox.socket().parent().unwrap().to_owned();
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        let (status, stderr) = Opts::default().run_expecting_failure(&sandbox);
        assert!(!status.success());
        assert!(stderr.contains("owned by uid 65534"), "{stderr}");
    }

    #[test]
    fn a_regular_file_at_the_socket_path_is_not_replaced() {
        let sandbox = Sandbox::new();
        let socket = sandbox.socket();
        std::fs::create_dir(socket.parent().unwrap()).unwrap();
        std::fs::set_permissions(
            socket.parent().unwrap(),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        std::fs::write(&socket, "precious").unwrap();
        let (status, _) = Opts::default().run_expecting_failure(&sandbox);
        assert!(!status.success());
        assert_eq!(std::fs::read_to_string(&socket).unwrap(), "precious");
    }

    #[test]
    fn authenticate_and_requests_in_one_write() {
        let d = Daemon::start(
            Sandbox::new(),
            Opts::default().env("CODI_MONITOR_TOKEN", SECRET),
        );
        let mut c = d.tcp_raw();
        let right = auth(SECRET);
        let entry = log(LogLevel::Info, "auth", "pipelined after auth");
        let ping = Message::new(Payload::Ping);
        let mut bytes = Vec::new();
        for m in [&right, &entry, &ping] {
            encode_message(m, &mut bytes).unwrap();
        }
        c.send_raw(&bytes).unwrap();
        assert_accepted(&c.recv(), right.id);
        assert_accepted(&c.recv(), entry.id);
        assert_accepted(&c.recv(), ping.id);

        // After a wrong token nothing that follows is served.
        let mut c = d.tcp_raw();
        let sneaky = log(LogLevel::Info, "auth", "after a wrong token");
        let mut bytes = Vec::new();
        for m in [&auth("nope"), &sneaky] {
            encode_message(m, &mut bytes).unwrap();
        }
        c.send_raw(&bytes).unwrap();
        assert_error(&c.recv(), ErrorCode::Unauthorized);
        c.expect_eof();
        let db = d.db();
        assert_eq!(db.count_uuid(entry.id), 1);
        assert_eq!(db.count_uuid(sneaky.id), 0);
    }

    #[test]
    fn token_file_readable_by_others_is_refused() {
        let sandbox = Sandbox::new();
        let token_file = sandbox.path().join("token");
        std::fs::write(&token_file, "secret\n").unwrap();
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (status, stderr) = Opts::default()
            .arg("--token-file")
            .arg(&token_file)
            .run_expecting_failure(&sandbox);
        assert!(!status.success());
        assert!(stderr.contains("token"), "{stderr}");
    }

    #[test]
    fn sighup_rereads_the_token_file() {
        let sandbox = Sandbox::new();
        let token_file = sandbox.path().join("token");
        std::fs::write(&token_file, "first-0123456789ab\n").unwrap();
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let d = Daemon::start(
            Arc::clone(&sandbox),
            Opts::default().arg("--token-file").arg(&token_file),
        );
        let first = auth("first-0123456789ab");
        assert_accepted(&d.tcp_raw().request(&first), first.id);

        std::fs::write(&token_file, "second-0123456789ab\n").unwrap();
        let before = d.stderr().len();
        d.signal(libc::SIGHUP);
        assert!(
            wait_until(Duration::from_secs(10), || d.stderr()[before..]
                .contains("reloaded")),
            "no reload message; stderr:\n{}",
            d.stderr()
        );
        let mut c = d.tcp_raw();
        assert_error(
            &c.request(&auth("first-0123456789ab")),
            ErrorCode::Unauthorized,
        );
        let second = auth("second-0123456789ab");
        assert_accepted(&d.tcp_raw().request(&second), second.id);
    }

    #[test]
    fn connections_beyond_the_limit_are_told_why() {
        let sandbox = Sandbox::new();
        sandbox.write_config("[monitor]\nmax_connections = 4\n");
        let d = Daemon::start(Arc::clone(&sandbox), Opts::default().with_config());
        let mut held: Vec<Client> = (0..4).map(|_| d.unix()).collect();
        for c in &mut held {
            c.ping();
        }
        let mut extra = d.unix();
        let _ = extra.send(&Message::new(Payload::Ping));
        assert_error(&extra.recv(), ErrorCode::Unavailable);
        extra.expect_eof();
        drop(held.pop());
        // The freed slot is usable again (the daemon notices the close
        // asynchronously, hence the retries).
        assert!(
            wait_until(Duration::from_secs(10), || {
                let mut c = d.unix();
                c.send(&Message::new(Payload::Ping)).is_ok()
                    && matches!(
                        c.try_recv(),
                        Ok(Some(Message {
                            payload: Payload::Acknowledgment { .. },
                            ..
                        }))
                    )
            }),
            "a closed connection never freed its slot"
        );
        for c in &mut held {
            c.ping();
        }
    }
}
