//! Committing the queued archive rows in one transaction, then releasing
//! their archive claims and (move mode) deleting or keeping their sources.

use super::{key, SourceFate, Watcher};
use crate::metrics::Metrics;
use rusqlite::params;

impl Watcher {
    /// Commits the waiting archive rows in one transaction, then (move
    /// mode) deletes their sources.
    pub(super) fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let now_us = crate::proto::Timestamp::now().as_micros();
        let result = (|| {
            let tx = self.conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO export_archive (original_path, archive_path, session_id, \
                     file_size, content_hash, source_mtime_ns, archived_at_us, error) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?;
                for r in &self.batch {
                    insert.execute(params![
                        r.source.to_string_lossy(),
                        r.archive_path,
                        r.session_id,
                        r.size as i64,
                        r.content_hash,
                        r.mtime_ns,
                        now_us,
                        r.error,
                    ])?;
                }
            }
            tx.commit()
        })();
        // Committed (or never to be): their files are the rows' to keep now.
        for r in self.batch.iter().filter(|r| !r.archive_path.is_empty()) {
            self.claims.release(&r.archive_path);
        }
        match result {
            Ok(()) => {
                self.wal.note_commit();
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
                // Forget these versions so that the next scan tries again.
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
