//! The merger thread: sole owner of the main database's read-write
//! connection. It moves committed logs from the ingest file into the
//! indexed `logs` table in large id-ordered chunks (see [`super::ingest`]
//! for why), applies session changes, and runs the main database's WAL
//! policy, and between merges runs retention and session expiry (see
//! [`super::retention`]). It also commits the batches the writer hands it
//! to write straight into `logs` ([`super::direct`]), which are only sent
//! while nothing awaits merging, and the writes of the threads that only
//! read the main database (hub sync, the export watcher: [`MainWrite`]).
//! It never holds the ingest file's write lock, so a long merge cannot
//! delay an acknowledgment of the ingest file.

use super::direct::{self, DirectBatch};
use super::ingest::{self, Merged};
use super::retention::Retention;
use super::tx::{spawn_named, Acker, JobResult, TxBody};
use super::wal::{self, Checkpointer, WalPolicy, WalState, WalTrimmer, FINAL_CHECKPOINT_LOCK_WAIT};
use super::watermarks::Watermarks;
use super::{ops, StoreError, WriteJob, WriteOp};
use crate::metrics::Metrics;
use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use rusqlite::{Connection, Transaction, TransactionBehavior};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Unmerged rows from which a merge starts at once rather than on the next
/// tick: a thousand sessions then have about 16 rows each per chunk.
pub const MERGE_MIN_ROWS: i64 = 16_384;
/// Most rows one merge transaction moves, so that session changes (which
/// this thread also applies) wait for at most one chunk.
pub const MERGE_MAX_ROWS: usize = 32_768;
/// A merge runs at least this often while there is anything to merge, so
/// queries scan few ingest rows and rows that `codi2` wrote standalone are
/// picked up.
pub const MERGE_INTERVAL: Duration = Duration::from_millis(200);
/// Unmerged rows from which the ingest writer waits for the merger before
/// committing more: bounds the ingest file and the rows a query scans
/// without an index when clients outpace the indexed table.
pub const MAX_UNMERGED_ROWS: i64 = 262_144;

/// What the ingest writer sends the merger.
#[derive(Debug)]
pub enum MergerMsg {
    /// A session change to apply and answer.
    Job(WriteJob),
    /// Enough rows are waiting: merge now.
    Wake,
    /// A batch to commit straight into `logs`, while the writer holds the
    /// ingest file's write lock ([`super::direct`]).
    Direct(DirectBatch),
}

/// A salvage step ([`super::recovery`]) for the merger to apply, and
/// where to say how it went (the rows inserted, or the error).
pub type SalvageRequest = (super::recovery::SalvageStep, Sender<Result<usize, String>>);

/// A write to the main database for the merger to make between merges, on
/// behalf of a thread that only reads that database: hub sync's state
/// (`sync_state`, `hub_changes`) and the export watcher's rows and watches
/// (`export_archive`, `monitored_paths`). The main database keeps one
/// read-write owner, and those threads never wait in SQLite's busy handler
/// behind a merger that frees its lock only for an instant between
/// transactions (up to a second per write at 100,000 logs/s).
pub struct MainWrite {
    /// Commit with `synchronous = FULL`: the commit syncs the WAL, and
    /// with it every earlier commit (the rows a batch was read from).
    pub durable: bool,
    /// The statements, in one transaction.
    pub apply: MainStatements,
}

/// The statements of a [`MainWrite`].
pub type MainStatements = Box<dyn FnOnce(&Transaction) -> rusqlite::Result<()> + Send>;

impl std::fmt::Debug for MainWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("MainWrite")
            .field("durable", &self.durable)
            .finish_non_exhaustive()
    }
}

/// Runs `write` on `conn` in one transaction, committed at `synchronous =
/// FULL` when it is durable (the connection's own setting is put back
/// afterwards, whatever happened).
fn apply_main_write(conn: &mut Connection, write: MainWrite) -> rusqlite::Result<()> {
    let MainWrite { durable, apply } = write;
    let normal: i64 = conn.pragma_query_value(None, "synchronous", |r| r.get(0))?;
    if durable {
        conn.pragma_update(None, "synchronous", "FULL")?;
    }
    let done = conn
        .transaction()
        .and_then(|tx| apply(&tx).and_then(|()| tx.commit()));
    if durable {
        if let Err(e) = conn.pragma_update(None, "synchronous", normal) {
            log::error!("the merger cannot set synchronous back to {normal}: {e}");
        }
    }
    done
}

/// A [`MainWriteRequest`] nobody has taken up yet.
const PENDING: u8 = 0;
/// The merger took the request up: it is being (or has been) made.
const TAKEN: u8 = 1;
/// Its sender stopped waiting first: it is never made.
const WITHDRAWN: u8 = 2;

/// A [`MainWrite`] on its way to the merger, and where to say how it went
/// (sent by [`MainWriteLink::write`]).
pub struct MainWriteRequest {
    write: MainWrite,
    answer: Sender<Result<(), String>>,
    /// [`PENDING`], then [`TAKEN`] by the merger or [`WITHDRAWN`] by the
    /// sender, whichever comes first.
    state: Arc<AtomicU8>,
}

impl MainWriteRequest {
    /// The write and where its answer goes, for the merger to make; `None`
    /// when its sender has stopped waiting, and then it is never made.
    fn take(self) -> Option<(MainWrite, Sender<Result<(), String>>)> {
        self.state
            .compare_exchange(PENDING, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        Some((self.write, self.answer))
    }
}

impl std::fmt::Debug for MainWriteRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("MainWriteRequest")
            .field("write", &self.write)
            .finish_non_exhaustive()
    }
}

/// Why a [`MainWrite`] was not made, or may not have been.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MainWriteError {
    /// The merger is gone (the daemon is stopping, or it failed): nothing
    /// was written.
    #[error("the merger has stopped, so nothing was written")]
    Stopped,
    /// The merger did not take the write up within the wait; it was
    /// withdrawn and is never made.
    #[error("the merger did not take the write up within {0:?}; it was withdrawn unwritten")]
    Withdrawn(Duration),
    /// The merger took the write up but did not answer within a second
    /// wait: it may still be committed.
    #[error("the merger took the write up but did not answer within {0:?} more; it may still be committed")]
    Unanswered(Duration),
    /// The database refused it: the transaction was rolled back.
    #[error("the database refused the write: {0}")]
    Refused(String),
}

impl MainWriteError {
    /// Whether the write may still be committed after this error: only
    /// when the merger took it up and has not answered
    /// ([`Unanswered`](Self::Unanswered)).
    pub fn may_still_commit(&self) -> bool {
        matches!(self, MainWriteError::Unanswered(_))
    }
}

/// Drops the writes still queued on `rx`, unmade (their senders hear
/// `Stopped` at once, not at the end of their wait), and then `rx`, so
/// that a later write cannot be sent. One sent between the two waits out
/// its wait and is withdrawn.
fn refuse_queued(rx: Receiver<MainWriteRequest>) {
    while let Ok(request) = rx.try_recv() {
        drop(request);
    }
    drop(rx);
}

/// Where a thread that only reads the main database sends its writes: to
/// the merger, the database's one read-write owner, which makes them
/// between merges. Each such thread has its own clone (see
/// [`WriterHandle::main_write_link`](super::writer::WriterHandle::main_write_link)).
#[derive(Debug, Clone)]
pub struct MainWriteLink {
    tx: Sender<MainWriteRequest>,
}

impl MainWriteLink {
    /// The link that sends on `tx`, the channel the merger polls.
    pub(super) fn new(tx: Sender<MainWriteRequest>) -> Self {
        MainWriteLink { tx }
    }

    /// Has the merger run `apply` in one transaction, committed at
    /// `synchronous = FULL` if `durable`, and waits for the outcome: at
    /// most `wait` for the merger to take it up (else it is withdrawn and
    /// never made), then at most `wait` again for the merger's answer.
    pub fn write(
        &self,
        durable: bool,
        wait: Duration,
        apply: impl FnOnce(&Transaction) -> rusqlite::Result<()> + Send + 'static,
    ) -> Result<(), MainWriteError> {
        let state = Arc::new(AtomicU8::new(PENDING));
        let (answer, answered) = crossbeam_channel::bounded(1);
        let request = MainWriteRequest {
            write: MainWrite {
                durable,
                apply: Box::new(apply),
            },
            answer,
            state: Arc::clone(&state),
        };
        // A wait too long for an `Instant` is no wait limit at all.
        let deadline = Instant::now().checked_add(wait);
        let sent = match deadline {
            Some(deadline) => self.tx.send_deadline(request, deadline),
            None => self
                .tx
                .send(request)
                .map_err(|e| SendTimeoutError::Disconnected(e.0)),
        };
        match sent {
            Ok(()) => {}
            // Never queued, so never made.
            Err(SendTimeoutError::Timeout(_)) => return Err(MainWriteError::Withdrawn(wait)),
            Err(SendTimeoutError::Disconnected(_)) => return Err(MainWriteError::Stopped),
        }
        let outcome = |got: Result<Result<(), String>, RecvTimeoutError>| match got {
            Ok(done) => Ok(done.map_err(MainWriteError::Refused)),
            // The merger dropped the request unmade (it stopped), or
            // failed while making it (rolled back).
            Err(RecvTimeoutError::Disconnected) => Ok(Err(MainWriteError::Stopped)),
            Err(RecvTimeoutError::Timeout) => Err(()),
        };
        let first = match deadline {
            Some(deadline) => answered.recv_deadline(deadline),
            None => answered.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        if let Ok(done) = outcome(first) {
            return done;
        }
        let withdrawn = state
            .compare_exchange(PENDING, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if withdrawn {
            return Err(MainWriteError::Withdrawn(wait));
        }
        // Taken up: the merger is making it, and its answer comes once the
        // transaction ends.
        outcome(answered.recv_timeout(wait)).unwrap_or(Err(MainWriteError::Unanswered(wait)))
    }
}

/// The running merger thread.
#[derive(Debug)]
pub struct MergerHandle {
    /// Where the ingest writer sends work; dropping it stops the merger
    /// after a final merge.
    pub tx: Sender<MergerMsg>,
    /// Gets a message after every merge, for a writer waiting on backlog.
    pub progress: Receiver<()>,
    thread: JoinHandle<()>,
}

impl MergerHandle {
    /// Stops the merger (after it has merged everything) and waits for it.
    pub fn finish(self) {
        drop(self.tx);
        if self.thread.join().is_err() {
            log::error!("the merger thread panicked");
        }
    }
}

/// What the merger does besides merging and applying session changes.
pub(super) struct Upkeep {
    /// Expires old rows and idle sessions between merges.
    pub(super) retention: Retention,
    /// Salvage steps from the salvage thread ([`super::salvager`]).
    pub(super) salvage: Receiver<SalvageRequest>,
    /// The writes of the threads that only read the main database (hub
    /// sync, the export watcher: [`MainWrite`]).
    pub(super) main_writes: Receiver<MainWriteRequest>,
}

/// Starts the merger thread (`codi-merger`) on `conn`, a connection of
/// [`super::schema::open_rw`] to the database at `db_path`, with the main
/// database's checkpointer (`codi-checkpoint`) sharing `wal_state`. Session
/// changes are answered through `acker`; `upkeep` runs between merges.
pub(super) fn spawn_merger(
    conn: Connection,
    db_path: &Path,
    wal_state: Arc<WalState>,
    policy: WalPolicy,
    state: Arc<Watermarks>,
    acker: Acker,
    upkeep: Upkeep,
) -> Result<MergerHandle, StoreError> {
    let Upkeep {
        retention,
        salvage,
        main_writes,
    } = upkeep;
    wal::configure_writer(&conn, &policy)?;
    let trimmer = WalTrimmer::new(&conn, policy, Arc::clone(&wal_state))?.waiting_for_readers();
    let checkpointer = Checkpointer::spawn(
        db_path,
        "codi-checkpoint",
        policy,
        wal_state,
        Arc::clone(&acker.metrics),
    )?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let (progress_tx, progress) = crossbeam_channel::bounded(1);
    let merger = Merger {
        conn,
        checkpointer: Some(checkpointer),
        trimmer,
        state,
        progress: progress_tx,
        acker,
        last_merge: Instant::now(),
        woken: false,
        retention,
    };
    let thread = spawn_named("codi-merger", move || {
        crate::sched::lower_current_thread_priority(crate::sched::WRITER_NICE);
        merger.run(&rx, salvage, main_writes)
    })?;
    Ok(MergerHandle {
        tx,
        progress,
        thread,
    })
}

/// Session changes go to the main database as they are.
struct SessionBody;

impl TxBody for SessionBody {
    fn begin(&mut self, _tx: &Transaction) -> rusqlite::Result<()> {
        Ok(())
    }

    fn apply(&mut self, tx: &Transaction, op: &WriteOp, now_us: i64) -> JobResult {
        ops::apply(tx, op, now_us)
    }

    fn committed(&mut self) {}
}

struct Merger {
    conn: Connection,
    /// Stopped before the final checkpoint.
    checkpointer: Option<Checkpointer>,
    trimmer: WalTrimmer,
    state: Arc<Watermarks>,
    progress: Sender<()>,
    acker: Acker,
    last_merge: Instant,
    /// The writer asked for a merge now.
    woken: bool,
    retention: Retention,
}

impl Merger {
    fn run(
        mut self,
        rx: &Receiver<MergerMsg>,
        mut salvage: Receiver<SalvageRequest>,
        mut main_writes: Receiver<MainWriteRequest>,
    ) {
        loop {
            let wait = if self.merge_due() {
                Duration::ZERO
            } else {
                MERGE_INTERVAL.saturating_sub(self.last_merge.elapsed())
            };
            let received = crossbeam_channel::select! {
                recv(rx) -> msg => msg.map_err(|_| RecvTimeoutError::Disconnected).map(Some),
                recv(salvage) -> request => {
                    match request {
                        Ok((step, answer)) => {
                            let _ = answer.send(self.salvage_step(&step));
                        }
                        // No salvage thread any more: stop listening.
                        Err(_) => salvage = crossbeam_channel::never(),
                    }
                    Ok(None)
                }
                recv(main_writes) -> request => {
                    match request {
                        // Unless its sender stopped waiting first.
                        Ok(request) => if let Some((write, answer)) = request.take() {
                            let _ = answer.send(self.main_write(write));
                        },
                        Err(_) => main_writes = crossbeam_channel::never(),
                    }
                    Ok(None)
                }
                default(wait) => Err(RecvTimeoutError::Timeout),
            };
            match received {
                Ok(None) => continue,
                Ok(Some(MergerMsg::Job(job))) => {
                    self.acker.jobs.push(job);
                    let mut direct = None;
                    while let Ok(msg) = rx.try_recv() {
                        match msg {
                            MergerMsg::Job(job) => self.acker.jobs.push(job),
                            MergerMsg::Wake => self.woken = true,
                            // The writer waits for it: after these, at once.
                            MergerMsg::Direct(batch) => {
                                direct = Some(batch);
                                break;
                            }
                        }
                    }
                    self.acker
                        .commit_and_answer(&mut self.conn, &mut SessionBody);
                    if let Some(batch) = direct {
                        self.commit_direct(batch);
                    }
                }
                Ok(Some(MergerMsg::Wake)) => self.woken = true,
                Ok(Some(MergerMsg::Direct(batch))) => self.commit_direct(batch),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if std::mem::take(&mut self.woken) || self.merge_due() {
                self.merge_step();
            }
            if self.retention.due() {
                self.retention_pass();
            }
        }
        // Writes still queued fail now rather than after the final merges
        // and checkpoint.
        refuse_queued(main_writes);
        // The ingest writer has committed its last batch: merge it all (a
        // failing merge leaves the rest for the next start).
        loop {
            let before = self.state.merged_through();
            match self.merge_step() {
                Some(merged) if merged.through > before => {}
                _ => break,
            }
        }
        // Makes every merge durable, so that the writer may then delete
        // the merged rows from the ingest file.
        wal::final_truncate(
            &self.conn,
            self.checkpointer.take(),
            FINAL_CHECKPOINT_LOCK_WAIT,
            "the database",
            &self.acker.metrics,
            Some(&*self.state),
        );
    }

    /// Applies one salvage step; rows it adds may carry uuids above the
    /// newest one the writer knows of, so that mark is read again.
    fn salvage_step(&mut self, step: &super::recovery::SalvageStep) -> Result<usize, String> {
        let inserted =
            super::recovery::apply_step(&mut self.conn, step).map_err(|e| e.to_string())?;
        if inserted > 0 {
            let newest = ingest::logs_max_uuid(&self.conn).map_err(|e| e.to_string())?;
            self.state.note_merged(self.state.merged_through(), newest);
            if self.trimmer.after_commit(&self.conn).is_some() {
                Metrics::add(&self.acker.metrics.checkpoints, 1);
            }
        }
        Ok(inserted)
    }

    /// Commits a batch the writer handed over straight into `logs`
    /// ([`direct::commit_handed`]) and runs the WAL policy after it.
    fn commit_direct(&mut self, batch: DirectBatch) {
        if direct::commit_handed(&mut self.conn, &self.state, batch)
            && self.trimmer.after_commit(&self.conn).is_some()
        {
            Metrics::add(&self.acker.metrics.checkpoints, 1);
        }
    }

    /// Makes one [`MainWrite`], at `synchronous = FULL` if it asks; the WAL
    /// policy after it counts it as the main database's activity (its
    /// checkpointer's idle TRUNCATE waits).
    fn main_write(&mut self, write: MainWrite) -> Result<(), String> {
        apply_main_write(&mut self.conn, write).map_err(|e| e.to_string())?;
        if self.trimmer.after_commit(&self.conn).is_some() {
            Metrics::add(&self.acker.metrics.checkpoints, 1);
        }
        Ok(())
    }

    /// One bounded retention pass; a failure is retried on the next one.
    fn retention_pass(&mut self) {
        let metrics = &self.acker.metrics;
        match self.retention.run(&mut self.conn, &self.state, metrics) {
            Ok(_) => {
                metrics.health.recover("merger/retention");
                if self.trimmer.after_commit(&self.conn).is_some() {
                    Metrics::add(&metrics.checkpoints, 1);
                }
            }
            Err(e) => {
                Metrics::add(&metrics.commit_errors, 1);
                log::error!("retention or session expiry failed (retrying): {e}");
                metrics.health.fail(
                    "merger/retention",
                    format!("retention or session expiry fails: {e}"),
                );
            }
        }
    }

    fn merge_due(&self) -> bool {
        self.state.unmerged() >= MERGE_MIN_ROWS || self.last_merge.elapsed() >= MERGE_INTERVAL
    }

    /// Moves one chunk; `None` if it failed (it is retried on the next tick).
    fn merge_step(&mut self) -> Option<Merged> {
        self.last_merge = Instant::now();
        match merge_once(&mut self.conn, &self.state, MERGE_MAX_ROWS) {
            Ok(merged) => {
                self.acker.metrics.health.recover("merger");
                if merged.rows > 0 {
                    Metrics::add(&self.acker.metrics.merges, 1);
                    Metrics::add(&self.acker.metrics.logs_merged, merged.rows as u64);
                    if self.trimmer.after_commit(&self.conn).is_some() {
                        Metrics::add(&self.acker.metrics.checkpoints, 1);
                    }
                }
                // Full: the writer has not looked yet; gone: it has exited.
                let _ = self.progress.try_send(());
                Some(merged)
            }
            Err(e) => {
                Metrics::add(&self.acker.metrics.commit_errors, 1);
                super::recovery::corruption_seen(&e, "a merge into the indexed table");
                log::error!("merging logs into the indexed table failed (retrying): {e}");
                self.acker
                    .metrics
                    .health
                    .fail("merger", format!("merges into the indexed table fail: {e}"));
                None
            }
        }
    }
}

/// Moves the next at most `max_rows` ingest rows into `logs` in one
/// transaction on `conn` (the merger's connection) and publishes the new
/// mark in `state`.
pub(super) fn merge_once(
    conn: &mut Connection,
    state: &Watermarks,
    max_rows: usize,
) -> rusqlite::Result<Merged> {
    let floor = ingest::merged_floor(conn)?.max(state.merged_through());
    let (merged, max_uuid) = if ingest::holds_rows_above(conn, floor)? {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let merged = ingest::merge_chunk(&tx, floor, max_rows)?;
        let max_uuid = ingest::logs_max_uuid(&tx)?;
        tx.commit()?;
        (merged, max_uuid)
    } else {
        // Nothing to move: no write transaction, so a `codi2` without a
        // daemon waiting for the main database's lock is not held up.
        (None, ingest::logs_max_uuid(conn)?)
    };
    let merged = merged.unwrap_or(Merged {
        rows: 0,
        through: floor,
    });
    state.note_merged(merged.through, max_uuid);
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::InflightBudget;
    use crate::reply::Replies;
    use crate::store::writer::{spawn_writer, WriterSettings};
    use std::sync::atomic::AtomicBool;

    #[test]
    fn a_durable_main_write_commits_at_full_and_puts_normal_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = super::super::schema::open_rw(&dir.path().join("codi.db"), 1).unwrap();
        let seen = |durable: bool, conn: &mut Connection| -> i64 {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let write = MainWrite {
                durable,
                apply: Box::new(move |t: &Transaction| {
                    let level: i64 = t.pragma_query_value(None, "synchronous", |r| r.get(0))?;
                    tx.send(level).unwrap();
                    t.execute(
                        "INSERT OR REPLACE INTO sync_state (target) VALUES ('t')",
                        [],
                    )?;
                    Ok(())
                }),
            };
            apply_main_write(conn, write).unwrap();
            // The write has returned, so its closure has run (or never will).
            rx.try_recv().expect("the main write ran its closure")
        };
        let level = |conn: &Connection| -> i64 {
            conn.pragma_query_value(None, "synchronous", |r| r.get(0))
                .unwrap()
        };
        assert_eq!(level(&conn), 1, "the store's connections run at NORMAL");
        assert_eq!(seen(true, &mut conn), 2, "FULL inside a durable write");
        assert_eq!(level(&conn), 1, "put back");
        assert_eq!(seen(false, &mut conn), 1, "NORMAL otherwise");
    }

    /// A write that records whether its closure ran.
    fn flagged(ran: &Arc<AtomicBool>) -> impl FnOnce(&Transaction) -> rusqlite::Result<()> {
        let ran = Arc::clone(ran);
        move |_| {
            ran.store(true, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn the_real_merger_makes_a_write_and_one_sent_after_it_stopped_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("codi.db");
        let (jobs, writer) = spawn_writer(
            &db,
            &WriterSettings::default(),
            Replies::new(Vec::new()),
            Arc::new(Metrics::default()),
            Arc::new(InflightBudget::new(1 << 20)),
        )
        .unwrap();
        let link = writer.main_write_link();
        link.write(false, Duration::from_secs(30), |tx| {
            tx.execute("INSERT INTO sync_state (target) VALUES ('made')", [])
                .map(drop)
        })
        .unwrap();
        let refused = link.write(false, Duration::from_secs(30), |tx| {
            tx.execute("INSERT INTO no_such_table VALUES (1)", [])
                .map(drop)
        });
        assert!(
            matches!(&refused, Err(MainWriteError::Refused(e)) if e.contains("no_such_table")),
            "{refused:?}"
        );
        let made: i64 = super::super::schema::open_ro(&db)
            .unwrap()
            .query_row(
                "SELECT count(*) FROM sync_state WHERE target = 'made'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(made, 1, "committed by the merger");

        // The daemon's stop: the last job sender goes, the writer and the
        // merger finish.
        drop(jobs);
        writer.join();
        let ran = Arc::new(AtomicBool::new(false));
        // `Stopped`, not `Withdrawn` after the whole wait.
        let late = link.write(false, Duration::from_secs(30), flagged(&ran));
        assert_eq!(late, Err(MainWriteError::Stopped));
        assert!(!ran.load(Ordering::SeqCst));
    }

    #[test]
    fn a_write_queued_when_the_merger_stops_fails_without_being_made() {
        let (tx, rx) = crossbeam_channel::bounded(2);
        let link = MainWriteLink::new(tx);
        let ran = Arc::new(AtomicBool::new(false));
        let merger = std::thread::spawn(move || {
            // Queued, then the merger goes without taking it up.
            while rx.is_empty() {
                std::thread::sleep(Duration::from_millis(1));
            }
            refuse_queued(rx);
        });
        let got = link.write(false, Duration::from_secs(30), flagged(&ran));
        merger.join().unwrap();
        // `Stopped`, not `Withdrawn` after the whole wait.
        assert_eq!(got, Err(MainWriteError::Stopped));
        assert!(!ran.load(Ordering::SeqCst));
    }

    #[test]
    fn a_write_not_taken_up_in_time_is_withdrawn_and_never_made() {
        let (tx, rx) = crossbeam_channel::bounded(2);
        let link = MainWriteLink::new(tx);
        let ran = Arc::new(AtomicBool::new(false));
        let wait = Duration::from_millis(50);
        let started = Instant::now();
        let got = link.write(false, wait, flagged(&ran));
        assert_eq!(got, Err(MainWriteError::Withdrawn(wait)));
        assert!(started.elapsed() >= wait);
        assert!(!got.unwrap_err().may_still_commit());
        // The merger gets to it late: it finds it withdrawn.
        let request: MainWriteRequest = rx.try_recv().expect("it was queued");
        assert!(
            request.take().is_none(),
            "a withdrawn write is not handed out"
        );
        assert!(!ran.load(Ordering::SeqCst));
    }

    #[test]
    fn a_write_taken_up_but_unanswered_may_still_commit() {
        let (tx, rx) = crossbeam_channel::bounded::<MainWriteRequest>(2);
        let link = MainWriteLink::new(tx);
        let (gave_up, heard) = crossbeam_channel::bounded::<()>(1);
        let merger = std::thread::spawn(move || {
            let (write, answer) = rx.recv().unwrap().take().expect("still pending");
            // Slow: answers only once the sender has given up.
            heard.recv().unwrap();
            drop(write);
            let _ = answer.send(Ok(()));
        });
        let wait = Duration::from_millis(50);
        let got = link.write(false, wait, |_| Ok(()));
        gave_up.send(()).unwrap();
        merger.join().unwrap();
        assert_eq!(got, Err(MainWriteError::Unanswered(wait)));
        assert!(got.unwrap_err().may_still_commit());
    }
}
