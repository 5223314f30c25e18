//! The watcher's bookkeeping at start-up: opening it (database connection,
//! archive directory, inotify, poll) and loading what earlier runs
//! recorded in `export_archive`, so that a restart archives nothing twice
//! and records no error twice.

use super::archive::{self, CopyError};
use super::{
    walk, ExportSettings, Watcher, INOTIFY, MAX_REMEMBERED_ERRORS, MOVE_AFTER_IDLE, REFRESH,
};
use crate::metrics::Metrics;
use crate::reply::Replies;
use crate::store::merger::MainWriteLink;
use crate::store::retention::ArchiveClaims;
use crate::store::{schema, StoreError};
use inotify::Inotify;
use mio::unix::SourceFd;
use mio::{Interest, Poll};
use rusqlite::Connection;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// Size and modification time (ns) of each source's last successful
/// archive row, keyed by the path as stored (see [`key`](super::key)).
fn load_known(conn: &Connection) -> Result<HashMap<String, (u64, i64)>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT original_path, file_size, source_mtime_ns FROM export_archive \
         WHERE id IN (SELECT max(id) FROM export_archive WHERE error IS NULL \
         GROUP BY original_path)",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            (
                r.get::<_, Option<i64>>(1)?.unwrap_or(-1) as u64,
                r.get::<_, Option<i64>>(2)?.unwrap_or(-1),
            ),
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The last error recorded for each source whose last row is an error
/// (other than a vanished file): its version and [`archive::error_class`].
fn load_errors(conn: &Connection) -> Result<HashMap<String, (u64, i64, String)>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT original_path, file_size, source_mtime_ns, error FROM export_archive \
         WHERE id IN (SELECT max(id) FROM export_archive GROUP BY original_path) \
         AND error IS NOT NULL",
    )?;
    let vanished = CopyError::Vanished.to_string();
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<i64>>(1)?.unwrap_or(-1) as u64,
            r.get::<_, Option<i64>>(2)?.unwrap_or(-1),
            r.get::<_, String>(3)?,
        ))
    })?;
    let mut errors = HashMap::new();
    for row in rows {
        let (path, size, mtime_ns, error) = row?;
        if error != vanished && errors.len() < MAX_REMEMBERED_ERRORS {
            let class = archive::error_class(&error).to_owned();
            errors.insert(path, (size, mtime_ns, class));
        }
    }
    Ok(errors)
}

/// [`content_key`] of every content in the archive.
fn load_contents(conn: &Connection) -> Result<HashSet<u64>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT DISTINCT content_hash FROM export_archive \
         WHERE error IS NULL AND content_hash IS NOT NULL",
    )?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut keys = HashSet::new();
    for hash in rows {
        keys.extend(content_key(&hash?));
    }
    Ok(keys)
}

/// The first 64 bits of a SHA-256 in hex, for [`Watcher::contents`].
pub(super) fn content_key(hash: &str) -> Option<u64> {
    hash.get(..16).and_then(|h| u64::from_str_radix(h, 16).ok())
}

impl Watcher {
    /// Opens its database connection (read-only: its writes go through
    /// `writes`), the archive directory, inotify and the poll, and loads
    /// the saved watches;
    /// [`spawn_watcher`](super::spawn_watcher) runs it.
    pub(super) fn open(
        db_path: &Path,
        writes: MainWriteLink,
        claims: Arc<ArchiveClaims>,
        settings: ExportSettings,
        replies: Replies,
        metrics: Arc<Metrics>,
        stop: Arc<AtomicBool>,
    ) -> Result<Watcher, StoreError> {
        // The merger owns the database's writes and its WAL policy (its
        // commits of this thread's writes count as activity, so its
        // checkpointer's idle TRUNCATE waits for them).
        let conn = schema::open_ro(db_path)?;
        let io_err = |action, path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io {
                action,
                path,
                source,
            }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&settings.archive_dir)
            .map_err(io_err("create archive directory", &settings.archive_dir))?;
        let archive_dir = fs::canonicalize(&settings.archive_dir)
            .map_err(io_err("resolve archive directory", &settings.archive_dir))?;
        let archive_identity = walk::open_root(&archive_dir)
            .and_then(|fd| walk::stat_fd(fd.as_fd()))
            .map(|m| m.identity)
            .ok();
        let inotify = Inotify::init().map_err(io_err("start inotify for", &archive_dir))?;
        // A writer opening a file while the watcher holds its read lease (see
        // `archive::open_for_writing`) makes the kernel send SIGIO, which would
        // otherwise end the process.
        // SAFETY: installing SIG_IGN has no preconditions.
        unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) };
        let poll = Poll::new().map_err(io_err("create a poll for", &archive_dir))?;
        poll.registry()
            .register(
                &mut SourceFd(&inotify.as_raw_fd()),
                INOTIFY,
                Interest::READABLE,
            )
            .map_err(io_err("register inotify for", &archive_dir))?;
        let mut watcher = Watcher {
            known: load_known(&conn)?,
            contents: load_contents(&conn)?,
            failed: HashMap::new(),
            errors: load_errors(&conn)?,
            conn,
            writes,
            settings: ExportSettings {
                archive_dir,
                ..settings
            },
            inotify,
            poll,
            dirs: HashMap::new(),
            watched: HashMap::new(),
            roots: Vec::new(),
            daemon_uid: rustix::process::geteuid().as_raw(),
            archive_identity,
            dir_cache: Vec::new(),
            depth_warned: false,
            settling: HashMap::new(),
            kept: HashMap::new(),
            move_after_idle: MOVE_AFTER_IDLE,
            closed: VecDeque::new(),
            closed_set: HashSet::new(),
            closed_overflowed: false,
            batch: Vec::new(),
            replies,
            metrics,
            claims,
            stop,
            next_scan: Instant::now(),
            limit_warned: false,
            made_dirs: HashSet::new(),
            free: (0, Instant::now() - REFRESH),
            workspaces: (Vec::new(), Instant::now() - REFRESH),
        };
        watcher.load_roots()?;
        Ok(watcher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_content_key_is_the_hash_prefix_and_short_hashes_have_none() {
        let hash = format!("{:016x}{}", 0x0123_4567_89ab_cdefu64, "0".repeat(48));
        assert_eq!(content_key(&hash), Some(0x0123_4567_89ab_cdef));
        assert_eq!(content_key("abc"), None);
        assert_eq!(content_key("zzzzzzzzzzzzzzzz"), None);
    }
}
