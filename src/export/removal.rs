//! Move mode: deleting an archived source, through its directory's
//! descriptor and only while it still is the very file that was copied;
//! a source that may still be written is kept until it is known done.

use super::walk::{self, Meta, Unlinked};
use super::{archive, SourceFate, Watcher};
use std::ffi::OsStr;
use std::io::ErrorKind;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

impl Watcher {
    /// Move mode, after the commit: deletes `path`, through its directory's
    /// descriptor, if the name still is the file that was copied. If the
    /// deletion fails it is tried again later (see [`Self::move_archived`]).
    pub(super) fn remove_committed(&mut self, path: PathBuf, copied: Meta) {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return;
        };
        let done = match self.resolve_dir(parent) {
            Ok(dir) => remove_archived(dir.as_fd(), &path, name, &copied, false),
            Err(e) if e.kind() == ErrorKind::NotFound => true,
            Err(e) => {
                log::warn!(
                    "archived `{}` but cannot remove it: {e}; trying again later",
                    path.display()
                );
                false
            }
        };
        if !done {
            self.kept.insert(path, copied);
        }
    }

    /// Move mode: `found`, the entry `name` of `dir` (named `path`), is a
    /// version already archived. If it was kept (a scan found it while it
    /// might still have been written, or its deletion failed), it is deleted
    /// now, provided it still is the very file that was copied (device,
    /// inode, size, modification time), it is done (its close event came,
    /// `closed`, or it has been unchanged for
    /// [`MOVE_AFTER_IDLE`](super::MOVE_AFTER_IDLE)), it is its watch's
    /// owner's, and no process has it open for writing (see
    /// [`walk::unlink_if_same`]). A version whose row is not committed yet
    /// is deleted after the commit.
    pub(super) fn move_archived(
        &mut self,
        dir: BorrowedFd<'_>,
        path: &Path,
        name: &OsStr,
        found: &Meta,
        closed: bool,
    ) {
        if !closed && archive::age_of(found.mtime_ns) < self.move_after_idle {
            return;
        }
        let in_batch = self
            .batch
            .iter()
            .rposition(|r| r.source == path && r.error.is_none());
        let copied = match in_batch {
            Some(i) => match self.batch[i].fate {
                SourceFate::Later(copied) => copied,
                // Deleted after the commit, or kept for good (copy mode).
                SourceFate::Remove(_) | SourceFate::Keep => return,
            },
            None => match self.kept.get(path) {
                Some(copied) => *copied,
                None => return,
            },
        };
        if !walk::same_file_version(&copied, found)
            || !self
                .roots
                .iter()
                .any(|r| r.matches(path) && r.trusts(found.uid))
        {
            return;
        }
        // Whether a writer has it open again is checked as it is deleted.
        match in_batch {
            Some(i) => self.batch[i].fate = SourceFate::Remove(copied),
            None => {
                if remove_archived(dir, path, name, &copied, true) {
                    self.kept.remove(path);
                }
            }
        }
    }
}

/// Deletes the entry `name` of `dir` (named `path`) if it still is
/// `copied` and no process has it open for writing
/// ([`walk::unlink_if_same`]). True when done with it: deleted, gone, or
/// changed since (its new version is archived on its own); false when it is
/// to be tried again: still open for writing (its close event brings it
/// back), or the deletion failed (a `retry` failing again is not logged as
/// a warning again).
fn remove_archived(
    dir: BorrowedFd<'_>,
    path: &Path,
    name: &OsStr,
    copied: &Meta,
    retry: bool,
) -> bool {
    match walk::unlink_if_same(dir, name, copied) {
        Ok(Unlinked::Removed) => true,
        Ok(Unlinked::OpenForWriting) => {
            log::debug!(
                "archived `{}` is open for writing; deleting it once it is closed (move mode)",
                path.display()
            );
            false
        }
        Ok(Unlinked::Changed) => {
            log::info!(
                "`{}` changed after it was archived; keeping it (move mode)",
                path.display()
            );
            true
        }
        Err(e) if e.kind() == ErrorKind::NotFound => true,
        Err(e) if retry => {
            log::debug!("still cannot remove archived `{}`: {e}", path.display());
            false
        }
        Err(e) => {
            log::warn!(
                "archived `{}` but cannot remove it: {e}; trying again later",
                path.display()
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::export::test_store::TestStore;
    use crate::export::{archive, key, ArchiveMode, Watcher, EVENT_BUFFER};
    use std::fs::{self, File, OpenOptions};
    use std::path::Path;
    use std::time::Duration;

    /// The storage threads on a fresh database under `base`, and a watcher
    /// on it in move mode, not running: the test drives its steps.
    fn move_watcher(base: &Path) -> (Watcher, TestStore) {
        let store = TestStore::start(&base.join("data/codi.db"));
        let w = store.watcher(&base.join("archive"), ArchiveMode::Move);
        (w, store)
    }

    /// What the loop does after a wakeup: reads inotify's events, archives
    /// the files they report closed, and commits.
    fn handle_events(w: &mut Watcher) {
        let mut buffer = vec![0u8; EVENT_BUFFER];
        w.read_events(&mut buffer);
        w.archive_closed(&mut buffer);
        w.flush();
    }

    fn archived(w: &Watcher, path: &Path) -> i64 {
        w.conn
            .query_row(
                "SELECT count(*) FROM export_archive WHERE original_path = ?1 \
                 AND error IS NULL",
                [key(path)],
                |r| r.get(0),
            )
            .unwrap()
    }

    #[test]
    fn move_mode_deletes_a_file_a_scan_archived_before_its_close_event() {
        let tmp = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(tmp.path()).unwrap();
        let work = base.join("work");
        fs::create_dir(&work).unwrap();
        let (mut w, _store) = move_watcher(&base);
        let uid = w.daemon_uid;
        let dir = w
            .start(&key(&work), true, Vec::new(), None, Some(uid))
            .unwrap();
        w.scan_dir(&dir);

        // Written and closed, and a scan gets to it before the watcher reads
        // its close event: archived, but kept (a scan cannot tell that the
        // writer is done) until that close event is read.
        let first = work.join("first.md");
        fs::write(&first, b"first").unwrap();
        w.full_scan();
        w.flush();
        assert_eq!(archived(&w, &first), 1);
        assert!(first.exists(), "a young file a scan found is kept for now");
        handle_events(&mut w);
        assert!(!first.exists(), "its close event deletes it");

        // The same, with the close event read before the row is committed.
        let second = work.join("second.md");
        fs::write(&second, b"second").unwrap();
        w.full_scan();
        handle_events(&mut w);
        assert_eq!(archived(&w, &second), 1);
        assert!(!second.exists(), "deleted once its row is committed");
        assert_eq!(archived(&w, &first), 1, "not archived again");
    }

    #[test]
    fn a_kept_file_is_deleted_by_a_later_scan_only_if_idle_unchanged_and_not_open() {
        let tmp = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(tmp.path()).unwrap();
        let work = base.join("work");
        fs::create_dir(&work).unwrap();
        // There before the watch, so no close event ever comes for them.
        let idle = work.join("idle.md");
        let open = work.join("open.md");
        let replaced = work.join("replaced.md");
        let linked = work.join("linked.md");
        for p in [&idle, &open, &replaced, &linked] {
            fs::write(p, b"same size").unwrap();
        }
        let (mut w, _store) = move_watcher(&base);
        let uid = w.daemon_uid;
        let dir = w
            .start(&key(&work), true, Vec::new(), None, Some(uid))
            .unwrap();
        w.scan_dir(&dir);
        w.flush();
        for p in [&idle, &open, &replaced, &linked] {
            assert_eq!(archived(&w, p), 1, "{}", p.display());
            assert!(p.exists(), "modified just now: kept for now");
        }
        w.full_scan();
        w.flush();
        assert!(idle.exists(), "not idle long enough yet");

        // Open for writing again, unchanged; the name given to another file
        // of the same size and modification time; a symbolic link to the
        // archived file put in its place.
        let writer = OpenOptions::new().append(true).open(&open).unwrap();
        let other = work.join("other");
        fs::write(&other, b"same size").unwrap();
        let mtime = fs::metadata(&replaced).unwrap().modified().unwrap();
        File::options()
            .write(true)
            .open(&other)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        fs::rename(&other, &replaced).unwrap();
        let outside = base.join("outside.md");
        fs::rename(&linked, &outside).unwrap();
        std::os::unix::fs::symlink(&outside, &linked).unwrap();
        let lease_works = archive::open_for_writing(&File::open(&open).unwrap()).is_some();

        // Time passes: long enough unchanged.
        w.move_after_idle = Duration::ZERO;
        w.full_scan();
        w.flush();
        assert!(!idle.exists(), "unchanged for long: deleted by the scan");
        assert!(replaced.exists(), "another inode is never deleted");
        assert!(
            outside.exists() && linked.exists(),
            "a link is never followed"
        );
        if lease_works {
            assert!(open.exists(), "not deleted while open for writing");
        }
        drop(writer);
        handle_events(&mut w);
        assert!(!open.exists(), "deleted after its writer closed it");
        assert!(replaced.exists() && outside.exists());
    }
}
