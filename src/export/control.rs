//! Monitoring requests: who may watch what. A watch makes the daemon read
//! (and in move mode delete) files with its own rights, so a user may watch
//! only a directory they own, and the watch archives only their files;
//! root and the daemon's own user may watch any directory and archive any
//! file. Only a watch's owner, root or the daemon's user may change or stop
//! it. The requester is the `SO_PEERCRED` uid of the Unix client.

use super::roots::{is_privileged, Root};
use super::walk::{self, Identity};
use super::{ControlJob, ControlOp, Watcher};
use crate::proto::{AckStatus, ErrorCode, Message, MonitoredPath, Payload};
use crate::store::StoreError;
use rusqlite::params;
use std::fs;
use std::io::{self, ErrorKind};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A refused request: the answer's code and sentence.
type Refusal = (ErrorCode, String);

fn invalid(reason: String) -> Refusal {
    (ErrorCode::InvalidRequest, reason)
}

/// The answer for a client whose uid the daemon could not read.
fn anonymous() -> Refusal {
    (
        ErrorCode::Unauthorized,
        "the daemon cannot tell which local user is asking (no peer credentials), so it \
         changes no watch for them"
            .into(),
    )
}

impl Watcher {
    pub(super) fn control(&mut self, job: ControlJob) {
        let requester = job.requester_uid;
        let answer = match job.op {
            ControlOp::Start {
                path,
                recursive,
                patterns,
                session_id,
            } => match self.start(&path, recursive, patterns, session_id, requester) {
                Ok(dir) => {
                    // Answer once the watch is saved and its root watched;
                    // the scan of a large tree can take longer than a
                    // client waits.
                    let ack = Message::ack(job.request_id, AckStatus::Accepted);
                    self.replies.send(job.reply, ack);
                    self.scan_dir(&dir);
                    return;
                }
                Err((code, reason)) => Message::error(code, reason),
            },
            ControlOp::Stop { path, only_owner } => {
                match self.stop_root(&path, requester, only_owner) {
                    Ok(()) => Message::ack(job.request_id, AckStatus::Accepted),
                    Err((code, reason)) => Message::error(code, reason),
                }
            }
            ControlOp::List { only_owner } => {
                let mut paths: Vec<MonitoredPath> = self
                    .roots
                    .iter()
                    .filter(|root| only_owner.is_none() || root.owner_uid == only_owner)
                    .map(Root::describe)
                    .collect();
                paths.sort_by(|a, b| a.path.cmp(&b.path));
                Message::answer(Payload::Monitoring { paths })
            }
        };
        self.replies.send(job.reply, answer);
    }

    /// Saves and installs a watch for `requester`; returns its directory,
    /// still to scan.
    pub(super) fn start(
        &mut self,
        given: &str,
        recursive: bool,
        patterns: Vec<String>,
        session_id: Option<String>,
        requester: Option<u32>,
    ) -> Result<PathBuf, Refusal> {
        let uid = requester.ok_or_else(anonymous)?;
        let daemon_uid = self.daemon_uid;
        let privileged = is_privileged(uid, daemon_uid);
        // The daemon looks with its own rights: until the directory is known
        // to be the asker's, an unprivileged asker learns nothing of the
        // path (whether it exists, what it is, whose, where a link leads).
        let not_theirs = || not_yours(given, uid, daemon_uid);
        let (path, checked, owner) = match canonical_dir(given) {
            Ok(found) => found,
            Err(_) if !privileged => return Err(not_theirs()),
            Err(reason) => return Err(invalid(reason)),
        };
        if !privileged && owner != uid {
            return Err(not_theirs());
        }
        if path.starts_with(&self.settings.archive_dir) {
            return Err(invalid(format!(
                "`{}` is inside the export archive `{}`, which is never watched",
                path.display(),
                self.settings.archive_dir.display()
            )));
        }
        // Opened one component at a time without following a link, and
        // checked to be the directory just inspected: what is watched is
        // what was checked, whatever is renamed meanwhile.
        let fd = walk::open_root(&path).map_err(|e| invalid(open_error(&path, &e)))?;
        let meta = walk::stat_fd(fd.as_fd())
            .map_err(|e| invalid(format!("cannot inspect `{}`: {e}", path.display())))?;
        if meta.identity != checked {
            return Err(invalid(format!(
                "`{}` was replaced while it was being checked; ask again",
                path.display()
            )));
        }
        if !privileged && meta.uid != uid {
            // Given away since it was looked up.
            return Err(not_theirs());
        }
        if let Some(existing) = self.roots.iter().find(|r| r.path == path) {
            if !existing.may_be_changed_by(uid, self.daemon_uid) {
                return Err((
                    ErrorCode::Unauthorized,
                    format!(
                        "`{}` is already watched for {}; only that user, root or the daemon's \
                         user may change that watch",
                        path.display(),
                        owner_text(existing.owner_uid)
                    ),
                ));
            }
        }
        let patterns = if patterns.is_empty() {
            self.settings.default_patterns.clone()
        } else {
            patterns
        };
        let mut root = Root::new(
            path,
            recursive,
            patterns,
            session_id,
            Some(uid),
            self.daemon_uid,
        )
        .map_err(invalid)?;
        let saved = (
            root.path_str(),
            root.recursive,
            root.patterns_json(),
            root.session_id.clone(),
        );
        let saved = self.write_main("save a watch", move |tx| {
            let (path, recursive, patterns, session_id) = saved;
            tx.execute(
                "INSERT INTO monitored_paths (path, recursive, patterns, active, session_id, \
                 owner_uid) VALUES (?1, ?2, ?3, 1, ?4, ?5) ON CONFLICT(path) DO UPDATE SET \
                 recursive = excluded.recursive, patterns = excluded.patterns, active = 1, \
                 session_id = excluded.session_id, owner_uid = excluded.owner_uid",
                params![path, recursive, patterns, session_id, uid],
            )
            .map(drop)
        });
        if let Err(e) = saved {
            return Err(invalid(format!("cannot save the watch: {e}")));
        }
        log::info!(
            "watching `{}` for exports ({}, patterns {}) for uid {uid}",
            root.path.display(),
            if root.recursive {
                "recursive"
            } else {
                "this directory only"
            },
            root.patterns.join(" ")
        );
        let dir = root.path.clone();
        // A second descriptor on the same directory for the watch below
        // (the root keeps the first).
        let for_watch = walk::open_below(fd.as_fd(), Path::new(""));
        root.fd = Some(fd);
        root.identity = Some(meta.identity);
        if let Some(old) = self.roots.iter().position(|r| r.path == dir) {
            let old = self.roots.remove(old);
            root.watches = old.watches;
            root.capped = old.capped;
        }
        self.roots.push(root);
        self.dir_cache.clear();
        match for_watch {
            Ok(fd) => {
                self.watch_dir(&dir, fd.as_fd(), meta.identity);
            }
            Err(e) => log::warn!("cannot watch `{}`: {e}", dir.display()),
        }
        Ok(dir)
    }

    /// Stops the watch of `given` for `requester`; `only_owner` as in
    /// [`ControlOp::Stop`].
    fn stop_root(
        &mut self,
        given: &str,
        requester: Option<u32>,
        only_owner: Option<u32>,
    ) -> Result<(), Refusal> {
        let uid = requester.ok_or_else(anonymous)?;
        let path = fs::canonicalize(given).unwrap_or_else(|_| PathBuf::from(given));
        // Where a link leads is shown only to those who may look anywhere.
        let shown = if is_privileged(uid, self.daemon_uid) {
            path.display().to_string()
        } else {
            given.to_owned()
        };
        let not_watched = || invalid(format!("`{shown}` is not watched"));
        let Some(index) = self.roots.iter().position(|r| r.path == path) else {
            return Err(not_watched());
        };
        if only_owner.is_some() && self.roots[index].owner_uid != only_owner {
            // Neither its owner nor its existence is this user's to learn.
            return Err(not_watched());
        }
        let root = &self.roots[index];
        if !root.may_be_changed_by(uid, self.daemon_uid) {
            return Err((
                ErrorCode::Unauthorized,
                format!(
                    "`{shown}` is watched for {}; only that user, root or the daemon's user \
                     may stop that watch",
                    owner_text(root.owner_uid)
                ),
            ));
        }
        let path = root.path_str();
        if let Err(e) = self.write_main("remove a watch", move |tx| {
            tx.execute("DELETE FROM monitored_paths WHERE path = ?1", [path])
                .map(drop)
        }) {
            return Err(invalid(format!("cannot remove the watch: {e}")));
        }
        let root = self.roots.remove(index);
        log::info!("stopped watching `{}`", root.path.display());
        self.dir_cache.clear();
        self.release_watches_of(&root.path);
        self.settling
            .retain(|p, _| self.roots.iter().any(|r| r.matches(p)));
        self.kept
            .retain(|p, _| self.roots.iter().any(|r| r.matches(p)));
        Ok(())
    }

    /// Restores the saved watches; their directories are opened by the
    /// first full scan.
    pub(super) fn load_roots(&mut self) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT path, recursive, patterns, session_id, owner_uid FROM monitored_paths \
             ORDER BY path",
        )?;
        type Saved = (String, bool, Option<String>, Option<String>, Option<i64>);
        let rows: Vec<Saved> = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?;
        drop(stmt);
        for (path, recursive, patterns, session_id, owner) in rows {
            let patterns: Vec<String> = patterns
                .and_then(|p| serde_json::from_str(&p).ok())
                .unwrap_or_else(|| self.settings.default_patterns.clone());
            let owner = owner.and_then(|uid| u32::try_from(uid).ok());
            match Root::new(
                PathBuf::from(&path),
                recursive,
                patterns,
                session_id,
                owner,
                self.daemon_uid,
            ) {
                Ok(root) => self.roots.push(root),
                Err(e) => log::error!("ignoring saved watch `{path}`: {e}"),
            }
        }
        if !self.roots.is_empty() {
            log::info!("restored {} export watch(es)", self.roots.len());
        }
        Ok(())
    }

    /// A watch saved before owners were recorded takes its directory's
    /// owner (what a request from that user would have been allowed).
    pub(super) fn adopt_owner(&mut self, index: usize, uid: u32) {
        let daemon_uid = self.daemon_uid;
        let root = &mut self.roots[index];
        root.set_owner(uid, daemon_uid);
        log::info!(
            "the watch of `{}` was saved without its owner; it now belongs to uid {uid}, the \
             directory's owner",
            root.path.display()
        );
        let path = root.path_str();
        // A failure is logged; the watch keeps this owner in memory and
        // takes it again at the next start.
        let _ = self.write_main("save a watch's owner", move |tx| {
            tx.execute(
                "UPDATE monitored_paths SET owner_uid = ?2 WHERE path = ?1",
                params![path, uid],
            )
            .map(drop)
        });
    }
}

/// The one refusal an unprivileged `uid` gets for any path `given` that is
/// not a directory it owns, whatever the path really is.
fn not_yours(given: &str, uid: u32, daemon_uid: u32) -> Refusal {
    (
        ErrorCode::Unauthorized,
        format!(
            "`{given}` is not a directory owned by uid {uid} (who asks) within reach of the \
             daemon (uid {daemon_uid}): only root or the daemon's own user may watch, or \
             learn anything of, a path that is not theirs"
        ),
    )
}

fn owner_text(owner: Option<u32>) -> String {
    match owner {
        Some(uid) => format!("uid {uid}"),
        None => "an owner not recorded yet".into(),
    }
}

/// The sentence for a root that cannot be opened.
fn open_error(path: &Path, e: &io::Error) -> String {
    if walk::is_not_a_directory(e) {
        return format!(
            "`{}` changed into a symbolic link or a file while it was being checked",
            path.display()
        );
    }
    match e.kind() {
        ErrorKind::NotFound => format!("`{}` does not exist", path.display()),
        ErrorKind::PermissionDenied => format!(
            "`{}` is not readable by the daemon (uid {})",
            path.display(),
            rustix::process::geteuid().as_raw()
        ),
        _ => format!("cannot open `{}`: {e}", path.display()),
    }
}

/// Canonicalises a requested watch path and checks it is a directory, with
/// a sentence for each way it is not; returns it with its identity and
/// owner.
fn canonical_dir(given: &str) -> Result<(PathBuf, Identity, u32), String> {
    if given.is_empty() {
        return Err("the path is empty".into());
    }
    let path = fs::canonicalize(given).map_err(|e| match e.kind() {
        ErrorKind::NotFound => format!("`{given}` does not exist"),
        ErrorKind::PermissionDenied => format!("`{given}` is not accessible to the daemon"),
        _ => format!("cannot resolve `{given}`: {e}"),
    })?;
    let meta = fs::metadata(&path).map_err(|e| format!("cannot inspect `{given}`: {e}"))?;
    if !meta.is_dir() {
        return Err(format!("`{}` is not a directory", path.display()));
    }
    Ok((path, (meta.dev(), meta.ino()), meta.uid()))
}
