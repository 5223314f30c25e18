//! The single writer thread: sole owner of the read-write connection,
//! committing whatever is queued as one transaction (group commit), and its
//! checkpointer companion.
//!
//! Group commit needs no timers: while a transaction commits, new jobs queue
//! up, and the next transaction takes them all. One fsync thus covers many
//! requests exactly when load is high.

use super::ops::{self, OpOutcome};
use super::wal::{self, Checkpointer, WalPolicy, WalState, WalTrimmer};
use super::{schema, StoreError, WriteJob, WriteOp};
use crate::budget::InflightBudget;
use crate::metrics::Metrics;
use crate::proto::{AckStatus, Message, Timestamp};
use crate::reply::{Completion, Replies};
use crossbeam_channel::{Receiver, Sender};
use rusqlite::{Connection, TransactionBehavior};
use std::path::Path;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

/// Tuning of the writer and checkpointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterSettings {
    /// SQLite page cache of the writer connection, in MiB.
    pub cache_size_mb: u32,
    /// A transaction stops taking jobs once it holds this many log rows.
    pub batch_max_rows: usize,
    /// Capacity of the job queue (jobs, not rows).
    pub queue_capacity: usize,
    /// How the WAL is checkpointed and kept small (see [`super::wal`]).
    pub wal: WalPolicy,
}

impl Default for WriterSettings {
    fn default() -> Self {
        WriterSettings {
            cache_size_mb: 64,
            batch_max_rows: 20_000,
            queue_capacity: 65_536,
            wal: WalPolicy::default(),
        }
    }
}

/// How long the final checkpoint at shutdown waits for another connection's
/// lock before leaving the WAL for the next start.
const FINAL_CHECKPOINT_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

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
    wal::configure_writer(&conn, &settings.wal)?;
    let wal_state = Arc::new(WalState::default());
    let trimmer = WalTrimmer::new(&conn, settings.wal, Arc::clone(&wal_state))?;
    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded(settings.queue_capacity.max(1));
    let checkpointer = Checkpointer::spawn(db_path, settings.wal, wal_state, Arc::clone(&metrics))?;
    let writer = Writer {
        checkpointer: Some(checkpointer),
        trimmer,
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
    let writer = spawn_named("codi-writer", move || {
        crate::sched::lower_current_thread_priority(crate::sched::WRITER_NICE);
        writer.run(jobs_rx)
    })?;
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
        ops::apply_all(&tx, ops.clone(), now_us, |outcome| out.push(Ok(outcome)))?;
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
    /// Stopped before the final checkpoint.
    checkpointer: Option<Checkpointer>,
    /// Restarts the WAL between batches when that is cheap.
    trimmer: WalTrimmer,
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
            if self.trimmer.after_commit(&self.conn).is_some() {
                Metrics::add(&self.metrics.checkpoints, 1);
            }
        }
        if let Some(checkpointer) = self.checkpointer.take() {
            checkpointer.stop();
        }
        // Everything is committed; the final truncate is a courtesy that must
        // not hold up the exit behind a standalone codi2's lock.
        if let Err(e) = self.conn.busy_timeout(FINAL_CHECKPOINT_LOCK_WAIT) {
            log::warn!("cannot shorten the busy timeout for the final checkpoint: {e}");
        }
        match wal::checkpoint(&self.conn, "TRUNCATE") {
            Ok(result) if !result.busy => Metrics::add(&self.metrics.checkpoints, 1),
            Ok(_) => log::warn!("final WAL checkpoint was blocked by a reader"),
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
