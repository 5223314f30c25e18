//! The salvage thread (`codi-salvage`): while the daemon serves, it moves
//! the readable rows of each file a recovery set aside
//! ([`super::recovery`]) into the new main database, one bounded step at
//! a time through the merger (the only read-write connection to it), and
//! keeps the health report and metrics saying that a recovery happened
//! until an operator acknowledges it (`codi-monitor recover
//! --acknowledge`).

use super::merger::SalvageRequest;
use super::recovery::{self, Recovery, Salvage, SalvageStep};
use super::{schema, StoreError};
use crate::health::Severity;
use crate::metrics::Metrics;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the thread looks for acknowledgments (and new pending work).
const POLL: Duration = Duration::from_secs(2);
/// How long after a failed salvage it tries again.
const RETRY: Duration = Duration::from_secs(30);

/// The running salvage thread.
#[derive(Debug)]
pub struct SalvagerHandle {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl SalvagerHandle {
    /// Stops the thread (a salvage under way stops between two steps and
    /// goes on at the next start) and waits for it.
    pub fn stop(self) {
        drop(self.stop);
        if self.thread.join().is_err() {
            log::error!("the salvage thread panicked");
        }
    }
}

/// Starts the salvage thread for the store at `db`, sending its steps to
/// the merger over `link`.
pub fn spawn_salvager(
    db: &Path,
    link: Sender<SalvageRequest>,
    metrics: Arc<Metrics>,
) -> Result<SalvagerHandle, StoreError> {
    let conn = schema::open_file(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let (stop, stopped) = crossbeam_channel::bounded(0);
    let salvager = Salvager {
        conn,
        db: db.to_owned(),
        link,
        metrics,
        stopped,
    };
    let thread = super::tx::spawn_named("codi-salvage", move || salvager.run())?;
    Ok(SalvagerHandle { stop, thread })
}

struct Salvager {
    conn: Connection,
    db: PathBuf,
    link: Sender<SalvageRequest>,
    metrics: Arc<Metrics>,
    stopped: Receiver<()>,
}

impl Salvager {
    fn run(self) {
        loop {
            let wait = match self.salvage_pending() {
                Ok(()) => POLL,
                Err(e) => {
                    log::error!(
                        "salvaging rows into `{}` failed (retrying in {} s): {e}",
                        self.db.display(),
                        RETRY.as_secs()
                    );
                    RETRY
                }
            };
            self.report();
            match self.stopped.recv_timeout(wait) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        }
    }

    fn salvage_pending(&self) -> Result<(), String> {
        let pending =
            recovery::recoveries(&self.conn, "state = 'pending'").map_err(|e| e.to_string())?;
        for r in pending {
            log::warn!(
                "salvaging the rows of `{}` (moved to `{}`) while serving",
                r.file.display(),
                r.moved_to.display()
            );
            let mut apply = |step: SalvageStep| self.send(step);
            let columns = |table: &str| recovery::target_columns(&self.conn, table);
            Salvage {
                apply: &mut apply,
                target_columns: &columns,
            }
            .run(&r)?;
            self.finished(r.id);
        }
        Ok(())
    }

    /// Hands `step` to the merger and waits for its answer; fails at once
    /// when the daemon is stopping (the salvage goes on at the next start).
    fn send(&self, step: SalvageStep) -> Result<usize, String> {
        if let Err(crossbeam_channel::TryRecvError::Disconnected) = self.stopped.try_recv() {
            return Err("the daemon is stopping; the salvage goes on at the next start".into());
        }
        let (answer, answered) = crossbeam_channel::bounded(1);
        self.link
            .send((step, answer))
            .map_err(|_| "the merger has stopped".to_owned())?;
        answered
            .recv()
            .map_err(|_| "the merger has stopped".to_owned())?
    }

    fn finished(&self, id: i64) {
        let done = recovery::recoveries(&self.conn, &format!("id = {id}"));
        if let Some(r) = done.ok().and_then(|v| v.into_iter().next()) {
            log::error!("recovery finished: {}", r.summary());
            Metrics::add(&self.metrics.recoveries, 1);
            Metrics::add(&self.metrics.logs_salvaged, r.logs_salvaged.max(0) as u64);
            Metrics::add(
                &self.metrics.rows_unreadable,
                r.rows_unreadable.max(0) as u64,
            );
        }
    }

    /// Keeps `storage/recovery` in the health table (degraded) and the
    /// unacknowledged gauge current.
    fn report(&self) {
        let open: Vec<Recovery> =
            recovery::recoveries(&self.conn, "acknowledged_at IS NULL").unwrap_or_default();
        Metrics::set(&self.metrics.recoveries_unacknowledged, open.len() as u64);
        let condition = (!open.is_empty()).then(|| {
            let each: Vec<String> = open.iter().map(Recovery::summary).collect();
            (
                Severity::Degraded,
                format!(
                    "{}; once checked, acknowledge with `codi-monitor recover --acknowledge`",
                    each.join("; ")
                ),
            )
        });
        self.metrics.health.set("storage/recovery", condition);
    }
}
