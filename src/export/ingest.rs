//! The archive step for one file: copying it ([`archive`]), reusing an
//! archive file that already holds the same content, and queueing its row
//! (or its error row) for the next transaction.

use super::archive::{self, CopyError};
use super::state::content_key;
use super::{key, ArchiveMode, Record, SourceFate, Watcher, MAX_REMEMBERED_ERRORS, REFRESH};
use crate::metrics::Metrics;
use rusqlite::OptionalExtension;
use std::path::Path;
use std::time::Instant;

impl Watcher {
    pub(super) fn archive(&mut self, source: &Path, opened: archive::Source, movable: bool) {
        let version = (opened.meta.size, opened.meta.mtime_ns);
        let fate = match (self.settings.mode, movable) {
            (ArchiveMode::Copy, _) => SourceFate::Keep,
            (ArchiveMode::Move, true) => SourceFate::Remove(opened.meta),
            (ArchiveMode::Move, false) => SourceFate::Later(opened.meta),
        };
        // The copy must be durable before the source goes, now or later.
        let may_delete = fate != SourceFate::Keep;
        let session = self.session_for(source, opened.meta.uid);
        let free = self.free_space();
        let copied = match archive::copy_to_temp(opened, &self.settings.archive_dir, free) {
            Ok(c) => {
                self.free.0 = self.free.0.saturating_sub(c.size);
                c
            }
            Err(e) => {
                self.record_error(source, version.0, version.1, &e);
                return;
            }
        };
        let existing = self.archived_content(&copied.content_hash);
        let archive_path = match existing {
            Some(path) => {
                copied.temp.discard();
                Metrics::add(&self.metrics.exports_deduplicated, 1);
                path
            }
            None => {
                let date = chrono::Utc::now().date_naive();
                let target = archive::archive_path(
                    &self.settings.archive_dir,
                    (
                        chrono::Datelike::year(&date),
                        chrono::Datelike::month(&date),
                        chrono::Datelike::day(&date),
                    ),
                    session.as_deref(),
                    &copied.content_hash,
                    source,
                );
                let target_name = target.to_string_lossy().into_owned();
                self.claims.lock().claim(&target_name);
                let placed =
                    archive::install(copied.temp, &target, &mut self.made_dirs).and_then(|()| {
                        if may_delete {
                            archive::sync(&target)
                        } else {
                            Ok(())
                        }
                    });
                if let Err(e) = placed {
                    self.claims.release(&target_name);
                    let e = CopyError::Io(format!("cannot place the archive copy: {e}"));
                    self.record_error(source, version.0, version.1, &e);
                    return;
                }
                target_name
            }
        };
        self.known.insert(key(source), version);
        self.errors.remove(&key(source));
        // An older version kept for deletion is not this name's file now.
        self.kept.remove(source);
        self.contents.extend(content_key(&copied.content_hash));
        self.batch.push(Record {
            source: source.to_owned(),
            archive_path,
            session_id: session,
            size: copied.size,
            mtime_ns: version.1,
            content_hash: Some(copied.content_hash),
            error: None,
            fate,
        });
        if self.batch.len() >= self.settings.batch_size {
            self.flush();
        }
    }

    /// Records that `source` (this version) could not be archived: once
    /// per version and kind of error (a full scan tries failed versions
    /// again, and a file that still does not fit or is still not the
    /// watch owner's is not recorded again). Every vanished file is.
    pub(super) fn record_error(
        &mut self,
        source: &Path,
        size: u64,
        mtime_ns: i64,
        error: &CopyError,
    ) {
        let name = key(source);
        let sentence = error.to_string();
        if *error != CopyError::Vanished {
            self.metrics.health.fail(
                "exports/archive",
                format!("exports cannot be archived: {error}"),
            );
        }
        if *error != CopyError::Vanished {
            self.failed.insert(name.clone(), (size, mtime_ns));
            let class = archive::error_class(&sentence);
            if self
                .errors
                .get(&name)
                .is_some_and(|(s, m, c)| (*s, *m, c.as_str()) == (size, mtime_ns, class))
            {
                log::debug!(
                    "still cannot archive export `{}`: {sentence}",
                    source.display()
                );
                return;
            }
            if self.errors.len() >= MAX_REMEMBERED_ERRORS {
                self.errors.clear();
            }
            self.errors.insert(name, (size, mtime_ns, class.to_owned()));
        }
        Metrics::add(&self.metrics.export_errors, 1);
        log::warn!("cannot archive export `{}`: {sentence}", source.display());
        self.batch.push(Record {
            source: source.to_owned(),
            archive_path: String::new(),
            session_id: None,
            size,
            mtime_ns,
            content_hash: None,
            error: Some(sentence),
            fate: SourceFate::Keep,
        });
    }

    /// Free bytes in the archive's filesystem, read again every [`REFRESH`].
    fn free_space(&mut self) -> u64 {
        if self.free.1.elapsed() >= REFRESH {
            match archive::free_bytes(&self.settings.archive_dir) {
                Ok(bytes) => self.free = (bytes, Instant::now()),
                Err(e) => log::warn!("cannot read the archive's free space: {e}"),
            }
        }
        self.free.0
    }

    /// The archive file already holding this content, from a committed row
    /// or one in the current batch, claimed for the row about to reference
    /// it: found and claimed under the claims' lock, so that retention
    /// cannot delete it in between (nor once claimed).
    fn archived_content(&self, hash: &str) -> Option<String> {
        if content_key(hash).is_some_and(|k| !self.contents.contains(&k)) {
            return None;
        }
        let mut claims = self.claims.lock();
        if let Some(r) = self
            .batch
            .iter()
            .find(|r| r.content_hash.as_deref() == Some(hash))
        {
            claims.claim(&r.archive_path);
            return Some(r.archive_path.clone());
        }
        let path: Option<String> = self
            .conn
            .prepare_cached(
                "SELECT archive_path FROM export_archive WHERE content_hash = ?1 \
                 AND error IS NULL ORDER BY id LIMIT 1",
            )
            .and_then(|mut stmt| stmt.query_row([hash], |r| r.get(0)).optional())
            .unwrap_or_else(|e| {
                log::warn!("cannot look up archived content: {e}");
                None
            });
        let path = path.filter(|p| Path::new(p).is_file());
        if let Some(p) = &path {
            claims.claim(p);
        }
        path
    }
}
