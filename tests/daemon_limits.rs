//! Integration tests: the real `codi-monitor` (and `codi2`) binaries, each
//! test with its own daemon in its own temporary directory, spoken to over
//! the real Unix and TCP sockets, with the database inspected directly.
//!
//! No assertion depends on timing: deadlines only protect against hangs.
//!
//! This file: limits and reloading.

#[allow(dead_code)]
mod common;

use codi_monitor::proto::{
    encode_message, AckStatus, ErrorCode, LogFilter, LogLevel, Message, Payload, Timestamp,
};
use common::*;
use rmpv::Value;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;
use uuid::Uuid;

/// Tests 11, 12, 13: limits and reloading.
mod limits {
    use super::*;

    #[test]
    fn rate_limited_client_is_slowed_never_dropped() {
        let sandbox = Sandbox::new();
        sandbox.write_config("[monitor]\nrate_limit = 50\nrate_burst = 10\n");
        let check = run(Opts::default()
            .arg("config")
            .arg("check")
            .arg("--config")
            .arg(sandbox.config())
            .command(&sandbox));
        let d = Daemon::start(Arc::clone(&sandbox), Opts::default().with_config());
        let mut c = d.unix();
        let msgs: Vec<Message> = (0..100)
            .map(|i| log(LogLevel::Info, "rate", &format!("r{i}")))
            .collect();
        let mut bytes = Vec::new();
        for m in &msgs {
            encode_message(m, &mut bytes).unwrap();
        }
        let mut writer = c.try_clone();
        let send = thread::spawn(move || writer.send_raw(&bytes).unwrap());
        for m in &msgs {
            assert_accepted(&c.recv(), m.id);
        }
        send.join().unwrap();
        assert_eq!(d.db().count_logs(), 100);
        let stdout = String::from_utf8_lossy(&check.stdout);
        assert!(
            check.status.success() && stdout.contains("rate_limit = 50"),
            "config check should show the rate limit in effect: {stdout}{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }

    /// Regression (review): a throttled connection whose client closed used
    /// to be held, with its buffers and slot, until its wait ended (here
    /// about 100 s).
    #[test]
    fn a_throttled_client_that_hangs_up_is_closed_at_once() {
        let sandbox = Sandbox::new();
        sandbox.write_config("[monitor]\nrate_limit = 1\nrate_burst = 1\n");
        let d = Daemon::start(Arc::clone(&sandbox), Opts::default().with_config());
        let open_connections = |c: &mut Client| -> String {
            let answer = c.call(Payload::GetStatus);
            let Payload::Status { components, .. } = &answer.payload else {
                panic!("not a status: {answer:?}")
            };
            components
                .iter()
                .find(|s| s.name == "ipc")
                .expect("ipc component")
                .message
                .clone()
        };
        {
            let mut c = d.unix();
            let entries = (0..100)
                .map(|i| fields(LogLevel::Info, "slow", &format!("e{i}")))
                .collect();
            c.expect_accepted(&batch(entries));
            // The bucket is 99 tokens in debt: this ping waits ~100 s.
            c.send(&Message::new(Payload::Ping)).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut observer = d.unix();
        let mut last = String::new();
        let closed = wait_until(Duration::from_secs(10), || {
            last = open_connections(&mut observer);
            last.starts_with("1 connections open")
        });
        assert!(closed, "the hung-up client is still held: {last}");
    }

    #[test]
    fn a_client_that_does_not_read_cannot_grow_the_daemon() {
        const N: usize = 20_000;
        const MAX_RSS_KIB: u64 = 300 * 1024;
        let d = Daemon::start_default();
        let mut c = d.unix();
        let msgs: Vec<Message> = (0..N)
            .map(|i| {
                let mut m = log(
                    LogLevel::Info,
                    "flood",
                    &format!("flood {i} {}", "f".repeat(200)),
                );
                if i % 100 == 0 {
                    m.payload = Payload::Ping;
                }
                m
            })
            .collect();
        let ids: Vec<Uuid> = msgs.iter().map(|m| m.id).collect();
        let written = Arc::new(AtomicUsize::new(0));
        let mut writer = c.try_clone();
        let progress = Arc::clone(&written);
        let send = thread::spawn(move || {
            for m in &msgs {
                writer.send(m).unwrap();
                progress.fetch_add(1, Ordering::Relaxed);
            }
        });
        let mut max_rss = d.rss_kib();
        // Not reading: wait until the writer is stuck on backpressure (or
        // done), sampling the daemon's memory meanwhile.
        let mut last = usize::MAX;
        let mut still = 0;
        wait_until(Duration::from_secs(20), || {
            max_rss = max_rss.max(d.rss_kib());
            let now = written.load(Ordering::Relaxed);
            still = if now == last { still + 1 } else { 0 };
            last = now;
            now == N || still >= 40
        });
        assert!(
            written.load(Ordering::Relaxed) < N,
            "a daemon that keeps reading from a client that never reads has no backpressure"
        );
        for (i, id) in ids.iter().enumerate() {
            if i % 500 == 0 {
                max_rss = max_rss.max(d.rss_kib());
            }
            assert_accepted(&c.recv(), *id);
        }
        send.join().unwrap();
        max_rss = max_rss.max(d.rss_kib());
        assert!(
            max_rss < MAX_RSS_KIB,
            "daemon RSS reached {max_rss} KiB (bound {MAX_RSS_KIB} KiB)"
        );
        assert_eq!(d.db().count_logs(), (N - N / 100) as i64);
    }

    /// Samples the daemon's RSS every 5 ms while `work` runs; returns
    /// `work`'s result and the largest RSS seen, in KiB.
    fn peak_rss_during<T>(d: &Daemon, work: impl FnOnce() -> T) -> (T, u64) {
        let stop = Arc::new(AtomicBool::new(false));
        let pid = d.pid();
        let sampler = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut peak = 0;
                while !stop.load(Ordering::Relaxed) {
                    peak = peak.max(rss_kib_of(pid));
                    thread::sleep(Duration::from_millis(5));
                }
                peak.max(rss_kib_of(pid))
            })
        };
        let out = work();
        stop.store(true, Ordering::Relaxed);
        (out, sampler.join().unwrap())
    }

    fn rss_kib_of(pid: i32) -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    fn with_blob(message: &str, bytes: usize) -> Message {
        let mut f = fields(LogLevel::Info, "blob", message);
        let blob: Vec<u8> = (0..bytes).map(|i| (i * 7) as u8).collect();
        f.metadata = Some(Value::Map(vec![("blob".into(), Value::Binary(blob))]));
        Message::new(Payload::LogEntry(f))
    }

    /// Issue point 2: 20 logs with ~1 MiB of binary metadata made one
    /// `QueryLogs` take 911 MB and answer no entry. Each is now refused
    /// (its base64 is over the row bound) or stored and answered, and the
    /// query stays small.
    #[test]
    fn logs_with_a_megabyte_of_binary_metadata_cannot_exhaust_a_query() {
        const MAX_GROWTH_KIB: u64 = 200 * 1024;
        let d = Daemon::start_default();
        let mut c = d.unix();
        c.expect_accepted(&log(LogLevel::Info, "blob", "before"));
        let before = d.rss_kib();
        let mut stored = Vec::new();
        // 900 KiB (a whole frame, over the row bound as base64), then
        // 300 KiB (400 KB as base64: stored).
        for (i, size) in [900 * 1024; 20]
            .into_iter()
            .chain([300 * 1024; 20])
            .enumerate()
        {
            let msg = with_blob(&format!("blob {i}"), size);
            let answer = c.request(&msg);
            match ack(&answer).1 {
                AckStatus::Accepted => stored.push(msg),
                AckStatus::Rejected(reason) => {
                    assert!(
                        reason.contains("524288") && reason.contains("MAX_ROW_BYTES"),
                        "the reason names the limit: {reason}"
                    );
                    assert!(size > 400 * 1024, "a 300 KiB blob fits: {reason}");
                }
                other => panic!("{other:?}"),
            }
        }
        c.expect_accepted(&log(LogLevel::Info, "blob", "after"));
        let after_logs = d.rss_kib();
        let (answer, peak) = peak_rss_during(&d, || c.request(&query(LogFilter::default(), 100)));
        eprintln!(
            "RSS under the big-row attack: before {before} KiB, after the logs {after_logs} KiB, \
             peak during QueryLogs {peak} KiB (+{} KiB)",
            peak.saturating_sub(before)
        );
        assert!(
            peak.saturating_sub(before) < MAX_GROWTH_KIB,
            "RSS grew from {before} to {peak} KiB"
        );
        let (entries, total) = results(&answer);
        assert_eq!(total as usize, 2 + stored.len());
        assert!(
            entries.len() > 1,
            "the answer holds entries: {}",
            entries.len()
        );
        assert_eq!(entries.last().unwrap().message, "after");
        // Every stored blob that came back is exact.
        for e in entries.iter().filter(|e| e.message.starts_with("blob")) {
            let sent = stored
                .iter()
                .find(|m| m.id == e.uuid)
                .expect("a stored log");
            let Payload::LogEntry(f) = &sent.payload else {
                unreachable!()
            };
            assert!(e.metadata == f.metadata, "{} came back changed", e.message);
        }
    }

    /// A daemon whose database holds, as an older daemon stored it, a row
    /// too large for any answer: a 700 KB message and 3.4 MB of binary
    /// metadata as an array of byte values, after "old 1" and "old 2".
    /// Returns the daemon and the row's stored text bytes.
    fn daemon_with_a_legacy_row() -> (Daemon, usize) {
        let sandbox = Sandbox::new();
        let mut d = Daemon::start(Arc::clone(&sandbox), Opts::default());
        let mut c = d.unix();
        for m in ["old 1", "old 2"] {
            c.expect_accepted(&log(LogLevel::Info, "legacy", m));
        }
        drop(c);
        d.terminate();
        assert!(d.wait_exit().success());
        let legacy_json = format!("[{}255]", "255,".repeat(850_000));
        let db = rusqlite::Connection::open(sandbox.db()).unwrap();
        db.execute(
            "INSERT INTO logs (id, uuid, timestamp, level, component, session_id, \
             message, metadata, created_at) \
             SELECT max(id) + 1, ?1, ?2, 'Info', 'legacy', NULL, ?3, ?4, ?2 FROM logs",
            rusqlite::params![
                Uuid::now_v7().as_bytes().as_slice(),
                Timestamp::now().as_micros(),
                "L".repeat(700_000),
                legacy_json
            ],
        )
        .unwrap();
        drop(db);
        let d = Daemon::start(sandbox, Opts::default());
        (d, "legacy".len() + 700_000 + legacy_json.len())
    }

    /// Issue point 2: a row too large for any answer hid every older row
    /// from `QueryLogs` (and so from `codi2 logs`).
    #[test]
    fn a_legacy_row_too_large_to_answer_hides_no_older_row() {
        let (d, legacy_len) = daemon_with_a_legacy_row();
        let mut c = d.unix();
        let answer = c.request(&query(LogFilter::default(), 100));
        let (entries, total) = results(&answer);
        let messages: Vec<&str> = entries.iter().map(|e| &e.message[..5]).collect();
        assert_eq!(total, 3);
        assert_eq!(messages, ["old 1", "old 2", "LLLLL"], "nothing is hidden");
        let cut = &entries[2];
        assert_eq!(cut.message.len(), 64 * 1024);
        assert!(
            cut.metadata
                == Some(Value::Map(vec![(
                    "$truncated".into(),
                    Value::from(legacy_len as u64)
                )])),
            "the metadata is replaced by the marker"
        );
    }

    /// Issue point 2: `codi2 logs --follow` stopped for good at a row too
    /// large for any answer. Either side's fix lets it pass: this daemon
    /// answers the row cut, this `codi2` steps past a row it is not sent
    /// (run with `$CODI_TEST_DAEMON` or `$CODI_TEST_CODI2` set to an older
    /// build to see each alone).
    #[test]
    fn follow_goes_on_past_a_legacy_row_too_large_to_answer() {
        let (d, _) = daemon_with_a_legacy_row();
        let sandbox = &d.sandbox;
        let mut follow = sandbox
            .codi2()
            .arg("--socket")
            .arg(sandbox.socket())
            .arg("--db")
            .arg(sandbox.db())
            .args(["logs", "--follow", "--json"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = follow.stdout.take().unwrap();
        thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                if tx.send(line.unwrap_or_default()).is_err() {
                    break;
                }
            }
        });
        let mut c = d.unix();
        c.expect_accepted(&log(LogLevel::Info, "legacy", "after the legacy row"));
        let mut seen = Vec::new();
        let found = wait_until(Duration::from_secs(10), || {
            while let Ok(line) = rx.try_recv() {
                seen.push(line);
            }
            seen.iter().any(|l| l.contains("after the legacy row"))
        });
        let _ = follow.kill();
        let _ = follow.wait();
        let summary: Vec<String> = seen.iter().map(|l| l.chars().take(100).collect()).collect();
        assert!(found, "--follow stopped at the legacy row: {summary:#?}");
    }

    /// Clients that pipeline queries and never read the answers: answer
    /// memory stays within the answer pool however many connect, a
    /// bystander is served while the pool has room and told `Unavailable`
    /// (never left hanging) once it has none, and logs are never refused.
    #[test]
    fn clients_that_never_read_query_answers_cannot_grow_the_daemon() {
        const POOL: usize = 32 << 20;
        const MAX_GROWTH_KIB: u64 = 100 * 1024;
        let sandbox = Sandbox::new();
        sandbox.write_config(&format!("[storage]\ninflight_bytes = {POOL}\n"));
        let d = Daemon::start(Arc::clone(&sandbox), Opts::default().with_config());
        let mut bystander = d.unix();
        // 40 logs of 100 KB: an answer of `limit 1000` fills a frame.
        let row = "q".repeat(100_000);
        for i in 0..40 {
            bystander.expect_accepted(&log(LogLevel::Info, "big", &format!("{i} {row}")));
        }
        let queries = |n: usize| {
            let mut bytes = Vec::new();
            for _ in 0..n {
                encode_message(&query(LogFilter::default(), 1000), &mut bytes).unwrap();
            }
            bytes
        };
        let answered = |c: &mut Client| -> u64 {
            let answer = c.call(Payload::GetStatus);
            let Payload::Status { components, .. } = &answer.payload else {
                panic!("{answer:?}")
            };
            let readers = &components
                .iter()
                .find(|s| s.name == "readers")
                .unwrap()
                .message;
            readers.split(' ').next().unwrap().parse().unwrap()
        };
        let settle = |c: &mut Client| {
            let mut last = u64::MAX;
            let mut still = 0;
            wait_until(Duration::from_secs(30), || {
                let now = answered(c);
                still = if now == last { still + 1 } else { 0 };
                last = now;
                still >= 10
            });
        };
        let mut observer = d.unix();
        let before = d.rss_kib();
        let ((), peak) = peak_rss_during(&d, || {
            let mut hostile = Vec::new();
            // Fewer than the pool holds (each holds at most two frames).
            for _ in 0..12 {
                let mut h = d.unix();
                h.send_raw(&queries(30)).unwrap();
                hostile.push(h);
            }
            settle(&mut observer);
            let answer = bystander.request(&query(LogFilter::default(), 5));
            assert_eq!(
                results(&answer).0.len(),
                5,
                "served while the pool has room"
            );
            // Far more than the pool holds.
            for _ in 0..50 {
                let mut h = d.unix();
                h.send_raw(&queries(30)).unwrap();
                hostile.push(h);
            }
            settle(&mut observer);
            match &bystander.request(&query(LogFilter::default(), 5)).payload {
                Payload::LogResults { entries, .. } => assert_eq!(entries.len(), 5),
                Payload::Error { code, message, .. } => {
                    assert_eq!(code, &ErrorCode::Unavailable);
                    assert!(message.contains("too many query answers"), "{message}");
                }
                other => panic!("{other:?}"),
            }
            bystander.expect_accepted(&log(LogLevel::Info, "bystander", "still logging"));
            drop(hostile);
        });
        eprintln!(
            "RSS with 62 connections pipelining unread QueryLogs: before {before} KiB, \
             peak {peak} KiB (+{} KiB)",
            peak.saturating_sub(before)
        );
        // Once they are gone, their room is back.
        let mut last = None;
        let served = wait_until(Duration::from_secs(20), || {
            let answer = bystander.request(&query(LogFilter::default(), 5));
            let ok = matches!(&answer.payload, Payload::LogResults { entries, .. } if entries.len() == 5);
            last = Some(answer);
            ok
        });
        assert!(served, "still refused after the clients left: {last:?}");
        assert!(
            peak.saturating_sub(before) < MAX_GROWTH_KIB,
            "RSS grew from {before} to {peak} KiB"
        );
    }

    fn paths_config(sandbox: &Sandbox, socket: &std::path::Path, extra: &str) -> String {
        format!(
            "[general]\nlog_level = \"info\"\n\n[storage]\nsqlite_path = \"{}\"\n\n\
             [monitor]\nunix_socket_path = \"{}\"\n{extra}",
            sandbox.db().display(),
            socket.display()
        )
    }

    #[test]
    fn sighup_reloads_live_settings_and_names_what_needs_a_restart() {
        let sandbox = Sandbox::new();
        sandbox.write_config(&paths_config(
            &sandbox,
            &sandbox.socket(),
            "rate_limit = 0\n",
        ));
        let opts = Opts {
            socket_flag: false,
            db_flag: false,
            tcp: None,
            config: true,
            ..Opts::default()
        };
        let d = Daemon::start(Arc::clone(&sandbox), opts);
        assert_eq!(d.socket(), sandbox.socket());
        let mut c = d.unix();
        c.ping();

        let moved = sandbox.path().join("run/other.sock");
        sandbox.write_config(&paths_config(
            &sandbox,
            &moved,
            "rate_limit = 1000\nrate_burst = 100\n",
        ));
        let before = d.stderr().len();
        d.signal(libc::SIGHUP);
        let new_lines = || d.stderr()[before..].to_owned();
        assert!(
            wait_until(Duration::from_secs(10), || new_lines()
                .contains("unix_socket_path")),
            "no reload message naming the socket path; stderr:\n{}",
            d.stderr()
        );
        let lines = new_lines();
        assert!(lines.contains("reload"), "{lines}");
        assert!(
            lines.contains("1000"),
            "the new rate limit is reported: {lines}"
        );
        let restart_line = lines
            .lines()
            .find(|l| l.contains("unix_socket_path"))
            .unwrap();
        assert!(restart_line.contains("restart"), "{restart_line}");

        // Still serving, on the old socket, with the same connection.
        c.ping();
        c.expect_accepted(&log(LogLevel::Info, "hup", "after reload"));
        d.unix().ping();
        assert!(!moved.exists(), "the socket does not move before a restart");

        // A broken file is refused and the running settings stay.
        std::fs::write(sandbox.config(), "[monitor\nrate_limit = ").unwrap();
        let before = d.stderr().len();
        d.signal(libc::SIGHUP);
        assert!(
            wait_until(Duration::from_secs(10), || d.stderr()[before..]
                .to_lowercase()
                .contains("reload")),
            "no message about the refused reload; stderr:\n{}",
            d.stderr()
        );
        c.ping();
        c.expect_accepted(&log(LogLevel::Info, "hup", "after a bad reload"));
    }
}
