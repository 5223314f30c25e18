use super::*;
use crate::budget::InflightBudget;
use crate::metrics::Metrics;
use crate::proto::{AckStatus, LogLevel, Payload};
use crate::reply::{self, Completion, Replies, ReplyTo};
use crate::store::direct::prefers_indexed;
use crate::store::ingest::PendingUuids;
use crate::store::ops::OpOutcome;
use crate::store::tx::{write_batch, BatchStats, JobResult, TxBody};
use crate::store::wal::WalPolicy;
use crate::store::watermarks::Watermarks;
use crate::store::{schema, LogRow, StoreError, WriteJob, WriteOp};
use crate::testing::recv;
use crossbeam_channel::{Receiver, Sender};
use rusqlite::{Connection, Transaction, TransactionBehavior};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

struct Loop {
    // Kept alive so the waker stays registered.
    _poll: mio::Poll,
    rx: Receiver<Completion>,
}

fn replies(loops: usize) -> (Replies, Vec<Loop>) {
    let mut sinks = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..loops {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let (sink, rx) = reply::channel(waker);
        sinks.push(sink);
        receivers.push(Loop { _poll: poll, rx });
    }
    (Replies::new(sinks), receivers)
}

fn reply_to(worker: usize, seq: u64) -> ReplyTo {
    ReplyTo {
        worker,
        token: 3,
        serial: 9,
        seq,
        query: false,
    }
}

fn logs(uuids: &[Uuid]) -> WriteOp {
    WriteOp::Logs(
        uuids
            .iter()
            .map(|&uuid| LogRow {
                uuid,
                timestamp_us: 5,
                level: LogLevel::Info,
                component: "c".into(),
                session_id: None,
                message: "m".into(),
                metadata_json: None,
                uid: None,
            })
            .collect(),
    )
}

/// `count` logs of session `session` with messages of `len` bytes.
fn session_logs(session: Option<&str>, count: usize, len: usize) -> Vec<LogRow> {
    (0..count)
        .map(|_| LogRow {
            uuid: Uuid::now_v7(),
            timestamp_us: 5,
            level: LogLevel::Info,
            component: "c".into(),
            session_id: session.map(str::to_owned),
            message: "m".repeat(len),
            metadata_json: None,
            uid: None,
        })
        .collect()
}

/// Far above [`DIRECT_LOCK_WAIT`], far below the writer's own lock wait.
///
/// [`DIRECT_LOCK_WAIT`]: crate::store::direct::DIRECT_LOCK_WAIT
const WRITER_TEST_WAIT: Duration = Duration::from_secs(20);

fn job(seq: u64, op: WriteOp, cost: usize) -> WriteJob {
    WriteJob {
        reply: reply_to(seq as usize % 2, seq),
        request_id: Uuid::from_u128(seq as u128 + 1000),
        op,
        cost,
    }
}

fn ack(c: &Completion) -> (Uuid, AckStatus) {
    match &c
        .answer
        .as_message()
        .expect("the writer answers messages")
        .payload
    {
        Payload::Acknowledgment { request_id, status } => (*request_id, status.clone()),
        other => panic!("not an ack: {other:?}"),
    }
}

/// Sends one job of cost 1 and waits for its answer.
fn send_and_wait(
    tx: &Sender<WriteJob>,
    loops: &[Loop],
    budget: &InflightBudget,
    seq: u64,
    op: WriteOp,
) -> AckStatus {
    assert!(budget.try_acquire(1));
    let j = job(seq, op, 1);
    let to = j.reply;
    tx.send(j).unwrap();
    ack(&recv(&loops[to.worker].rx, "writer completion")).1
}

fn count_logs(path: &Path) -> i64 {
    let conn = schema::open_ro(path).unwrap();
    conn.query_row("SELECT COUNT(*) FROM logs", [], |r| r.get(0))
        .unwrap()
}

fn start(
    path: &Path,
    settings: &WriterSettings,
) -> (
    Sender<WriteJob>,
    WriterHandle,
    Vec<Loop>,
    Arc<Metrics>,
    Arc<InflightBudget>,
) {
    let (replies, loops) = replies(2);
    let metrics = Arc::new(Metrics::default());
    let budget = Arc::new(InflightBudget::new(1 << 20));
    let (tx, handle) = spawn_writer(
        path,
        settings,
        replies,
        Arc::clone(&metrics),
        Arc::clone(&budget),
    )
    .unwrap();
    (tx, handle, loops, metrics, budget)
}

#[test]
fn end_to_end_acks_dedups_and_checkpoints_on_exit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    let settings = WriterSettings {
        batch_max_rows: 3,
        ..WriterSettings::default()
    };
    let (tx, handle, loops, metrics, budget) = start(&path, &settings);
    let a = Uuid::now_v7();
    let b = Uuid::now_v7();
    let mut sent = Vec::new();
    let ops = [
        logs(&[a, b]),
        logs(&[a]),
        logs(&[b, Uuid::now_v7()]),
        WriteOp::SessionEnd {
            session_id: "nope".into(),
            ended_at_us: 1,
            restricted_to: None,
        },
        WriteOp::SessionStart {
            session_id: "s".into(),
            identity: "me".into(),
            agent_type: None,
            workspace: None,
            started_at_us: 1,
            uid: None,
            restricted_to: None,
        },
    ];
    for (seq, op) in ops.into_iter().enumerate() {
        assert!(budget.try_acquire(100));
        let j = job(seq as u64, op, 100);
        sent.push((j.reply, j.request_id));
        tx.send(j).unwrap();
    }
    let mut got: Vec<Completion> = Vec::new();
    for (to, _) in &sent {
        got.push(recv(&loops[to.worker].rx, "writer completion"));
    }
    got.sort_by_key(|c| c.to.seq);
    for (c, (to, id)) in got.iter().zip(&sent) {
        assert_eq!(c.to, *to);
        assert_eq!(ack(c).0, *id);
    }
    let statuses: Vec<_> = got.iter().map(|c| ack(c).1).collect();
    assert_eq!(
        statuses,
        [
            AckStatus::Accepted,
            AckStatus::Accepted,
            AckStatus::Accepted,
            AckStatus::Rejected("unknown session `nope`".into()),
            AckStatus::Accepted,
        ]
    );
    // An idle connection stays open so that closing the writer's cannot
    // remove the WAL: only the writer's final checkpoint can empty it.
    let idle = schema::open_ro(&path).unwrap();
    drop(tx);
    handle.join();
    let wal = std::fs::metadata(path.with_extension("db-wal")).unwrap();
    assert_eq!(wal.len(), 0, "WAL truncated on exit");
    drop(idle);
    assert_eq!(budget.used(), 0, "every job's cost released");
    assert_eq!(count_logs(&path), 3);
    assert_eq!(Metrics::get(&metrics.logs_stored), 3);
    assert_eq!(Metrics::get(&metrics.logs_duplicate), 2);
    assert!(
        Metrics::get(&metrics.commits) >= 2,
        "batches bounded by rows"
    );
    assert_eq!(Metrics::get(&metrics.commit_errors), 0);
    assert!(Metrics::get(&metrics.checkpoints) >= 1);
}

#[test]
fn batches_whose_bytes_outweigh_their_sessions_go_straight_into_logs() {
    let jobs = |rows: Vec<LogRow>| vec![job(0, WriteOp::Logs(rows), 1)];
    let many_sessions: Vec<LogRow> = (0..500)
        .flat_map(|n| session_logs(Some(&format!("s{n}")), 1, 150))
        .collect();
    assert!(!prefers_indexed(&jobs(many_sessions)));
    assert!(!prefers_indexed(&jobs(session_logs(Some("s"), 1, 150))));
    assert!(prefers_indexed(&jobs(session_logs(Some("s"), 40, 150))));
    assert!(prefers_indexed(&jobs(session_logs(None, 4, 1024))));
    let mut two = session_logs(Some("a"), 4, 1024);
    two.extend(session_logs(Some("b"), 4, 1024));
    assert!(prefers_indexed(&jobs(two)), "8 KiB of rows, 2 sessions");
    assert!(!prefers_indexed(&[]));
}

#[test]
fn a_batch_from_one_session_is_in_logs_when_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    let (tx, handle, loops, metrics, budget) = start(&path, &WriterSettings::default());
    let send = |seq: u64, op: WriteOp| send_and_wait(&tx, &loops, &budget, seq, op);
    let rows = session_logs(Some("s"), 64, 200);
    assert_eq!(send(0, WriteOp::Logs(rows.clone())), AckStatus::Accepted);
    let ingest_rows: i64 = schema::open_ingest_rw(&path, 1)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM ingest_logs", [], |r| r.get(0))
        .unwrap();
    assert_eq!((count_logs(&path), ingest_rows), (64, 0));
    assert_eq!(Metrics::get(&metrics.indexed_commits), 1);
    assert_eq!(Metrics::get(&metrics.logs_merged), 0);

    // A resend through the ingest file is found in `logs`, and one
    // straight into `logs` too.
    assert_eq!(send(1, logs(&[rows[0].uuid])), AckStatus::Accepted);
    assert_eq!(send(2, WriteOp::Logs(rows)), AckStatus::Accepted);
    assert_eq!(Metrics::get(&metrics.logs_duplicate), 65);
    assert_eq!(send(3, logs(&[Uuid::now_v7()])), AckStatus::Accepted);
    drop(tx);
    handle.join();
    assert_eq!(count_logs(&path), 65);
    assert_eq!(Metrics::get(&metrics.logs_stored), 65);
}

#[test]
fn a_batch_finding_the_main_database_locked_goes_to_the_ingest_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    let (tx, handle, loops, metrics, budget) = start(&path, &WriterSettings::default());
    let mut other = schema::open_rw(&path, 1).unwrap();
    let lock = other
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap();
    let started = Instant::now();
    let rows = session_logs(Some("s"), 64, 200);
    assert_eq!(
        send_and_wait(&tx, &loops, &budget, 0, WriteOp::Logs(rows)),
        AckStatus::Accepted
    );
    assert!(
        started.elapsed() < WRITER_TEST_WAIT,
        "the batch did not wait for the lock's holder"
    );
    assert_eq!(Metrics::get(&metrics.indexed_commits), 0);
    assert_eq!(Metrics::get(&metrics.logs_stored), 64);
    drop(lock);
    drop(tx);
    handle.join();
    assert_eq!(count_logs(&path), 64, "merged once the lock was free");
}

#[test]
fn batches_straight_into_logs_keep_the_main_wal_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    let settings = WriterSettings {
        wal: WalPolicy {
            interval: Duration::from_millis(5),
            restart_bytes: 1 << 20,
            hard_limit_bytes: 4 << 20,
        },
        ..WriterSettings::default()
    };
    let (tx, handle, loops, metrics, budget) = start(&path, &settings);
    let mut largest_wal = 0;
    for seq in 0..800 {
        let rows = session_logs(Some("s"), 64, 1024);
        send_and_wait(&tx, &loops, &budget, seq, WriteOp::Logs(rows));
        let wal = std::fs::metadata(path.with_extension("db-wal")).map_or(0, |m| m.len());
        largest_wal = largest_wal.max(wal);
    }
    assert_eq!(Metrics::get(&metrics.indexed_commits), 800);
    // Bounded by the policy's hard limit plus what commits add before
    // the checkpointer (a low-priority thread, late on a busy machine)
    // reports the WAL's size: about 3 MB here, but once 32 MB in CI
    // with half as much data and a 20 ms interval. Unbounded, 52 MB of
    // rows make a WAL of over 100 MB.
    assert!(
        largest_wal < 64 << 20,
        "52 MB of rows grew the WAL to {largest_wal} bytes"
    );
    drop(tx);
    handle.join();
    assert_eq!(count_logs(&path), 800 * 64);
}

#[test]
fn logs_a_standalone_codi2_wrote_meanwhile_are_not_stored_twice() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    let (tx, handle, loops, metrics, budget) = start(&path, &WriterSettings::default());
    let send = |seq: u64, op: WriteOp| send_and_wait(&tx, &loops, &budget, seq, op);
    let first = Uuid::now_v7();
    assert_eq!(send(0, logs(&[first])), AckStatus::Accepted);
    // Another process writes into the ingest file behind the writer's
    // back (codi2 when the daemon did not answer in time).
    let theirs = Uuid::now_v7();
    let mut standalone = crate::store::standalone::StandaloneStore::open(&path).unwrap();
    standalone.apply(&logs(&[theirs])).unwrap();
    // Resent to the daemon: recognised, not stored again.
    assert_eq!(send(1, logs(&[theirs, first])), AckStatus::Accepted);
    assert_eq!(send(2, logs(&[Uuid::now_v7()])), AckStatus::Accepted);
    drop(tx);
    handle.join();
    assert_eq!(count_logs(&path), 3);
    assert_eq!(Metrics::get(&metrics.logs_duplicate), 2);
}

#[test]
fn logs_are_refused_with_a_reason_once_the_ingest_file_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    drop(schema::open_rw(&path, 4).unwrap());
    let mut conn = schema::open_ingest_rw(&path, 4).unwrap();
    let mut body = IngestBody::new(
        Arc::new(Watermarks::new(0, 0, Uuid::nil())),
        PendingUuids::default(),
        0,
        2,
    );
    let ops = [
        logs(&[Uuid::now_v7(), Uuid::now_v7()]),
        logs(&[Uuid::now_v7()]),
    ];
    let mut out = Vec::new();
    write_batch(&mut conn, ops.iter(), 1, &mut body, &mut out);
    assert_eq!(
        out[0].as_ref().unwrap(),
        &OpOutcome::Logs {
            inserted: 2,
            duplicates: 0
        }
    );
    match out[1].as_ref().unwrap() {
        OpOutcome::Rejected(reason) => {
            assert!(reason.contains("not keeping up"), "{reason}")
        }
        other => panic!("not refused: {other:?}"),
    }
    let stored: i64 = conn
        .query_row("SELECT count(*) FROM ingest_logs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stored, 2);
}

#[test]
fn writer_keeps_answering_after_a_failing_job() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    let (tx, handle, loops, metrics, budget) = start(&path, &WriterSettings::default());
    // Break session writes behind the writer's back; log writes still work.
    Connection::open(&path)
        .unwrap()
        .execute_batch("DROP TABLE sessions")
        .unwrap();
    let ops = [
        logs(&[Uuid::now_v7()]),
        WriteOp::SessionStart {
            session_id: "s".into(),
            identity: "me".into(),
            agent_type: None,
            workspace: None,
            started_at_us: 1,
            uid: None,
            restricted_to: None,
        },
        logs(&[Uuid::now_v7(), Uuid::now_v7()]),
    ];
    for (seq, op) in ops.into_iter().enumerate() {
        assert!(budget.try_acquire(10));
        tx.send(job(seq as u64 * 2, op, 10)).unwrap();
    }
    let mut got: Vec<_> = (0..3)
        .map(|_| recv(&loops[0].rx, "writer completion"))
        .collect();
    got.sort_by_key(|c| c.to.seq);
    let statuses: Vec<_> = got.iter().map(|c| ack(c).1).collect();
    assert_eq!(statuses[0], AckStatus::Accepted);
    assert!(
        matches!(&statuses[1], AckStatus::Rejected(r) if r.starts_with("storage error: ") && r.contains("sessions")),
        "{:?}",
        statuses[1]
    );
    assert_eq!(statuses[2], AckStatus::Accepted);
    // And it goes on serving later jobs.
    tx.send(job(8, logs(&[Uuid::now_v7()]), 0)).unwrap();
    assert_eq!(
        ack(&recv(&loops[0].rx, "writer completion")).1,
        AckStatus::Accepted
    );
    drop(tx);
    handle.join();
    assert_eq!(count_logs(&path), 4);
    assert_eq!(budget.used(), 0);
    assert!(Metrics::get(&metrics.commit_errors) >= 1);
    assert_eq!(Metrics::get(&metrics.logs_stored), 4);
}

/// Every op straight into the main database.
struct DirectBody;

impl TxBody for DirectBody {
    fn begin(&mut self, _tx: &Transaction) -> rusqlite::Result<()> {
        Ok(())
    }

    fn apply(&mut self, tx: &Transaction, op: &WriteOp, now_us: i64) -> JobResult {
        crate::store::ops::apply(tx, op, now_us)
    }

    fn committed(&mut self) {}
}

#[test]
fn a_whole_database_failure_rejects_the_batch_once_without_retries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    let mut conn = schema::open_rw(&path, 4).unwrap();
    conn.execute_batch("PRAGMA query_only = 1").unwrap();
    let ops: Vec<WriteOp> = (1..=50).map(|i| logs(&[Uuid::from_u128(i)])).collect();
    let mut out = Vec::new();
    let stats = write_batch(&mut conn, ops.iter(), 7, &mut DirectBody, &mut out);
    assert_eq!(
        (stats.commits, stats.commit_errors),
        (0, 1),
        "one failure, no retries"
    );
    assert!(stats.failure.is_some());
    assert_eq!(out.len(), 50);
    for outcome in &out {
        match outcome {
            Ok(OpOutcome::Rejected(reason)) => {
                assert!(reason.starts_with("storage error: "), "{reason}")
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }
    // Failing on its own (here: read-only) is no reason to restart
    // the daemon: the watchdog sees progress.
    assert!(!stats.blocked && stats.progressed());
}

#[test]
fn a_batch_that_waits_out_another_connections_lock_is_no_progress() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    let mut conn = schema::open_rw(&path, 4).unwrap();
    conn.busy_timeout(Duration::from_millis(50)).unwrap();
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let ops = [logs(&[Uuid::from_u128(1)])];
    let mut out = Vec::new();
    let stats = write_batch(&mut conn, ops.iter(), 7, &mut DirectBody, &mut out);
    assert_eq!((stats.commits, stats.blocked), (0, true), "{stats:?}");
    assert!(!stats.progressed());

    other.execute_batch("ROLLBACK").unwrap();
    let mut out = Vec::new();
    let stats = write_batch(&mut conn, ops.iter(), 7, &mut DirectBody, &mut out);
    assert_eq!((stats.commits, stats.blocked), (1, false), "{stats:?}");
    assert!(stats.progressed());
}

#[test]
fn batch_falls_back_to_one_transaction_per_job() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    let mut conn = schema::open_rw(&path, 4).unwrap();
    conn.execute_batch("DROP TABLE sessions").unwrap();
    let ops = [
        logs(&[Uuid::from_u128(1)]),
        WriteOp::SessionEnd {
            session_id: "s".into(),
            ended_at_us: 1,
            restricted_to: None,
        },
        logs(&[Uuid::from_u128(2), Uuid::from_u128(1)]),
    ];
    let mut out = Vec::new();
    let stats = write_batch(&mut conn, ops.iter(), 7, &mut DirectBody, &mut out);
    assert_eq!((stats.commits, stats.commit_errors), (2, 2));
    assert!(stats.failure.unwrap().contains("sessions"));
    assert_eq!(out.len(), 3);
    assert_eq!(
        out[0].as_ref().unwrap(),
        &OpOutcome::Logs {
            inserted: 1,
            duplicates: 0
        }
    );
    assert!(out[1].is_err());
    assert_eq!(
        out[2].as_ref().unwrap(),
        &OpOutcome::Logs {
            inserted: 1,
            duplicates: 1
        }
    );

    // A healthy batch is one transaction.
    let mut out = Vec::new();
    let stats = write_batch(&mut conn, ops[..1].iter(), 7, &mut DirectBody, &mut out);
    assert_eq!(
        stats,
        BatchStats {
            commits: 1,
            commit_errors: 0,
            failure: None,
            blocked: false,
        }
    );
    assert_eq!(
        out[0].as_ref().unwrap(),
        &OpOutcome::Logs {
            inserted: 0,
            duplicates: 1
        }
    );
}

#[test]
fn open_errors_surface_before_any_thread_starts() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let (replies, _loops) = replies(1);
    let err = spawn_writer(
        &file.join("w.db"),
        &WriterSettings::default(),
        replies,
        Arc::new(Metrics::default()),
        Arc::new(InflightBudget::new(1)),
    )
    .unwrap_err();
    assert!(matches!(err, StoreError::NotADirectory(_)), "{err}");
}

/// Sends `jobs` one-row jobs on a schedule of one every 200 µs (a sender
/// that falls behind sends the jobs it owes at once) and waits for every
/// answer; returns the commits the writer made for them.
fn commits_for_a_steady_stream(commit_delay: Duration, jobs: u64) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    let settings = WriterSettings {
        commit_delay,
        ..WriterSettings::default()
    };
    let (tx, handle, loops, metrics, budget) = start(&path, &settings);
    let start = Instant::now();
    for seq in 0..jobs {
        let due = start + Duration::from_micros(200) * seq as u32;
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        assert!(budget.try_acquire(1));
        tx.send(job(seq, logs(&[Uuid::now_v7()]), 1)).unwrap();
    }
    for seq in 0..jobs {
        let answer = recv(&loops[seq as usize % 2].rx, "writer completion");
        assert_eq!(ack(&answer).1, AckStatus::Accepted);
    }
    let commits = metrics.commits.load(std::sync::atomic::Ordering::Relaxed);
    drop(tx);
    handle.join();
    assert_eq!(count_logs(&path), jobs as i64);
    commits
}

#[test]
fn a_steady_stream_of_small_jobs_shares_commits() {
    let jobs = 400;
    let paused = commits_for_a_steady_stream(Duration::from_millis(2), jobs);
    let unpaused = commits_for_a_steady_stream(Duration::ZERO, jobs);
    // 2 ms at one job per 200 µs gathers about ten jobs per commit; the
    // first commits, before load counts as steady, take one each. Without
    // the pause a commit takes only what queued while the last one ran.
    assert!(
        paused * 3 <= jobs,
        "{paused} commits for {jobs} jobs arriving every 200 µs"
    );
    assert!(
        unpaused >= 2 * paused,
        "{unpaused} commits without the pause against {paused} with it"
    );
}
