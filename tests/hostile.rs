//! Hostile connections against the real daemon: clients that never
//! authenticate, never finish a frame, guess tokens, sit idle or arrive
//! beyond the descriptor limit. Each test checks the bound holds and that
//! ordinary clients are still served.

#[allow(dead_code)]
mod common;

use codi_monitor::proto::{encode_message, ErrorCode, LogLevel, Message, Payload, Timestamp};
use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Reads answers until the daemon closes; returns the last `Error`'s code
/// and message (the reason it gave for closing).
fn closing_reason(c: &mut Client) -> (ErrorCode, String) {
    let mut last = None;
    loop {
        match c.try_recv() {
            Ok(Some(Message {
                payload: Payload::Error { code, message, .. },
                ..
            })) => last = Some((code, message)),
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => panic!("no close within the read timeout: {e}"),
        }
    }
    last.expect("an Error naming the reason before the close")
}

fn auth(token: &str) -> Message {
    Message::new(Payload::Authenticate {
        token: token.into(),
    })
}

#[test]
fn a_tcp_connection_that_never_authenticates_is_closed_at_the_deadline() {
    let sandbox = Sandbox::new();
    sandbox.write_config("[monitor]\nauth_timeout = \"300ms\"\n");
    let d = Daemon::start(Arc::clone(&sandbox), Opts::default().with_config());
    let started = Instant::now();
    let mut silent = d.tcp_raw();
    let (code, message) = closing_reason(&mut silent);
    assert_eq!(code, ErrorCode::Unauthorized, "{message}");
    assert!(
        message.contains("no Authenticate within 300ms"),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    // Authenticating in time is unaffected.
    d.tcp().ping();
}

#[test]
fn an_unauthenticated_tcp_flood_cannot_lock_out_unix_or_authenticated_clients() {
    raise_nofile_limit();
    let sandbox = Sandbox::new();
    sandbox.write_config("[monitor]\nmax_connections = 64\n");
    let d = Daemon::start(Arc::clone(&sandbox), Opts::default().with_config());
    // Far more never-authenticating connections than there are slots.
    let flood: Vec<TcpStream> = (0..200)
        .filter_map(|_| TcpStream::connect(d.tcp_addr()).ok())
        .collect();
    assert!(flood.len() >= 100, "only {} flood connections", flood.len());
    std::thread::sleep(Duration::from_millis(500));
    let served = (0..24)
        .filter(|i| {
            let entry = log(LogLevel::Info, "bystander", &format!("unix {i}"));
            let mut c = d.unix();
            c.send(&entry).is_ok()
                && matches!(c.try_recv(), Ok(Some(answer)) if is_accepted(&answer, entry.id))
        })
        .count();
    let mut tcp = Client::tcp(d.tcp_addr());
    let tcp_served = tcp.send(&auth(TEST_TOKEN)).is_ok()
        && matches!(
            tcp.try_recv(),
            Ok(Some(Message {
                payload: Payload::Acknowledgment { .. },
                ..
            }))
        );
    eprintln!(
        "{} flood connections open: {served} of 24 Unix clients served, authenticated TCP client served: {tcp_served}",
        flood.len()
    );
    assert_eq!(served, 24);
    assert!(tcp_served);
    tcp.expect_accepted(&log(LogLevel::Info, "bystander", "tcp"));
    assert_eq!(d.db().count_logs(), 25);
    drop(flood);
}

#[test]
fn a_connection_idle_past_the_timeout_is_told_and_closed() {
    let sandbox = Sandbox::new();
    sandbox.write_config("[monitor]\nidle_timeout = \"1s\"\n");
    let d = Daemon::start(Arc::clone(&sandbox), Opts::default().with_config());
    let mut idle = d.unix();
    idle.ping();
    let started = Instant::now();
    let (code, message) = closing_reason(&mut idle);
    assert_eq!(code, ErrorCode::Unavailable, "{message}");
    assert!(message.contains("idle for 1s"), "{message}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    // A busy connection is not idle.
    let mut busy = d.unix();
    for _ in 0..6 {
        busy.ping();
        std::thread::sleep(Duration::from_millis(400));
    }
}

#[test]
fn a_big_frame_before_authenticate_is_refused_at_once() {
    let d = Daemon::start_default();
    let mut c = d.tcp_raw();
    c.send_raw(&(1024u32 * 1024).to_le_bytes()).unwrap();
    c.send_raw(b"x").unwrap();
    let (code, message) = closing_reason(&mut c);
    assert_eq!(code, ErrorCode::FrameTooLarge, "{message}");
    assert!(message.contains("before Authenticate"), "{message}");
}

/// Opens `n` Unix connections that each announce a maximum frame and send
/// `sent` bytes of it; returns them (kept open) and the daemon's RSS growth
/// in MiB.
fn slowloris(d: &Daemon, n: usize, sent: usize) -> (Vec<UnixStream>, u64) {
    let before = d.rss_kib();
    let chunk = vec![0x91u8; sent];
    let mut held = Vec::new();
    for _ in 0..n {
        let mut s = UnixStream::connect(d.socket()).expect("connect");
        s.write_all(&(1024u32 * 1024).to_le_bytes()).unwrap();
        s.set_nonblocking(true).unwrap();
        // What the kernel does not take now stays unsent, as a slow
        // client's would.
        let _ = s.write(&chunk);
        held.push(s);
    }
    // And then one more byte each, a second later, as slowloris does.
    std::thread::sleep(Duration::from_secs(1));
    for s in &mut held {
        let _ = s.write(b"\x91");
    }
    std::thread::sleep(Duration::from_secs(1));
    let grown = d.rss_kib().saturating_sub(before) / 1024;
    (held, grown)
}

#[test]
fn partly_sent_frames_cost_memory_only_for_bytes_received_and_within_the_pool() {
    raise_nofile_limit();
    let sandbox = Sandbox::new();
    sandbox
        .write_config("[storage]\ninflight_bytes = 8388608\n[monitor]\nmax_connections = 1024\n");
    let d = Daemon::start(Arc::clone(&sandbox), Opts::default().with_config());
    // Headers announcing 1 MiB with one byte each: no MiB is reserved.
    let (announced, grown_headers) = slowloris(&d, 400, 1);
    // Then 256 KiB of each frame actually sent (100 MiB in all): only the
    // 8 MiB receive pool (plus a small allowance each) is buffered.
    let (partial, grown_partial) = slowloris(&d, 400, 256 * 1024);
    eprintln!(
        "RSS growth: {grown_headers} MiB for 400 announced-only frames, {grown_partial} MiB for 400 frames 256 KiB into 1 MiB"
    );
    assert!(grown_headers < 64, "{grown_headers} MiB for bare headers");
    assert!(grown_partial < 96, "{grown_partial} MiB for partial frames");
    // A bystander with small frames is served all along.
    let mut c = d.unix();
    c.expect_accepted(&log(LogLevel::Info, "bystander", "during slowloris"));
    drop((announced, partial));
}

/// A batch of `n` logs of 1 KiB each.
fn large_batch(n: usize) -> Message {
    let text = "x".repeat(1024);
    Message::new(Payload::LogBatch {
        entries: (0..n)
            .map(|_| fields(LogLevel::Info, "large", &text))
            .collect(),
    })
}

/// A read buffer grown for a large frame is charged to the receive pool:
/// connections that sent one and then sit idle must not keep another
/// connection's large frame out of the pool.
#[test]
fn idle_connections_never_keep_a_large_frame_out_of_the_receive_pool() {
    let sandbox = Sandbox::new();
    sandbox.write_config("[storage]\ninflight_bytes = 2097152\n");
    let d = Daemon::start(Arc::clone(&sandbox), Opts::default().with_config());
    // Three buffers of about 700 KiB still held would leave the 2 MiB pool
    // no room for a fourth frame of 900 KiB.
    let idle: Vec<Client> = (0..3)
        .map(|_| {
            let mut c = d.unix();
            c.expect_accepted(&large_batch(650));
            c
        })
        .collect();
    let mut c = d.unix();
    c.expect_accepted(&large_batch(850));
    for mut kept in idle {
        kept.expect_accepted(&large_batch(650));
    }
}

#[test]
fn token_guesses_are_throttled_per_address_and_logged() {
    let d = Daemon::start_default();
    let mut throttled = 0;
    for i in 0..40 {
        let mut c = d.tcp_raw();
        let message = assert_error(
            &c.request(&auth(&format!("wrong-guess-{i:08}"))),
            ErrorCode::Unauthorized,
        );
        if message.contains("too many failed Authenticate attempts") {
            throttled += 1;
        }
    }
    assert!(throttled >= 25, "only {throttled} of 40 guesses throttled");
    assert!(
        d.stderr().contains("failed Authenticate from 127.0.0.1"),
        "failures are not logged: {}",
        d.stderr()
    );
    // The Unix socket is unaffected.
    d.unix().ping();
}

#[test]
fn a_descriptor_limit_below_max_connections_is_fitted_and_said() {
    let sandbox = Sandbox::new();
    let mut cmd = Opts::default().command(&sandbox);
    // SAFETY: setrlimit is async-signal-safe; runs in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 256,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let d = Daemon::spawn_command(Arc::clone(&sandbox), cmd, Opts::default().effective_token());
    assert!(
        d.stderr()
            .contains("monitor.max_connections lowered from 2048 to"),
        "{}",
        d.stderr()
    );
    // Clients beyond the fitted limit are told so instead of hanging.
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..300 {
        let mut c = d.unix();
        if c.send(&Message::new(Payload::Ping)).is_err() {
            continue;
        }
        match c.try_recv() {
            Ok(Some(Message {
                payload: Payload::Error { code, message, .. },
                ..
            })) => {
                assert_eq!(code, ErrorCode::Unavailable, "{message}");
                refused = Some(message);
                break;
            }
            Ok(Some(_)) => held.push(c),
            other => panic!("a client beyond the limit got {other:?}"),
        }
    }
    let message = refused.expect("a client beyond the limit is refused");
    assert!(message.contains("connection limit"), "{message}");
    drop(held);
}

#[test]
fn a_second_daemon_on_the_same_database_is_refused() {
    let first = Daemon::start_default();
    let other = Sandbox::new();
    let opts = Opts {
        db_flag: false,
        ..Opts::default()
    };
    let (status, stderr) = opts
        .arg("--db")
        .arg(first.db_path())
        .run_expecting_failure(&other);
    assert!(!status.success());
    assert!(
        stderr.contains("is in use by process") && stderr.contains(".lock"),
        "{stderr}"
    );
    assert!(
        !other.socket().exists(),
        "the refused daemon bound its socket"
    );
    first.unix().ping();
}

/// The frame of `msg` with its timestamp string replaced by `timestamp`.
fn with_timestamp(msg: &Message, timestamp: &str) -> Vec<u8> {
    let mut frame = Vec::new();
    codi_monitor::proto::encode_message(msg, &mut frame).unwrap();
    let mut value = rmpv::decode::read_value(&mut &frame[4..]).unwrap();
    let rmpv::Value::Map(fields) = &mut value else {
        panic!("a message is a map");
    };
    for (k, v) in fields.iter_mut() {
        if k.as_str() == Some("timestamp") {
            *v = rmpv::Value::from(timestamp);
        }
    }
    let mut body = Vec::new();
    rmpv::encode::write_value(&mut body, &value).unwrap();
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

#[test]
fn timestamps_beyond_year_9999_are_refused_and_queries_keep_working() {
    let d = Daemon::start_default();
    let mut c = d.unix();
    let entry = log(LogLevel::Info, "clock", "from the year 10000");
    c.send_raw(&with_timestamp(&entry, "9999-12-31T23:59:59-01:00"))
        .unwrap();
    let message = assert_error(&c.recv(), ErrorCode::InvalidMessage);
    assert!(message.contains("outside years 0000-9999"), "{message}");
    let edge = log(LogLevel::Info, "clock", "last microsecond of 9999");
    c.send_raw(&with_timestamp(&edge, "9999-12-31T23:59:59.999999Z"))
        .unwrap();
    let answer = c.recv();
    // Accepted as a timestamp, but far ahead of the clock.
    let reason = assert_rejected(&answer, edge.id);
    assert!(reason.contains("more than 24 hours ahead"), "{reason}");
    let soon = Timestamp::from_micros(Timestamp::now().as_micros() + 3_600_000_000);
    let near = log(LogLevel::Info, "clock", "an hour ahead");
    c.send_raw(&with_timestamp(&near, &soon.to_rfc3339()))
        .unwrap();
    assert_accepted(&c.recv(), near.id);
    let out = d
        .sandbox
        .codi2()
        .arg("--socket")
        .arg(d.socket())
        .arg("logs")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("an hour ahead"));
    assert_eq!(d.db().count_logs(), 1);
}

/// Sets the file-size limit of process `pid` (`None`: unlimited).
fn set_file_size_limit(pid: i32, bytes: Option<u64>) {
    let limit = libc::rlimit {
        rlim_cur: bytes.unwrap_or(libc::RLIM_INFINITY),
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit on our own child with a valid struct.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

fn writer_status(c: &mut Client) -> (String, String) {
    match c.call(Payload::GetStatus).payload {
        Payload::Status { components, .. } => components
            .into_iter()
            .find(|s| s.name == "writer")
            .map(|s| (s.status, s.message))
            .expect("a writer component"),
        other => panic!("expected Status, got {other:?}"),
    }
}

#[test]
fn a_full_disk_fails_each_batch_once_logs_a_few_lines_and_recovers() {
    let sandbox = Sandbox::new();
    let mut cmd = Opts::default().command(&sandbox);
    // SAFETY: signal(2) is async-signal-safe; runs in the child before exec.
    // A write past the file-size limit then fails with EFBIG, as on a full
    // disk, instead of killing the daemon.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let d = Daemon::spawn_command(Arc::clone(&sandbox), cmd, None);
    let mut c = d.unix();
    c.expect_accepted(&log(LogLevel::Info, "disk", "before the disk fills"));
    set_file_size_limit(d.pid(), Some(16 * 1024));
    let lines_before = d.stderr().lines().count();
    let mut rejected = 0;
    for round in 0..20 {
        let entries: Vec<Message> = (0..100)
            .map(|i| {
                log(
                    LogLevel::Info,
                    "disk",
                    &format!("{round}-{i} {}", "x".repeat(400)),
                )
            })
            .collect();
        for e in &entries {
            c.send(e).unwrap();
        }
        for e in &entries {
            match c.recv().payload {
                Payload::Acknowledgment {
                    status: codi_monitor::proto::AckStatus::Rejected(reason),
                    request_id,
                } => {
                    assert_eq!(request_id, e.id);
                    assert!(reason.starts_with("storage error"), "{reason}");
                    rejected += 1;
                }
                Payload::Acknowledgment { .. } => {}
                other => panic!("unexpected answer {other:?}"),
            }
        }
    }
    let stderr = d.stderr();
    let lines = stderr.lines().count() - lines_before;
    let (status, message) = writer_status(&mut c);
    eprintln!("{rejected} of 2000 logs rejected on the full disk; {lines} log lines; writer {status}: {message}");
    assert!(rejected >= 1000, "only {rejected} rejected");
    assert!(
        lines <= 60,
        "{lines} log lines for {rejected} rejections:\n{stderr}"
    );
    assert_eq!(status, "degraded");
    assert!(message.contains("write transactions fail"), "{message}");

    set_file_size_limit(d.pid(), None);
    let after = log(LogLevel::Info, "disk", "after space came back");
    assert!(
        wait_until(Duration::from_secs(10), || {
            let mut c = d.unix();
            c.send(&after).is_ok()
                && matches!(c.try_recv(), Ok(Some(a)) if is_accepted(&a, after.id))
        }),
        "no log accepted after the disk recovered"
    );
    let (status, message) = writer_status(&mut c);
    assert_eq!(status, "healthy", "{message}");
}

#[test]
fn a_directory_name_cannot_forge_lines_in_the_daemons_log() {
    let d = Daemon::start_default();
    let forged = "w\n2026-01-01T00:00:00.000Z ERROR forged line\x1b[31m";
    let dir = d.sandbox.path().join(forged);
    std::fs::create_dir(&dir).unwrap();
    let mut c = d.unix();
    c.expect_accepted(&Message::new(Payload::StartMonitoring {
        path: dir.to_str().unwrap().into(),
        recursive: false,
        patterns: Vec::new(),
        session_id: None,
    }));
    assert!(
        wait_until(Duration::from_secs(10), || d
            .stderr()
            .contains("forged line")),
        "the watch is not logged: {}",
        d.stderr()
    );
    let stderr = d.stderr();
    assert!(
        !stderr.lines().any(|l| l.starts_with("2026-01-01")),
        "a forged line in the log:\n{stderr}"
    );
    assert!(
        !stderr.contains('\x1b'),
        "a raw escape in the log:\n{stderr}"
    );
    assert!(stderr.contains(r"w\n2026-01-01"), "{stderr}");
}

/// Clients that pipeline queries and never read a byte of the answers:
/// past `monitor.write_timeout` they are closed and the answer pool they
/// held is free again, so a bystander's query is answered, not refused.
#[test]
fn clients_that_leave_answers_unread_are_closed_at_the_write_timeout() {
    const POOL: usize = 8 << 20;
    let sandbox = Sandbox::new();
    sandbox.write_config(&format!(
        "[monitor]\nwrite_timeout = \"1s\"\n\n[storage]\ninflight_bytes = {POOL}\n"
    ));
    let d = Daemon::start(Arc::clone(&sandbox), Opts::default().with_config());
    let mut bystander = d.unix();
    // 40 logs of 100 KB: one answer of `limit 1000` fills a frame.
    let row = "q".repeat(100_000);
    for i in 0..40 {
        bystander.expect_accepted(&log(LogLevel::Info, "big", &format!("{i} {row}")));
    }
    let mut queries = Vec::new();
    for _ in 0..30 {
        let q = Message::new(Payload::QueryLogs {
            filter: Default::default(),
            limit: 1000,
        });
        encode_message(&q, &mut queries).unwrap();
    }
    // Far more than the pool holds (each holds up to two frames).
    let mut stuck = Vec::new();
    for _ in 0..20 {
        let mut s = UnixStream::connect(d.socket()).expect("connect");
        s.write_all(&queries).unwrap();
        stuck.push(s);
    }
    let small = Message::new(Payload::QueryLogs {
        filter: Default::default(),
        limit: 5,
    });
    let mut last = None;
    let started = Instant::now();
    let served = wait_until(Duration::from_secs(20), || {
        let answer = bystander.request(&small);
        let ok =
            matches!(&answer.payload, Payload::LogResults { entries, .. } if entries.len() == 5);
        last = Some(answer);
        ok && started.elapsed() > Duration::from_secs(3)
    });
    assert!(served, "the bystander is still refused: {last:?}");
    // The clients holding answers find their connection closed once they
    // read; the others were told `Unavailable` at once and owe nothing.
    let mut closed = 0;
    for mut s in stuck {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut sink = Vec::new();
        match std::io::Read::read_to_end(&mut s, &mut sink) {
            Ok(_) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        assert!(sink.len() < 30 * 1024 * 1024, "every answer was written");
    }
    // The pool holds eight frames and each connection up to two of them.
    assert!(closed >= 4, "only {closed} stuck connections were closed");
    let log = d.stderr();
    assert!(
        log.contains("bytes of answers unread for 1s"),
        "the daemon's log does not say why: {log}"
    );
}
