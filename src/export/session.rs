//! Attributing an export to a session: the watch's own session, else the
//! active session whose workspace holds the file, and never a session of
//! another user than the file's owner.

use super::{roots, Watcher, REFRESH};
use rusqlite::OptionalExtension;
use std::path::Path;
use std::time::Instant;

/// An active session's workspace, as the watcher attributes exports.
#[derive(Debug, Clone)]
pub(super) struct Workspace {
    /// The directory, without a trailing `/`.
    pub(super) dir: String,
    /// The session.
    pub(super) session_id: String,
    /// The uid that started it; `None` over TCP or before uids were stored.
    pub(super) uid: Option<u32>,
}

/// True if a session `session_uid` started may have a file `owner` owns
/// counted as its export: its own, or root's, the daemon's or one with no
/// uid (the operator's, over TCP).
fn may_claim(session_uid: Option<u32>, owner: u32, daemon_uid: u32) -> bool {
    match session_uid {
        None => true,
        Some(uid) => uid == owner || roots::is_privileged(uid, daemon_uid),
    }
}

impl Watcher {
    /// The watch's session; else the active session whose workspace holds
    /// `source` (the deepest workspace, then the latest start); else none.
    /// Either only if it may claim a file `owner` owns ([`may_claim`]):
    /// no user's session takes another user's exports. Workspaces are
    /// compared as the sessions gave them, so `codi2` sends absolute ones.
    pub(super) fn session_for(&mut self, source: &Path, owner: u32) -> Option<String> {
        if let Some(s) = self
            .roots
            .iter()
            .filter(|r| r.matches(source))
            .max_by_key(|r| r.path.as_os_str().len())
            .and_then(|r| r.session_id.clone())
        {
            let started_by = self
                .conn
                .prepare_cached("SELECT uid FROM sessions WHERE id = ?1")
                .and_then(|mut stmt| stmt.query_row([&s], |r| r.get(0)).optional());
            match started_by {
                // Not started yet: the watch's owner named it first.
                Ok(None) => return Some(s),
                Ok(Some(uid)) if may_claim(uid, owner, self.daemon_uid) => return Some(s),
                Ok(Some(_)) => {}
                Err(e) => log::warn!("cannot look up session `{s}`: {e}"),
            }
        }
        if self.workspaces.1.elapsed() >= REFRESH {
            match self.load_workspaces() {
                Ok(list) => self.workspaces = (list, Instant::now()),
                Err(e) => log::warn!("cannot read the sessions' workspaces: {e}"),
            }
        }
        let source = source.to_string_lossy();
        let daemon_uid = self.daemon_uid;
        self.workspaces
            .0
            .iter()
            .find(|w| {
                may_claim(w.uid, owner, daemon_uid)
                    && source
                        .strip_prefix(w.dir.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            })
            .map(|w| w.session_id.clone())
    }

    fn load_workspaces(&self) -> rusqlite::Result<Vec<Workspace>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT rtrim(workspace, '/'), id, uid FROM sessions \
             WHERE ended_at IS NULL AND workspace IS NOT NULL AND workspace <> '/' \
             AND workspace <> '' ORDER BY length(rtrim(workspace, '/')) DESC, started_at DESC",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Workspace {
                dir: r.get(0)?,
                session_id: r.get(1)?,
                uid: r.get(2)?,
            })
        })?;
        rows.collect()
    }
}
