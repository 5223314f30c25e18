//! Counters every part of the daemon bumps and the status answer and the
//! HTTP metrics endpoint read. Plain relaxed atomics, lock-free histograms
//! ([`histogram`]), plus the (rarely touched) health table and the
//! components' heartbeats.

pub mod histogram;

use crate::proto::ErrorCode;
use histogram::{Histogram, Sharded, BATCH_BOUNDS, COMMIT_BOUNDS, IPC_BOUNDS, SYNC_BOUNDS};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// The daemon's counters and gauges, and which components are
        /// degraded now.
        #[derive(Debug)]
        pub struct Metrics {
            $($(#[$doc])* pub $name: AtomicU64,)*
            /// Degraded components and why (cleared on recovery).
            pub health: crate::health::Health,
            /// Whether the event loops and the writer make progress (for
            /// the systemd watchdog).
            pub heartbeats: crate::heartbeat::Heartbeats,
            /// From a request's frame decoded to its answer handed to the
            /// socket, one shard per event loop (nanoseconds).
            pub ipc_duration: Sharded,
            /// One log batch's commit, acknowledgments included
            /// (nanoseconds).
            pub commit_duration: Histogram,
            /// Log rows per committed batch.
            pub batch_rows: Histogram,
            /// From a log's commit (its `created_at`) to the hub's 2xx for
            /// the batch that held it (nanoseconds).
            pub sync_latency: Histogram,
            /// `Error` answers sent, by code ([`ERROR_CODES`] order, then
            /// codes this version does not name).
            pub errors_sent: [AtomicU64; ERROR_CODES.len() + 1],
        }

        impl Default for Metrics {
            fn default() -> Self {
                Metrics {
                    $($name: AtomicU64::new(0),)*
                    health: crate::health::Health::default(),
                    heartbeats: crate::heartbeat::Heartbeats::default(),
                    ipc_duration: Sharded::new(IPC_BOUNDS),
                    commit_duration: Histogram::new(COMMIT_BOUNDS),
                    batch_rows: Histogram::new(BATCH_BOUNDS),
                    sync_latency: Histogram::new(SYNC_BOUNDS),
                    errors_sent: std::array::from_fn(|_| AtomicU64::new(0)),
                }
            }
        }

        impl Metrics {
            /// Every counter with its name, for exposition.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    /// Connections accepted since start.
    connections_accepted,
    /// Connections open now.
    connections_open,
    /// Connections refused (limit reached).
    connections_refused,
    /// Frames decoded into messages.
    frames_received,
    /// Frames rejected as oversized, empty or undecodable.
    frames_invalid,
    /// Log entries received (each batch entry counts).
    logs_received,
    /// Log rows inserted.
    logs_stored,
    /// Log rows skipped because their id was already stored.
    logs_duplicate,
    /// Log entries rejected before they reached the writer: invalid
    /// fields, a timestamp from the future (nothing stored).
    logs_rejected_invalid,
    /// Log entries the writer rejected: storage errors, storage not keeping
    /// up (nothing stored).
    logs_rejected_storage,
    /// Write transactions committed (ingest, straight into the indexed
    /// table, and session changes).
    commits,
    /// Log batches committed straight into the indexed table, past the
    /// ingest file (rows from few sessions, or large rows).
    indexed_commits,
    /// Merge transactions that moved logs into the indexed table.
    merges,
    /// Log rows moved into the indexed table.
    logs_merged,
    /// Write transactions that failed.
    commit_errors,
    /// Log rows deleted by retention (`storage.retention_days`).
    logs_expired,
    /// Ended sessions deleted by retention.
    sessions_expired,
    /// Export rows deleted by retention.
    exports_expired,
    /// Open sessions ended after `general.session_timeout` without
    /// activity.
    sessions_timed_out,
    /// Log rows rotated out, whatever their age, because the main database
    /// was above `storage.max_db_size_mb`.
    logs_rotated_cap,
    /// Log rows rotated out because the database's filesystem was nearly
    /// full (with `storage.max_db_size_mb` set).
    logs_rotated_disk,
    /// Of the rotated logs, those hub sync had not shipped yet.
    logs_rotated_unshipped,
    /// Queries answered.
    queries,
    /// Queries refused because the answer pool was full.
    queries_refused,
    /// Answer entries cut because the row was too large to answer whole.
    rows_cut,
    /// Failed authentications.
    auth_failures,
    /// `Authenticate` attempts refused unchecked because their address
    /// failed too often.
    auth_throttled,
    /// TCP connections closed for not authenticating in time.
    auth_timeouts,
    /// TCP connections waiting to authenticate closed to make room for a
    /// newer one.
    unauthenticated_evicted,
    /// Connections closed after the idle timeout.
    idle_closed,
    /// Connections closed because their answers waited unread past the
    /// write timeout.
    write_timeouts,
    /// Times a connection stopped reading because the receive pool for
    /// partly received frames was full.
    receive_pauses,
    /// Times a connection was paused for backpressure.
    backpressure_pauses,
    /// Times a connection was paused by its rate limit.
    rate_limit_pauses,
    /// WAL checkpoints run.
    checkpoints,
    /// Salvages of a damaged file finished since start.
    recoveries,
    /// Logs those salvages moved into the new database.
    logs_salvaged,
    /// Rows those salvages could not read (an upper bound).
    rows_unreadable,
    /// Recoveries recorded and not yet acknowledged by an operator.
    recoveries_unacknowledged,
    /// Batches of logs the hub acknowledged.
    sync_batches,
    /// Logs in them.
    sync_rows,
    /// Batches the hub did not take (each retry counts).
    sync_failures,
    /// Gauge: age in seconds of the oldest log the hub does not have (0
    /// when it has all).
    sync_lag_seconds,
    /// Export files archived (a new archive row without error).
    exports_archived,
    /// Exports whose content was already archived (recorded, stored once).
    exports_deduplicated,
    /// Exports that could not be archived (vanished, no space, I/O).
    export_errors,
    /// Full scans of the watched directories.
    export_scans,
    /// Times the inotify event queue overflowed (each followed by a scan).
    inotify_overflows,
    /// Directories that could not be watched for the inotify watch limit.
    watch_limit_errors,
    /// Times a watched tree reached `monitor.max_watches_per_root` (once per
    /// tree until a full scan finds it below the cap).
    watch_cap_hits,
    /// Watched directories found deleted or moved away.
    watched_dirs_lost,
    /// `WATCHDOG=1` pings sent to systemd.
    watchdog_pings,
    /// Pings withheld because a component was stuck.
    watchdog_withheld,
    /// Gauge: write jobs still queued when the writer last took a batch.
    writer_queue_depth,
    /// Gauge: watched directory trees (roots).
    watched_roots,
    /// Gauge: watched roots that are missing (deleted or moved away).
    watched_roots_missing,
    /// Gauge: inotify watches held.
    inotify_watches,
    /// HTTP requests the admin endpoint answered with 200 or 503.
    admin_requests,
    /// HTTP requests the admin endpoint refused as malformed, oversized,
    /// of another method or for an unknown path.
    admin_bad_requests,
    /// HTTP connections closed unanswered: over the connection cap, or no
    /// complete request within the read deadline.
    admin_dropped,
}

/// Error codes counted apart in [`Metrics::errors_sent`].
pub const ERROR_CODES: [ErrorCode; 9] = [
    ErrorCode::FrameTooLarge,
    ErrorCode::InvalidFrame,
    ErrorCode::InvalidMessage,
    ErrorCode::Unauthorized,
    ErrorCode::RateLimited,
    ErrorCode::Unavailable,
    ErrorCode::Unsupported,
    ErrorCode::InvalidRequest,
    ErrorCode::Internal,
];

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Sets a gauge.
    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }

    /// Counts one `Error` answer sent with `code`.
    pub fn error_sent(&self, code: &ErrorCode) {
        let index = ERROR_CODES
            .iter()
            .position(|c| c == code)
            .unwrap_or(ERROR_CODES.len());
        Metrics::add(&self.errors_sent[index], 1);
    }

    /// `Error` answers sent, by code name (`Other` for codes this version
    /// does not name).
    pub fn errors_by_code(&self) -> Vec<(&'static str, u64)> {
        let names = ERROR_CODES.iter().map(ErrorCode::static_name);
        names
            .chain(std::iter::once("Other"))
            .zip(&self.errors_sent)
            .map(|(name, n)| (name, Metrics::get(n)))
            .collect()
    }

    /// Log entries rejected in all.
    pub fn logs_rejected(&self) -> u64 {
        Metrics::get(&self.logs_rejected_invalid) + Metrics::get(&self.logs_rejected_storage)
    }

    /// Records one committed log batch: how long it took and its rows.
    pub fn record_commit(&self, took: Duration, rows: usize) {
        self.commit_duration.record_duration(took);
        self.batch_rows.record(rows as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_counted_by_code() {
        let m = Metrics::default();
        m.error_sent(&ErrorCode::InvalidMessage);
        m.error_sent(&ErrorCode::InvalidMessage);
        m.error_sent(&ErrorCode::Other("Teapot".into()));
        let by_code = m.errors_by_code();
        assert_eq!(by_code.len(), ERROR_CODES.len() + 1);
        assert!(by_code.contains(&("InvalidMessage", 2)));
        assert!(by_code.contains(&("Other", 1)));
        assert!(by_code.contains(&("Internal", 0)));
    }
}
