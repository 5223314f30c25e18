//! Counters every part of the daemon bumps and the status answer (and later
//! the HTTP metrics endpoint) reads. Plain relaxed atomics, plus the
//! (rarely touched) health table and the components' heartbeats.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// The daemon's counters and gauges, and which components are
        /// degraded now.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $($(#[$doc])* pub $name: AtomicU64,)*
            /// Degraded components and why (cleared on recovery).
            pub health: crate::health::Health,
            /// Whether the event loops and the writer make progress (for
            /// the systemd watchdog).
            pub heartbeats: crate::heartbeat::Heartbeats,
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
    /// Log entries rejected (nothing stored).
    logs_rejected,
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
}

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
