//! The sync thread (`codi-sync`): ships `logs`, `sessions` and
//! `export_archive` to the hub, exactly once.
//!
//! Progress is a watermark (`sync_state.last_log_id` of target `logs`,
//! the largest id the hub has acknowledged) plus a record of the one batch
//! in flight (its id range and digest), never a per-row update:
//!
//! 1. A batch is formed from the ids above the watermark up to the
//!    merger's merged mark ([`Watermarks::merged_through`]): rows in
//!    `logs`, every id below it filled.
//! 2. Its id range and digest are committed (`synchronous = FULL`) before
//!    it is sent. That commit syncs the main database's WAL, and with it
//!    every frame committed before it by any connection: the rows the
//!    batch was read from are on disk before the hub sees them, so a power
//!    cut cannot take them back and give their ids to other logs (the
//!    model test's watermark rule and its `Ship` step, `store::model_tests`;
//!    waiting for a checkpoint's durable mark instead cost 2-3 s of
//!    latency at 100,000 logs/s, docs/PERFORMANCE.md).
//! 3. It is sent to the hub's `Distributed` table with
//!    `insert_distributed_sync = 1`, so a 2xx means it is in a replicated
//!    table; after a failure, or a restart, the recorded body is sent
//!    again, byte for byte (whatever retention or rotation did to its rows
//!    since), which the hub's block deduplication drops as a repeat;
//!    unless it is over `batch_size` or `batch_bytes` as they are now
//!    (lowered since, because the hub refuses bodies that large): then it
//!    is cut again to them rather than refused for ever.
//! 4. On 2xx the watermark moves to the batch's last id and the record is
//!    cleared, in one transaction.
//!
//! Sessions and export records change after they are written (a session
//! ends), so their watermark is not a row id but the `seq` of
//! `hub_changes`, where a trigger records every insert and update (schema
//! v9); a batch holds each changed row once, as it is when the batch is
//! formed, and the shipped changes are deleted with the watermark's move.
//!
//! Between failures it waits `backoff_min`, doubling up to `backoff_max`,
//! less a random quarter. While a damaged file's rows are being salvaged
//! (rows may come back below the watermark) it waits. The watermark's
//! meaning for the seed's `synced` column: a log is synced when its id is
//! at or below `last_log_id`.

use super::batch::{self, Batch, ChangeKind};
use super::transport::{self, Transport};
use crate::config::ServerHubConfig;
use crate::fault;
use crate::metrics::Metrics;
use crate::proto::Timestamp;
use crate::store::merger::{MainWriteError, MainWriteLink};
use crate::store::watermarks::Watermarks;
use crate::store::{schema, StoreError};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The `sync_state` target of logs.
pub const LOGS: &str = "logs";
/// How long the sync waits for the merger to take up one of its writes, and
/// then again for its answer.
const WRITE_WAIT: Duration = Duration::from_secs(30);
/// How long a stop waits for a request under way before it leaves the
/// thread behind (its batch is re-sent at the next start).
const STOP_WAIT: Duration = Duration::from_secs(2);

/// The largest log id the hub has acknowledged (0 before any), read on
/// `conn` (the main database).
pub fn shipped_through(conn: &Connection) -> rusqlite::Result<i64> {
    Ok(conn
        .query_row(
            "SELECT last_log_id FROM main.sync_state WHERE target = ?1",
            [LOGS],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0))
}

/// What a reload (SIGHUP) may change while the sync runs: how batches are
/// cut and paced. The rest of `[server_hub]` (where, as whom, into which
/// tables) takes a restart, so that a batch in flight always goes again
/// to the hub it was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// `server_hub.batch_size`.
    pub batch_size: usize,
    /// `server_hub.batch_bytes`.
    pub batch_bytes: usize,
    /// `server_hub.sync_interval`.
    pub sync_interval: Duration,
    /// `server_hub.backoff_min`.
    pub backoff_min: Duration,
    /// `server_hub.backoff_max`.
    pub backoff_max: Duration,
}

impl From<&ServerHubConfig> for Tuning {
    fn from(hub: &ServerHubConfig) -> Self {
        Tuning {
            batch_size: hub.batch_size,
            batch_bytes: hub.batch_bytes,
            sync_interval: hub.sync_interval,
            backoff_min: hub.backoff_min,
            backoff_max: hub.backoff_max,
        }
    }
}

/// The tuning the sync thread reads at each round, which a reload replaces.
pub type LiveTuning = Arc<parking_lot::RwLock<Tuning>>;

/// The running sync thread.
#[derive(Debug)]
pub struct SyncHandle {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl SyncHandle {
    /// Stops the thread: waits at most `STOP_WAIT` (2 s) for a request under
    /// way, then leaves it behind (its batch is recorded and goes again at
    /// the next start), so a slow hub cannot hold up the daemon's stop.
    pub fn stop(self) {
        drop(self.stop);
        let deadline = std::time::Instant::now() + STOP_WAIT;
        while !self.thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !self.thread.is_finished() {
            log::warn!("hub sync: a request to the hub is still under way; it goes again at the next start");
        } else if self.thread.join().is_err() {
            log::error!("the hub sync thread panicked");
        }
    }
}

/// Starts the sync thread for the store at `db` with `hub` (which must
/// have a URL), reading the merged mark from `merge` and its tuning from
/// `tuning`; its writes go to the merger through `writes` (the writer's
/// [`main_write_link`](crate::store::writer::WriterHandle::main_write_link)),
/// or without it on its own connection.
pub fn spawn_sync(
    db: &Path,
    hub: &ServerHubConfig,
    tuning: LiveTuning,
    writes: Option<MainWriteLink>,
    merge: Arc<Watermarks>,
    metrics: Arc<Metrics>,
) -> Result<SyncHandle, StoreError> {
    let mut setup = schema::open_file(db, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    setup.pragma_update(None, "synchronous", "FULL")?;
    prepare_targets(&mut setup)?;
    // With the merger making its writes, the thread only reads: a
    // read-only connection. Without (tests), its own writes need FULL:
    // the record of the batch in flight must survive a power cut.
    let conn = if writes.is_some() {
        drop(setup);
        schema::open_file(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?
    } else {
        setup
    };
    let transport = Transport::new(hub).map_err(StoreError::HubSetup)?;
    let (stop, stopped) = crossbeam_channel::bounded(0);
    let sync = Sync {
        conn,
        hub: hub.clone(),
        transport,
        tuning,
        acked: std::cell::Cell::new(None),
        writes,
        merge,
        metrics,
        stopped,
    };
    let thread = std::thread::Builder::new()
        .name("codi-sync".into())
        .spawn(move || sync.run())
        .map_err(|source| StoreError::Spawn {
            name: "codi-sync".into(),
            source,
        })?;
    Ok(SyncHandle { stop, thread })
}

/// The record of the batch in flight: its range (ids or seqs), digest,
/// and for changes its body.
struct InFlight {
    first: i64,
    last: i64,
    digest: String,
    body: Option<Vec<u8>>,
}

/// A target whose last batch failed: when to try again, and why.
struct Failing {
    failures: u32,
    retry_at: Instant,
    error: String,
}

/// What one step did.
enum Progress {
    /// A batch went; `more`: it was full, so the next may go at once.
    Sent { more: bool },
    /// Nothing to send now.
    Idle,
}

/// What is shipped, each with its own `sync_state` row: logs by id,
/// sessions and export records by their `hub_changes` seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Logs,
    Changes(ChangeKind),
}

/// Every target, in the order a round ships them.
const TARGETS: [Target; 3] = [
    Target::Logs,
    Target::Changes(ChangeKind::Sessions),
    Target::Changes(ChangeKind::Exports),
];

impl Target {
    /// Its `sync_state.target`.
    fn name(self) -> &'static str {
        match self {
            Target::Logs => LOGS,
            Target::Changes(kind) => kind.name(),
        }
    }

    /// The hub's table for it.
    fn table(self, hub: &ServerHubConfig) -> &str {
        match self {
            Target::Logs => &hub.tables.logs,
            Target::Changes(ChangeKind::Sessions) => &hub.tables.sessions,
            Target::Changes(ChangeKind::Exports) => &hub.tables.exports,
        }
    }
}

/// Creates the `sync_state` row of every target that has none; the first
/// time a kind of changing row is shipped, every row it has is recorded as
/// changed (they were written before the sync), in the same transaction.
fn prepare_targets(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for target in TARGETS {
        let created = tx.execute(
            "INSERT OR IGNORE INTO sync_state (target, last_log_id, updated_at) VALUES (?1, 0, ?2)",
            params![target.name(), now_us()],
        )?;
        if let (1, Target::Changes(kind)) = (created, target) {
            let rows = kind.record_every_row(&tx)?;
            log::info!("hub sync: {rows} {} to ship from before", kind.name());
        }
    }
    tx.commit()
}

/// Forgets what was recorded for shipping sessions and export records:
/// run at a start with the hub off, so that `hub_changes` does not grow
/// without a sync to empty it (each retention pass then empties it of
/// what the triggers record during the run). When the hub is turned on again, every row
/// is shipped afresh (the hub keeps one row per key).
pub fn forget_changes(db: &Path) -> Result<(), StoreError> {
    let mut conn = schema::open_file(db, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM hub_changes", [])?;
    tx.execute(
        "DELETE FROM sync_state WHERE target IN (?1, ?2)",
        [ChangeKind::Sessions.name(), ChangeKind::Exports.name()],
    )?;
    tx.commit()?;
    Ok(())
}

struct Sync {
    conn: Connection,
    hub: ServerHubConfig,
    transport: Transport,
    tuning: LiveTuning,
    /// A batch of logs the hub acknowledged whose watermark move is not
    /// committed yet: it goes with the next batch's record (one write
    /// transaction, one lock wait behind the merger, one sync per batch).
    acked: std::cell::Cell<Option<i64>>,
    /// Where writes go to the merger, the main database's owner; `None`:
    /// on this thread's own connection (tests).
    writes: Option<MainWriteLink>,
    merge: Arc<Watermarks>,
    metrics: Arc<Metrics>,
    stopped: Receiver<()>,
}

impl Sync {
    fn run(self) {
        // Each target fails and backs off on its own: a hub that refuses
        // one table's batches does not hold up the others.
        let mut failing: [Option<Failing>; TARGETS.len()] = Default::default();
        loop {
            let now = Instant::now();
            // One round per interval, start to start: a round that took a
            // while (a large batch) waits only for the rest of it.
            let mut wait = self.tuning.read().sync_interval;
            let round_started = now;
            match self.salvaging() {
                Ok(true) => {}
                Ok(false) => {
                    for (i, target) in TARGETS.into_iter().enumerate() {
                        if failing[i].as_ref().is_some_and(|f| now < f.retry_at) {
                            continue;
                        }
                        match self.step(target) {
                            // A backlog goes in full batches back to back;
                            // otherwise one batch per interval (few, large
                            // inserts: ClickHouse makes a part of each).
                            Ok(progress) => {
                                if let Some(f) = failing[i].take() {
                                    log::info!(
                                        "the hub takes {} batches again after {} failures",
                                        target.name(),
                                        f.failures
                                    );
                                }
                                if let Progress::Sent { more: true } = progress {
                                    wait = Duration::ZERO;
                                }
                            }
                            Err(e) => {
                                let failures = failing[i].as_ref().map_or(0, |f| f.failures) + 1;
                                let backoff = self.backoff(failures);
                                Metrics::add(&self.metrics.sync_failures, 1);
                                log::warn!(
                                    "hub sync of {} to {} failed ({failures} in a row; retrying \
                                     in {backoff:?}): {e}",
                                    target.name(),
                                    self.hub.url.as_deref().unwrap_or("")
                                );
                                failing[i] = Some(Failing {
                                    failures,
                                    retry_at: Instant::now() + backoff,
                                    error: e,
                                });
                            }
                        }
                    }
                }
                Err(e) => log::warn!("hub sync: the database: {e}"),
            }
            let troubles: Vec<String> = TARGETS
                .iter()
                .zip(&failing)
                .filter_map(|(t, f)| Some(format!("{}: {}", t.name(), f.as_ref()?.error)))
                .collect();
            if troubles.is_empty() {
                self.metrics.health.recover("hub");
            } else {
                self.metrics.health.fail(
                    "hub",
                    format!("batches to the hub fail: {}", troubles.join("; ")),
                );
            }
            let now = Instant::now();
            wait = wait.saturating_sub(now.duration_since(round_started));
            for f in failing.iter().flatten() {
                wait = wait.min(f.retry_at.saturating_duration_since(now));
            }
            self.update_lag();
            match self.stopped.recv_timeout(wait) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => {
                    if let Err(e) = self.flush_acked() {
                        log::warn!("hub sync: cannot record the last batch the hub took (it goes again at the next start): {e}");
                    }
                    return;
                }
            }
        }
    }

    /// Commits the watermark move of a batch of logs the hub acknowledged,
    /// if one is waiting.
    fn flush_acked(&self) -> Result<(), String> {
        if let Some(last) = self.acked.take() {
            self.shipped(Target::Logs, last)?;
        }
        Ok(())
    }

    /// Whether a damaged file's rows are being salvaged (they may come
    /// back below a watermark: the sync waits).
    fn salvaging(&self) -> rusqlite::Result<bool> {
        self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM recoveries WHERE state IN ('moving', 'pending'))",
            [],
            |r| r.get(0),
        )
    }

    /// Sets the lag gauge: the age of the oldest log the hub does not
    /// have (0 when it has all), so that it grows while the hub is away.
    fn update_lag(&self) {
        let oldest: rusqlite::Result<Option<i64>> = self
            .conn
            .query_row(
                "SELECT l.created_at FROM main.logs l, main.sync_state s \
                 WHERE s.target = ?1 AND l.id > s.last_log_id ORDER BY l.id LIMIT 1",
                [LOGS],
                |r| r.get(0),
            )
            .optional();
        let lag_us = match oldest {
            Ok(Some(created)) => now_us().saturating_sub(created).max(0),
            Ok(None) => 0,
            Err(e) => {
                log::debug!("hub sync: cannot read the oldest unshipped log: {e}");
                return;
            }
        };
        Metrics::set(&self.metrics.sync_lag_seconds, (lag_us / 1_000_000) as u64);
    }

    fn backoff(&self, failures: u32) -> Duration {
        let jitter = rand_fraction();
        let t = *self.tuning.read();
        backoff(t.backoff_min, t.backoff_max, failures, jitter)
    }

    /// Ships the batch of `target` in flight, or its next one.
    fn step(&self, target: Target) -> Result<Progress, String> {
        let sql = |e: rusqlite::Error| format!("the database: {e}");
        let (mut mark, mut in_flight) = self.state(target).map_err(sql)?;
        // The recorded batch in flight is one the hub took already.
        let acked = if target == Target::Logs {
            self.acked.get()
        } else {
            None
        };
        if let Some(last) = acked {
            mark = mark.max(last);
            in_flight = None;
        }
        if target == Target::Logs {
            self.merge.note_shipped(mark);
        }
        let again = match in_flight {
            Some(in_flight) => Some(self.again(target, in_flight).map_err(sql)?),
            None => None,
        };
        let batch = match again {
            Some(b) if self.within_bounds(&b) => b,
            stale => {
                if let Some(b) = stale {
                    // batch_size or batch_bytes was lowered since it was
                    // first sent (perhaps because the hub refuses a body
                    // that large): sent as it is it would fail for ever.
                    // The rows go again in batches of the new bounds, so
                    // the hub may hold some twice until its merges.
                    log::warn!(
                        "hub sync: the {} batch in flight ({}..={}, {} rows, {} bytes) is over \
                         server_hub.batch_size or batch_bytes; it is cut again to them (the hub \
                         may keep some of its rows twice until its merges)",
                        target.name(),
                        b.first,
                        b.last,
                        batch::rows_in(&b.body),
                        b.body.len()
                    );
                }
                let started = Instant::now();
                let Some(b) = self.form(target, mark).map_err(sql)? else {
                    if target == Target::Logs {
                        self.flush_acked()?;
                    }
                    return Ok(Progress::Idle);
                };
                let formed = started.elapsed();
                if b.body.is_empty() {
                    // Every changed row is gone: nothing to send.
                    if target == Target::Logs {
                        self.flush_acked()?;
                    }
                    self.shipped(target, b.last)?;
                    return Ok(Progress::Sent { more: b.more });
                }
                // Committed with synchronous = FULL, which also makes every
                // row the batch was read from durable: nothing the hub is
                // sent can be taken back by a power cut. A batch of logs is
                // recorded by its range and digest (its rows do not change:
                // the same range gives the same bytes again); a batch of
                // changes by its body (its rows may change again).
                let body = match target {
                    Target::Logs => None,
                    Target::Changes(_) => Some(&b.body),
                };
                // With the watermark move of the batch before it, if the hub
                // took that one and it waits.
                let record = (target.name(), b.first, b.last, b.digest.clone());
                let body = body.cloned();
                let before = acked.unwrap_or(0);
                self.write(true, move |tx| {
                    let (name, first, last, digest) = record;
                    tx.execute(
                        "UPDATE sync_state SET last_log_id = max(last_log_id, ?7), \
                         inflight_first = ?2, inflight_last = ?3, inflight_digest = ?4, \
                         inflight_body = ?5, updated_at = ?6 WHERE target = ?1",
                        params![name, first, last, digest, body, now_us(), before],
                    )?;
                    Ok(())
                })?;
                if target == Target::Logs {
                    self.acked.set(None);
                }
                log::debug!(
                    "hub sync: {} batch {}..={} of {} rows, {} bytes: read in {formed:.0?}, \
                     recorded in {:.0?}",
                    target.name(),
                    b.first,
                    b.last,
                    batch::rows_in(&b.body),
                    b.body.len(),
                    started.elapsed() - formed
                );
                b
            }
        };
        if batch.body.is_empty() {
            self.shipped(target, batch.last)?;
            return Ok(Progress::Sent { more: true });
        }
        let name = transport::batch_name(target.name(), batch.last, &batch.digest);
        let sending = Instant::now();
        self.transport
            .send(target.table(&self.hub), &name, &batch.body)?;
        let sent = sending.elapsed();
        fault::point("hub-after-send");
        if target == Target::Logs {
            self.merge.note_shipped(batch.last);
        }
        if target == Target::Logs && batch.more {
            // More wait: the watermark goes with the next batch's record.
            self.acked.set(Some(batch.last));
        } else {
            self.shipped(target, batch.last)?;
        }
        log::debug!(
            "hub sync: {name} sent in {sent:.0?}, watermark recorded in {:.0?}",
            sending.elapsed() - sent
        );
        Metrics::add(&self.metrics.sync_batches, 1);
        Metrics::add(&self.metrics.sync_rows, batch::rows_in(&batch.body) as u64);
        let now = now_us();
        for created in &batch.created_at {
            let us = now.saturating_sub(*created).max(0) as u64;
            self.metrics.sync_latency.record(us.saturating_mul(1000));
        }
        Ok(Progress::Sent { more: batch.more })
    }

    /// Whether `b` keeps to the bounds now configured (a batch of one row
    /// always does).
    fn within_bounds(&self, b: &Batch) -> bool {
        let rows = batch::rows_in(&b.body);
        let t = *self.tuning.read();
        rows <= 1 || (rows <= t.batch_size && b.body.len() <= t.batch_bytes)
    }

    /// The next batch of `target` above `mark`, if there is one.
    fn form(&self, target: Target, mark: i64) -> rusqlite::Result<Option<Batch>> {
        let host = self.hub.host_id.as_str();
        let t = *self.tuning.read();
        match target {
            Target::Logs => batch::read(
                &self.conn,
                host,
                mark,
                self.merge.merged_through(),
                t.batch_size,
                t.batch_bytes,
            ),
            Target::Changes(kind) => {
                batch::read_changes(&self.conn, kind, host, mark, t.batch_size, t.batch_bytes)
            }
        }
    }

    /// The batch in flight, to send again: the recorded body, or for logs
    /// the same range read again, which gives the same bytes unless the
    /// size cap rotated some of its rows out since (then the rest is
    /// sent: a new block, whose rows the hub's merges keep once).
    fn again(&self, target: Target, in_flight: InFlight) -> rusqlite::Result<Batch> {
        let InFlight {
            first,
            last,
            digest,
            body,
        } = in_flight;
        if let Some(body) = body {
            return Ok(Batch {
                first,
                last,
                body,
                digest,
                created_at: Vec::new(),
                more: true,
            });
        }
        let host = self.hub.host_id.as_str();
        let read = batch::read(&self.conn, host, first - 1, last, usize::MAX, usize::MAX)?;
        let mut b = read.unwrap_or(Batch {
            first,
            last,
            body: Vec::new(),
            digest: String::new(),
            created_at: Vec::new(),
            more: true,
        });
        if b.digest != digest {
            log::warn!(
                "hub sync: the {} batch in flight ({first}..={last}) reads differently than \
                 when it was first sent (rows rotated out by the size cap or lost to a damaged \
                 file, or server_hub.host_id changed); sending it as it is now, a new block",
                target.name()
            );
        }
        (b.first, b.last, b.more) = (first, last, true);
        Ok(b)
    }

    /// The watermark of `target` and its batch in flight, if any.
    fn state(&self, target: Target) -> rusqlite::Result<(i64, Option<InFlight>)> {
        self.conn.query_row(
            "SELECT last_log_id, inflight_first, inflight_last, inflight_digest, inflight_body \
             FROM sync_state WHERE target = ?1",
            [target.name()],
            |r| {
                let in_flight = match (r.get(1)?, r.get(2)?, r.get(3)?) {
                    (Some(first), Some(last), Some(digest)) => Some(InFlight {
                        first,
                        last,
                        digest,
                        body: r.get(4)?,
                    }),
                    _ => None,
                };
                Ok((r.get(0)?, in_flight))
            },
        )
    }

    /// The hub has everything of `target` up to `last`: the watermark moves
    /// there, the batch in flight is done and (for changes) the shipped
    /// changes are dropped, in one transaction.
    fn shipped(&self, target: Target, last: i64) -> Result<(), String> {
        self.write(false, move |tx| {
            tx.execute(
                "UPDATE sync_state SET last_log_id = max(last_log_id, ?2), inflight_first = NULL, \
                 inflight_last = NULL, inflight_digest = NULL, inflight_body = NULL, \
                 updated_at = ?3 WHERE target = ?1",
                params![target.name(), last, now_us()],
            )?;
            if let Target::Changes(kind) = target {
                tx.execute(
                    "DELETE FROM hub_changes WHERE kind = ?1 AND seq <= ?2",
                    params![kind.name(), last],
                )?;
            }
            Ok(())
        })
    }

    /// Runs `apply` in one transaction, committed with `synchronous =
    /// FULL` if `durable`: made by the merger between merges when linked
    /// (it owns the main database's writes), else on this connection
    /// (always FULL).
    fn write(
        &self,
        durable: bool,
        apply: impl FnOnce(&rusqlite::Transaction) -> rusqlite::Result<()> + Send + 'static,
    ) -> Result<(), String> {
        let Some(writes) = &self.writes else {
            let tx = self.conn.unchecked_transaction().map_err(db_error)?;
            apply(&tx).map_err(db_error)?;
            return tx.commit().map_err(db_error);
        };
        writes
            .write(durable, WRITE_WAIT, apply)
            .map_err(|e| match e {
                MainWriteError::Refused(e) => format!("the database: {e}"),
                e => format!("the sync's write: {e}"),
            })
    }
}

fn db_error(e: rusqlite::Error) -> String {
    format!("the database: {e}")
}

/// The wait after `failures` failures in a row: `min` doubled per failure
/// after the first, at most `max`, less up to a quarter of it by `jitter`
/// (in `[0, 1)`), so that hosts that lost the hub together do not all come
/// back in the same instant.
fn backoff(min: Duration, max: Duration, failures: u32, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    let wait = min.saturating_mul(1 << doublings).min(max);
    wait.mul_f64(1.0 - 0.25 * jitter.clamp(0.0, 1.0))
}

/// A random fraction in `[0, 1)` (the v4 UUID generator's randomness).
fn rand_fraction() -> f64 {
    let bits = uuid::Uuid::new_v4().as_u128() as u64 & ((1 << 53) - 1);
    bits as f64 / (1u64 << 53) as f64
}

fn now_us() -> i64 {
    Timestamp::now().as_micros()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::Mutex;

    /// A plain-HTTP receiver answering `script` in order (200 once used
    /// up) and recording every body it gets.
    #[test]
    fn a_start_with_the_hub_off_forgets_changes_and_the_next_sync_records_every_row_again() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("codi.db");
        let mut conn = schema::open_rw(&db, 1).unwrap();
        prepare_targets(&mut conn).unwrap();
        conn.execute(
            "INSERT INTO sessions (id, identity, started_at, recorded_at) VALUES ('s', 'me', 1, 1)",
            [],
        )
        .unwrap();
        let count = |conn: &Connection, sql: &str| -> i64 {
            conn.query_row(sql, [], |r| r.get(0)).unwrap()
        };
        assert_eq!(count(&conn, "SELECT count(*) FROM hub_changes"), 1);
        forget_changes(&db).unwrap();
        assert_eq!(count(&conn, "SELECT count(*) FROM hub_changes"), 0);
        assert_eq!(
            count(&conn, "SELECT count(*) FROM sync_state"),
            1,
            "only the logs' watermark is kept"
        );
        // Turned on again: the session is recorded as changed once more.
        prepare_targets(&mut conn).unwrap();
        assert_eq!(
            count(
                &conn,
                "SELECT count(*) FROM hub_changes WHERE kind = 'sessions' AND row_key = 's'"
            ),
            1
        );
    }

    fn receiver(script: Vec<u16>) -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/in", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&bodies);
        std::thread::spawn(move || {
            let mut script = script.into_iter();
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let mut reader = BufReader::new(stream);
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            length = v.trim().parse().unwrap();
                        }
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                seen.lock().unwrap().push(body);
                let status = script.next().unwrap_or(200);
                let _ = write!(
                    reader.get_mut(),
                    "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        (url, bodies)
    }

    fn sync(db: &Path, url: &str, batch_size: usize, batch_bytes: usize) -> Sync {
        let text = format!(
            "[server_hub]\nenabled = true\nkind = \"ndjson\"\nurl = \"{url}\"\n\
             host_id = \"h\"\nbatch_size = {batch_size}\n"
        );
        // Below the smallest batch_bytes a configuration may set, to keep
        // the test's bodies small.
        let mut config =
            crate::config::Config::from_toml_str(&text, &crate::config::Overrides::default())
                .unwrap();
        config.server_hub.batch_bytes = batch_bytes;
        let mut conn = schema::open_file(db, OpenFlags::SQLITE_OPEN_READ_WRITE).unwrap();
        prepare_targets(&mut conn).unwrap();
        let merge = Watermarks::new(i64::MAX, i64::MAX, uuid::Uuid::nil());
        Sync {
            conn,
            transport: Transport::new(&config.server_hub).unwrap(),
            tuning: Arc::new(parking_lot::RwLock::new(Tuning::from(&config.server_hub))),
            acked: std::cell::Cell::new(None),
            writes: None,
            hub: config.server_hub,
            merge: Arc::new(merge),
            metrics: Arc::new(Metrics::default()),
            stopped: crossbeam_channel::bounded(0).1,
        }
    }

    #[test]
    fn a_batch_in_flight_over_bounds_lowered_since_is_cut_again() {
        // A receiver refused a batch of 20 logs (too large for it, say);
        // the operator lowers batch_size to 5 and restarts: what goes next
        // must hold 5, or the batch is refused for ever.
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("codi.db");
        let conn = schema::open_rw(&db, 1).unwrap();
        for id in 1..=20 {
            conn.execute(
                "INSERT INTO logs (id, uuid, timestamp, level, component, message, created_at) \
                 VALUES (?1, ?2, ?3, 'info', 'c', 'm', ?3)",
                params![
                    id,
                    uuid::Uuid::from_u128(id as u128).as_bytes().to_vec(),
                    1_764_700_000_000_000i64 + id
                ],
            )
            .unwrap();
        }
        let (url, bodies) = receiver(vec![413]);
        assert!(sync(&db, &url, 100, 1 << 20).step(Target::Logs).is_err());
        assert_eq!(batch::rows_in(&bodies.lock().unwrap()[0]), 20);
        let lowered = sync(&db, &url, 5, 1 << 20);
        assert!(matches!(
            lowered.step(Target::Logs),
            Ok(Progress::Sent { more: true })
        ));
        assert_eq!(batch::rows_in(&bodies.lock().unwrap()[1]), 5);
        // More wait: the watermark's move goes with the next record.
        assert_eq!(lowered.acked.get(), Some(5));
        assert_eq!(shipped_through(&lowered.conn).unwrap(), 0);
        lowered.flush_acked().unwrap();
        assert_eq!(shipped_through(&lowered.conn).unwrap(), 5);
        // So with batch_bytes.
        let (url, bodies) = receiver(vec![413]);
        assert!(sync(&db, &url, 100, 1 << 20).step(Target::Logs).is_err());
        let line = bodies.lock().unwrap()[0].len() / 15;
        let lowered = sync(&db, &url, 100, 3 * line + 1);
        lowered.step(Target::Logs).unwrap();
        assert_eq!(batch::rows_in(&bodies.lock().unwrap()[1]), 3);
        lowered.flush_acked().unwrap();
        // A batch within the bounds goes again as it was.
        let (url, bodies) = receiver(vec![500]);
        assert!(sync(&db, &url, 4, 1 << 20).step(Target::Logs).is_err());
        sync(&db, &url, 6, 1 << 20).step(Target::Logs).unwrap();
        let bodies = bodies.lock().unwrap();
        assert_eq!(bodies[0], bodies[1]);
        assert_eq!(batch::rows_in(&bodies[1]), 4);
    }

    #[test]
    fn the_backoff_doubles_from_the_first_failure_up_to_its_bound() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(1));
        let waits: Vec<u128> = (1..=6)
            .map(|f| backoff(min, max, f, 0.0).as_millis())
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff(min, max, u32::MAX, 0.0), max);
        assert_eq!(backoff(min, max, 1, 1.0), Duration::from_millis(75));
        assert_eq!(backoff(min, max, 9, 0.5), Duration::from_millis(875));
        for _ in 0..1000 {
            let f = rand_fraction();
            assert!((0.0..1.0).contains(&f), "{f}");
        }
    }
}
