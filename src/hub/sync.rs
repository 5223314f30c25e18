//! The sync thread (`codi-sync`): ships `logs` to the hub, exactly once.
//!
//! Progress is a watermark (`sync_state.last_log_id` of target `logs`,
//! the largest id the hub has acknowledged) plus a record of the one batch
//! in flight (its id range and digest), never a per-row update:
//!
//! 1. A batch is formed from the ids above the watermark up to the
//!    merger's durable mark ([`MergeState::durable_through`]): only rows
//!    on disk in `logs`, which a power cut cannot take back, so no id the
//!    hub holds is ever given to another log (the model test's watermark
//!    rule, `store::model_tests`).
//! 2. Its id range, body and digest are committed (`synchronous = FULL`)
//!    before it is sent.
//! 3. It is sent to the hub's `Distributed` table with
//!    `insert_distributed_sync = 1`, so a 2xx means it is in a replicated
//!    table; after a failure, or a restart, the recorded body is sent
//!    again, byte for byte (whatever retention or rotation did to its rows
//!    since), which the hub's block deduplication drops as a repeat.
//! 4. On 2xx the watermark moves to the batch's last id and the record is
//!    cleared, in one transaction.
//!
//! Between failures it waits `backoff_min`, doubling up to `backoff_max`.
//! While a damaged file's rows are being salvaged (rows may come back
//! below the watermark) it waits. Sessions and export records are not
//! shipped yet. The watermark's meaning for the seed's `synced` column: a
//! log is synced when its id is at or below `last_log_id`.

use super::batch;
use super::transport::{self, Transport};
use crate::config::ServerHubConfig;
use crate::metrics::Metrics;
use crate::proto::Timestamp;
use crate::store::merger::MergeState;
use crate::store::{schema, StoreError};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The `sync_state` target of logs.
pub const LOGS: &str = "logs";
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

/// The running sync thread.
#[derive(Debug)]
pub struct SyncHandle {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl SyncHandle {
    /// Stops the thread: waits at most [`STOP_WAIT`] for a request under
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
/// have a URL), reading the durable mark from `merge`.
pub fn spawn_sync(
    db: &Path,
    hub: &ServerHubConfig,
    merge: Arc<MergeState>,
    metrics: Arc<Metrics>,
) -> Result<SyncHandle, StoreError> {
    let conn = schema::open_file(db, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    // The record of the batch in flight and the watermark must survive a
    // power cut: one sync per batch.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute(
        "INSERT OR IGNORE INTO sync_state (target, last_log_id, updated_at) VALUES (?1, 0, ?2)",
        params![LOGS, now_us()],
    )?;
    let transport = Transport::new(hub).map_err(StoreError::HubSetup)?;
    let (stop, stopped) = crossbeam_channel::bounded(0);
    let sync = Sync {
        conn,
        hub: hub.clone(),
        transport,
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

/// The batch in flight: its last id and the body sent.
type InFlight = (i64, Vec<u8>);

/// What one step did.
enum Progress {
    /// A batch went: look for the next at once.
    Sent,
    /// Nothing to send now.
    Idle,
}

struct Sync {
    conn: Connection,
    hub: ServerHubConfig,
    transport: Transport,
    merge: Arc<MergeState>,
    metrics: Arc<Metrics>,
    stopped: Receiver<()>,
}

impl Sync {
    fn run(self) {
        let mut failures: u32 = 0;
        loop {
            let wait = match self.step() {
                Ok(progress) => {
                    if failures > 0 {
                        log::info!("the hub takes batches again after {failures} failures");
                    }
                    failures = 0;
                    self.metrics.health.recover("hub");
                    match progress {
                        Progress::Sent => Duration::ZERO,
                        Progress::Idle => self.hub.sync_interval,
                    }
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    Metrics::add(&self.metrics.sync_failures, 1);
                    let wait = self.backoff(failures);
                    log::warn!(
                        "hub sync to {} failed ({failures} in a row; retrying in {wait:?}): {e}",
                        self.hub.url.as_deref().unwrap_or("")
                    );
                    self.metrics
                        .health
                        .fail("hub", format!("batches to the hub fail: {e}"));
                    wait
                }
            };
            match self.stopped.recv_timeout(wait) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        backoff(self.hub.backoff_min, self.hub.backoff_max, failures)
    }

    fn step(&self) -> Result<Progress, String> {
        let sql = |e: rusqlite::Error| format!("the database: {e}");
        let salvaging: bool = self
            .conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM recoveries WHERE state IN ('moving', 'pending'))",
                [],
                |r| r.get(0),
            )
            .map_err(sql)?;
        if salvaging {
            return Ok(Progress::Idle);
        }
        let (mark, in_flight) = self.state().map_err(sql)?;
        let host = self.hub.host_id.as_str();
        // A batch in flight is re-sent as the same bytes, whatever happened
        // to its rows since: the hub drops it if it took it before.
        let (last, body, newest) = match in_flight {
            Some((last, body)) => (last, body, None),
            None => {
                let durable = self.merge.durable_through();
                let formed = batch::read(
                    &self.conn,
                    host,
                    mark,
                    durable,
                    self.hub.batch_size,
                    self.hub.batch_bytes,
                )
                .map_err(sql)?;
                let Some(b) = formed else {
                    Metrics::set(&self.metrics.sync_lag_seconds, 0);
                    return Ok(Progress::Idle);
                };
                self.conn
                    .execute(
                        "UPDATE sync_state SET inflight_first = ?2, inflight_last = ?3, \
                         inflight_digest = ?4, inflight_body = ?5, updated_at = ?6 \
                         WHERE target = ?1",
                        params![LOGS, b.first, b.last, b.digest, b.body, now_us()],
                    )
                    .map_err(sql)?;
                (b.last, b.body, Some(b.newest_created_at))
            }
        };
        let name = transport::batch_name(LOGS, last, &body);
        self.transport.send(&self.hub.tables.logs, &name, &body)?;
        self.shipped(last).map_err(sql)?;
        Metrics::add(&self.metrics.sync_batches, 1);
        Metrics::add(&self.metrics.sync_rows, batch::rows_in(&body) as u64);
        if let Some(newest) = newest {
            let lag_us = now_us().saturating_sub(newest).max(0);
            Metrics::set(&self.metrics.sync_lag_seconds, (lag_us / 1_000_000) as u64);
        }
        Ok(Progress::Sent)
    }

    /// The watermark and the batch in flight, if any.
    fn state(&self) -> rusqlite::Result<(i64, Option<InFlight>)> {
        self.conn.query_row(
            "SELECT last_log_id, inflight_last, inflight_body FROM sync_state WHERE target = ?1",
            [LOGS],
            |r| {
                let in_flight = match (r.get(1)?, r.get(2)?) {
                    (Some(last), Some(body)) => Some((last, body)),
                    _ => None,
                };
                Ok((r.get(0)?, in_flight))
            },
        )
    }

    /// The hub has every log up to `last`: the watermark moves there and
    /// the batch in flight is done, in one transaction.
    fn shipped(&self, last: i64) -> rusqlite::Result<()> {
        self.conn.execute(
            "UPDATE sync_state SET last_log_id = max(last_log_id, ?2), inflight_first = NULL, \
             inflight_last = NULL, inflight_digest = NULL, inflight_body = NULL, updated_at = ?3 \
             WHERE target = ?1",
            params![LOGS, last, now_us()],
        )?;
        Ok(())
    }
}

/// The wait after `failures` failures in a row: `min` doubled per failure
/// after the first, at most `max`.
fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    min.saturating_mul(1 << doublings).min(max)
}

fn now_us() -> i64 {
    Timestamp::now().as_micros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_from_the_first_failure_up_to_its_bound() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(1));
        let waits: Vec<u128> = (1..=6).map(|f| backoff(min, max, f).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff(min, max, u32::MAX), max);
    }
}
