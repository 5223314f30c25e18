//! The writer's public face: its settings, [`spawn_writer`], which opens
//! every file and wires the writer, merger and checkpointer threads before
//! any of them starts, and the [`WriterHandle`] that joins them.

use super::group::GroupCommit;
use super::thread::Writer;
use super::{recover, IngestBody, MAX_PENDING_ROWS};
use crate::budget::InflightBudget;
use crate::metrics::Metrics;
use crate::reply::Replies;
use crate::store::ingest;
use crate::store::merger;
use crate::store::retention::{self, ArchiveClaims, Retention, RetentionPolicy};
use crate::store::tx::{spawn_named, Acker};
use crate::store::wal::{self, Checkpointer, DurableMark, WalPolicy, WalState, WalTrimmer};
use crate::store::watermarks::Watermarks;
use crate::store::{schema, StoreError, WriteJob};
use crossbeam_channel::Sender;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Tuning of the writer and checkpointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterSettings {
    /// SQLite page cache of each read-write connection, in MiB.
    pub cache_size_mb: u32,
    /// A transaction stops taking jobs once it holds this many log rows.
    pub batch_max_rows: usize,
    /// Longest a small batch waits for more rows under steady load (see
    /// the writer's group commit); zero commits at once.
    pub commit_delay: Duration,
    /// Capacity of the job queue (jobs, not rows).
    pub queue_capacity: usize,
    /// How the WAL is checkpointed and kept small (see [`crate::store::wal`]).
    pub wal: WalPolicy,
    /// What the merger expires (see [`crate::store::retention`]).
    pub retention: RetentionPolicy,
}

impl Default for WriterSettings {
    fn default() -> Self {
        WriterSettings {
            cache_size_mb: 64,
            batch_max_rows: 20_000,
            commit_delay: Duration::from_micros(crate::config::DEFAULT_COMMIT_DELAY_US),
            queue_capacity: 65_536,
            wal: WalPolicy::default(),
            retention: RetentionPolicy::default(),
        }
    }
}

/// The running writer thread, which owns the merger and checkpointers.
#[derive(Debug)]
pub struct WriterHandle {
    writer: JoinHandle<()>,
    salvage: Option<Sender<merger::SalvageRequest>>,
    main_writes: Sender<merger::MainWriteRequest>,
    claims: Arc<ArchiveClaims>,
    watermarks: Arc<Watermarks>,
}

impl WriterHandle {
    /// Where log ids stand in storage (hub sync reads the merged mark and
    /// moves the shipped one).
    pub fn watermarks(&self) -> Arc<Watermarks> {
        Arc::clone(&self.watermarks)
    }

    /// Where salvage steps go to the merger (once: for the salvage thread,
    /// [`crate::store::salvager`]). The merger does not wait for this sender to
    /// go before it exits.
    pub fn take_salvage_link(&mut self) -> Option<Sender<merger::SalvageRequest>> {
        self.salvage.take()
    }

    /// Where a thread that only reads the main database sends its writes
    /// to the merger, the database's one read-write owner: a link for each
    /// such thread (hub sync, the export watcher). Writes on it fail with
    /// `Stopped` once the merger has finished.
    pub fn main_write_link(&self) -> merger::MainWriteLink {
        merger::MainWriteLink::new(self.main_writes.clone())
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
    let mut conn = schema::open_ingest_rw(db_path, settings.cache_size_mb)?;
    wal::configure_writer(&conn, &settings.wal)?;
    let (state, pending) = recover(&mut conn, ingest::logs_max_uuid(&main)?)?;
    let state = Arc::new(state);
    let watermarks_for_handle = Arc::clone(&state);
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
    // `Watermarks::durable_through`).
    let main_wal = Arc::new(WalState::marking(Arc::clone(&state) as Arc<dyn DurableMark>));
    let (salvage_tx, salvage_rx) = crossbeam_channel::bounded(1);
    // Room for one waiting write of each thread that sends them.
    let (main_writes, main_writes_rx) = crossbeam_channel::bounded(2);
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
            main_writes: main_writes_rx,
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
        woke_merger_at: None,
        merger_stalled_at: None,
        acker: Acker::new(replies, metrics, budget),
        batch_max_rows: settings.batch_max_rows.max(1),
        group: GroupCommit::new(settings.commit_delay, settings.batch_max_rows),
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
            salvage: Some(salvage_tx),
            main_writes,
            claims,
            watermarks: watermarks_for_handle,
        },
    ))
}
