//! Watching and scanning the watched trees, always through directory
//! descriptors ([`walk`]): a root is opened from its path one component at
//! a time (a symbolic link anywhere in it makes the root missing), every
//! directory below it relative to its parent, and each is watched through
//! `/proc/self/fd` before its entries are read, so the watch is on the
//! directory that is scanned. A directory whose open or watch failed is
//! not scanned; one beyond `monitor.max_watches_per_root` (or the kernel's
//! limit) is scanned without a watch, so the periodic full scan still finds
//! its exports. A path from an inotify event is opened again from its
//! root's descriptor, never through the path string.

use super::walk::{self, Identity, Listing};
use super::{Watched, Watcher};
use crate::metrics::Metrics;
use inotify::{WatchDescriptor, WatchMask};
use rustix::fs::FileType;
use std::fs;
use std::io::{self, ErrorKind};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Deepest directory below a root that is scanned: a scan holds one
/// descriptor per level, and a hostile user could nest directories without
/// end.
const MAX_DEPTH: usize = 128;
/// Directories whose descriptors are kept for the files inotify reports
/// in them (most bursts write into one directory).
const DIR_CACHE: usize = 8;

/// What became of a directory's watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Watch {
    /// Watched (now or already).
    Watched,
    /// Not watched for a limit (the root's cap, the kernel's): it is still
    /// scanned, and the periodic scan covers it.
    Limited,
    /// The watch failed: the directory is not scanned.
    Failed,
}

/// One directory being listed during a scan.
struct Level {
    path: PathBuf,
    listing: Listing,
}

impl Watcher {
    /// Watches the directory `fd`, named `dir`, unless it is already
    /// watched (as the same directory).
    pub(super) fn watch_dir(
        &mut self,
        dir: &Path,
        fd: BorrowedFd<'_>,
        identity: Identity,
    ) -> Watch {
        if let Some(wd) = self.watched.get(dir) {
            if self.dirs.get(wd).is_some_and(|w| w.identity == identity) {
                return Watch::Watched;
            }
            // Another directory has this name now: the old watch is stale.
            self.unwatch(dir);
        }
        let Some(root) = self.root_for(dir) else {
            return Watch::Failed;
        };
        if self.roots[root].watches >= self.settings.max_watches_per_root {
            self.cap_hit(root);
            return Watch::Limited;
        }
        // Through the descriptor: the watch is on exactly this directory,
        // whatever its path names by now (so no `IN_DONT_FOLLOW`, which
        // would refuse the /proc link itself).
        let mask = WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::CREATE
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF
            | WatchMask::ONLYDIR;
        match self.inotify.watches().add(walk::proc_path(fd), mask) {
            Ok(wd) => {
                let root_path = self.roots[root].path.clone();
                let entry = Watched {
                    path: dir.to_owned(),
                    identity,
                    root: root_path.clone(),
                };
                match self.dirs.insert(wd.clone(), entry) {
                    // The same directory under a new name (moved within
                    // the tree) gets the same descriptor: drop the old name.
                    Some(old) => {
                        if old.path != dir {
                            self.watched.remove(&old.path);
                        }
                        if old.root != root_path {
                            self.count_watch(&old.root, false);
                            self.count_watch(&root_path, true);
                        }
                    }
                    None => self.count_watch(&root_path, true),
                }
                self.watched.insert(dir.to_owned(), wd);
                Watch::Watched
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                Metrics::add(&self.metrics.watch_limit_errors, 1);
                if !self.limit_warned {
                    self.limit_warned = true;
                    log::error!(
                        "inotify watch limit reached (raise fs.inotify.max_user_watches, now {}): \
                         `{}` and further directories are covered only by the scan every {:?}",
                        fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
                            .map(|s| s.trim().to_owned())
                            .unwrap_or_else(|_| "unknown".into()),
                        dir.display(),
                        self.settings.scan_interval
                    );
                }
                Watch::Limited
            }
            Err(e) => {
                log::warn!("cannot watch `{}`: {e}; not scanning it", dir.display());
                Watch::Failed
            }
        }
    }

    /// The root's cap was reached: said once until a full scan finds the
    /// tree below the cap again.
    fn cap_hit(&mut self, index: usize) {
        let cap = self.settings.max_watches_per_root;
        let interval = self.settings.scan_interval;
        let root = &mut self.roots[index];
        root.capped_this_scan = true;
        if root.capped {
            return;
        }
        root.capped = true;
        Metrics::add(&self.metrics.watch_cap_hits, 1);
        log::warn!(
            "`{}` has more directories than monitor.max_watches_per_root ({cap}): the ones \
             beyond it are not watched, and exports in them are found by the full scan every \
             {interval:?}",
            root.path.display()
        );
    }

    fn count_watch(&mut self, root: &Path, add: bool) {
        if let Some(r) = self.roots.iter_mut().find(|r| r.path == root) {
            if add {
                r.watches += 1;
            } else {
                r.watches = r.watches.saturating_sub(1);
            }
        }
    }

    /// Removes the watch of `dir`, if any.
    pub(super) fn unwatch(&mut self, dir: &Path) {
        if let Some(wd) = self.watched.remove(dir) {
            self.drop_watch(&wd);
            // Fails for a watch the kernel already dropped.
            let _ = self.inotify.watches().remove(wd);
        }
    }

    fn drop_watch(&mut self, wd: &WatchDescriptor) {
        if let Some(w) = self.dirs.remove(wd) {
            self.count_watch(&w.root, false);
        }
    }

    /// After a root was removed: drops the watches no other root covers and
    /// counts the rest against the root that covers them now.
    pub(super) fn release_watches_of(&mut self, removed: &Path) {
        let orphans: Vec<PathBuf> = self
            .watched
            .keys()
            .filter(|d| !self.roots.iter().any(|r| r.covers_dir(d)))
            .cloned()
            .collect();
        for dir in orphans {
            self.unwatch(&dir);
        }
        let moved: Vec<(WatchDescriptor, PathBuf)> = self
            .dirs
            .iter()
            .filter(|(_, w)| w.root == removed)
            .map(|(wd, w)| (wd.clone(), w.path.clone()))
            .collect();
        for (wd, dir) in moved {
            if let Some(index) = self.root_for(&dir) {
                let root = self.roots[index].path.clone();
                if let Some(w) = self.dirs.get_mut(&wd) {
                    w.root = root.clone();
                }
                self.count_watch(&root, true);
            }
        }
    }

    /// The deepest root covering `dir`: its watches count against it, and
    /// paths below it are opened from its descriptor.
    fn root_for(&self, dir: &Path) -> Option<usize> {
        self.roots
            .iter()
            .enumerate()
            .filter(|(_, r)| r.covers_dir(dir))
            .max_by_key(|(_, r)| r.path.as_os_str().len())
            .map(|(i, _)| i)
    }

    /// Opens the directory `dir` from the descriptor of the deepest open
    /// root covering it, one component at a time, never following a link.
    fn open_dir(&self, dir: &Path) -> io::Result<OwnedFd> {
        if dir.starts_with(&self.settings.archive_dir) {
            return Err(io::Error::other("inside the export archive"));
        }
        let (root, fd) = self
            .roots
            .iter()
            .filter(|r| r.covers_dir(dir))
            .filter_map(|r| r.fd.as_ref().map(|fd| (r, fd)))
            .max_by_key(|(r, _)| r.path.as_os_str().len())
            .ok_or_else(|| io::Error::from(ErrorKind::NotFound))?;
        let relative = dir
            .strip_prefix(&root.path)
            .map_err(|_| io::Error::from(ErrorKind::NotFound))?;
        walk::open_below(fd.as_fd(), relative)
    }

    /// [`Self::open_dir`], remembering the last few directories (files
    /// reported closed usually come in bursts in one directory).
    pub(super) fn resolve_dir(&mut self, dir: &Path) -> io::Result<Arc<OwnedFd>> {
        if let Some((_, fd)) = self.dir_cache.iter().find(|(p, _)| p == dir) {
            return Ok(Arc::clone(fd));
        }
        let fd = Arc::new(self.open_dir(dir)?);
        if self.dir_cache.len() >= DIR_CACHE {
            self.dir_cache.remove(0);
        }
        self.dir_cache.push((dir.to_owned(), Arc::clone(&fd)));
        Ok(fd)
    }

    pub(super) fn full_scan(&mut self) {
        self.next_scan = Instant::now() + self.settings.scan_interval;
        self.limit_warned = false;
        self.depth_warned = false;
        self.failed.clear();
        self.dir_cache.clear();
        Metrics::add(&self.metrics.export_scans, 1);
        for root in &mut self.roots {
            root.capped_this_scan = false;
        }
        for index in 0..self.roots.len() {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            if self.refresh_root(index) {
                let dir = self.roots[index].path.clone();
                self.scan_dir(&dir);
            }
        }
        if self.stop.load(Ordering::Relaxed) {
            return;
        }
        for root in &mut self.roots {
            // Below the cap for a whole scan: say so again if it is hit.
            if !root.capped_this_scan {
                root.capped = false;
            }
        }
    }

    /// Opens a root's directory again from its path (it may have been
    /// deleted, replaced or swapped for a link since), checks its owner
    /// still is the watch's, and records whether it is there. True if it
    /// is, with its descriptor in the root.
    pub(super) fn refresh_root(&mut self, index: usize) -> bool {
        let path = self.roots[index].path.clone();
        let opened = walk::open_root(&path).and_then(|fd| Ok((walk::stat_fd(fd.as_fd())?, fd)));
        let (meta, fd) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                let reason = if e.kind() == ErrorKind::NotFound {
                    "was deleted or moved away".to_owned()
                } else if walk::is_not_a_directory(&e) {
                    "is a symbolic link or not a directory now, which is never followed".to_owned()
                } else {
                    format!("cannot be opened ({e})")
                };
                self.lose_root(index, &reason);
                return false;
            }
        };
        if self.roots[index].owner_uid.is_none() {
            self.adopt_owner(index, meta.uid);
        }
        let root = &self.roots[index];
        if !root.trusts(meta.uid) {
            let reason = format!(
                "is owned by uid {} now, not by uid {} who watches it",
                meta.uid,
                root.owner_uid.unwrap_or(u32::MAX)
            );
            self.lose_root(index, &reason);
            return false;
        }
        if root.identity.is_some_and(|id| id != meta.identity) {
            log::info!(
                "watched directory `{}` was replaced by another directory; watching the new one",
                path.display()
            );
            // The old tree's watches name paths that are the new tree's now.
            self.drop_watches_of(&path);
        }
        let root = &mut self.roots[index];
        root.fd = Some(fd);
        root.identity = Some(meta.identity);
        self.mark_root(index, true, "");
        true
    }

    /// A root's directory is gone (or not trusted): close it, drop the
    /// watches counted against it and say so once.
    fn lose_root(&mut self, index: usize, reason: &str) {
        let root = &mut self.roots[index];
        root.fd = None;
        root.identity = None;
        let path = root.path.clone();
        self.drop_watches_of(&path);
        self.mark_root(index, false, reason);
    }

    /// Drops every watch counted against the root `path`.
    fn drop_watches_of(&mut self, path: &Path) {
        self.dir_cache.clear();
        let stale: Vec<PathBuf> = self
            .dirs
            .values()
            .filter(|w| w.root == path)
            .map(|w| w.path.clone())
            .collect();
        for dir in stale {
            self.unwatch(&dir);
        }
    }

    /// Records whether a root directory is present, and says so when that
    /// (or why it is missing) changes.
    fn mark_root(&mut self, index: usize, present: bool, reason: &str) {
        let root = &mut self.roots[index];
        if root.active == present && (present || root.lost_reason == reason) {
            return;
        }
        let changed = root.active != present;
        root.active = present;
        root.lost_reason = reason.to_owned();
        let dir = root.path.clone();
        if !changed {
            // Still missing, for another reason now.
            log::warn!("watched directory `{}` {reason}", dir.display());
            return;
        }
        if present {
            log::info!("watched directory `{}` is back; scanning it", dir.display());
        } else {
            Metrics::add(&self.metrics.watched_dirs_lost, 1);
            log::warn!(
                "watched directory `{}` {reason}; it is watched again when it is a directory \
                 again (checked every {:?})",
                dir.display(),
                self.settings.scan_interval
            );
        }
        let path = dir.to_string_lossy().into_owned();
        // For whoever reads the database; the watcher itself goes by
        // `root.active`, so a failure is only logged.
        let _ = self.write_main("save whether a watched directory is present", move |tx| {
            tx.execute(
                "UPDATE monitored_paths SET active = ?2 WHERE path = ?1",
                rusqlite::params![path, present],
            )
            .map(drop)
        });
    }

    /// Watches `start` (and, under a recursive root, every directory below
    /// it) first, then looks at the files already there.
    pub(super) fn scan_dir(&mut self, start: &Path) {
        let fd = match self.open_dir(start) {
            Ok(fd) => fd,
            // Gone, or a link or file now: nothing to scan (a link is
            // never followed).
            Err(e) if e.kind() == ErrorKind::NotFound || walk::is_not_a_directory(&e) => return,
            Err(e) => {
                log::warn!("cannot scan `{}`: {e}", start.display());
                return;
            }
        };
        let base_depth = self
            .root_for(start)
            .and_then(|i| start.strip_prefix(&self.roots[i].path).ok())
            .map_or(0, |rel| rel.components().count());
        let mut stack: Vec<Level> = Vec::new();
        if let Some(level) = self.enter(start.to_owned(), fd) {
            stack.push(level);
        }
        loop {
            let depth = base_depth + stack.len();
            let Some(top) = stack.last_mut() else { break };
            if self.stop.load(Ordering::Relaxed) {
                // Shutting down: the next start scans everything anyway.
                return;
            }
            let entry = match top.listing.next_entry() {
                None => {
                    stack.pop();
                    continue;
                }
                Some(Err(e)) => {
                    log::warn!("cannot list `{}`: {e}", top.path.display());
                    stack.pop();
                    continue;
                }
                Some(Ok(entry)) => entry,
            };
            let path = top.path.join(&entry.name);
            let dir = top.listing.fd();
            let kind = match entry.kind {
                FileType::Unknown => match walk::stat_at(dir, &entry.name) {
                    Ok(meta) => meta.kind,
                    Err(_) => continue,
                },
                kind => kind,
            };
            let child = match kind {
                FileType::Directory => {
                    if !self.roots.iter().any(|r| r.covers_dir(&path)) {
                        continue;
                    }
                    if depth >= MAX_DEPTH {
                        self.too_deep(&path);
                        continue;
                    }
                    match walk::open_dir_at(dir, &entry.name) {
                        Ok(fd) => self.enter(path, fd),
                        // Swapped for a link or a file since it was listed:
                        // never followed.
                        Err(e)
                            if e.kind() == ErrorKind::NotFound || walk::is_not_a_directory(&e) =>
                        {
                            continue
                        }
                        Err(e) => {
                            log::warn!("cannot open `{}`: {e}", path.display());
                            continue;
                        }
                    }
                }
                FileType::RegularFile => {
                    if self.roots.iter().any(|r| r.matches(&path)) {
                        self.consider_at(dir, &path, &entry.name, true);
                    }
                    continue;
                }
                // Symbolic links, FIFOs, sockets, devices: never opened or
                // followed.
                _ => continue,
            };
            if let Some(child) = child {
                stack.push(child);
            }
        }
    }

    /// A directory reached by a scan: skipped if it is the archive, or owned
    /// by a user no covering watch trusts; otherwise watched, and listed
    /// unless the watch failed.
    fn enter(&mut self, path: PathBuf, fd: OwnedFd) -> Option<Level> {
        let meta = match walk::stat_fd(fd.as_fd()) {
            Ok(meta) => meta,
            Err(e) => {
                log::warn!("cannot inspect `{}`: {e}", path.display());
                return None;
            }
        };
        if Some(meta.identity) == self.archive_identity
            || path.starts_with(&self.settings.archive_dir)
        {
            return None;
        }
        if !self
            .roots
            .iter()
            .any(|r| r.covers_dir(&path) && r.trusts(meta.uid))
        {
            log::debug!(
                "not scanning `{}`: owned by uid {}, not by a watch's owner",
                path.display(),
                meta.uid
            );
            return None;
        }
        if self.watch_dir(&path, fd.as_fd(), meta.identity) == Watch::Failed {
            return None;
        }
        match Listing::new(fd) {
            Ok(listing) => Some(Level { path, listing }),
            Err(e) => {
                log::warn!("cannot list `{}`: {e}", path.display());
                None
            }
        }
    }

    fn too_deep(&mut self, dir: &Path) {
        if !self.depth_warned {
            self.depth_warned = true;
            log::warn!(
                "`{}` is more than {MAX_DEPTH} directories below its watched root; it and \
                 deeper directories are not scanned",
                dir.display()
            );
        }
    }

    /// A watch went away, or its directory was deleted or moved: forget it
    /// and every watch below it (their paths are stale now), then look at
    /// the path again if it is still (or again) a watched directory. A
    /// directory moved within the tree is watched anew under its new name
    /// through its parent's `IN_MOVED_TO`.
    pub(super) fn forget(&mut self, wd: WatchDescriptor, dir: &Path, ignored_only: bool) {
        if self.dirs.get(&wd).map(|w| w.path.as_path()) != Some(dir) {
            return;
        }
        self.dir_cache.clear();
        if ignored_only {
            self.drop_watch(&wd);
            self.watched.remove(dir);
        } else {
            let stale: Vec<PathBuf> = self
                .watched
                .keys()
                .filter(|p| p.starts_with(dir))
                .cloned()
                .collect();
            for path in stale {
                self.unwatch(&path);
            }
        }
        if let Some(index) = self.roots.iter().position(|r| r.path == dir) {
            if self.refresh_root(index) {
                self.scan_dir(dir);
            }
        } else if self.roots.iter().any(|r| r.covers_dir(dir)) {
            // Something else may have this name now: look at it (a link
            // there is not followed).
            self.scan_dir(dir);
        }
    }
}
