//! Direct database access for `codi2` when no daemon answers: the same
//! schema, the same SQL ([`super::ingest`], [`super::ops`],
//! [`super::query`]), one transaction per operation. Logs go into the
//! ingest file, as the daemon's do; the daemon's merger moves them into the
//! indexed table once it runs. Every write holds the right to write
//! ([`StandaloneWrite`]), which no `codi2` gets while a daemon holds the
//! database; the busy timeout lets several `codi2`s share the files.

use super::ingest::{self, IdAllocator, PendingUuids};
use super::lock::StandaloneWrite;
use super::ops::{self, OpOutcome};
use super::query::run_query;
use super::{recovery, schema, StoreError, WriteOp};
use crate::proto::{LogFilter, StoredLog, Timestamp};
use rusqlite::{Connection, TransactionBehavior};
use std::path::Path;

/// Page cache of a standalone connection, in MiB (it lives for one command).
const STANDALONE_CACHE_MB: u32 = 8;
/// Newest ingest rows whose uuids a standalone write checks: a log resent
/// after its first send reached a daemon that then stopped answering is
/// among them. (The ingest file has no uuid index; an older duplicate is
/// dropped when the daemon moves the rows into `logs`.)
const RECENT_ROWS: i64 = 4096;

/// Read-write connections for one `codi2` process: to the main database
/// (session changes, queries) and to the ingest file (logs).
#[derive(Debug)]
pub struct StandaloneStore {
    conn: Connection,
    ingest: Connection,
    path: std::path::PathBuf,
    /// The files opened, to tell whether a recovery replaced them since.
    identity: Option<[(u64, u64); 2]>,
}

impl StandaloneStore {
    /// Opens (creating and migrating if needed) the database at `path`,
    /// with the same checks and settings as the daemon.
    /// A damaged file, one the daemon found corrupt, or a recovery under
    /// way is [`StoreError::Damaged`]: nothing is written then.
    /// A daemon that holds the database is [`StoreError::HeldByDaemon`]
    /// first, even while it salvages the files: it serves them soon.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let refuse = |detail: &str| StoreError::Damaged {
            path: path.to_owned(),
            detail: detail.to_owned(),
        };
        // Opening creates and migrates the files: a write. Taken before
        // the checks, so that no set-aside starts between them and the
        // open, and so that a daemon salvaging the files (it set them
        // aside, or found them suspect) is waited for, not reported as
        // damage nobody deals with.
        let _right_to_write = StandaloneWrite::take(path)?;
        if recovery::in_progress(path) {
            return Err(refuse("a recovery of it is under way"));
        }
        if recovery::suspect_path(path).exists() {
            return Err(refuse(
                "the daemon found it corrupt and salvages it at its next start",
            ));
        }
        let open = || -> Result<Self, StoreError> {
            let conn = schema::open_rw(path, STANDALONE_CACHE_MB)?;
            let ingest = schema::open_ingest_rw(path, STANDALONE_CACHE_MB)?;
            Ok(StandaloneStore {
                conn,
                ingest,
                path: path.to_owned(),
                identity: recovery::identity(path),
            })
        };
        open().map_err(|e| e.or_damaged(path))
    }

    /// Applies one operation in its own transaction and commits it.
    /// Refused as [`StoreError::Damaged`] when a recovery replaced the
    /// files since they were opened (the write would go to a moved file).
    pub fn apply(&mut self, op: &WriteOp) -> Result<OpOutcome, StoreError> {
        let _right_to_write = StandaloneWrite::take(&self.path)?;
        if recovery::in_progress(&self.path) || recovery::identity(&self.path) != self.identity {
            return Err(StoreError::Damaged {
                path: self.path.clone(),
                detail: "a recovery replaced its files while this command ran".into(),
            });
        }
        self.apply_once(op).map_err(|e| e.or_damaged(&self.path))
    }

    fn apply_once(&mut self, op: &WriteOp) -> Result<OpOutcome, StoreError> {
        let now_us = Timestamp::now().as_micros();
        let outcome = if let WriteOp::Logs(rows) = op {
            let tx = self
                .ingest
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut ids = IdAllocator::new(&tx, 0)?;
            let mut recent = PendingUuids::load_newest(&tx, RECENT_ROWS)?;
            let outcome = ingest::insert_rows(&tx, &mut ids, &mut recent, rows, now_us, None)?;
            tx.commit()?;
            outcome
        } else {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let outcome = ops::apply(&tx, op, now_us)?;
            tx.commit()?;
            outcome
        };
        Ok(outcome)
    }

    /// Runs a query with the daemon's semantics: the same entries, within
    /// one frame, with rows too large to answer cut (`store::query`).
    pub fn query(
        &self,
        filter: &LogFilter,
        limit: u64,
    ) -> Result<(Vec<StoredLog>, u64), StoreError> {
        run_query(&self.conn, filter, limit).map_err(|e| e.or_damaged(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{LogFields, LogLevel};
    use crate::store::{batch_entry_id, LogRow};
    use uuid::Uuid;

    /// A daemon restarting to salvage (the store marked suspect, or its
    /// files being set aside) holds the database until it serves: codi2
    /// waits for it rather than give up on a damage about to be repaired.
    #[test]
    fn a_daemon_salvaging_the_files_is_held_by_daemon_not_damage() {
        use crate::store::lock::DatabaseLock;
        use crate::store::schema::with_suffix;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(StandaloneStore::open(&path).unwrap());
        let is_held = |e: &StoreError| matches!(e, StoreError::HeldByDaemon { .. });
        let is_damaged = |e: &StoreError| matches!(e, StoreError::Damaged { .. });

        recovery::mark_suspect(&path, "found corrupt").unwrap();
        let daemon = DatabaseLock::acquire(&path).unwrap();
        let e = StandaloneStore::open(&path).unwrap_err();
        assert!(is_held(&e), "suspect, a daemon starting: {e}");
        drop(daemon);
        let e = StandaloneStore::open(&path).unwrap_err();
        assert!(is_damaged(&e), "suspect, no daemon: {e}");
        std::fs::remove_file(recovery::suspect_path(&path)).unwrap();

        // A set-aside under way: its fresh file is in place.
        std::fs::write(with_suffix(&path, ".new"), b"").unwrap();
        let daemon = DatabaseLock::acquire(&path).unwrap();
        let e = StandaloneStore::open(&path).unwrap_err();
        assert!(is_held(&e), "set-aside under way: {e}");
        drop(daemon);
        let e = StandaloneStore::open(&path).unwrap_err();
        assert!(is_damaged(&e), "a set-aside left half done: {e}");
    }

    #[test]
    fn writes_and_reads_alongside_another_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut first = StandaloneStore::open(&path).unwrap();
        let mut second = StandaloneStore::open(&path).unwrap();
        let batch = Uuid::now_v7();
        let fields = LogFields {
            level: LogLevel::Info,
            component: "cli".into(),
            message: "hello".into(),
            metadata: None,
            session_id: None,
        };
        let rows: Vec<_> = (0..3)
            .map(|i| {
                LogRow::from_fields(
                    batch_entry_id(batch, i),
                    Timestamp::from_micros(i as i64),
                    fields.clone(),
                    Some("s"),
                    None,
                )
                .unwrap()
            })
            .collect();
        let op = WriteOp::Logs(rows);
        assert_eq!(
            first.apply(&op).unwrap(),
            OpOutcome::Logs {
                inserted: 3,
                duplicates: 0
            }
        );
        assert_eq!(
            second.apply(&op).unwrap(),
            OpOutcome::Logs {
                inserted: 0,
                duplicates: 3
            }
        );
        let (entries, total) = second.query(&LogFilter::default(), 10).unwrap();
        assert_eq!(total, 3);
        assert_eq!(entries[0].uuid, batch);
        assert_eq!(entries[2].uuid, batch_entry_id(batch, 2));
        assert!(entries.iter().all(|e| e.session_id.as_deref() == Some("s")));
        assert_eq!(
            first
                .apply(&WriteOp::SessionEnd {
                    session_id: "s".into(),
                    ended_at_us: 1,
                    restricted_to: None,
                })
                .unwrap(),
            OpOutcome::Rejected("unknown session `s`".into())
        );
    }
}
