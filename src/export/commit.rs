//! Committing the queued archive rows in one transaction, then releasing
//! their archive claims and (move mode) deleting or keeping their sources.
//!
//! The watcher's connection only reads: every write goes to the merger,
//! the main database's one read-write owner ([`MainWriteLink`]), and the
//! watcher waits for its answer, at most [`WRITE_WAIT`] for the merger to
//! take it up and as long again for the answer. It holds no lock meanwhile
//! (the archive claims' least of all: retention, on the merger's thread,
//! takes it).
//!
//! [`MainWriteLink`]: crate::store::merger::MainWriteLink

use super::{key, SourceFate, Watcher};
use crate::metrics::Metrics;
use crate::store::merger::MainWriteError;
use rusqlite::{params, Transaction};
use std::time::Duration;

/// How long the watcher waits for the merger to take up one of its writes,
/// and then again for its answer.
pub(super) const WRITE_WAIT: Duration = Duration::from_secs(30);

/// One `export_archive` row as the merger inserts it: original path,
/// archive path, session, size, content hash, source mtime (ns), error.
type Row = (
    String,
    String,
    Option<String>,
    i64,
    Option<String>,
    i64,
    Option<String>,
);

impl Watcher {
    /// Has the merger make `apply` in one transaction and waits for it
    /// ([`WRITE_WAIT`]). A failure is logged as the failure to `what` and
    /// marks `exports/database` failed until a write succeeds.
    pub(super) fn write_main(
        &self,
        what: &str,
        apply: impl FnOnce(&Transaction) -> rusqlite::Result<()> + Send + 'static,
    ) -> Result<(), MainWriteError> {
        let done = self.writes.write(false, WRITE_WAIT, apply);
        match &done {
            Ok(()) => {
                self.metrics.health.recover("exports/database");
            }
            Err(e) => {
                log::error!("the export watcher cannot {what}: {e}");
                self.metrics.health.fail(
                    "exports/database",
                    format!("the export watcher cannot {what}: {e}"),
                );
            }
        }
        done
    }

    /// Commits the waiting archive rows in one transaction, then (move
    /// mode) deletes their sources.
    pub(super) fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let now_us = crate::proto::Timestamp::now().as_micros();
        let rows: Vec<Row> = self
            .batch
            .iter()
            .map(|r| {
                (
                    key(&r.source),
                    r.archive_path.clone(),
                    r.session_id.clone(),
                    r.size as i64,
                    r.content_hash.clone(),
                    r.mtime_ns,
                    r.error.clone(),
                )
            })
            .collect();
        let result = self.writes.write(false, WRITE_WAIT, move |tx| {
            let mut insert = tx.prepare_cached(
                "INSERT INTO export_archive (original_path, archive_path, session_id, \
                 file_size, content_hash, source_mtime_ns, archived_at_us, error) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for (source, archive_path, session_id, size, hash, mtime_ns, error) in &rows {
                insert.execute(params![
                    source,
                    archive_path,
                    session_id,
                    size,
                    hash,
                    mtime_ns,
                    now_us,
                    error
                ])?;
            }
            Ok(())
        });
        // Committed (or never to be): their files are the rows' to keep now.
        // A write the merger may still commit keeps its claims for good, so
        // that retention never deletes a file such a row will reference.
        let settled = result
            .as_ref()
            .map_or_else(|e| !e.may_still_commit(), |()| true);
        if settled {
            for r in self.batch.iter().filter(|r| !r.archive_path.is_empty()) {
                self.claims.release(&r.archive_path);
            }
        }
        match result {
            Ok(()) => {
                let archived = self.batch.iter().filter(|r| r.error.is_none()).count();
                Metrics::add(&self.metrics.exports_archived, archived as u64);
                if archived > 0 {
                    self.metrics.health.recover("exports/archive");
                }
                for r in std::mem::take(&mut self.batch) {
                    match r.fate {
                        SourceFate::Keep => {}
                        SourceFate::Remove(copied) => self.remove_committed(r.source, copied),
                        SourceFate::Later(copied) => {
                            self.kept.insert(r.source, copied);
                        }
                    }
                }
            }
            Err(e) => {
                // Forget these versions so that the next scan tries again
                // (no source is deleted: in move mode it is archived again).
                log::error!("cannot record {} archived export(s): {e}", self.batch.len());
                self.metrics.health.fail(
                    "exports/archive",
                    format!("archived exports cannot be recorded: {e}"),
                );
                Metrics::add(&self.metrics.export_errors, self.batch.len() as u64);
                for r in self.batch.drain(..) {
                    self.known.remove(&key(&r.source));
                    self.errors.remove(&key(&r.source));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::export::test_store::TestStore;
    use crate::export::{key, ArchiveMode, Watcher};
    use crate::metrics::Metrics;
    use crate::store::schema;
    use std::fs;
    use std::path::Path;

    fn count(db: &Path, sql: &str) -> i64 {
        schema::open_ro(db)
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    }

    /// Watches `work` (under `base`) for its owner, the daemon's user.
    fn watch(w: &mut Watcher, work: &Path) {
        let uid = w.daemon_uid;
        let dir = w
            .start(&key(work), true, Vec::new(), None, Some(uid))
            .unwrap();
        w.scan_dir(&dir);
        w.flush();
    }

    #[test]
    fn the_watchers_connection_cannot_write_and_its_rows_go_through_the_merger() {
        let tmp = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(tmp.path()).unwrap();
        let work = base.join("work");
        fs::create_dir(&work).unwrap();
        let store = TestStore::start(&base.join("data/codi.db"));
        let mut w = store.watcher(&base.join("archive"), ArchiveMode::Copy);

        for sql in [
            "INSERT INTO monitored_paths (path, recursive, active) VALUES ('/x', 1, 1)",
            "DELETE FROM export_archive",
        ] {
            let e = w.conn.execute(sql, []).unwrap_err();
            assert!(
                e.to_string().contains("readonly"),
                "`{sql}` on the watcher's connection: {e}"
            );
        }

        watch(&mut w, &work);
        fs::write(work.join("a.md"), b"an export").unwrap();
        w.full_scan();
        w.flush();
        let db = &store.db;
        assert_eq!(count(db, "SELECT count(*) FROM monitored_paths"), 1);
        assert_eq!(
            count(
                db,
                "SELECT count(*) FROM export_archive WHERE error IS NULL AND original_path \
                 LIKE '%/a.md'"
            ),
            1,
            "the merger committed the row"
        );
        assert_eq!(Metrics::get(&w.metrics.exports_archived), 1);
        let seen: i64 = w
            .conn
            .query_row("SELECT count(*) FROM export_archive", [], |r| r.get(0))
            .unwrap();
        assert_eq!(seen, 1, "the watcher's own connection reads the row");
    }

    #[test]
    fn a_flush_after_the_merger_stopped_records_nothing_and_the_next_scan_retries() {
        let tmp = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(tmp.path()).unwrap();
        let work = base.join("work");
        fs::create_dir(&work).unwrap();
        let db = base.join("data/codi.db");
        let mut store = TestStore::start(&db);
        let mut w = store.watcher(&base.join("archive"), ArchiveMode::Move);
        watch(&mut w, &work);

        store.stop();
        let export = work.join("a.md");
        fs::write(&export, b"an export").unwrap();
        let mut buffer = vec![0u8; crate::export::EVENT_BUFFER];
        w.read_events(&mut buffer);
        w.archive_closed(&mut buffer);
        let archive_path = w.batch[0].archive_path.clone();
        assert!(w.claims.lock().is_claimed(&archive_path));
        w.flush();
        assert_eq!(count(&db, "SELECT count(*) FROM export_archive"), 0);
        assert!(w.batch.is_empty());
        assert!(!w.known.contains_key(&key(&export)), "forgotten, to retry");
        assert!(
            !w.claims.lock().is_claimed(&archive_path),
            "a write never made releases its claims"
        );
        assert!(export.exists(), "move mode deletes only committed exports");
        assert_eq!(Metrics::get(&w.metrics.export_errors), 1);
        assert!(
            w.metrics.health.get("exports/archive").is_some(),
            "the failure shows in the health table"
        );

        // The merger back (the next start): the next scan archives it.
        let store = TestStore::start(&db);
        w.writes = store.link();
        w.move_after_idle = std::time::Duration::ZERO;
        w.full_scan();
        w.flush();
        assert_eq!(count(&db, "SELECT count(*) FROM export_archive"), 1);
        assert!(w.metrics.health.get("exports/archive").is_none());
        assert!(!export.exists(), "deleted once its row is committed");
    }

    #[test]
    fn a_watch_the_merger_cannot_save_is_refused_and_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(tmp.path()).unwrap();
        let work = base.join("work");
        fs::create_dir(&work).unwrap();
        let mut store = TestStore::start(&base.join("data/codi.db"));
        let mut w = store.watcher(&base.join("archive"), ArchiveMode::Copy);
        store.stop();
        let uid = w.daemon_uid;
        let (_, reason) = w
            .start(&key(&work), true, Vec::new(), None, Some(uid))
            .unwrap_err();
        assert!(reason.contains("cannot save the watch"), "{reason}");
        assert!(reason.contains("merger has stopped"), "{reason}");
        assert!(w.roots.is_empty(), "not watched unsaved");
        assert!(w.metrics.health.get("exports/database").is_some());
    }
}
