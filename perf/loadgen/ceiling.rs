//! The storage ceiling: the same rows, schema and PRAGMAs as the daemon's,
//! inserted straight into SQLite from one thread in large transactions.
//!
//! The database is opened with the daemon's own `schema::open_rw`, writes go
//! through the daemon's own `ops::apply`, autocheckpointing is off and a
//! checkpointer thread on its own connection runs PASSIVE checkpoints (or
//! TRUNCATE past the WAL limit) on the daemon's interval, exactly as the
//! daemon's writer does. Whatever the daemon achieves is then read as a
//! fraction of what this machine's storage can do at all.

use crate::payload::{client_session, log_fields, run_tag};
use codi_monitor::config::DEFAULT_CACHE_SIZE_MB;
use codi_monitor::metrics::Metrics;
use codi_monitor::proto::Timestamp;
use codi_monitor::store::wal::{self, Checkpointer, WalPolicy, WalState, WalTrimmer};
use codi_monitor::store::{ops, schema, LogRow, WriteOp};
use rusqlite::TransactionBehavior;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// What one ceiling run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct CeilingResult {
    /// Rows inserted.
    pub rows: u64,
    /// Rows per transaction.
    pub batch: usize,
    /// Message text bytes per row.
    pub message_size: usize,
    /// Time inside transactions (BEGIN IMMEDIATE to COMMIT).
    pub busy: Duration,
    /// Wall time of the whole insert loop, building rows included.
    pub wall: Duration,
    /// Checkpoints the checkpointer ran.
    pub checkpoints: u64,
    /// False when the writer never restarted the WAL (`--passive-only`).
    pub trim_wal: bool,
    /// The longest single transaction (a TRUNCATE checkpoint blocks the
    /// writer, which shows here).
    pub longest: Duration,
    /// Transactions that took longer than [`STALL`].
    pub stalls: u64,
}

/// A transaction slower than this counts as a stall.
pub const STALL: Duration = Duration::from_millis(100);

impl CeilingResult {
    /// Rows per second of transaction time: the ceiling.
    pub fn rows_per_sec(&self) -> f64 {
        self.rows as f64 / self.busy.as_secs_f64().max(1e-9)
    }

    /// MB (10^6 bytes) of message text per second of transaction time.
    pub fn payload_mb_per_sec(&self) -> f64 {
        self.rows_per_sec() * self.message_size as f64 / 1e6
    }
}

/// The companions of `db`: its `-wal` and `-shm`, its ingest file and the
/// ingest file's `-wal` and `-shm`.
fn companions(db: &Path) -> [PathBuf; 5] {
    ["-wal", "-shm", "-ingest", "-ingest-wal", "-ingest-shm"].map(|suffix| {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    })
}

/// Longest wait for the daemon's WAL to shrink before the ceiling starts.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(30);

/// Waits until the daemon's WAL (beside `daemon_db`) is at most the size
/// the daemon restarts it at, then one more checkpoint interval, so the
/// daemon's own checkpoint of what the run wrote does not compete with the
/// ceiling for the disk. Gives up after [`SETTLE_LIMIT`]; returns the wait.
pub fn settle(daemon_db: &Path) -> Duration {
    let policy = WalPolicy::default();
    let wal = companions(daemon_db)[0].clone();
    let started = Instant::now();
    while started.elapsed() < SETTLE_LIMIT {
        let len = std::fs::metadata(&wal).map_or(0, |m| m.len());
        if len <= policy.restart_bytes {
            std::thread::sleep(policy.interval);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

/// Deletes `db` and its companion files, ignoring ones that are not there.
pub fn remove_db(db: &Path) {
    let _ = std::fs::remove_file(db);
    for f in companions(db) {
        let _ = std::fs::remove_file(f);
    }
}

/// Inserts `rows` rows into the new database `db`, `batch` per transaction,
/// spread round robin over `sessions` sessions exactly as that many load
/// clients spread them, checkpointed exactly as the daemon's writer is
/// (`store::wal`); with `trim_wal` false the writer never restarts the WAL
/// (it then grows without bound). Refuses a database that already exists:
/// the ceiling needs a fresh one.
pub fn run(
    db: &Path,
    rows: u64,
    batch: usize,
    message_size: usize,
    sessions: usize,
    trim_wal: bool,
) -> Result<CeilingResult, String> {
    if db.exists() {
        return Err(format!(
            "`{}` already exists; the ceiling needs a fresh database",
            db.display()
        ));
    }
    let mut conn = schema::open_rw(db, DEFAULT_CACHE_SIZE_MB).map_err(|e| e.to_string())?;
    let policy = WalPolicy::default();
    wal::configure_writer(&conn, &policy).map_err(|e| e.to_string())?;
    let state = Arc::new(WalState::default());
    let metrics = Arc::new(Metrics::default());
    let trimmer = WalTrimmer::new(&conn, policy, Arc::clone(&state)).map_err(|e| e.to_string())?;
    let checkpointer =
        Checkpointer::spawn(db, "codi-checkpoint", policy, state, Arc::clone(&metrics))
            .map_err(|e| format!("cannot start the checkpointer: {e}"))?;

    let tag = run_tag(Uuid::now_v7());
    let session_ids: Vec<String> = (0..sessions.max(1))
        .map(|i| client_session(&tag, i))
        .collect();
    let mut fields = log_fields(message_size, &tag);
    let mut busy = Duration::ZERO;
    let mut longest = Duration::ZERO;
    let mut stalls = 0u64;
    let mut inserted = 0u64;
    let started = Instant::now();
    let result = (|| -> Result<(), String> {
        while inserted < rows {
            let n = (rows - inserted).min(batch as u64) as usize;
            let now = Timestamp::now();
            let op = WriteOp::Logs(
                (0..n)
                    .map(|i| {
                        let row = inserted as usize + i;
                        fields.session_id = Some(session_ids[row % session_ids.len()].clone());
                        LogRow::from_fields(Uuid::now_v7(), now, fields.clone(), None, Some(0))
                            .expect("metadata-free rows always convert")
                    })
                    .collect(),
            );
            let t0 = Instant::now();
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| e.to_string())?;
            let outcome = ops::apply(&tx, &op, now.as_micros()).map_err(|e| e.to_string())?;
            tx.commit().map_err(|e| e.to_string())?;
            let took = t0.elapsed();
            busy += took;
            longest = longest.max(took);
            stalls += u64::from(took > STALL);
            if trim_wal {
                if let Some(paused) = trimmer.after_commit(&conn) {
                    busy += paused;
                    longest = longest.max(paused);
                    stalls += u64::from(paused > STALL);
                    Metrics::add(&metrics.checkpoints, 1);
                }
            }
            match outcome {
                ops::OpOutcome::Logs { inserted: k, .. } if k == n => inserted += n as u64,
                other => return Err(format!("unexpected insert outcome {other:?}")),
            }
        }
        Ok(())
    })();
    let wall = started.elapsed();
    checkpointer.stop();
    let checkpoints = Metrics::get(&metrics.checkpoints);
    result?;
    Ok(CeilingResult {
        rows: inserted,
        batch,
        message_size,
        busy,
        wall,
        checkpoints,
        trim_wal,
        longest,
        stalls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn inserts_every_row_into_a_fresh_database_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let db = dir.path().join("ceiling.db");
        let r = run(&db, 250, 100, 40, 10, true).unwrap();
        assert_eq!(r.rows, 250);
        assert!(r.rows_per_sec() > 0.0);
        let conn = rusqlite::Connection::open(&db).unwrap();
        let (count, len): (i64, i64) = conn
            .query_row("SELECT count(*), min(length(message)) FROM logs", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((count, len), (250, 40));
        drop(conn);
        assert!(run(&db, 1, 1, 1, 1, false)
            .unwrap_err()
            .contains("already exists"));
        remove_db(&db);
        assert!(!db.exists());
    }
}
