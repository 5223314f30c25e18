//! Deciding whether a reported or scanned file is an export to archive now:
//! looked up again through its directory's descriptor, skipped when this
//! version is already archived or failed, refused when not its watch
//! owner's, and left to settle while it may still be written.

use super::archive::{self, CopyError};
use super::walk;
use super::{key, ArchiveMode, Watcher, SETTLE};
use std::ffi::OsStr;
use std::io::ErrorKind;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

impl Watcher {
    /// A file inotify reported (or one settling): opened again through
    /// its directory's descriptor, from its root's, never through `path`.
    pub(super) fn consider_path(&mut self, path: &Path, scanned: bool) {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return;
        };
        match self.resolve_dir(parent) {
            Ok(dir) => self.consider_at(dir.as_fd(), path, name, scanned),
            Err(e) if e.kind() == ErrorKind::NotFound => self.vanished(path, scanned),
            Err(e) => {
                // A link (never followed) or a file where a directory was.
                self.settling.remove(path);
                log::debug!(
                    "not looking at `{}`: its directory cannot be opened ({e})",
                    path.display()
                );
            }
        }
    }

    fn vanished(&mut self, path: &Path, scanned: bool) {
        self.settling.remove(path);
        self.kept.remove(path);
        if !scanned {
            self.record_error(path, 0, 0, &CopyError::Vanished);
        }
    }

    /// The matching entry `name` of `dir`, named `path`: archive it unless
    /// this version already is, or it is not a regular file (then it is
    /// never opened), or not its watch's owner's. A file found by a scan
    /// that changed within [`SETTLE`] waits for its close event or a later
    /// look.
    pub(super) fn consider_at(
        &mut self,
        dir: BorrowedFd<'_>,
        path: &Path,
        name: &OsStr,
        scanned: bool,
    ) {
        let found = match walk::stat_at(dir, name) {
            Ok(found) => found,
            Err(e) if e.kind() == ErrorKind::NotFound => return self.vanished(path, scanned),
            Err(e) => {
                log::warn!("cannot inspect export `{}`: {e}", path.display());
                return;
            }
        };
        if !found.is_file() {
            self.settling.remove(path);
            self.kept.remove(path);
            return;
        }
        let name_key = key(path);
        let version = (found.size, found.mtime_ns);
        if self.known.get(&name_key) == Some(&version) {
            self.settling.remove(path);
            if self.settings.mode == ArchiveMode::Move {
                self.move_archived(dir, path, name, &found, !scanned);
            }
            return;
        }
        if self.failed.get(&name_key) == Some(&version) {
            self.settling.remove(path);
            return;
        }
        if !self
            .roots
            .iter()
            .any(|r| r.matches(path) && r.trusts(found.uid))
        {
            self.settling.remove(path);
            let watcher = self
                .roots
                .iter()
                .filter(|r| r.matches(path))
                .max_by_key(|r| r.path.as_os_str().len())
                .and_then(|r| r.owner_uid);
            let error = CopyError::Untrusted {
                owner: found.uid,
                watcher,
            };
            self.record_error(path, version.0, version.1, &error);
            return;
        }
        let source = match archive::open_source(dir, name, &found, scanned) {
            Ok(Some(source)) => source,
            // Replaced since it was inspected; its own event brings it.
            Ok(None) => {
                self.settling.remove(path);
                return;
            }
            Err(CopyError::Vanished) => return self.vanished(path, scanned),
            Err(e) => {
                log::warn!("cannot open export `{}`: {e}", path.display());
                return;
            }
        };
        let age = source.age();
        if source.being_written == Some(true) {
            // Its close event (the directory is watched) brings it; failing
            // that, it is looked at again a second from now.
            self.settling
                .insert(path.to_owned(), Instant::now() + SETTLE);
            return;
        }
        // Where the kernel could not tell whether it is still being
        // written, a file a scan found waits until it has been unchanged
        // for a moment.
        if scanned && source.being_written.is_none() && age < SETTLE {
            self.settling
                .insert(path.to_owned(), Instant::now() + (SETTLE - age));
            return;
        }
        self.settling.remove(path);
        // A move deletes the source, so only after its close event or once
        // a scan found it unchanged for long: a writer that paused for a
        // second would otherwise lose the rest of its file. One found
        // sooner is kept until then (`move_archived`).
        let movable = !scanned || age >= self.move_after_idle;
        self.archive(path, source, movable);
    }

    pub(super) fn recheck_settled(&mut self) {
        let now = Instant::now();
        let due: Vec<PathBuf> = self
            .settling
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(p, _)| p.clone())
            .collect();
        for path in due {
            self.settling.remove(&path);
            self.consider_path(&path, true);
        }
    }
}
