//! A watched root: its directory, whether subdirectories count, its glob
//! patterns (globset) and its session.

use crate::proto::MonitoredPath;
use globset::{Glob, GlobSet, GlobSetBuilder};
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
    /// False while the directory is missing.
    pub active: bool,
}

impl Root {
    /// Compiles `patterns`; a pattern globset rejects is a readable error.
    pub fn new(
        path: PathBuf,
        recursive: bool,
        patterns: Vec<String>,
        session_id: Option<String>,
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
        })
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
        }
    }
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
        )
        .unwrap();
        assert!(root.matches(Path::new("/w/a.md")));
        assert!(root.matches(Path::new("/w/x/y/a.md")));
        assert!(root.matches(Path::new("/w/out/r.json")));
        assert!(!root.matches(Path::new("/w/a.txt")));
        assert!(!root.matches(Path::new("/elsewhere/a.md")));
        let flat = Root::new("/w".into(), false, vec!["*.md".into()], None).unwrap();
        assert!(flat.matches(Path::new("/w/a.md")));
        assert!(!flat.matches(Path::new("/w/x/a.md")), "not recursive");
        assert!(flat.covers_dir(Path::new("/w")));
        assert!(!flat.covers_dir(Path::new("/w/x")));
    }

    #[test]
    fn bad_patterns_are_refused_with_a_reason() {
        let err = Root::new("/w".into(), true, vec!["a[".into()], None).unwrap_err();
        assert!(err.contains("invalid pattern `a[`"), "{err}");
        assert!(Root::new("/w".into(), true, vec![String::new()], None).is_err());
    }
}
