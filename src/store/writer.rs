//! The ingest writer thread: sole owner of the ingest file's read-write
//! connection, committing whatever is queued as one transaction (group
//! commit) and acknowledging it. It owns the merger thread (see
//! [`super::merger`]), which moves committed logs into the indexed table
//! and applies session changes, and the ingest file's checkpointer.
//!
//! Group commit needs no timers: while a transaction commits, new jobs queue
//! up, and the next transaction takes them all. One fsync thus covers many
//! requests exactly when load is high.

use super::ingest::{self, IdAllocator, PendingUuids};
use super::merger::{self, MergeState, MergerHandle, MergerMsg, MAX_UNMERGED_ROWS, MERGE_MIN_ROWS};
use super::ops::OpOutcome;
use super::retention::{self, ArchiveClaims, Retention, RetentionPolicy};
use super::wal::{self, Checkpointer, DurableMark, WalPolicy, WalState, WalTrimmer};
use super::{schema, LogRow, StoreError, WriteJob, WriteOp};
use crate::budget::InflightBudget;
use crate::heartbeat::Pulse;
use crate::metrics::Metrics;
use crate::proto::{AckStatus, Message, Timestamp};
use crate::reply::{Completion, Replies};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rusqlite::{Connection, Transaction, TransactionBehavior};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Tuning of the writer and checkpointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterSettings {
    /// SQLite page cache of each read-write connection, in MiB.
    pub cache_size_mb: u32,
    /// A transaction stops taking jobs once it holds this many log rows.
    pub batch_max_rows: usize,
    /// Capacity of the job queue (jobs, not rows).
    pub queue_capacity: usize,
    /// How the WAL is checkpointed and kept small (see [`super::wal`]).
    pub wal: WalPolicy,
    /// What the merger expires (see [`super::retention`]).
    pub retention: RetentionPolicy,
}

impl Default for WriterSettings {
    fn default() -> Self {
        WriterSettings {
            cache_size_mb: 64,
            batch_max_rows: 20_000,
            queue_capacity: 65_536,
            wal: WalPolicy::default(),
            retention: RetentionPolicy::default(),
        }
    }
}

/// How long the final checkpoint at shutdown waits for another connection's
/// lock before leaving the WAL for the next start.
pub(super) const FINAL_CHECKPOINT_LOCK_WAIT: Duration = Duration::from_secs(1);

/// How long the writer waits for a merger that makes no progress at all
/// before it stops waiting for it.
const MERGER_STALL: Duration = Duration::from_secs(5);
/// Most rows the ingest file holds before new logs are refused: reached
/// only while the merger is stalled (the writer waits for it below
/// [`MAX_UNMERGED_ROWS`]); bounds [`PendingUuids`] at about 40 MiB.
pub(super) const MAX_PENDING_ROWS: usize = 1 << 20;

/// Merged rows deleted from the ingest file at shutdown per transaction.
const FINAL_DELETE_ROWS: usize = 65_536;

/// Bytes SQLite writes for one index leaf page a commit dirties.
const INDEX_PAGE_BYTES: usize = schema::PAGE_SIZE as usize;

/// How long a batch bound straight for `logs` waits for the main
/// database's lock (a session change, an export row, a WAL restart) before
/// it goes to the ingest file instead: acknowledgments never wait long.
const INDEXED_LOCK_WAIT: Duration = Duration::from_millis(200);

/// The running writer thread, which owns the merger and checkpointers.
#[derive(Debug)]
pub struct WriterHandle {
    writer: JoinHandle<()>,
    main_wal: Arc<WalState>,
    salvage: Option<Sender<merger::SalvageRequest>>,
    sync: Option<Sender<merger::SyncRequest>>,
    claims: Arc<ArchiveClaims>,
    merge: Arc<MergeState>,
}

impl WriterHandle {
    /// Where merges stand, the durable mark included (for hub sync).
    pub fn merge_state(&self) -> Arc<MergeState> {
        Arc::clone(&self.merge)
    }

    /// The main database's WAL state: other threads that commit to the main
    /// database (the export watcher) report their commits here.
    pub fn main_wal(&self) -> Arc<WalState> {
        Arc::clone(&self.main_wal)
    }

    /// Where salvage steps go to the merger (once: for the salvage thread,
    /// [`super::salvager`]). The merger does not wait for this sender to
    /// go before it exits.
    pub fn take_salvage_link(&mut self) -> Option<Sender<merger::SalvageRequest>> {
        self.salvage.take()
    }

    /// Where hub sync's writes go to the merger (once: for the sync
    /// thread, [`crate::hub::sync`]).
    pub fn take_sync_link(&mut self) -> Option<Sender<merger::SyncRequest>> {
        self.sync.take()
    }

    /// The archive paths the export watcher is about to record, which
    /// retention leaves alone.
    pub fn archive_claims(&self) -> Arc<ArchiveClaims> {
        Arc::clone(&self.claims)
    }

    /// Waits for the storage threads. The writer exits once every job sender
    /// is dropped and the queue is drained; before that it lets the merger
    /// move every row into the indexed table, then truncates the WALs.
    pub fn join(self) {
        if self.writer.join().is_err() {
            log::error!("the writer thread panicked");
        }
    }
}

/// Opens and migrates the database and its ingest file, then starts the
/// writer thread (`codi-writer`), the merger (`codi-merger`) and their
/// checkpointers.
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
    let main = schema::open_rw(db_path, settings.cache_size_mb)?;
    if settings.retention.deletes_logs() {
        // Before this process opens its other connections to the file, so
        // that none of them waits behind the one-time VACUUM.
        retention::convert_auto_vacuum(&main, db_path);
    }
    let indexed = schema::open_rw(db_path, settings.cache_size_mb)?;
    wal::configure_writer(&indexed, &settings.wal)?;
    indexed.busy_timeout(INDEXED_LOCK_WAIT)?;
    let mut conn = schema::open_ingest_rw(db_path, settings.cache_size_mb)?;
    wal::configure_writer(&conn, &settings.wal)?;
    let (state, pending) = recover(&mut conn, ingest::logs_max_uuid(&main)?)?;
    let state = Arc::new(state);
    let merge_for_handle = Arc::clone(&state);
    // From the rows just read: a row another process adds later has a
    // larger id and makes the writer read them again.
    let last_own_id = pending.last_id();
    let wal_state = Arc::new(WalState::default());
    let trimmer = WalTrimmer::new(&conn, settings.wal, Arc::clone(&wal_state))?;
    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded(settings.queue_capacity.max(1));
    let checkpointer = Checkpointer::spawn(
        &schema::ingest_path(db_path),
        "codi-ingest-ckpt",
        settings.wal,
        wal_state,
        Arc::clone(&metrics),
    )?;
    // The main database's checkpoints make merges durable (see
    // `MergeState::durable_through`).
    let main_wal = Arc::new(WalState::marking(Arc::clone(&state) as Arc<dyn DurableMark>));
    let (salvage_tx, salvage_rx) = crossbeam_channel::bounded(1);
    let (sync_tx, sync_rx) = crossbeam_channel::bounded(1);
    let claims = Arc::new(ArchiveClaims::default());
    let merger = merger::spawn_merger(
        main,
        db_path,
        Arc::clone(&main_wal),
        settings.wal,
        Arc::clone(&state),
        Acker::new(replies.clone(), Arc::clone(&metrics), Arc::clone(&budget)),
        merger::Upkeep {
            retention: Retention::new(settings.retention.clone(), Arc::clone(&claims))
                .with_free_space(Box::new(retention::DbFilesystem(db_path.to_owned()))),
            salvage: salvage_rx,
            sync: sync_rx,
        },
    )?;
    let pulse = metrics
        .heartbeats
        .register("writer", "has had work without finishing a transaction");
    let writer = Writer {
        pulse,
        merger: Some(merger),
        checkpointer: Some(checkpointer),
        trimmer,
        conn,
        body: IngestBody::new(state, pending, last_own_id, MAX_PENDING_ROWS),
        indexed_trimmer: WalTrimmer::new(&indexed, settings.wal, Arc::clone(&main_wal))?,
        indexed,
        woke_merger_at: None,
        merger_stalled_at: None,
        acker: Acker::new(replies, metrics, budget),
        batch_max_rows: settings.batch_max_rows.max(1),
    };
    // If this spawn fails, the merger's and checkpointer's senders are
    // dropped with the closure and they exit on their own.
    let writer = spawn_named("codi-writer", move || {
        crate::sched::lower_current_thread_priority(crate::sched::WRITER_NICE);
        writer.run(jobs_rx)
    })?;
    Ok((
        jobs_tx,
        WriterHandle {
            writer,
            main_wal,
            salvage: Some(salvage_tx),
            sync: Some(sync_tx),
            claims,
            merge: merge_for_handle,
        },
    ))
}

/// Reads where the ingest file and `logs` stand (after a crash the ingest
/// file may hold rows not yet merged, and merged rows not yet deleted) and
/// the uuids of the ingest file's rows.
///
/// Merged rows stay: their copies in `logs` may be only in the main
/// database's WAL, which nothing has synced (the daemon may have been
/// killed right after the merge). The writer deletes them once the main
/// database's checkpointer has made them durable, as it does while
/// running.
pub(super) fn recover(
    conn: &mut Connection,
    logs_max_uuid: Uuid,
) -> Result<(MergeState, PendingUuids), StoreError> {
    let merged: i64 = conn.query_row("SELECT coalesce(max(id), 0) FROM store.logs", [], |r| {
        r.get(0)
    })?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let pending = PendingUuids::load(&tx)?;
    let committed = ingest::max_ingest_id(&tx)?;
    tx.commit()?;
    if committed > merged {
        log::info!(
            "{} logs committed before the last stop are not yet in the indexed table; merging them",
            committed - merged
        );
    }
    Ok((MergeState::new(committed, merged, logs_max_uuid), pending))
}

pub(super) fn spawn_named<F: FnOnce() + Send + 'static>(
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
pub(super) type JobResult = Result<OpOutcome, rusqlite::Error>;

/// What one write transaction does: something first, then each op of the
/// batch, then bookkeeping once it has committed.
pub(super) trait TxBody {
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
pub(super) struct BatchStats {
    pub(super) commits: u64,
    pub(super) commit_errors: u64,
    /// The last error, when a transaction failed.
    pub(super) failure: Option<String>,
    /// Nothing committed because another connection held a lock past the
    /// busy timeout: time spent waiting, not progress.
    pub(super) blocked: bool,
}

impl BatchStats {
    /// Whether the call got anywhere: a transaction committed, or failed
    /// for a reason of its own (a full disk, a bad row) rather than by
    /// waiting for someone else's lock.
    pub(super) fn progressed(&self) -> bool {
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
pub(super) fn fails_every_job(e: &rusqlite::Error) -> bool {
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
pub(super) fn write_batch<'a, B: TxBody>(
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
            super::recovery::corruption_seen(&e, "a write transaction");
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
pub(super) struct Acker {
    pub(super) replies: Replies,
    pub(super) metrics: Arc<Metrics>,
    pub(super) budget: Arc<InflightBudget>,
    /// Jobs of the next batch.
    pub(super) jobs: Vec<WriteJob>,
    outcomes: Vec<JobResult>,
    completions: Vec<Completion>,
}

impl Acker {
    pub(super) fn new(
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
    pub(super) fn commit_and_answer<B: TxBody>(
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
    pub(super) fn answer(&mut self) {
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
    fn reject(&mut self, job: WriteJob, reason: &str) {
        self.jobs.push(job);
        self.outcomes
            .push(Ok(OpOutcome::Rejected(reason.to_owned())));
        self.answer();
    }
}

/// Log rows go into the ingest table, after deleting some rows the merger
/// has already moved and the main database has synced.
pub(super) struct IngestBody {
    state: Arc<MergeState>,
    /// The merge mark read before the current transaction began.
    mark: (i64, Uuid),
    /// Ingest rows up to this id may be deleted: the durable mark read
    /// before the current transaction began.
    deletable: i64,
    ids: Option<IdAllocator>,
    /// Merged rows the next transaction may delete.
    delete_rows: usize,
    /// The uuids in the ingest table.
    pending: PendingUuids,
    /// The largest ingest id this writer knows of: a larger one means a
    /// `codi2` without a daemon wrote too, and `pending` is read again.
    last_own_id: i64,
    /// Rows the ingest file may hold before logs are refused
    /// ([`MAX_PENDING_ROWS`]).
    max_pending: usize,
}

impl IngestBody {
    /// The writer's body for an ingest file holding the rows in `pending`,
    /// of which this writer knows ids up to `last_own_id`; logs are refused
    /// once it holds `max_pending` rows.
    pub(super) fn new(
        state: Arc<MergeState>,
        pending: PendingUuids,
        last_own_id: i64,
        max_pending: usize,
    ) -> Self {
        IngestBody {
            state,
            mark: (0, Uuid::nil()),
            deletable: 0,
            ids: None,
            delete_rows: 0,
            pending,
            last_own_id,
            max_pending,
        }
    }

    /// Lets the next transaction delete at most `rows` rows already in
    /// `logs` on disk.
    pub(super) fn delete_at_most(&mut self, rows: usize) {
        self.delete_rows = rows;
    }

    /// Starts `pending` on the transaction `tx`, reading it again if
    /// another process wrote rows meanwhile: deletions must know every row.
    fn begin_pending(&mut self, tx: &Transaction) -> rusqlite::Result<()> {
        self.pending.begin();
        let newest = ingest::max_ingest_id(tx)?;
        if newest > self.last_own_id {
            log::info!("another process wrote logs into the ingest file; rereading their ids");
            self.pending = PendingUuids::load(tx)?;
            self.last_own_id = newest;
        }
        Ok(())
    }

    /// Deletes every ingest row that is in `logs` on disk, in transactions
    /// of at most [`FINAL_DELETE_ROWS`] on `conn` (the writer's).
    pub(super) fn delete_all_durable(&mut self, conn: &mut Connection) {
        let through = self.state.durable_through();
        let result = (|| loop {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            self.begin_pending(&tx)?;
            let deleted =
                ingest::delete_merged(&tx, through, FINAL_DELETE_ROWS, &mut self.pending)?;
            tx.commit()?;
            self.pending.commit();
            if deleted < FINAL_DELETE_ROWS {
                return Ok::<_, rusqlite::Error>(());
            }
        })();
        if let Err(e) = result {
            log::warn!(
                "cannot delete merged rows from the ingest file (the writer will after \
                 the next start): {e}"
            );
        }
    }
}

impl TxBody for IngestBody {
    fn before(&mut self) {
        // Read before BEGIN: the transaction's snapshot of `logs` (taken at
        // BEGIN) then holds every row merged up to this mark, which the
        // id floor and the skipped uuid lookups rely on.
        self.mark = self.state.merged_mark();
        // Never the merge mark: a merge may still be only in the main
        // database's WAL, and a power cut would lose a row deleted here.
        self.deletable = self.state.durable_through();
    }

    fn begin(&mut self, tx: &Transaction) -> rusqlite::Result<()> {
        let (through, _) = self.mark;
        self.begin_pending(tx)?;
        ingest::delete_merged(tx, self.deletable, self.delete_rows, &mut self.pending)?;
        self.ids = Some(IdAllocator::new(tx, through)?);
        Ok(())
    }

    fn apply(&mut self, tx: &Transaction, op: &WriteOp, now_us: i64) -> JobResult {
        match (op, self.ids.as_mut()) {
            (WriteOp::Logs(_), _) if self.pending.len() >= self.max_pending => {
                Ok(OpOutcome::Rejected(format!(
                    "storage is not keeping up: {} logs wait to be moved into the indexed \
                     table, which has taken none for a while (see the daemon's log)",
                    self.pending.len()
                )))
            }
            (WriteOp::Logs(rows), Some(ids)) => {
                ingest::insert_rows(tx, ids, &mut self.pending, rows, now_us, Some(self.mark.1))
            }
            _ => Ok(OpOutcome::Rejected(
                "internal: only logs go to the ingest file".into(),
            )),
        }
    }

    fn committed(&mut self) {
        self.pending.commit();
        if let Some(ids) = self.ids.take() {
            self.last_own_id = self.last_own_id.max(ids.last());
            self.state.note_committed(ids.last());
        }
    }
}

/// Commits `jobs` (log jobs only) straight into `logs` in one transaction
/// on `indexed`, with ids handed out under the ingest file's write lock,
/// taken on `ingest` and held (having written nothing) until the rows are
/// committed, so that nobody else hands out ids meanwhile, and publishes
/// the rows as merged in `state`. Returns each job's outcome, or `None`
/// when the ingest file holds rows not yet merged (see
/// [`IdAllocator::for_indexed`]).
pub(super) fn insert_indexed(
    ingest: &mut Connection,
    indexed: &mut Connection,
    jobs: &[WriteJob],
    state: &MergeState,
    now_us: i64,
) -> rusqlite::Result<Option<Vec<JobResult>>> {
    let (merged_through, _) = state.merged_mark();
    let lock = ingest.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(mut ids) = IdAllocator::for_indexed(&lock, merged_through)? else {
        return Ok(None);
    };
    let tx = indexed.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut newest = Uuid::nil();
    for job in jobs {
        let WriteOp::Logs(rows) = &job.op else {
            return Ok(None);
        };
        newest = rows.iter().map(|r| r.uuid).fold(newest, std::cmp::max);
        outcomes.push(Ok(ingest::insert_rows_indexed(
            &tx, &mut ids, rows, now_us,
        )?));
    }
    tx.commit()?;
    drop(lock);
    if ids.last() > merged_through {
        state.note_merged(ids.last(), newest);
    }
    Ok(Some(outcomes))
}

/// Whether a batch of log jobs costs less written straight into `logs` than
/// through the ingest file: when its rows come from so few sessions that
/// the session-index leaves they dirty (about one page each per commit)
/// weigh less than the rows' own bytes, which the ingest file writes twice.
fn prefers_indexed(jobs: &[WriteJob]) -> bool {
    let rows = || {
        jobs.iter().flat_map(|job| match &job.op {
            WriteOp::Logs(rows) => rows.as_slice(),
            _ => &[],
        })
    };
    let bytes: usize = rows().map(LogRow::stored_len).sum();
    let most_sessions = bytes / INDEX_PAGE_BYTES;
    let mut sessions = HashSet::new();
    for row in rows() {
        if sessions.insert(row.session_id.as_deref()) && sessions.len() > most_sessions {
            return false;
        }
    }
    !sessions.is_empty()
}

struct Writer {
    /// Beats when a transaction ends; idle while nothing is queued.
    pulse: Pulse,
    conn: Connection,
    /// A read-write connection to the main database, for batches that go
    /// straight into `logs`; it waits at most [`INDEXED_LOCK_WAIT`] for
    /// the main database's lock.
    indexed: Connection,
    /// The main database's WAL policy after those commits.
    indexed_trimmer: WalTrimmer,
    /// `merged_through` when the merger was last woken for a batch that
    /// would have gone straight into `logs`: woken once per merge.
    woke_merger_at: Option<i64>,
    /// Finished (after its final merge) before the final checkpoint.
    merger: Option<MergerHandle>,
    /// Stopped before the final checkpoint.
    checkpointer: Option<Checkpointer>,
    /// Restarts the WAL between batches when that is cheap.
    trimmer: WalTrimmer,
    body: IngestBody,
    /// The merged id at which the merger was found stalled: not waited for
    /// again until it moves.
    merger_stalled_at: Option<i64>,
    acker: Acker,
    batch_max_rows: usize,
}

impl Writer {
    fn run(mut self, jobs: Receiver<WriteJob>) {
        loop {
            if jobs.is_empty() {
                self.pulse.idle();
            }
            let Ok(first) = jobs.recv() else { break };
            self.pulse.working();
            let mut rows = first.op.row_count();
            self.take(first);
            while rows < self.batch_max_rows {
                match jobs.try_recv() {
                    Ok(job) => {
                        rows += job.op.row_count();
                        self.take(job);
                    }
                    Err(_) => break,
                }
            }
            Metrics::set(&self.metrics().writer_queue_depth, jobs.len() as u64);
            if self.acker.jobs.is_empty() {
                continue;
            }
            let started = Instant::now();
            if self.commit_indexed() {
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
            FINAL_CHECKPOINT_LOCK_WAIT,
            "the ingest file",
            &self.acker.metrics,
            None,
        );
    }

    fn metrics(&self) -> &Metrics {
        &self.acker.metrics
    }

    /// Commits and answers the queued batch straight into `logs` when that
    /// costs less ([`prefers_indexed`]) and no ingest row awaits merging;
    /// returns whether it did. Otherwise (or if that fails, e.g. on the
    /// main database's lock) the batch goes to the ingest file.
    fn commit_indexed(&mut self) -> bool {
        if !prefers_indexed(&self.acker.jobs) {
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
        let now_us = Timestamp::now().as_micros();
        let written = insert_indexed(
            &mut self.conn,
            &mut self.indexed,
            &self.acker.jobs,
            &self.body.state,
            now_us,
        );
        let outcomes = match written {
            Ok(Some(written)) => written,
            Ok(None) => return false,
            Err(e) => {
                // Busy is expected now and then (someone held the main
                // database's lock past the wait); anything else is news.
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) {
                    log::debug!("a batch goes to the ingest file: the main database is busy");
                } else {
                    log::warn!("a batch goes to the ingest file: writing it into the indexed table failed: {e}");
                }
                return false;
            }
        };
        self.pulse.beat();
        let metrics = &self.acker.metrics;
        Metrics::add(&metrics.commits, 1);
        Metrics::add(&metrics.indexed_commits, 1);
        if self.indexed_trimmer.after_commit(&self.indexed).is_some() {
            Metrics::add(&metrics.checkpoints, 1);
        }
        self.acker.outcomes = outcomes;
        self.acker.answer();
        true
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{LogLevel, Payload};
    use crate::reply::{self, ReplyTo};
    use crate::store::LogRow;
    use crate::testing::recv;
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

    /// Far above [`INDEXED_LOCK_WAIT`], far below the writer's own lock
    /// wait.
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
            Arc::new(MergeState::new(0, 0, Uuid::nil())),
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
}
