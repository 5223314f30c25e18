//! Opening the database safely: a private directory and file, WAL journaling,
//! and forward-only migrations keyed by `PRAGMA user_version`.
//!
//! A database written by a newer binary is refused rather than guessed at,
//! so a downgrade can never corrupt data it does not understand.

use super::StoreError;
use crate::fsperm::check_private_dir;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The schema version this binary creates and reads.
pub const SCHEMA_VERSION: i64 = 1;

/// How long a connection waits for a lock held by another connection.
pub const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);

/// Forward steps: `MIGRATIONS[i]` takes `user_version` from `i` to `i + 1`.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [V1];

/// Version 0 to 1: the whole initial schema.
const V1: &str = "
CREATE TABLE logs (
  id INTEGER PRIMARY KEY,
  uuid BLOB NOT NULL,
  timestamp INTEGER NOT NULL,
  level TEXT NOT NULL,
  component TEXT NOT NULL,
  session_id TEXT,
  message TEXT NOT NULL,
  metadata TEXT,
  created_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX idx_logs_uuid ON logs(uuid);
CREATE INDEX idx_logs_timestamp ON logs(timestamp);
CREATE INDEX idx_logs_session ON logs(session_id, timestamp);
CREATE TABLE sessions (
  id TEXT PRIMARY KEY,
  identity TEXT NOT NULL,
  agent_type TEXT,
  started_at INTEGER NOT NULL,
  ended_at INTEGER,
  metadata TEXT,
  workspace TEXT
);
CREATE TABLE monitored_paths (
  path TEXT PRIMARY KEY,
  recursive INTEGER NOT NULL DEFAULT 1,
  patterns TEXT,
  active INTEGER NOT NULL DEFAULT 1,
  created_at INTEGER NOT NULL DEFAULT (strftime('%s','now'))
);
CREATE TABLE export_archive (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  original_path TEXT NOT NULL,
  archive_path TEXT NOT NULL,
  session_id TEXT,
  file_size INTEGER,
  processed_at INTEGER NOT NULL DEFAULT (strftime('%s','now'))
);
CREATE TABLE sync_queue (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  batch_id TEXT NOT NULL,
  payload BLOB NOT NULL,
  retry_count INTEGER NOT NULL DEFAULT 0,
  next_retry INTEGER,
  created_at INTEGER NOT NULL DEFAULT (strftime('%s','now'))
);
CREATE TABLE sync_state (
  target TEXT PRIMARY KEY,
  last_log_id INTEGER NOT NULL DEFAULT 0,
  updated_at INTEGER
);
";

/// Page size of new databases, set explicitly because it decides the WAL's
/// volume: with a thousand sessions writing at once, every commit dirties a
/// leaf page of the session index per session, and each dirty page goes to
/// the WAL whole. In isolated bulk inserts 16 KiB pages were faster, but the
/// daemon under 1,000 clients acknowledged 20-25 % more logs/s with 4 KiB
/// pages (less WAL to write, checksum, checkpoint and restart); see
/// docs/PERFORMANCE.md.
pub const PAGE_SIZE: i64 = 4 * 1024;

/// Opens (creating if needed) the database read-write, with the directory
/// at mode 0700 and the file at 0600, WAL journaling, `synchronous=NORMAL`,
/// a busy timeout, a page cache of `cache_size_mb`, and the schema migrated
/// to [`SCHEMA_VERSION`].
pub fn open_rw(path: &Path, cache_size_mb: u32) -> Result<Connection, StoreError> {
    prepare_directory(path)?;
    prepare_file(path)?;
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Takes effect only while the file is still empty; existing databases
    // keep their page size (WAL mode cannot change it).
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::WalUnavailable {
            path: path.to_owned(),
            mode,
        });
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // A negative cache_size is a size in KiB rather than in pages.
    conn.pragma_update(None, "cache_size", -(i64::from(cache_size_mb) * 1024))?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

/// Opens an existing, migrated database read-only (`query_only` too), with
/// the busy timeout. Fails if its schema is not [`SCHEMA_VERSION`].
pub fn open_ro(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "query_only", true)?;
    let found = user_version(&conn)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            path: path.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if found != SCHEMA_VERSION {
        return Err(StoreError::SchemaMismatch {
            path: path.to_owned(),
            found,
            expected: SCHEMA_VERSION,
        });
    }
    Ok(conn)
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Runs every missing step, each in its own IMMEDIATE transaction that
/// re-reads the version, so two processes opening at once cannot both
/// migrate.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found = user_version(&tx)?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                path: path.to_owned(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found < 0 {
            return Err(StoreError::SchemaMismatch {
                path: path.to_owned(),
                found,
                expected: SCHEMA_VERSION,
            });
        }
        if found == SCHEMA_VERSION {
            return Ok(());
        }
        tx.execute_batch(MIGRATIONS[found as usize])?;
        tx.pragma_update(None, "user_version", found + 1)?;
        tx.commit()?;
        log::info!(
            "migrated database `{}` to schema version {}",
            path.display(),
            found + 1
        );
    }
}

/// The directory holding `path`; `.` for a bare file name.
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Creates the directory at 0700 if missing; refuses an existing one that
/// others may write to or another user owns.
fn prepare_directory(path: &Path) -> Result<(), StoreError> {
    let dir = parent_dir(path);
    match fs::metadata(&dir) {
        Ok(meta) => {
            if !meta.is_dir() {
                return Err(StoreError::NotADirectory(dir));
            }
            check_private_dir(&meta)
                .map_err(|problem| StoreError::InsecureDirectory { path: dir, problem })
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|source| StoreError::Io {
                    action: "create database directory",
                    path: dir.clone(),
                    source,
                })?;
            // The umask can only remove bits, but be explicit.
            fs::set_permissions(&dir, Permissions::from_mode(0o700)).map_err(|source| {
                StoreError::Io {
                    action: "set permissions of",
                    path: dir,
                    source,
                }
            })
        }
        Err(source) => Err(StoreError::Io {
            action: "inspect database directory",
            path: dir,
            source,
        }),
    }
}

/// Creates the database file at 0600 if missing; tightens an existing one
/// that others could read.
fn prepare_file(path: &Path) -> Result<(), StoreError> {
    let io_err = |action| {
        move |source| StoreError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    };
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => fs::set_permissions(path, Permissions::from_mode(0o600))
            .map_err(io_err("set permissions of")),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            let mode = fs::metadata(path)
                .map_err(io_err("inspect"))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                log::warn!(
                    "database `{}` had mode {:o}; tightening to 600",
                    path.display(),
                    mode & 0o7777
                );
                fs::set_permissions(path, Permissions::from_mode(0o600))
                    .map_err(io_err("set permissions of"))?;
            }
            Ok(())
        }
        Err(source) => Err(io_err("create database file")(source)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn tables(conn: &Connection) -> Vec<String> {
        let mut stmt = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap();
        let names = stmt.query_map([], |r| r.get(0)).unwrap();
        names.map(Result::unwrap).collect()
    }

    #[test]
    fn migrates_an_empty_database_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codi.db");
        let conn = open_rw(&path, 4).unwrap();
        assert_eq!(user_version(&conn).unwrap(), SCHEMA_VERSION);
        let names = tables(&conn);
        for t in [
            "export_archive",
            "logs",
            "monitored_paths",
            "sessions",
            "sync_queue",
            "sync_state",
        ] {
            assert!(names.iter().any(|n| n == t), "missing {t} in {names:?}");
        }
        let journal: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(journal, "wal");
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 1, "NORMAL");
        let cache: i64 = conn
            .query_row("PRAGMA cache_size", [], |r| r.get(0))
            .unwrap();
        assert_eq!(cache, -4096);
        drop(conn);
        // Reopening an up-to-date database runs no step and keeps the data.
        let conn = open_rw(&path, 4).unwrap();
        assert_eq!(user_version(&conn).unwrap(), SCHEMA_VERSION);
        let ro = open_ro(&path).unwrap();
        let logs: i64 = ro
            .query_row("SELECT COUNT(*) FROM logs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(logs, 0);
        assert!(ro.execute("DELETE FROM logs", []).is_err(), "read-only");
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codi.db");
        drop(open_rw(&path, 4).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        let err = open_rw(&path, 4).unwrap_err();
        assert!(
            matches!(err, StoreError::SchemaTooNew { found, .. } if found == SCHEMA_VERSION + 1),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade"), "{err}");
        assert!(matches!(
            open_ro(&path).unwrap_err(),
            StoreError::SchemaTooNew { .. }
        ));
    }

    #[test]
    fn read_only_refuses_an_unmigrated_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        assert!(matches!(
            open_ro(&path).unwrap_err(),
            StoreError::SchemaMismatch { found: 0, .. }
        ));
    }

    #[test]
    fn creates_private_directory_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let db_dir = dir.path().join("a").join("b");
        let path = db_dir.join("codi.db");
        drop(open_rw(&path, 4).unwrap());
        assert_eq!(mode(&db_dir), 0o700);
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&path), 0o600);
        let wal = db_dir.join("codi.db-wal");
        if wal.exists() {
            assert_eq!(mode(&wal) & 0o077, 0);
        }
    }

    #[test]
    fn tightens_an_existing_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codi.db");
        fs::write(&path, b"").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        drop(open_rw(&path, 4).unwrap());
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn refuses_a_group_or_world_writable_directory() {
        for bad in [0o770, 0o707, 0o777] {
            let dir = tempfile::tempdir().unwrap();
            let shared = dir.path().join("shared");
            fs::create_dir(&shared).unwrap();
            fs::set_permissions(&shared, Permissions::from_mode(bad)).unwrap();
            let err = open_rw(&shared.join("codi.db"), 4).unwrap_err();
            assert!(
                matches!(err, StoreError::InsecureDirectory { problem: crate::fsperm::Untrusted::Writable(mode), .. } if mode == bad),
                "{err}"
            );
            assert!(!shared.join("codi.db").exists());
        }
    }

    #[test]
    fn refuses_a_parent_that_is_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            open_rw(&file.join("codi.db"), 4).unwrap_err(),
            StoreError::NotADirectory(_)
        ));
    }

    #[test]
    fn new_databases_get_the_chosen_page_size() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_rw(&dir.path().join("db/codi.db"), 8).unwrap();
        let page: i64 = conn
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .unwrap();
        assert_eq!(page, PAGE_SIZE);
    }
}
