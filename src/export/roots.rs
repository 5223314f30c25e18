//! A watched root: its directory, whether subdirectories count, its glob
//! patterns (globset), its session, who asked for it (and so whose files it
//! may archive) and the descriptor its tree is walked from.

use super::walk::Identity;
use crate::proto::MonitoredPath;
use globset::{Glob, GlobSet, GlobSetBuilder};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// One `StartMonitoring` in force.
#[derive(Debug)]
pub struct Root {
    /// The canonical directory.
    pub path: PathBuf,
    /// Subdirectories (also ones created later) are watched too.
    pub recursive: bool,
    /// The patterns as given.
    pub patterns: Vec<String>,
    globs: GlobSet,
    /// The session its exports belong to, if named.
    pub session_id: Option<String>,
    /// False while the directory is missing (or is not a directory).
    pub active: bool,
    /// Why it is missing, as last logged.
    pub lost_reason: String,
    /// The uid of the user who asked for the watch; `None` for a watch
    /// saved before owners were recorded, until its directory's owner is
    /// adopted.
    pub owner_uid: Option<u32>,
    /// The owner is root or the daemon's own user: files of any owner are
    /// archived.
    pub privileged: bool,
    /// The directory, opened (one component at a time, no symbolic link);
    /// every walk of the tree starts here. `None` while it is missing.
    pub fd: Option<OwnedFd>,
    /// Device and inode of `fd`.
    pub identity: Option<Identity>,
    /// inotify watches counted against this root.
    pub watches: usize,
    /// The tree has more directories than `monitor.max_watches_per_root`
    /// (said once in the log until a full scan finds it below the cap).
    pub capped: bool,
    /// The cap was hit during the current full scan.
    pub capped_this_scan: bool,
}

impl Root {
    /// Compiles `patterns`; a pattern globset rejects is a readable error.
    /// `owner_uid` asked for the watch; it is privileged if it is root or
    /// `daemon_uid`.
    pub fn new(
        path: PathBuf,
        recursive: bool,
        patterns: Vec<String>,
        session_id: Option<String>,
        owner_uid: Option<u32>,
        daemon_uid: u32,
    ) -> Result<Root, String> {
        let mut builder = GlobSetBuilder::new();
        for p in &patterns {
            if p.is_empty() {
                return Err("an empty pattern matches nothing".into());
            }
            builder.add(Glob::new(p).map_err(|e| format!("invalid pattern `{p}`: {e}"))?);
        }
        let globs = builder
            .build()
            .map_err(|e| format!("invalid patterns: {e}"))?;
        Ok(Root {
            path,
            recursive,
            patterns,
            globs,
            session_id,
            active: true,
            lost_reason: String::new(),
            owner_uid,
            privileged: owner_uid.is_some_and(|uid| is_privileged(uid, daemon_uid)),
            fd: None,
            identity: None,
            watches: 0,
            capped: false,
            capped_this_scan: false,
        })
    }

    /// Sets the owner (adopting a directory's owner for a watch saved
    /// without one).
    pub fn set_owner(&mut self, uid: u32, daemon_uid: u32) {
        self.owner_uid = Some(uid);
        self.privileged = is_privileged(uid, daemon_uid);
    }

    /// True if files (and directories) owned by `uid` belong to this
    /// watch: its owner's, or anyone's for a privileged owner.
    pub fn trusts(&self, uid: u32) -> bool {
        self.privileged || self.owner_uid == Some(uid)
    }

    /// True if `uid` may change or stop this watch: its owner, root or the
    /// daemon's user.
    pub fn may_be_changed_by(&self, uid: u32, daemon_uid: u32) -> bool {
        is_privileged(uid, daemon_uid) || self.owner_uid == Some(uid)
    }

    /// The directory as stored in `monitored_paths`.
    pub fn path_str(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// The patterns as stored in `monitored_paths` (a JSON array).
    pub fn patterns_json(&self) -> String {
        serde_json::to_string(&self.patterns).unwrap_or_else(|_| "[]".into())
    }

    /// True if the directory `dir` belongs to this watch.
    pub fn covers_dir(&self, dir: &Path) -> bool {
        dir == self.path || (self.recursive && dir.starts_with(&self.path))
    }

    /// True if the file `path` is an export of this watch.
    pub fn matches(&self, path: &Path) -> bool {
        let Some(parent) = path.parent() else {
            return false;
        };
        if !self.covers_dir(parent) {
            return false;
        }
        path.strip_prefix(&self.path)
            .is_ok_and(|relative| self.globs.is_match(relative))
    }

    /// The watch as a `Monitoring` answer shows it.
    pub fn describe(&self) -> MonitoredPath {
        MonitoredPath {
            path: self.path_str(),
            recursive: self.recursive,
            patterns: self.patterns.clone(),
            session_id: self.session_id.clone(),
            active: self.active,
            watch_cap_reached: self.capped,
        }
    }
}

/// Root and the daemon's own user may watch any directory and archive any
/// file.
pub fn is_privileged(uid: u32, daemon_uid: u32) -> bool {
    uid == 0 || uid == daemon_uid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_relative_paths_at_any_depth_when_recursive() {
        let root = Root::new(
            "/w".into(),
            true,
            vec!["*.md".into(), "out/*.json".into()],
            None,
            Some(1000),
            999,
        )
        .unwrap();
        assert!(root.matches(Path::new("/w/a.md")));
        assert!(root.matches(Path::new("/w/x/y/a.md")));
        assert!(root.matches(Path::new("/w/out/r.json")));
        assert!(!root.matches(Path::new("/w/a.txt")));
        assert!(!root.matches(Path::new("/elsewhere/a.md")));
        let flat = Root::new("/w".into(), false, vec!["*.md".into()], None, None, 999).unwrap();
        assert!(flat.matches(Path::new("/w/a.md")));
        assert!(!flat.matches(Path::new("/w/x/a.md")), "not recursive");
        assert!(flat.covers_dir(Path::new("/w")));
        assert!(!flat.covers_dir(Path::new("/w/x")));
    }

    #[test]
    fn bad_patterns_are_refused_with_a_reason() {
        let err = Root::new("/w".into(), true, vec!["a[".into()], None, None, 999).unwrap_err();
        assert!(err.contains("invalid pattern `a[`"), "{err}");
        assert!(Root::new("/w".into(), true, vec![String::new()], None, None, 999).is_err());
    }

    #[test]
    fn a_watch_trusts_its_owners_files_and_privileged_watches_trust_all() {
        let mine = Root::new("/w".into(), true, vec![], None, Some(1000), 999).unwrap();
        assert!(mine.trusts(1000));
        assert!(!mine.trusts(0) && !mine.trusts(1001));
        assert!(mine.may_be_changed_by(1000, 999));
        assert!(mine.may_be_changed_by(0, 999) && mine.may_be_changed_by(999, 999));
        assert!(!mine.may_be_changed_by(1001, 999));
        for owner in [0, 999] {
            let all = Root::new("/w".into(), true, vec![], None, Some(owner), 999).unwrap();
            assert!(all.trusts(1000) && all.trusts(0));
        }
        let mut legacy = Root::new("/w".into(), true, vec![], None, None, 999).unwrap();
        assert!(!legacy.trusts(0), "nothing until its owner is known");
        assert!(!legacy.may_be_changed_by(1000, 999));
        legacy.set_owner(1000, 999);
        assert!(legacy.trusts(1000) && !legacy.trusts(1001));
    }
}
