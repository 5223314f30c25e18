//! Keeping the WAL small without ever making the writer wait on another
//! connection's lock.
//!
//! SQLite's own auto-checkpoint runs inside the committing connection, and a
//! TRUNCATE or RESTART checkpoint from another connection holds the write
//! lock for its whole backlog plus two fsyncs; a blocked writer then sleeps
//! in SQLite's busy handler in steps of up to 100 ms. Measured on this
//! project's schema, either costs a flat-out writer a quarter of its
//! throughput and stalls of up to 1.5 s.
//!
//! The policy here instead:
//! 1. a checkpointer thread, on its own connection, runs PASSIVE checkpoints
//!    (which never block anyone) every `interval` and publishes how far the
//!    WAL is backfilled;
//! 2. the WAL can only start over from its beginning when a write
//!    transaction begins with every frame backfilled, which a busy writer
//!    never sees; so once the WAL is past `restart_bytes` and the backlog
//!    is small, the writer itself backfills the last few frames between two
//!    batches (the merger, the main database's owner, with a RESTART
//!    checkpoint that also waits at most 10 ms for readers to leave the
//!    WAL: a short, bounded pause on its own thread, during which the
//!    file's other writers wait too), and its next transaction restarts
//!    the WAL. Past `hard_limit_bytes` it does so
//!    whatever the backlog, and logs the pause;
//! 3. `journal_size_limit` trims the WAL file back to `restart_bytes` when it
//!    restarts; and when the daemon falls idle (nothing written since the
//!    last look, everything backfilled) with a WAL past `restart_bytes`, the
//!    checkpointer truncates it: there is nothing left to copy, so the lock
//!    it takes is brief and only ever meets an idle writer.
//!
//! Checkpoints are also what makes commits survive a power cut. With
//! `synchronous=NORMAL` a commit only appends to the WAL, and nothing
//! syncs it; a checkpoint that has frames to copy first syncs the WAL
//! (every frame written so far), and only then records how far it got
//! (`nBackfill`), and SQLite starts the WAL over only once a checkpoint
//! has also copied every frame and synced the database file. So a
//! checkpoint that reports every frame of its snapshot copied proves that
//! each commit made before it began is on disk. A [`DurableMark`] turns
//! that into a position the rest of the store can act on (the merger's
//! merged-through id: ingest rows may be deleted only up to it).

use crate::metrics::Metrics;
use crate::store::{schema, StoreError};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rusqlite::{Connection, OpenFlags};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Backlog (frames not yet backfilled) small enough for the writer to
/// finish between two batches: with 4 KiB pages, at most 4 MiB to copy.
pub const SMALL_BACKLOG_FRAMES: u64 = 1024;
/// How long the writer must have committed nothing before the checkpointer
/// may truncate the WAL.
pub const IDLE_BEFORE_TRUNCATE: Duration = Duration::from_secs(1);
/// How long the idle TRUNCATE waits for a lock before giving up until the
/// next tick: it must never hold up a writer that has just woken.
const TRUNCATE_LOCK_WAIT: Duration = Duration::from_millis(10);

/// How long the final checkpoint at shutdown waits for another connection's
/// lock before leaving the WAL for the next start.
pub(in crate::store) const FINAL_CHECKPOINT_LOCK_WAIT: Duration = Duration::from_secs(1);

/// Tuning of the checkpoint policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalPolicy {
    /// How often the checkpointer runs a PASSIVE checkpoint.
    pub interval: Duration,
    /// WAL size from which the writer restarts the WAL when the backlog is
    /// small; also the size the WAL file is trimmed to on restart.
    pub restart_bytes: u64,
    /// WAL size from which the writer restarts the WAL whatever the backlog.
    pub hard_limit_bytes: u64,
}

impl Default for WalPolicy {
    fn default() -> Self {
        WalPolicy {
            interval: Duration::from_millis(100),
            restart_bytes: 256 * 1024 * 1024,
            hard_limit_bytes: 1024 * 1024 * 1024,
        }
    }
}

/// What one `PRAGMA wal_checkpoint` reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointResult {
    /// It could not finish because of a lock (a blocking mode that met a
    /// reader, or another checkpoint running).
    pub busy: bool,
    /// Frames in the WAL.
    pub log_frames: u64,
    /// Frames already copied into the database.
    pub backfilled: u64,
}

impl CheckpointResult {
    /// Whether every frame of the WAL (as the checkpoint found it) is in
    /// the database file: then every commit made before the checkpoint
    /// began is on disk (see the module's last paragraph).
    pub fn complete(&self) -> bool {
        !self.busy && self.backfilled == self.log_frames
    }
}

/// A position in what the writers of one database have committed (the
/// merger's merged-through id for the main database) that its checkpoints
/// declare durable. Writers must advance [`committed`](Self::committed)
/// only after the commit that reached it returned.
pub trait DurableMark: Send + Sync + std::fmt::Debug {
    /// How far the commits have got; read before a checkpoint begins.
    fn committed(&self) -> i64;
    /// Every commit up to `mark` (a value [`committed`](Self::committed)
    /// returned) is on disk.
    fn made_durable(&self, mark: i64);
}

/// Runs [`checkpoint`] in `mode` on `conn` and, if it was
/// [complete](CheckpointResult::complete), tells `mark` that what had been
/// committed when it began is durable.
pub fn checkpoint_marking(
    conn: &Connection,
    mode: &str,
    mark: Option<&dyn DurableMark>,
) -> rusqlite::Result<CheckpointResult> {
    let committed = mark.map(|m| (m, m.committed()));
    let result = checkpoint(conn, mode)?;
    if let Some((mark, through)) = committed {
        if result.complete() {
            mark.made_durable(through);
        }
    }
    Ok(result)
}

/// Runs `PRAGMA main.wal_checkpoint(mode)` on `conn`: only its own file,
/// never a read-only attached one (which would fail the whole call).
pub fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<CheckpointResult> {
    conn.query_row(&format!("PRAGMA main.wal_checkpoint({mode})"), [], |r| {
        Ok(CheckpointResult {
            busy: r.get::<_, i64>(0)? != 0,
            log_frames: r.get::<_, i64>(1)?.max(0) as u64,
            backfilled: r.get::<_, i64>(2)?.max(0) as u64,
        })
    })
}

/// The WAL's state as last seen, shared by the checkpointer and the writer.
#[derive(Debug)]
pub struct WalState {
    log_frames: AtomicU64,
    backfilled: AtomicU64,
    /// Microseconds after `epoch` of the writer's last commit.
    last_commit_us: AtomicU64,
    epoch: Instant,
    /// What the checkpointer's complete checkpoints make durable.
    mark: Option<Arc<dyn DurableMark>>,
}

impl Default for WalState {
    fn default() -> Self {
        WalState {
            log_frames: AtomicU64::new(0),
            backfilled: AtomicU64::new(0),
            last_commit_us: AtomicU64::new(0),
            epoch: Instant::now(),
            mark: None,
        }
    }
}

impl WalState {
    /// The state of a WAL whose checkpointer tells `mark` what each of its
    /// complete checkpoints made durable.
    pub fn marking(mark: Arc<dyn DurableMark>) -> Self {
        WalState {
            mark: Some(mark),
            ..WalState::default()
        }
    }

    fn publish(&self, r: CheckpointResult) {
        self.log_frames.store(r.log_frames, Ordering::Relaxed);
        self.backfilled.store(r.backfilled, Ordering::Relaxed);
    }

    /// Records a commit to this WAL's database, so the checkpointer does
    /// not take it for idle (its idle TRUNCATE would hold up the writer).
    pub fn note_commit(&self) {
        let us = self.epoch.elapsed().as_micros() as u64;
        self.last_commit_us.store(us, Ordering::Relaxed);
    }

    fn writer_idle_for(&self) -> Duration {
        let last = Duration::from_micros(self.last_commit_us.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// How long the writer waits for a lock held by another connection (a
/// standalone `codi2`, the checkpointer's rare TRUNCATE) before its batch
/// fails: long, because failing means rejecting logs.
pub const WRITER_BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// Configures the writer's connection for this policy: no auto-checkpoint
/// inside commits, the WAL file trimmed on restart, and a lock wait long
/// enough that contention never rejects a log.
pub fn configure_writer(conn: &Connection, policy: &WalPolicy) -> rusqlite::Result<()> {
    conn.busy_timeout(WRITER_BUSY_TIMEOUT)?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(None, "journal_size_limit", policy.restart_bytes as i64)?;
    Ok(())
}

/// At shutdown, after the last commit: stops `checkpointer`, then truncates
/// the WAL of `conn`'s file (`what`, for the log) as a courtesy that waits
/// at most `lock_wait` for another connection's lock, and tells `mark`
/// (if any) what that made durable.
pub fn final_truncate(
    conn: &Connection,
    checkpointer: Option<Checkpointer>,
    lock_wait: Duration,
    what: &str,
    metrics: &Metrics,
    mark: Option<&dyn DurableMark>,
) {
    if let Some(checkpointer) = checkpointer {
        checkpointer.stop();
    }
    if let Err(e) = conn.busy_timeout(lock_wait) {
        log::warn!("cannot shorten the busy timeout for the final checkpoint of {what}: {e}");
    }
    match checkpoint_marking(conn, "TRUNCATE", mark) {
        Ok(result) if !result.busy => Metrics::add(&metrics.checkpoints, 1),
        Ok(_) => log::warn!("final WAL checkpoint of {what} was blocked by a reader"),
        Err(e) => log::error!("final WAL checkpoint of {what} failed: {e}"),
    }
}

/// The running checkpointer thread; dropping `stop` ends it.
#[derive(Debug)]
pub struct Checkpointer {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Opens its own connection to `db_path` and starts the thread `name`.
    pub fn spawn(
        db_path: &Path,
        name: &str,
        policy: WalPolicy,
        state: Arc<WalState>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let conn = Connection::open_with_flags(
            db_path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: db_path.to_owned(),
            source,
        })?;
        conn.busy_timeout(schema::BUSY_TIMEOUT)?;
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let thread = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                crate::sched::lower_current_thread_priority(crate::sched::CHECKPOINTER_NICE);
                run_checkpointer(&conn, policy, &state, &metrics, &stopped)
            })
            .map_err(|source| StoreError::Spawn {
                name: name.to_owned(),
                source,
            })?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the checkpointer thread panicked");
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn run_checkpointer(
    conn: &Connection,
    policy: WalPolicy,
    state: &WalState,
    metrics: &Metrics,
    stopped: &Receiver<()>,
) {
    let page_size: i64 = conn
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .unwrap_or(4096);
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(policy.interval) {
        let result = match checkpoint_marking(conn, "PASSIVE", state.mark.as_deref()) {
            Ok(result) => result,
            Err(e) => {
                log::warn!("PASSIVE checkpoint failed: {e}");
                continue;
            }
        };
        state.publish(result);
        Metrics::add(&metrics.checkpoints, 1);
        let idle = state.writer_idle_for() >= IDLE_BEFORE_TRUNCATE;
        let big = result.log_frames * page_size.max(512) as u64 > policy.restart_bytes;
        if idle && big && result.backfilled == result.log_frames {
            truncate_idle(conn, state, metrics);
        }
    }
}

/// TRUNCATE with a lock wait short enough never to hold up the writer.
fn truncate_idle(conn: &Connection, state: &WalState, metrics: &Metrics) {
    let outcome = conn
        .busy_timeout(TRUNCATE_LOCK_WAIT)
        .and_then(|()| checkpoint_marking(conn, "TRUNCATE", state.mark.as_deref()));
    if let Err(e) = conn.busy_timeout(schema::BUSY_TIMEOUT) {
        log::warn!("cannot restore the checkpointer's busy timeout: {e}");
    }
    match outcome {
        Ok(done) if !done.busy => {
            state.publish(done);
            Metrics::add(&metrics.checkpoints, 1);
        }
        Ok(_) => {}
        Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => {}
        Err(e) => log::warn!("idle TRUNCATE checkpoint failed: {e}"),
    }
}

/// The writer's own checkpoint between two batches: RESTART, which also
/// waits (at most [`TRUNCATE_LOCK_WAIT`]) for readers still on the WAL's
/// frames to finish, so that the next transaction can start the WAL over:
/// a reader always on it (hub sync reading batch after batch) otherwise
/// kept it from ever starting over (it grew past 1 GiB in 20 s at 100,000
/// logs/s). Readers that begin meanwhile read the database file alone and
/// are no obstacle. Its lock wait is restored afterwards.
fn restart_briefly(
    conn: &Connection,
    mark: Option<&dyn DurableMark>,
) -> rusqlite::Result<CheckpointResult> {
    let wait: i64 = conn.pragma_query_value(None, "busy_timeout", |r| r.get(0))?;
    conn.busy_timeout(TRUNCATE_LOCK_WAIT)?;
    let result = checkpoint_marking(conn, "RESTART", mark);
    if let Err(e) = conn.busy_timeout(Duration::from_millis(wait.max(0) as u64)) {
        log::error!("cannot restore the writer's lock wait of {wait} ms: {e}");
    }
    result
}

/// The writer's half of the policy.
#[derive(Debug)]
pub struct WalTrimmer {
    policy: WalPolicy,
    page_size: u64,
    state: Arc<WalState>,
    /// Backfill with a RESTART that waits briefly for readers
    /// ([`restart_briefly`]) rather than a PASSIVE checkpoint.
    wait_for_readers: bool,
}

impl WalTrimmer {
    /// The trimmer for the writer connection `conn`.
    pub fn new(
        conn: &Connection,
        policy: WalPolicy,
        state: Arc<WalState>,
    ) -> rusqlite::Result<Self> {
        let page_size: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
        Ok(WalTrimmer {
            policy,
            page_size: page_size.max(512) as u64,
            state,
            wait_for_readers: false,
        })
    }

    /// The same, backfilling with a RESTART that waits at most 10 ms for
    /// readers to leave the WAL: for the one connection that owns a file's
    /// writes (the merger's, of the main database). It holds the write
    /// lock meanwhile, so any other writer of the file may wait that long
    /// too; the other trimmers stay PASSIVE.
    pub fn waiting_for_readers(mut self) -> Self {
        self.wait_for_readers = true;
        self
    }

    /// Called by the writer between batches: backfills the rest of the WAL
    /// when it is big enough to restart and cheap enough to finish. Returns
    /// how long the writer paused, if it did.
    pub fn after_commit(&self, conn: &Connection) -> Option<Duration> {
        self.state.note_commit();
        let log_frames = self.state.log_frames.load(Ordering::Relaxed);
        let backlog = log_frames.saturating_sub(self.state.backfilled.load(Ordering::Relaxed));
        let wal_bytes = log_frames * self.page_size;
        let due = wal_bytes >= self.policy.hard_limit_bytes
            || (wal_bytes >= self.policy.restart_bytes && backlog <= SMALL_BACKLOG_FRAMES);
        if !due {
            return None;
        }
        let started = Instant::now();
        let done = if self.wait_for_readers {
            restart_briefly(conn, self.state.mark.as_deref())
        } else {
            checkpoint_marking(conn, "PASSIVE", self.state.mark.as_deref())
        };
        match done {
            Ok(result) => {
                // Until the checkpointer looks again, assume the restart took:
                // the writer's next transaction starts the WAL over.
                self.state.publish(CheckpointResult {
                    busy: false,
                    log_frames: 0,
                    backfilled: 0,
                });
                let paused = started.elapsed();
                if wal_bytes >= self.policy.hard_limit_bytes {
                    log::warn!(
                        "WAL reached {} MiB with {backlog} frames not yet checkpointed; \
                         the writer paused {paused:.0?} to backfill {} frames",
                        wal_bytes >> 20,
                        result
                            .log_frames
                            .saturating_sub(result.backfilled.min(log_frames))
                    );
                }
                Some(paused)
            }
            Err(e) => {
                log::warn!("writer-side checkpoint failed: {e}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::LogLevel;
    use crate::store::{ops, LogRow, WriteOp};
    use rusqlite::TransactionBehavior;
    use uuid::Uuid;

    fn insert(conn: &mut Connection, rows: usize) {
        let op = WriteOp::Logs(
            (0..rows)
                .map(|i| LogRow {
                    uuid: Uuid::now_v7(),
                    timestamp_us: i as i64,
                    level: LogLevel::Info,
                    component: "c".into(),
                    session_id: Some(format!("s{}", i % 50)),
                    message: "m".repeat(200),
                    metadata_json: None,
                    uid: None,
                })
                .collect(),
        );
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        ops::apply(&tx, &op, 0).unwrap();
        tx.commit().unwrap();
    }

    fn wal_frames(conn: &Connection) -> u64 {
        checkpoint(conn, "PASSIVE").unwrap().log_frames
    }

    #[test]
    fn writer_restarts_a_big_wal_once_backfilled_and_leaves_a_small_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db/codi.db");
        let mut conn = schema::open_rw(&path, 8).unwrap();
        let policy = WalPolicy {
            interval: Duration::from_secs(3600),
            restart_bytes: 1024 * 1024,
            hard_limit_bytes: u64::MAX,
        };
        configure_writer(&conn, &policy).unwrap();
        let state = Arc::new(WalState::default());
        let trimmer = WalTrimmer::new(&conn, policy, Arc::clone(&state)).unwrap();

        insert(&mut conn, 10);
        state.publish(checkpoint(&conn, "PASSIVE").unwrap());
        assert_eq!(trimmer.after_commit(&conn), None, "small WAL is left alone");

        insert(&mut conn, 20_000);
        let before = wal_frames(&conn);
        assert!(before * 16 * 1024 >= policy.restart_bytes, "WAL is big now");
        // The checkpointer has backfilled everything: the writer finishes up.
        state.publish(checkpoint(&conn, "PASSIVE").unwrap());
        assert!(trimmer.after_commit(&conn).is_some());
        insert(&mut conn, 1);
        let after = wal_frames(&conn);
        assert!(after < before, "the WAL started over: {after} < {before}");
        let file = std::fs::metadata(path.with_extension("db-wal"))
            .unwrap()
            .len();
        assert!(
            file <= policy.restart_bytes,
            "file trimmed to the limit: {file}"
        );
    }

    #[test]
    fn a_big_backlog_waits_for_the_checkpointer_until_the_hard_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = schema::open_rw(&dir.path().join("db/codi.db"), 8).unwrap();
        let mut policy = WalPolicy {
            interval: Duration::from_secs(3600),
            restart_bytes: 256 * 1024,
            hard_limit_bytes: u64::MAX,
        };
        configure_writer(&conn, &policy).unwrap();
        insert(&mut conn, 5_000);
        let state = Arc::new(WalState::default());
        let frames = wal_frames(&conn);
        // Seen by the checkpointer with nothing backfilled yet.
        state.publish(CheckpointResult {
            busy: false,
            log_frames: frames + SMALL_BACKLOG_FRAMES + 1,
            backfilled: 0,
        });
        let trimmer = WalTrimmer::new(&conn, policy, Arc::clone(&state)).unwrap();
        assert_eq!(
            trimmer.after_commit(&conn),
            None,
            "backlog too big to pause for"
        );
        policy.hard_limit_bytes = policy.restart_bytes;
        let forced = WalTrimmer::new(&conn, policy, state).unwrap();
        assert!(forced.after_commit(&conn).is_some(), "hard limit forces it");
    }

    #[test]
    fn checkpointer_truncates_a_big_wal_once_the_writer_is_idle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db/codi.db");
        let mut conn = schema::open_rw(&path, 8).unwrap();
        let policy = WalPolicy {
            interval: Duration::from_millis(5),
            restart_bytes: 1024 * 1024,
            hard_limit_bytes: u64::MAX,
        };
        configure_writer(&conn, &policy).unwrap();
        insert(&mut conn, 20_000);
        let wal = path.with_extension("db-wal");
        assert!(std::fs::metadata(&wal).unwrap().len() > policy.restart_bytes);
        let state = Arc::new(WalState::default());
        let ck =
            Checkpointer::spawn(&path, "t", policy, state, Arc::new(Metrics::default())).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&wal).unwrap().len() > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        ck.stop();
        assert_eq!(
            std::fs::metadata(&wal).unwrap().len(),
            0,
            "idle WAL truncated"
        );
        drop(conn);
    }

    #[test]
    fn checkpointer_publishes_progress_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db/codi.db");
        let mut conn = schema::open_rw(&path, 8).unwrap();
        configure_writer(&conn, &WalPolicy::default()).unwrap();
        insert(&mut conn, 100);
        let state = Arc::new(WalState::default());
        let metrics = Arc::new(Metrics::default());
        let policy = WalPolicy {
            interval: Duration::from_millis(5),
            ..WalPolicy::default()
        };
        let ck = Checkpointer::spawn(&path, "t", policy, Arc::clone(&state), Arc::clone(&metrics))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while state.backfilled.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        ck.stop();
        assert!(state.backfilled.load(Ordering::Relaxed) > 0);
        assert_eq!(
            state.backfilled.load(Ordering::Relaxed),
            state.log_frames.load(Ordering::Relaxed)
        );
        assert!(Metrics::get(&metrics.checkpoints) >= 1);
    }
}
