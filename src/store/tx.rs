//! The transaction machinery every write thread shares (the writer, the
//! merger, the salvager): a [`TxBody`] says what one transaction does,
//! [`write_batch`] runs a batch of ops through it (falling back to one
//! transaction per op when one op fails), the [`Acker`] answers each job
//! with its outcome and frees its budget, and [`spawn_named`] starts such
//! a thread.

use crate::budget::InflightBudget;
use crate::metrics::Metrics;
use crate::proto::{AckStatus, Message, Timestamp};
use crate::reply::{Completion, Replies};
use crate::store::ops::OpOutcome;
use crate::store::{StoreError, WriteJob, WriteOp};
use rusqlite::{Connection, Transaction, TransactionBehavior};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

/// The result of one job: its outcome, or the storage error that stopped it.
pub(in crate::store) type JobResult = Result<OpOutcome, rusqlite::Error>;

/// What one write transaction does: something first, then each op of the
/// batch, then bookkeeping once it has committed.
pub(in crate::store) trait TxBody {
    /// Runs before every transaction begins (and so before its snapshot of
    /// any attached file is taken).
    fn before(&mut self) {}
    /// Runs at the start of every transaction.
    fn begin(&mut self, tx: &Transaction) -> rusqlite::Result<()>;
    /// Applies one op.
    fn apply(&mut self, tx: &Transaction, op: &WriteOp, now_us: i64) -> JobResult;
    /// Called after a transaction committed.
    fn committed(&mut self);
}

/// Counts of one [`write_batch`] call.
#[derive(Debug, Default, PartialEq, Eq)]
pub(in crate::store) struct BatchStats {
    pub(in crate::store) commits: u64,
    pub(in crate::store) commit_errors: u64,
    /// The last error, when a transaction failed.
    pub(in crate::store) failure: Option<String>,
    /// Nothing committed because another connection held a lock past the
    /// busy timeout: time spent waiting, not progress.
    pub(in crate::store) blocked: bool,
}

impl BatchStats {
    /// Whether the call got anywhere: a transaction committed, or failed
    /// for a reason of its own (a full disk, a bad row) rather than by
    /// waiting for someone else's lock.
    pub(in crate::store) fn progressed(&self) -> bool {
        self.commits > 0 || !self.blocked
    }
}

/// True when `e` means the transaction waited out another connection's
/// lock.
fn waited_for_lock(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(e.sqlite_error_code(), Some(DatabaseBusy | DatabaseLocked))
}

/// True when `e` is about the database as a whole (full disk, I/O error,
/// read-only or corrupt file, lock timeout, out of memory) rather than about
/// one row: retrying the batch's jobs one by one would only fail each again.
fn fails_every_job(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        e.sqlite_error_code(),
        Some(
            DiskFull
                | SystemIoFailure
                | ReadOnly
                | DatabaseCorrupt
                | NotADatabase
                | DatabaseBusy
                | DatabaseLocked
                | OutOfMemory
                | CannotOpen
                | PermissionDenied
                | FileLockingProtocolFailed
        )
    )
}

/// Applies `ops` in one IMMEDIATE transaction, pushing one result per op to
/// `out`. If that transaction fails because of one op (a constraint, a
/// value too big), it is rolled back and every op is retried in its own
/// transaction, so one bad op cannot sink the others; if it fails because
/// of the database as a whole ([`fails_every_job`]), every op fails at once
/// with that error, without a retry per op.
pub(in crate::store) fn write_batch<'a, B: TxBody>(
    conn: &mut Connection,
    ops: impl Iterator<Item = &'a WriteOp> + Clone,
    now_us: i64,
    body: &mut B,
    out: &mut Vec<JobResult>,
) -> BatchStats {
    let start = out.len();
    let batch = (|| {
        body.before();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        body.begin(&tx)?;
        for op in ops.clone() {
            let outcome = body.apply(&tx, op, now_us)?;
            out.push(Ok(outcome));
        }
        tx.commit()
    })();
    match batch {
        Ok(()) => {
            body.committed();
            BatchStats {
                commits: 1,
                commit_errors: 0,
                failure: None,
                blocked: false,
            }
        }
        Err(e) if fails_every_job(&e) => {
            crate::store::recovery::corruption_seen(&e, "a write transaction");
            out.truncate(start);
            let jobs = ops.count();
            log::error!("a write transaction of {jobs} jobs failed: {e}; all are rejected");
            let reason = format!("storage error: {e}");
            out.extend((0..jobs).map(|_| Ok(OpOutcome::Rejected(reason.clone()))));
            BatchStats {
                commits: 0,
                commit_errors: 1,
                failure: Some(e.to_string()),
                blocked: waited_for_lock(&e),
            }
        }
        Err(e) => {
            log::warn!("batch transaction failed ({e}); retrying its jobs one by one");
            out.truncate(start);
            let mut stats = BatchStats {
                commits: 0,
                commit_errors: 1,
                failure: None,
                blocked: false,
            };
            for op in ops {
                let result = write_one(conn, op, now_us, body);
                match &result {
                    Ok(_) => stats.commits += 1,
                    Err(e) => {
                        stats.commit_errors += 1;
                        log::error!("write failed: {e}");
                        stats.failure = Some(e.to_string());
                        stats.blocked = waited_for_lock(e);
                    }
                }
                out.push(result);
            }
            stats
        }
    }
}

/// Applies one op in its own IMMEDIATE transaction.
fn write_one<B: TxBody>(
    conn: &mut Connection,
    op: &WriteOp,
    now_us: i64,
    body: &mut B,
) -> JobResult {
    body.before();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    body.begin(&tx)?;
    let outcome = body.apply(&tx, op, now_us)?;
    tx.commit()?;
    body.committed();
    Ok(outcome)
}

/// The answering side of a write thread: where acknowledgments go, what
/// they count and free, and buffers reused from batch to batch.
pub(in crate::store) struct Acker {
    pub(in crate::store) replies: Replies,
    pub(in crate::store) metrics: Arc<Metrics>,
    pub(in crate::store) budget: Arc<InflightBudget>,
    /// Jobs of the next batch.
    pub(in crate::store) jobs: Vec<WriteJob>,
    pub(in crate::store) outcomes: Vec<JobResult>,
    completions: Vec<Completion>,
}

impl Acker {
    pub(in crate::store) fn new(
        replies: Replies,
        metrics: Arc<Metrics>,
        budget: Arc<InflightBudget>,
    ) -> Self {
        Acker {
            replies,
            metrics,
            budget,
            jobs: Vec::new(),
            outcomes: Vec::new(),
            completions: Vec::new(),
        }
    }

    /// Writes the queued jobs through `body` ([`write_batch`]), then answers
    /// each and frees its budget; returns whether that was progress
    /// ([`BatchStats::progressed`]).
    pub(in crate::store) fn commit_and_answer<B: TxBody>(
        &mut self,
        conn: &mut Connection,
        body: &mut B,
    ) -> bool {
        let now_us = Timestamp::now().as_micros();
        let stats = write_batch(
            conn,
            self.jobs.iter().map(|j| &j.op),
            now_us,
            body,
            &mut self.outcomes,
        );
        Metrics::add(&self.metrics.commits, stats.commits);
        Metrics::add(&self.metrics.commit_errors, stats.commit_errors);
        match &stats.failure {
            Some(e) => self
                .metrics
                .health
                .fail("writer", format!("write transactions fail: {e}")),
            None if stats.commits > 0 => {
                self.metrics.health.recover("writer");
            }
            None => {}
        }
        self.answer();
        stats.progressed()
    }

    /// Answers each queued job with its outcome (in order), counts them and
    /// frees their budget; empties both lists.
    pub(in crate::store) fn answer(&mut self) {
        let m = &*self.metrics;
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
                    Metrics::add(&m.logs_rejected_storage, job.op.row_count() as u64);
                    AckStatus::Rejected(reason)
                }
                Err(e) => {
                    Metrics::add(&m.logs_rejected_storage, job.op.row_count() as u64);
                    AckStatus::Rejected(format!("storage error: {e}"))
                }
            };
            self.completions.push(Completion {
                to: job.reply,
                answer: Message::ack(job.request_id, status).into(),
            });
        }
        self.replies.send_all(self.completions.drain(..));
        self.budget.release(cost);
    }

    /// Answers `job` with a rejection.
    pub(in crate::store) fn reject(&mut self, job: WriteJob, reason: &str) {
        self.jobs.push(job);
        self.outcomes
            .push(Ok(OpOutcome::Rejected(reason.to_owned())));
        self.answer();
    }
}

/// Starts a thread named `name` running `f`.
pub(in crate::store) fn spawn_named<F: FnOnce() + Send + 'static>(
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
