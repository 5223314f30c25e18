//! The writer thread's run loop: it takes whatever is queued as one batch,
//! sends session changes to the merger, writes log batches straight into
//! `logs` or into the ingest file, waits for a merger far behind, and at
//! exit lets the merger finish before emptying and truncating the ingest
//! file.

use super::group::{Batch, GroupCommit};
use super::IngestBody;
use crate::heartbeat::Pulse;
use crate::metrics::Metrics;
use crate::proto::Timestamp;
use crate::store::direct::{self, NotDirect};
use crate::store::merger::{MergerHandle, MergerMsg, MAX_UNMERGED_ROWS, MERGE_MIN_ROWS};
use crate::store::tx::Acker;
use crate::store::wal::{self, Checkpointer, WalTrimmer};
use crate::store::{WriteJob, WriteOp};
use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use rusqlite::Connection;
use std::time::{Duration, Instant};

/// How long the writer waits for a merger that makes no progress at all
/// before it stops waiting for it.
const MERGER_STALL: Duration = Duration::from_secs(5);

/// The writer thread's state: its connections, the merger and
/// checkpointer it owns, and the batch being written.
pub(super) struct Writer {
    /// Beats when a transaction ends; idle while nothing is queued.
    pub(super) pulse: Pulse,
    /// The ingest file's read-write connection, the only one in the
    /// daemon.
    pub(super) conn: Connection,
    /// `merged_through` when the merger was last woken for a batch that
    /// would have gone straight into `logs`: woken once per merge.
    pub(super) woke_merger_at: Option<i64>,
    /// Finished (after its final merge) before the final checkpoint.
    pub(super) merger: Option<MergerHandle>,
    /// Stopped before the final checkpoint.
    pub(super) checkpointer: Option<Checkpointer>,
    /// Restarts the WAL between batches when that is cheap.
    pub(super) trimmer: WalTrimmer,
    pub(super) body: IngestBody,
    /// The merged id at which the merger was found stalled: not waited for
    /// again until it moves.
    pub(super) merger_stalled_at: Option<i64>,
    pub(super) acker: Acker,
    pub(super) batch_max_rows: usize,
    /// Whether a small batch waits a moment for more rows.
    pub(super) group: GroupCommit,
}

impl Writer {
    pub(super) fn run(mut self, jobs: Receiver<WriteJob>) {
        while let Some((first, paused)) = self.next_job(&jobs) {
            self.pulse.working();
            let mut rows = first.op.row_count();
            self.take(first);
            rows = self.take_queued(&jobs, rows);
            Metrics::set(&self.metrics().writer_queue_depth, jobs.len() as u64);
            if self.acker.jobs.is_empty() {
                // Only session changes, handed to the merger: progress too.
                self.pulse.beat();
                continue;
            }
            let batch = Batch {
                rows,
                jobs: self.acker.jobs.len(),
                paused,
                full: rows >= self.batch_max_rows && !jobs.is_empty(),
            };
            let started = Instant::now();
            if self.commit_indexed() {
                self.group.committed(batch, Instant::now());
                self.metrics().record_commit(started.elapsed(), rows);
                continue;
            }
            self.wait_for_merger();
            // Delete merged rows a little faster than they arrive.
            self.body.delete_at_most(2 * rows + 1024);
            let started = Instant::now();
            if self.acker.commit_and_answer(&mut self.conn, &mut self.body) {
                self.pulse.beat();
            }
            self.group.committed(batch, Instant::now());
            self.metrics().record_commit(started.elapsed(), rows);
            if self.trimmer.after_commit(&self.conn).is_some() {
                Metrics::add(&self.metrics().checkpoints, 1);
            }
            if self.body.state.unmerged() >= MERGE_MIN_ROWS {
                self.send_to_merger(MergerMsg::Wake);
            }
        }
        if let Some(merger) = self.merger.take() {
            merger.finish();
        }
        self.delete_all_merged();
        // Everything is committed; the final truncate must not hold up the
        // exit behind a standalone codi2's lock.
        wal::final_truncate(
            &self.conn,
            self.checkpointer.take(),
            wal::FINAL_CHECKPOINT_LOCK_WAIT,
            "the ingest file",
            &self.acker.metrics,
            None,
        );
    }

    /// The first job of the next batch, after the group-commit pause while
    /// load is steady, and whether it paused; `None` once every sender is
    /// gone.
    fn next_job(&mut self, jobs: &Receiver<WriteJob>) -> Option<(WriteJob, bool)> {
        let pause = self.group.pause(jobs.len(), Instant::now());
        if !pause.is_zero() {
            std::thread::sleep(pause);
            match jobs.try_recv() {
                Ok(job) => return Some((job, true)),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {}
            }
        }
        if jobs.is_empty() {
            self.pulse.idle();
        }
        jobs.recv().ok().map(|job| (job, false))
    }

    /// Takes queued jobs into the batch, which holds `rows` log rows,
    /// until it holds [`Writer::batch_max_rows`] or the queue is empty;
    /// returns the rows it holds then.
    fn take_queued(&mut self, jobs: &Receiver<WriteJob>, mut rows: usize) -> usize {
        while rows < self.batch_max_rows {
            match jobs.try_recv() {
                Ok(job) => {
                    rows += job.op.row_count();
                    self.take(job);
                }
                Err(_) => break,
            }
        }
        rows
    }

    fn metrics(&self) -> &Metrics {
        &self.acker.metrics
    }

    /// Commits and answers the queued batch straight into `logs`, through
    /// the merger ([`direct::hand_over`]), when that costs less
    /// ([`direct::prefers_indexed`]) and no ingest row awaits merging;
    /// returns whether it did. Otherwise (or if the merger is busy or the
    /// write fails) the batch goes to the ingest file.
    fn commit_indexed(&mut self) -> bool {
        if !direct::prefers_indexed(&self.acker.jobs) {
            return false;
        }
        let (through, _) = self.body.state.merged_mark();
        if self.body.state.unmerged() > 0 {
            // So that a later batch like this one may go straight in.
            if self.woke_merger_at != Some(through) {
                self.woke_merger_at = Some(through);
                self.send_to_merger(MergerMsg::Wake);
            }
            return false;
        }
        let Some(merger) = &self.merger else {
            return false;
        };
        let jobs = std::mem::take(&mut self.acker.jobs);
        let now_us = Timestamp::now().as_micros();
        match direct::hand_over(&mut self.conn, &merger.tx, jobs, now_us) {
            Ok((jobs, outcomes)) => {
                self.pulse.beat();
                let metrics = &self.acker.metrics;
                Metrics::add(&metrics.commits, 1);
                Metrics::add(&metrics.indexed_commits, 1);
                self.acker.jobs = jobs;
                self.acker.outcomes = outcomes;
                self.acker.answer();
                true
            }
            Err((jobs, why)) => {
                match why {
                    NotDirect::Unmerged => {}
                    // Expected now and then (a retention pass, a sync
                    // write, another process's lock); anything else is news.
                    NotDirect::MergerBusy => {
                        log::debug!("a batch goes to the ingest file: the merger is busy")
                    }
                    NotDirect::Failed(e)
                        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) =>
                    {
                        log::debug!("a batch goes to the ingest file: the main database is busy")
                    }
                    NotDirect::Failed(e) => log::warn!(
                        "a batch goes to the ingest file: writing it into the indexed table \
                         failed: {e}"
                    ),
                    NotDirect::NoMerger => {
                        log::error!("the merger thread is gone; a batch goes to the ingest file")
                    }
                }
                self.acker.jobs = jobs;
                false
            }
        }
    }

    /// Keeps a log job for this batch; hands a session change to the merger,
    /// which owns the main database.
    fn take(&mut self, job: WriteJob) {
        match job.op {
            WriteOp::Logs(_) => self.acker.jobs.push(job),
            WriteOp::SessionStart { .. } | WriteOp::SessionEnd { .. } => {
                self.send_to_merger(MergerMsg::Job(job))
            }
        }
    }

    fn send_to_merger(&mut self, msg: MergerMsg) {
        let sent = match &self.merger {
            Some(merger) => merger.tx.send(msg).map_err(|e| e.into_inner()),
            None => Err(msg),
        };
        if let Err(MergerMsg::Job(job)) = sent {
            log::error!("the merger thread is gone; rejecting a session change");
            // Logs queued for this batch are not answered yet; keep them.
            let queued = std::mem::take(&mut self.acker.jobs);
            self.acker
                .reject(job, "storage error: the merger thread is gone");
            self.acker.jobs = queued;
        }
    }

    /// Waits while the merger is far behind, so that the ingest file (and
    /// what a query scans of it) stays bounded; the job queue then fills and
    /// the event loops stop reading, which slows clients down. A merger that
    /// makes no progress for [`MERGER_STALL`] (its database failing) is not
    /// waited for: logs keep being acknowledged into the ingest file.
    fn wait_for_merger(&mut self) {
        let Some(merger) = &self.merger else { return };
        let mut progress_at = Instant::now();
        let mut through = self.body.state.merged_through();
        if self.merger_stalled_at == Some(through) {
            return;
        }
        self.merger_stalled_at = None;
        while self.body.state.unmerged() > MAX_UNMERGED_ROWS {
            if merger.tx.send(MergerMsg::Wake).is_err() {
                return;
            }
            match merger.progress.recv_timeout(Duration::from_millis(100)) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = self.body.state.merged_through();
            if now > through {
                (through, progress_at) = (now, Instant::now());
                // Waiting for a merger that moves is progress too.
                self.pulse.beat();
            } else if progress_at.elapsed() >= MERGER_STALL {
                log::error!(
                    "the merger has moved no logs for {MERGER_STALL:?}; \
                     the ingest file grows past {MAX_UNMERGED_ROWS} rows until it does"
                );
                self.merger_stalled_at = Some(through);
                return;
            }
        }
    }

    /// After the final merge and the main database's final checkpoint:
    /// empties the ingest table of merged rows that checkpoint made
    /// durable (all of them, unless it was blocked).
    fn delete_all_merged(&mut self) {
        self.body.delete_all_durable(&mut self.conn);
    }
}
