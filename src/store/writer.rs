//! The single writer thread: sole owner of the read-write connection,
//! committing whatever is queued as one transaction (group commit), and its
//! checkpointer companion.
//!
//! Group commit needs no timers: while a transaction commits, new jobs queue
//! up, and the next transaction takes them all. One fsync thus covers many
//! requests exactly when load is high.

use super::ops::{self, OpOutcome};
use super::{schema, StoreError, WriteJob, WriteOp};
use crate::budget::InflightBudget;
use crate::metrics::Metrics;
use crate::proto::{AckStatus, Message, Timestamp};
use crate::reply::{Completion, Replies};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rusqlite::{Connection, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Tuning of the writer and checkpointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterSettings {
    /// SQLite page cache of the writer connection, in MiB.
    pub cache_size_mb: u32,
    /// A transaction stops taking jobs once it holds this many log rows.
    pub batch_max_rows: usize,
    /// Capacity of the job queue (jobs, not rows).
    pub queue_capacity: usize,
    /// How often the checkpointer runs a PASSIVE checkpoint.
    pub checkpoint_interval: Duration,
    /// WAL size above which the checkpointer truncates the WAL.
    pub wal_truncate_bytes: u64,
}

impl Default for WriterSettings {
    fn default() -> Self {
        WriterSettings {
            cache_size_mb: 64,
            batch_max_rows: 20_000,
            queue_capacity: 65_536,
            checkpoint_interval: Duration::from_secs(1),
            wal_truncate_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The running writer thread, which owns the checkpointer thread.
#[derive(Debug)]
pub struct WriterHandle {
    writer: JoinHandle<()>,
}

impl WriterHandle {
    /// Waits for both threads. The writer exits once every job sender is
    /// dropped and the queue is drained; before that it stops and joins the
    /// checkpointer, then truncates the WAL.
    pub fn join(self) {
        if self.writer.join().is_err() {
            log::error!("the writer thread panicked");
        }
    }
}

/// Opens and migrates the database, then starts the writer thread
/// (`codi-writer`) and the checkpointer (`codi-checkpoint`).
///
/// Opening happens before any thread starts, so a bad path, a too-new schema
/// or an insecure directory is reported here. Send jobs on the returned
/// sender; drop every clone of it to stop the writer.
pub fn spawn_writer(
    db_path: &Path,
    settings: &WriterSettings,
    replies: Replies,
    metrics: Arc<Metrics>,
    budget: Arc<InflightBudget>,
) -> Result<(Sender<WriteJob>, WriterHandle), StoreError> {
    let conn = schema::open_rw(db_path, settings.cache_size_mb)?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    let checkpointer = Checkpointer {
        conn: open_checkpointer(db_path)?,
        wal_path: wal_path(db_path),
        interval: settings.checkpoint_interval,
        truncate_bytes: settings.wal_truncate_bytes,
        metrics: Arc::clone(&metrics),
    };
    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded(settings.queue_capacity.max(1));
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);

    let checkpointer = spawn_named("codi-checkpoint", move || checkpointer.run(stop_rx))?;
    let writer = Writer {
        checkpointer: Some((stop_tx, checkpointer)),
        conn,
        replies,
        metrics,
        budget,
        batch_max_rows: settings.batch_max_rows.max(1),
        jobs: Vec::new(),
        outcomes: Vec::new(),
        completions: Vec::new(),
    };
    // If this spawn fails, the checkpointer's stop sender is dropped with
    // the closure and the checkpointer exits on its own.
    let writer = spawn_named("codi-writer", move || writer.run(jobs_rx))?;
    Ok((jobs_tx, WriterHandle { writer }))
}

fn spawn_named<F: FnOnce() + Send + 'static>(
    name: &str,
    f: F,
) -> Result<JoinHandle<()>, StoreError> {
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(f)
        .map_err(|source| StoreError::Spawn {
            name: name.to_owned(),
            source,
        })
}

fn wal_path(db_path: &Path) -> PathBuf {
    let mut name = db_path.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

fn open_checkpointer(db_path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        db_path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| StoreError::Open {
        path: db_path.to_owned(),
        source,
    })?;
    conn.busy_timeout(schema::BUSY_TIMEOUT)?;
    Ok(conn)
}

/// Runs `PRAGMA wal_checkpoint(mode)`; true if it completed (not busy).
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<bool> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|busy| busy == 0)
}

struct Checkpointer {
    conn: Connection,
    wal_path: PathBuf,
    interval: Duration,
    truncate_bytes: u64,
    metrics: Arc<Metrics>,
}

impl Checkpointer {
    /// Checkpoints every interval until the writer drops its end of `stop`.
    fn run(self, stop: Receiver<()>) {
        while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(self.interval) {
            self.tick();
        }
    }

    /// One checkpoint: PASSIVE (never waits), or TRUNCATE when the WAL has
    /// grown past the limit (waits up to the busy timeout for readers).
    fn tick(&self) {
        let wal_len = std::fs::metadata(&self.wal_path).map_or(0, |m| m.len());
        let mode = if wal_len > self.truncate_bytes {
            "TRUNCATE"
        } else {
            "PASSIVE"
        };
        match checkpoint(&self.conn, mode) {
            Ok(_) => Metrics::add(&self.metrics.checkpoints, 1),
            Err(e) => log::warn!("{mode} checkpoint failed: {e}"),
        }
    }
}

/// The result of one job: its outcome, or the storage error that stopped it.
type JobResult = Result<OpOutcome, rusqlite::Error>;

/// Counts of one [`write_batch`] call.
#[derive(Debug, Default, PartialEq, Eq)]
struct BatchStats {
    commits: u64,
    commit_errors: u64,
}

/// Applies `ops` in one IMMEDIATE transaction, pushing one result per op to
/// `out`. If that transaction fails, it is rolled back and every op is
/// retried in its own transaction, so one bad op cannot sink the others.
fn write_batch<'a>(
    conn: &mut Connection,
    ops: impl Iterator<Item = &'a WriteOp> + Clone,
    now_us: i64,
    out: &mut Vec<JobResult>,
) -> BatchStats {
    let start = out.len();
    let batch = (|| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for op in ops.clone() {
            out.push(Ok(ops::apply(&tx, op, now_us)?));
        }
        tx.commit()
    })();
    match batch {
        Ok(()) => BatchStats {
            commits: 1,
            commit_errors: 0,
        },
        Err(e) => {
            log::warn!("batch transaction failed ({e}); retrying its jobs one by one");
            out.truncate(start);
            let mut stats = BatchStats {
                commits: 0,
                commit_errors: 1,
            };
            for op in ops {
                let result = write_one(conn, op, now_us);
                match &result {
                    Ok(_) => stats.commits += 1,
                    Err(e) => {
                        stats.commit_errors += 1;
                        log::error!("write failed: {e}");
                    }
                }
                out.push(result);
            }
            stats
        }
    }
}

/// Applies one op in its own IMMEDIATE transaction.
fn write_one(conn: &mut Connection, op: &WriteOp, now_us: i64) -> JobResult {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let outcome = ops::apply(&tx, op, now_us)?;
    tx.commit()?;
    Ok(outcome)
}

struct Writer {
    conn: Connection,
    /// Dropping the sender stops the checkpointer thread.
    checkpointer: Option<(Sender<()>, JoinHandle<()>)>,
    replies: Replies,
    metrics: Arc<Metrics>,
    budget: Arc<InflightBudget>,
    batch_max_rows: usize,
    /// Buffers reused from batch to batch.
    jobs: Vec<WriteJob>,
    outcomes: Vec<JobResult>,
    completions: Vec<Completion>,
}

impl Writer {
    fn run(mut self, jobs: Receiver<WriteJob>) {
        while let Ok(first) = jobs.recv() {
            let mut rows = first.op.row_count();
            self.jobs.push(first);
            while rows < self.batch_max_rows {
                match jobs.try_recv() {
                    Ok(job) => {
                        rows += job.op.row_count();
                        self.jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
            self.commit_and_answer();
        }
        if let Some((stop, thread)) = self.checkpointer.take() {
            drop(stop);
            if thread.join().is_err() {
                log::error!("the checkpointer thread panicked");
            }
        }
        match checkpoint(&self.conn, "TRUNCATE") {
            Ok(true) => Metrics::add(&self.metrics.checkpoints, 1),
            Ok(false) => log::warn!("final WAL checkpoint was blocked by a reader"),
            Err(e) => log::error!("final WAL checkpoint failed: {e}"),
        }
    }

    /// Writes the queued jobs, then answers each and frees its budget.
    fn commit_and_answer(&mut self) {
        let now_us = Timestamp::now().as_micros();
        let stats = write_batch(
            &mut self.conn,
            self.jobs.iter().map(|j| &j.op),
            now_us,
            &mut self.outcomes,
        );
        let m = &*self.metrics;
        Metrics::add(&m.commits, stats.commits);
        Metrics::add(&m.commit_errors, stats.commit_errors);
        let mut cost = 0;
        for (job, outcome) in self.jobs.drain(..).zip(self.outcomes.drain(..)) {
            cost += job.cost;
            let status = match outcome {
                Ok(OpOutcome::Logs {
                    inserted,
                    duplicates,
                }) => {
                    Metrics::add(&m.logs_stored, inserted as u64);
                    Metrics::add(&m.logs_duplicate, duplicates as u64);
                    AckStatus::Accepted
                }
                Ok(OpOutcome::Done) => AckStatus::Accepted,
                Ok(OpOutcome::Rejected(reason)) => {
                    Metrics::add(&m.logs_rejected, job.op.row_count() as u64);
                    AckStatus::Rejected(reason)
                }
                Err(e) => {
                    Metrics::add(&m.logs_rejected, job.op.row_count() as u64);
                    AckStatus::Rejected(format!("storage error: {e}"))
                }
            };
            self.completions.push(Completion {
                to: job.reply,
                answer: Message::ack(job.request_id, status),
            });
        }
        self.replies.send_all(self.completions.drain(..));
        self.budget.release(cost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{LogLevel, Payload};
    use crate::reply::{self, ReplyTo};
    use crate::store::LogRow;
    use crossbeam_channel::Receiver;
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
                })
                .collect(),
        )
    }

    fn job(seq: u64, op: WriteOp, cost: usize) -> WriteJob {
        WriteJob {
            reply: reply_to(seq as usize % 2, seq),
            request_id: Uuid::from_u128(seq as u128 + 1000),
            op,
            cost,
        }
    }

    fn ack(c: &Completion) -> (Uuid, AckStatus) {
        match &c.answer.payload {
            Payload::Acknowledgment { request_id, status } => (*request_id, status.clone()),
            other => panic!("not an ack: {other:?}"),
        }
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
            },
            WriteOp::SessionStart {
                session_id: "s".into(),
                identity: "me".into(),
                agent_type: None,
                workspace: None,
                started_at_us: 1,
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
            got.push(loops[to.worker].rx.recv().unwrap());
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
        let wal = std::fs::metadata(wal_path(&path)).unwrap();
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
            },
            logs(&[Uuid::now_v7(), Uuid::now_v7()]),
        ];
        for (seq, op) in ops.into_iter().enumerate() {
            assert!(budget.try_acquire(10));
            tx.send(job(seq as u64 * 2, op, 10)).unwrap();
        }
        let mut got: Vec<_> = (0..3).map(|_| loops[0].rx.recv().unwrap()).collect();
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
        assert_eq!(ack(&loops[0].rx.recv().unwrap()).1, AckStatus::Accepted);
        drop(tx);
        handle.join();
        assert_eq!(count_logs(&path), 4);
        assert_eq!(budget.used(), 0);
        assert!(Metrics::get(&metrics.commit_errors) >= 1);
        assert_eq!(Metrics::get(&metrics.logs_stored), 4);
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
            },
            logs(&[Uuid::from_u128(2), Uuid::from_u128(1)]),
        ];
        let mut out = Vec::new();
        let stats = write_batch(&mut conn, ops.iter(), 7, &mut out);
        assert_eq!(
            stats,
            BatchStats {
                commits: 2,
                commit_errors: 2
            }
        );
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
        let stats = write_batch(&mut conn, ops[..1].iter(), 7, &mut out);
        assert_eq!(
            stats,
            BatchStats {
                commits: 1,
                commit_errors: 0
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
    fn checkpointer_truncates_a_large_wal_and_spares_a_small_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let mut conn = schema::open_rw(&path, 4).unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        write_one(&mut conn, &logs(&[Uuid::new_v4()]), 0).unwrap();
        let wal_len = || std::fs::metadata(wal_path(&path)).unwrap().len();
        let before = wal_len();
        assert!(before > 0);
        let metrics = Arc::new(Metrics::default());
        let checkpointer = |truncate_bytes| Checkpointer {
            conn: open_checkpointer(&path).unwrap(),
            wal_path: wal_path(&path),
            interval: Duration::from_secs(1),
            truncate_bytes,
            metrics: Arc::clone(&metrics),
        };
        checkpointer(before).tick();
        assert_eq!(wal_len(), before, "PASSIVE keeps the file");
        checkpointer(before - 1).tick();
        assert_eq!(wal_len(), 0, "TRUNCATE empties it");
        assert_eq!(Metrics::get(&metrics.checkpoints), 2);
        drop(conn);
        assert_eq!(count_logs(&path), 1);
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
}
