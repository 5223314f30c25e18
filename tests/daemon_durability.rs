//! Integration tests: the real `codi-monitor` (and `codi2`) binaries, each
//! test with its own daemon in its own temporary directory, spoken to over
//! the real Unix and TCP sockets, with the database inspected directly.
//!
//! No assertion depends on timing: deadlines only protect against hangs.
//!
//! This file: many concurrent connections and the delivery promise.

#[allow(dead_code)]
mod common;

use codi_monitor::proto::{AckStatus, LogFields, LogLevel, Message, Payload};
use common::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;
use uuid::Uuid;

/// Test 4: many concurrent connections.
mod scale {
    use super::*;

    #[test]
    fn a_thousand_concurrent_connections_each_get_their_answer() {
        let limit = raise_nofile_limit();
        assert!(
            limit >= 2500,
            "RLIMIT_NOFILE hard limit {limit} is too low for this test"
        );
        let d = Daemon::start_default();
        let mut clients: Vec<(Client, Message)> = (0..1000)
            .map(|i| {
                let c = if i % 4 == 3 { d.tcp() } else { d.unix() };
                (c, log(LogLevel::Info, "many", &format!("client {i}")))
            })
            .collect();
        for (c, msg) in &mut clients {
            c.send(msg).unwrap();
        }
        for (c, msg) in &mut clients {
            assert_accepted(&c.recv(), msg.id);
        }
        let stored = d.db().uuids();
        assert_eq!(stored.len(), 1000);
        for (_, msg) in &clients {
            assert!(stored.contains(&msg.id));
        }
        // Still all open and served.
        for (c, _) in clients.iter_mut().step_by(97) {
            c.ping();
        }
    }
}

/// Tests 5, 6, 7: the delivery promise.
mod durability {
    use super::*;

    /// Sends windows of logs (or, with `batches`, only batches) until the
    /// connection breaks; records every log id that was acknowledged
    /// `Accepted`. Small logs each have their own session, so they go
    /// through the ingest file; the batches hold large entries of one
    /// session, so they go straight into `logs` once the merger has caught
    /// up, which needs the small logs to pause (`quiet`).
    fn hammer(
        mut c: Client,
        tag: usize,
        batches: bool,
        quiet: Arc<AtomicBool>,
        accepted: Arc<Mutex<Vec<Uuid>>>,
    ) {
        let mut round = 0usize;
        let padding = "x".repeat(600);
        loop {
            if !batches && quiet.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
            let mut window = Vec::new();
            for k in 0..16 {
                let msg = if batches {
                    batch(
                        (0..10)
                            .map(|j| LogFields {
                                session_id: Some(format!("kill-{tag}")),
                                ..fields(
                                    LogLevel::Info,
                                    "kill",
                                    &format!("{tag}.{round}.{j} {padding}"),
                                )
                            })
                            .collect(),
                    )
                } else {
                    let name = format!("{tag}.{round}.{k}");
                    Message::new(Payload::LogEntry(LogFields {
                        session_id: Some(name.clone()),
                        ..fields(LogLevel::Info, "kill", &name)
                    }))
                };
                if c.send(&msg).is_err() {
                    return;
                }
                window.push(msg);
            }
            for msg in window {
                let answer = match c.try_recv() {
                    Ok(Some(a)) => a,
                    Ok(None) | Err(_) => return,
                };
                let (request_id, status) = ack(&answer);
                assert_eq!(request_id, msg.id, "answers out of order");
                if status == &AckStatus::Accepted {
                    let mut acc = accepted.lock().unwrap();
                    match &msg.payload {
                        Payload::LogBatch { entries } => {
                            acc.extend((0..entries.len()).map(|i| batch_entry(msg.id, i)))
                        }
                        _ => acc.push(msg.id),
                    }
                }
            }
            round += 1;
        }
    }

    /// Merges into `logs`, and batches written straight into it, so far
    /// (from the merger's line of `GetStatus`).
    fn write_paths(c: &mut Client) -> (u64, u64) {
        let answer = c.call(Payload::GetStatus);
        let Payload::Status { components, .. } = &answer.payload else {
            panic!("expected Status, got {answer:?}");
        };
        let merger = components.iter().find(|c| c.name == "merger").unwrap();
        let numbers: Vec<u64> = merger
            .message
            .split(|ch: char| !ch.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect();
        match numbers[..] {
            [_, merges, direct, ..] => (merges, direct),
            _ => panic!("unexpected merger status: {}", merger.message),
        }
    }

    #[test]
    fn kill_9_under_load_loses_no_accepted_log() {
        // Several rounds on one database: each kill lands at a different
        // point of the writer's cycle, and each restart recovers the last.
        let sandbox = Sandbox::new();
        let mut d = Daemon::start(Arc::clone(&sandbox), Opts::default());
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let count = |acc: &Mutex<Vec<Uuid>>| acc.lock().unwrap().len();
        for round in 0..3 {
            let start = count(&accepted);
            let quiet = Arc::new(AtomicBool::new(false));
            let threads: Vec<_> = (0..4)
                .map(|t| {
                    let c = if t == 3 { d.tcp() } else { d.unix() };
                    let (acc, quiet) = (Arc::clone(&accepted), Arc::clone(&quiet));
                    thread::spawn(move || hammer(c, round * 10 + t, t == 0, quiet, acc))
                })
                .collect();
            assert!(
                wait_until(Duration::from_secs(60), || count(&accepted) >= start + 3000),
                "load never got going"
            );
            // Only the batches for a while: they go straight into `logs`.
            quiet.store(true, Ordering::Relaxed);
            let mut status = d.unix();
            let (_, direct) = write_paths(&mut status);
            assert!(
                wait_until(Duration::from_secs(60), || write_paths(&mut status).1
                    > direct),
                "round {round}: no batch went straight into logs"
            );
            assert!(write_paths(&mut status).0 > 0, "logs were merged too");
            if round == 1 {
                // Killed while both paths commit, rather than in the middle
                // of the batches alone.
                quiet.store(false, Ordering::Relaxed);
                let now = count(&accepted);
                assert!(wait_until(Duration::from_secs(60), || count(&accepted) >= now + 2000));
            }
            d.kill9();
            // Every client must write again to see its connection gone.
            quiet.store(false, Ordering::Relaxed);
            for t in threads {
                t.join().expect("client thread");
            }
            assert!(sandbox.socket().exists(), "kill -9 leaves the socket file");

            d = Daemon::start(Arc::clone(&sandbox), Opts::default());
            let db = d.db();
            let stored = db.uuids();
            let accepted = accepted.lock().unwrap();
            let lost: Vec<&Uuid> = accepted.iter().filter(|id| !stored.contains(id)).collect();
            assert!(
                lost.is_empty(),
                "round {round}: {} of {} accepted logs lost after kill -9, e.g. {:?}",
                lost.len(),
                accepted.len(),
                &lost[..lost.len().min(5)]
            );
            assert_eq!(db.integrity_check(), "ok");
            d.unix().ping();
        }
        // The restarted daemon merges what the killed ones left in the
        // ingest file; a clean stop leaves every log in the indexed table.
        d.terminate();
        assert!(d.wait_exit().success());
        let db = Db::open(&sandbox.db());
        let (indexed, ingest) = db.table_counts();
        assert_eq!(ingest, 0, "merged rows are deleted from the ingest file");
        assert_eq!(indexed, db.count_logs());
        assert!(indexed as usize >= accepted.lock().unwrap().len());
    }

    use power_cut::WalIndex;

    /// How many logs had been acknowledged (a prefix of the clients'
    /// list) and how far each file's WAL reached just after: those logs
    /// are all in frames up to those.
    #[derive(Clone, Copy)]
    struct Sample {
        acknowledged: usize,
        wal: [WalIndex; 2],
    }

    /// Power cuts emulated on copies of the files (the point 9).
    /// At `synchronous=NORMAL` a commit only reaches the disk through a
    /// checkpoint, so a power cut can take back any commit the last
    /// checkpoint of its file had not copied; but a log acknowledged
    /// before both files were checkpointed must survive, wherever the
    /// merger has moved it meanwhile.
    ///
    /// Under load, a sampler notes every millisecond how many logs were
    /// acknowledged and then how far each WAL reaches (T1). A cut freezes
    /// the daemon (T2), preferably just after the ingest file's checkpoint
    /// moved on while the main database's WAL holds frames not yet copied
    /// (a loss needs a merged row's deletion on disk and its merge not
    /// yet), and copies the files as a power cut then could leave them
    /// ([`copy_as_after_power_cut`]). Every log acknowledged by the last
    /// T1 that both files' checkpoints have passed must be in the copy
    /// exactly once. `CODI_TEST_POWER_CUTS` sets the number of cuts
    /// (default 6).
    #[test]
    fn a_power_cut_loses_no_log_acknowledged_before_both_checkpoints() {
        /// How long a cut waits for a risky moment before it cuts anyway.
        const RISKY_WAIT: Duration = Duration::from_secs(2);
        let cuts: usize = std::env::var("CODI_TEST_POWER_CUTS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(6);
        let sandbox = Sandbox::new();
        let mut d = Daemon::start(Arc::clone(&sandbox), Opts::default());
        let main = sandbox.db();
        let ingest = codi_monitor::store::schema::ingest_path(&main);
        let files = [main.clone(), ingest.clone()];
        let read_wal = move || {
            let [m, i] = [&main, &ingest].map(|f| WalIndex::read(f));
            m.zip(i).map(|(m, i)| [m, i])
        };
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let count = |acc: &Mutex<Vec<Uuid>>| acc.lock().unwrap().len();
        // Paused while a copy is checked, so that the files stay small.
        let quiet = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..3)
            .map(|t| {
                let (c, acc, quiet) = (d.unix(), Arc::clone(&accepted), Arc::clone(&quiet));
                thread::spawn(move || hammer(c, t, false, quiet, acc))
            })
            .collect();
        let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (acc, samples, stop) = (
                Arc::clone(&accepted),
                Arc::clone(&samples),
                Arc::clone(&stop),
            );
            let read_wal = read_wal.clone();
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let acknowledged = count(&acc);
                    if let Some(wal) = read_wal() {
                        samples.lock().unwrap().push(Sample { acknowledged, wal });
                    }
                    thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let mut report = Vec::new();
        for n in 0..cuts {
            let start = count(&accepted);
            assert!(
                wait_until(Duration::from_secs(60), || count(&accepted) >= start + 2000),
                "cut {n}: the load stalled"
            );
            let risky_until = std::time::Instant::now() + RISKY_WAIT;
            let deadline = risky_until + Duration::from_secs(20);
            let mut last = read_wal();
            let (wal, acknowledged, copy) = loop {
                assert!(
                    std::time::Instant::now() < deadline,
                    "cut {n}: a checkpoint seemed always to be running"
                );
                thread::sleep(Duration::from_millis(1));
                let now = read_wal();
                let risky = match (now, last) {
                    (Some([m, i]), Some([_, i_before])) => {
                        m.backfilled < m.max_frame
                            && (i.salt, i.backfilled) != (i_before.salt, i_before.backfilled)
                    }
                    _ => false,
                };
                last = now.or(last);
                if !risky && std::time::Instant::now() < risky_until {
                    continue;
                }
                d.freeze();
                let running = files.iter().any(|f| WalIndex::checkpoint_running(f));
                let cut = read_wal().filter(|_| !running).map(|wal| {
                    let dir = sandbox.path().join(format!("power-cut-{n}"));
                    let copy = copy_as_after_power_cut(&files[0], &dir);
                    // The last T1 both checkpoints have passed.
                    let acknowledged = samples
                        .lock()
                        .unwrap()
                        .iter()
                        .rev()
                        .find(|s| {
                            wal.iter()
                                .zip(&s.wal)
                                .all(|(now, t1)| now.backfilled_past(t1))
                        })
                        .map_or(0, |s| s.acknowledged);
                    (wal, acknowledged, copy)
                });
                d.thaw();
                if let Some(cut) = cut {
                    break cut;
                }
            };
            quiet.store(true, Ordering::Relaxed);
            let guaranteed: Vec<Uuid> = accepted.lock().unwrap()[..acknowledged].to_vec();
            let after = Db::open(&copy);
            assert_eq!(after.integrity_check(), "ok", "cut {n}");
            let seen = after.uuid_counts();
            let lost = guaranteed.iter().filter(|u| !seen.contains_key(u)).count();
            let doubled = seen.values().filter(|&&k| k > 1).count();
            eprintln!(
                "power cut {n}: {lost} of {} logs acknowledged before both checkpoints lost, \
                 {doubled} stored twice (main WAL {}/{} frames copied, ingest {}/{})",
                guaranteed.len(),
                wal[0].backfilled,
                wal[0].max_frame,
                wal[1].backfilled,
                wal[1].max_frame,
            );
            report.push((lost, doubled));
            drop(after);
            std::fs::remove_dir_all(copy.parent().unwrap()).unwrap();
            samples.lock().unwrap().clear();
            quiet.store(false, Ordering::Relaxed);
        }
        stop.store(true, Ordering::Relaxed);
        sampler.join().unwrap();
        d.kill9();
        for t in threads {
            t.join().expect("client thread");
        }
        assert!(
            report.iter().all(|&r| r == (0, 0)),
            "logs acknowledged before both checkpoints lost or stored twice after a power cut \
             (lost, doubled per cut): {report:?}"
        );
    }

    #[test]
    fn sigterm_drains_stores_every_accepted_log_and_removes_the_socket() {
        let sandbox = Sandbox::new();
        let mut d = Daemon::start(Arc::clone(&sandbox), Opts::default());
        let accepted = Arc::new(AtomicUsize::new(0));
        let accepted_ids = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for t in 0..3 {
            let mut reader = if t == 2 { d.tcp() } else { d.unix() };
            let mut writer = reader.try_clone();
            let (tx, rx) = mpsc::channel::<Uuid>();
            handles.push(thread::spawn(move || {
                for i in 0.. {
                    let msg = log(LogLevel::Info, "term", &format!("{t}.{i}"));
                    let id = msg.id;
                    if writer.send(&msg).is_err() || tx.send(id).is_err() {
                        return;
                    }
                }
            }));
            let accepted = Arc::clone(&accepted);
            let ids = Arc::clone(&accepted_ids);
            handles.push(thread::spawn(move || loop {
                let answer = match reader.try_recv() {
                    Ok(Some(a)) => a,
                    Ok(None) | Err(_) => return,
                };
                let want = rx.recv().expect("an answer without a request");
                if let Payload::Acknowledgment { request_id, status } = &answer.payload {
                    assert_eq!(*request_id, want, "answers out of order");
                    if status == &AckStatus::Accepted {
                        ids.lock().unwrap().push(want);
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        assert!(
            wait_until(Duration::from_secs(60), || accepted.load(Ordering::Relaxed)
                >= 5000),
            "load never got going"
        );
        d.terminate();
        let status = d.wait_exit();
        assert!(status.success(), "exit status after SIGTERM: {status}");
        for h in handles {
            h.join().expect("client thread");
        }
        assert!(
            !sandbox.socket().exists(),
            "the socket file is removed on a clean stop"
        );
        let ids = accepted_ids.lock().unwrap();
        let db = sandbox.open_db();
        let stored = db.uuids();
        let lost = ids.iter().filter(|id| !stored.contains(id)).count();
        assert_eq!(lost, 0, "{lost} of {} accepted logs lost", ids.len());
        assert_eq!(db.integrity_check(), "ok");
        assert!(
            d.stderr().contains("stop") || d.stderr().contains("drain"),
            "the daemon says it stops"
        );
    }

    #[test]
    fn sigterm_with_idle_connections_exits_cleanly() {
        let mut d = Daemon::start_default();
        let mut idle = d.unix();
        let _idle_tcp = d.tcp();
        idle.ping();
        d.terminate();
        assert!(d.wait_exit().success());
        idle.expect_eof();
    }

    #[test]
    fn resent_log_entry_is_stored_once() {
        let d = Daemon::start_default();
        let msg = log(LogLevel::Info, "resend", "only once");
        let mut c = d.unix();
        for _ in 0..3 {
            c.expect_accepted(&msg);
        }
        drop(c);
        d.tcp().expect_accepted(&msg);
        let d = d.restart(Opts::default());
        d.unix().expect_accepted(&msg);
        // Same id, different content: still the first one stored.
        let mut changed = msg.clone();
        if let Payload::LogEntry(f) = &mut changed.payload {
            f.message = "changed".into();
        }
        d.unix().expect_accepted(&changed);
        let db = d.db();
        assert_eq!(db.count_uuid(msg.id), 1);
        assert_eq!(db.count_logs(), 1);
        assert_eq!(db.row(msg.id).unwrap().message, "only once");
    }

    #[test]
    fn resent_log_batch_is_stored_once() {
        let d = Daemon::start_default();
        let msg = batch(
            (0..4)
                .map(|i| fields(LogLevel::Warn, "resend", &format!("b{i}")))
                .collect(),
        );
        let mut c = d.unix();
        for _ in 0..3 {
            c.expect_accepted(&msg);
        }
        drop(c);
        d.unix().expect_accepted(&msg);
        let d = d.restart(Opts::default());
        d.tcp().expect_accepted(&msg);
        let db = d.db();
        assert_eq!(db.count_logs(), 4);
        for i in 0..4 {
            assert_eq!(db.count_uuid(batch_entry(msg.id, i)), 1, "entry {i}");
        }
    }

    #[test]
    fn sigint_stops_cleanly_too() {
        let sandbox = Sandbox::new();
        let mut d = Daemon::start(Arc::clone(&sandbox), Opts::default());
        let msg = log(LogLevel::Info, "int", "before SIGINT");
        d.unix().expect_accepted(&msg);
        d.signal(libc::SIGINT);
        assert!(d.wait_exit().success());
        assert!(!sandbox.socket().exists());
        assert_eq!(sandbox.open_db().count_uuid(msg.id), 1);
    }
}
