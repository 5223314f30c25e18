//! The admin endpoint of the real daemon: `/metrics` counters move by
//! exactly the traffic sent, `/health` reports real trouble (a failing
//! writer, a nearly full disk, a missing watched directory) the same way
//! `GetStatus` and `codi2 status` do, turns 503 when unhealthy, and
//! hostile HTTP clients get bounded answers while logs keep flowing.

// Only part of the shared harness is used here.
#[allow(dead_code)]
mod common;

use codi_monitor::proto::{LogLevel, Message, Payload, Timestamp};
use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn scrape(d: &Daemon) -> String {
    let r = d.http_get("/metrics");
    assert_eq!(r.status, 200);
    r.text()
}

fn health(d: &Daemon) -> (u16, Value) {
    let r = d.http_get("/health");
    let json = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("/health is not JSON ({e}): {}", r.text()));
    (r.status, json)
}

/// `codi2 status --json` against `d`.
fn codi2_status_json(d: &Daemon) -> (bool, Value) {
    d.codi2_status_json()
}

/// The parts of a health document that do not change from one request to
/// the next (uptime and counters do).
fn stable(doc: &Value) -> Value {
    let mut components = serde_json::Map::new();
    for (name, c) in doc["components"].as_object().expect("components map") {
        components.insert(
            name.clone(),
            serde_json::json!({"status": c["status"], "reason": c["reason"], "since": c["since"]}),
        );
    }
    serde_json::json!({"status": doc["status"], "version": doc["version"], "components": components})
}

#[test]
fn metrics_counters_move_by_exactly_the_traffic_sent() {
    let d = Daemon::start_default();
    let before = scrape(&d);
    let mut c = d.unix();
    for i in 0..10 {
        c.expect_accepted(&log(LogLevel::Info, "m", &format!("one {i}")));
    }
    let batch = Message::new(Payload::LogBatch {
        entries: (0..5)
            .map(|i| fields(LogLevel::Warn, "m", &format!("batch {i}")))
            .collect(),
    });
    c.expect_accepted(&batch);
    let two_days = 2 * 24 * 3600 * 1_000_000;
    let future = at(
        Timestamp::now().as_micros() + two_days,
        Payload::LogEntry(fields(LogLevel::Info, "m", "from the future")),
    );
    assert_rejected(&c.request(&future), future.id);
    c.send_raw(&[3, 0, 0, 0, 0xc1, 0xc1, 0xc1]).unwrap();
    assert_error(&c.recv(), codi_monitor::proto::ErrorCode::InvalidMessage);
    // The writer answers a batch before it records the batch's figures:
    // a scrape right after the last answer may come just before them.
    let mut after = scrape(&d);
    wait_until(Duration::from_secs(5), || {
        after = scrape(&d);
        series(&after, "codi_batch_rows_sum") - series(&before, "codi_batch_rows_sum") >= 15.0
    });

    let moved = |name: &str| series(&after, name) - series(&before, name);
    assert_eq!(moved("codi_logs_total"), 15.0, "rows stored");
    assert_eq!(moved("codi_logs_received_total"), 15.0);
    assert_eq!(moved("codi_logs_rejected_total{reason=\"invalid\"}"), 1.0);
    assert_eq!(moved("codi_logs_rejected_total{reason=\"storage\"}"), 0.0);
    assert_eq!(moved("codi_errors_total{code=\"InvalidMessage\"}"), 1.0);
    assert_eq!(moved("codi_frames_invalid_total"), 1.0);
    // Thirteen requests, each answered once.
    assert_eq!(moved("codi_ipc_duration_seconds_count"), 13.0);
    assert_eq!(
        moved("codi_ipc_duration_seconds_bucket{le=\"+Inf\"}"),
        13.0,
        "the +Inf bucket counts every observation"
    );
    assert!(moved("codi_ipc_duration_seconds_sum") > 0.0);
    assert_eq!(
        moved("codi_batch_rows_sum"),
        15.0,
        "every stored row was in a batch"
    );
    assert!(moved("codi_commit_duration_seconds_count") >= 1.0);
    assert_eq!(series(&after, "codi_connections_open"), 1.0);
    assert!(series(&after, "codi_database_bytes{file=\"main\"}") > 0.0);
    assert!(series(&after, "process_resident_memory_bytes") > 1e6);
    assert!(series(&after, "process_threads") >= 5.0);
    assert_eq!(series(&after, "codi_health{component=\"writer\"}"), 0.0);
    assert!(after.contains("# TYPE codi_ipc_duration_seconds histogram\n"));
    assert!(after.contains("# TYPE codi_logs_total counter\n"));
    assert_eq!(
        series(&after, "codi_sync_lag_seconds"),
        0.0,
        "no hub sync configured, so no lag"
    );
    assert_eq!(
        moved("codi_sync_rows_total"),
        0.0,
        "no hub, nothing shipped"
    );
    assert_eq!(d.db().count_logs(), 15);

    let r = d.http_get("/metrics");
    assert_eq!(
        r.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert_eq!(r.headers["content-length"], r.body.len().to_string());
    // The two scrapes before (this one counts once it is answered).
    assert!(series(&r.text(), "codi_admin_requests_total{outcome=\"answered\"}") >= 2.0);
}

/// Writes past this file-size limit fail with EFBIG, as on a full disk.
fn set_file_size_limit(pid: i32, bytes: Option<u64>) {
    let limit = libc::rlimit {
        rlim_cur: bytes.unwrap_or(libc::RLIM_INFINITY),
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit on our own child with a valid struct.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Sends logs of 400 bytes until one is rejected; returns how many were.
fn send_until_rejected(c: &mut Client, round: usize) -> usize {
    let mut rejected = 0;
    for i in 0..200 {
        let m = log(
            LogLevel::Info,
            "disk",
            &format!("{round}-{i} {}", "x".repeat(400)),
        );
        if !is_accepted(&c.request(&m), m.id) {
            rejected += 1;
            if rejected >= 2 {
                break;
            }
        }
    }
    rejected
}

#[test]
fn a_failing_writer_degrades_then_fails_the_health_and_recovers() {
    let sandbox = Sandbox::new();
    // No free-space floor: the host's own disk must not make it degraded.
    sandbox.write_config(
        "[health]\nfailing_for = \"1s\"\ndisk_min_free_mb = 0\ndisk_min_free_percent = 0\n",
    );
    let mut cmd = Opts::default().with_config().command(&sandbox);
    // SAFETY: signal(2) is async-signal-safe; runs in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let d = Daemon::spawn_command(Arc::clone(&sandbox), cmd, None);
    let (code, doc) = health(&d);
    assert_eq!(
        (code, doc["status"].as_str()),
        (200, Some("healthy")),
        "{doc}"
    );
    assert_eq!(doc["version"], env!("CARGO_PKG_VERSION"));
    assert!(doc["uptime_seconds"].is_u64());
    for name in [
        "ipc", "writer", "readers", "merger", "exports", "storage", "admin",
    ] {
        let c = &doc["components"][name];
        assert_eq!(c["status"], "healthy", "{name}: {doc}");
        assert!(
            c["reason"].is_null() && c["since"].is_null(),
            "{name}: {doc}"
        );
        assert!(c["message"].is_string(), "{name}: {doc}");
    }

    let mut c = d.unix();
    c.expect_accepted(&log(LogLevel::Info, "disk", "before the disk fills"));
    set_file_size_limit(d.pid(), Some(16 * 1024));
    assert!(send_until_rejected(&mut c, 0) >= 1, "nothing rejected");
    let (code, doc) = health(&d);
    let writer = &doc["components"]["writer"];
    let failed_already = writer["status"] == "failed";
    if !failed_already {
        assert_eq!(code, 200, "degraded is still 200: {doc}");
        assert_eq!(doc["status"], "degraded", "{doc}");
        assert_eq!(writer["status"], "degraded", "{doc}");
    }
    let reason = writer["reason"].as_str().expect("a reason");
    assert!(reason.contains("write transactions fail"), "{reason}");
    let since = writer["since"].as_str().expect("since");
    Timestamp::parse_rfc3339(since).expect("since is RFC 3339");

    // Every write keeps failing past health.failing_for: unhealthy, 503.
    std::thread::sleep(Duration::from_millis(1100));
    let mut round = 1;
    assert!(
        wait_until(Duration::from_secs(20), || {
            send_until_rejected(&mut c, round);
            round += 1;
            health(&d).0 == 503
        }),
        "never unhealthy: {}",
        health(&d).1
    );
    let (_, doc) = health(&d);
    assert_eq!(doc["status"], "unhealthy", "{doc}");
    assert_eq!(doc["components"]["writer"]["status"], "failed", "{doc}");
    let reason = doc["components"]["writer"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("no write transaction has succeeded for"),
        "{reason}"
    );
    assert_eq!(
        series(&scrape(&d), "codi_health{component=\"writer\"}"),
        2.0
    );

    // The protocol and codi2 say the same.
    let Payload::Status { components, .. } = c.call(Payload::GetStatus).payload else {
        panic!("expected Status");
    };
    let w = components.iter().find(|s| s.name == "writer").unwrap();
    assert_eq!(w.status, "failed");
    assert_eq!(w.reason.as_deref(), Some(reason));
    let (ok, json) = codi2_status_json(&d);
    assert!(
        ok,
        "codi2 status --json exits 0 for an unhealthy daemon too"
    );
    assert_eq!(stable(&json), stable(&health(&d).1));
    let out = run({
        let mut cmd = d.sandbox.codi2();
        cmd.arg("--socket").arg(d.socket()).arg("status");
        cmd
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\nstatus unhealthy (codi-monitor "), "{text}");
    assert!(
        text.contains("no write transaction has succeeded"),
        "{text}"
    );

    set_file_size_limit(d.pid(), None);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let m = log(LogLevel::Info, "disk", "after space came back");
            is_accepted(&c.request(&m), m.id)
        }),
        "no log accepted after the disk recovered"
    );
    // The writer is healthy again at its first success; the merger (which
    // failed too) at its next merge.
    let (code, doc) = health(&d);
    assert_eq!(code, 200, "{doc}");
    assert_eq!(doc["components"]["writer"]["status"], "healthy", "{doc}");
    assert_ne!(doc["status"], "unhealthy", "{doc}");
}

#[test]
fn a_nearly_full_disk_degrades_storage() {
    let sandbox = Sandbox::new();
    let vfs = rustix::fs::statvfs(sandbox.path()).unwrap();
    let free_mb = (vfs.f_bavail * vfs.f_frsize) >> 20;
    // More free space wanted than there is (with room for what the test
    // itself writes meanwhile).
    sandbox.write_config(&format!(
        "[health]\ndisk_min_free_mb = {}\n",
        free_mb + 1024
    ));
    let d = Daemon::start(Arc::clone(&sandbox), Opts::default().with_config());
    assert!(
        wait_until(Duration::from_secs(10), || health(&d).1["components"]
            ["storage"]["status"]
            == "degraded"),
        "storage never degraded: {}",
        health(&d).1
    );
    let (code, doc) = health(&d);
    assert_eq!(
        (code, doc["status"].as_str()),
        (200, Some("degraded")),
        "{doc}"
    );
    let reason = doc["components"]["storage"]["reason"].as_str().unwrap();
    assert!(reason.contains("nearly full"), "{reason}");
    assert!(reason.contains("health.disk_min_free_mb"), "{reason}");
    assert_eq!(
        series(&scrape(&d), "codi_health{component=\"storage\"}"),
        1.0
    );
    // Logs still flow.
    d.unix()
        .expect_accepted(&log(LogLevel::Info, "disk", "still stored"));
}

#[test]
fn a_missing_watched_directory_degrades_exports_until_it_is_back() {
    let sandbox = Sandbox::new();
    sandbox.write_config("[monitor]\nscan_interval = \"1s\"\n");
    let d = Daemon::start(Arc::clone(&sandbox), Opts::default().with_config());
    let dir = sandbox.path().join("exports");
    std::fs::create_dir(&dir).unwrap();
    let mut c = d.unix();
    c.expect_accepted(&Message::new(Payload::StartMonitoring {
        path: dir.to_str().unwrap().into(),
        recursive: true,
        patterns: Vec::new(),
        session_id: None,
    }));
    std::fs::remove_dir(&dir).unwrap();
    let exports = |d: &Daemon| health(d).1["components"]["exports"].clone();
    assert!(
        wait_until(Duration::from_secs(10), || exports(&d)["status"]
            == "degraded"),
        "exports never degraded: {}",
        exports(&d)
    );
    let reason = exports(&d)["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.contains("1 of 1 watched directories are missing"),
        "{reason}"
    );
    assert!(!reason.contains("exports"), "no path in a reason: {reason}");
    let text = scrape(&d);
    assert_eq!(
        series(&text, "codi_watched_directories{state=\"missing\"}"),
        1.0
    );
    assert!(series(&text, "codi_watched_dirs_lost_total") >= 1.0);

    std::fs::create_dir(&dir).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || exports(&d)["status"]
            == "healthy"),
        "exports never recovered: {}",
        exports(&d)
    );
    assert_eq!(
        series(&scrape(&d), "codi_watched_directories{state=\"active\"}"),
        1.0
    );
}

/// What the endpoint answers to `request`: the status code, or `None` if
/// it closed without an answer.
fn answer_to(d: &Daemon, request: &[u8]) -> Option<u16> {
    match http_request(d.admin_addr(), request) {
        Ok(r) => Some(r.status),
        Err(_) => None,
    }
}

#[test]
fn hostile_http_clients_get_bounded_answers_while_logs_flow() {
    let d = Daemon::start_default();
    assert_eq!(
        answer_to(&d, b"\x16\x03\x01\x02\x00garbage\r\n\r\n"),
        Some(400)
    );
    assert_eq!(answer_to(&d, b"GET /metrics HTTP/7.0\r\n\r\n"), Some(400));
    let post = http_request(
        d.admin_addr(),
        b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    )
    .unwrap();
    assert_eq!(post.status, 405);
    assert_eq!(post.headers["allow"], "GET, HEAD");
    assert_eq!(answer_to(&d, b"GET /admin HTTP/1.1\r\n\r\n"), Some(404));
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
    huge.extend(vec![b'a'; 64 * 1024]);
    huge.extend_from_slice(b"\r\n\r\n");
    assert_eq!(answer_to(&d, &huge), Some(431), "an oversized head");
    let many: String = (0..40).map(|i| format!("X-{i}: v\r\n")).collect();
    assert_eq!(
        answer_to(&d, format!("GET /health HTTP/1.1\r\n{many}\r\n").as_bytes()),
        Some(431)
    );
    let head = http_request(d.admin_addr(), b"HEAD /health HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty(), "HEAD has no body");
    assert!(head.headers["content-length"].parse::<usize>().unwrap() > 100);

    // Slow clients take every slot: a newcomer is closed unanswered, logs
    // are still accepted, and the slow ones are closed at the deadline.
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut s = TcpStream::connect(d.admin_addr()).unwrap();
            s.write_all(b"GET /metr").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        answer_to(&d, b"GET /health HTTP/1.1\r\n\r\n"),
        None,
        "over the connection cap"
    );
    let mut c = d.unix();
    for i in 0..50 {
        c.expect_accepted(&log(LogLevel::Info, "bystander", &format!("log {i}")));
    }
    for s in &mut slow {
        s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        let mut buf = Vec::new();
        // Closed without an answer (end of stream, or a reset).
        let _ = s.read_to_end(&mut buf);
        assert!(buf.is_empty(), "a slow client got {buf:?}");
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4),
        "closed before the read deadline ({waited:?})"
    );
    assert_eq!(d.http_get("/health").status, 200, "served again");
    let text = scrape(&d);
    assert!(series(&text, "codi_admin_requests_total{outcome=\"dropped\"}") >= 17.0);
    assert!(series(&text, "codi_admin_requests_total{outcome=\"refused\"}") >= 6.0);
    assert_eq!(d.db().count_logs(), 50);
}

#[test]
fn a_taken_port_leaves_the_daemon_running_with_the_endpoint_degraded() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let opts = Opts {
        admin: Some(addr.clone()),
        ..Opts::default()
    };
    let d = Daemon::start(Sandbox::new(), opts);
    assert_eq!(d.ready.admin, None, "READY names no endpoint");
    let mut c = d.unix();
    c.expect_accepted(&log(LogLevel::Info, "a", "logs still flow"));
    let Payload::Status { components, .. } = c.call(Payload::GetStatus).payload else {
        panic!("expected Status");
    };
    let admin = components.iter().find(|s| s.name == "admin").unwrap();
    assert_eq!(admin.status, "degraded");
    let reason = admin.reason.as_deref().unwrap();
    assert!(
        reason.contains(&format!("cannot listen on {addr}")),
        "{reason}"
    );
}

#[test]
fn the_endpoint_can_be_turned_off() {
    let sandbox = Sandbox::new();
    // No free-space floor: the host's own disk must not make it degraded.
    sandbox.write_config("[health]\ndisk_min_free_mb = 0\ndisk_min_free_percent = 0\n");
    let opts = Opts {
        admin: Some(String::new()),
        ..Opts::default().with_config()
    };
    let d = Daemon::start(sandbox, opts);
    assert_eq!(d.ready.admin, None);
    let (ok, json) = codi2_status_json(&d);
    assert!(ok);
    assert_eq!(json["status"], "healthy", "{json}");
    let message = json["components"]["admin"]["message"].as_str().unwrap();
    assert!(message.starts_with("off"), "{message}");
}

#[test]
fn clients_refused_at_the_connection_limit_degrade_ipc() {
    let sandbox = Sandbox::new();
    sandbox.write_config("[monitor]\nmax_connections = 1\n");
    let d = Daemon::start(
        Arc::clone(&sandbox),
        Opts::default().tcp(None).token(None).with_config(),
    );
    let mut first = d.unix();
    first.ping();
    let mut second = d.unix();
    assert_error(&second.recv(), codi_monitor::proto::ErrorCode::Unavailable);
    let ipc = |d: &Daemon| health(d).1["components"]["ipc"].clone();
    assert!(
        wait_until(Duration::from_secs(10), || ipc(&d)["status"] == "degraded"),
        "ipc never degraded: {}",
        ipc(&d)
    );
    let reason = ipc(&d)["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.starts_with("1 connections refused at the connection limit (1)"),
        "{reason}"
    );
    assert_eq!(
        series(&scrape(&d), "codi_errors_total{code=\"Unavailable\"}"),
        1.0
    );
    first.ping();
}
