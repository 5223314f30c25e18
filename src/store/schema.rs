//! Opening the database safely: a private directory and files, WAL
//! journaling, and forward-only migrations keyed by `PRAGMA user_version`.
//!
//! The store is two SQLite files: the main database (`codi.db`) and its
//! ingest file (`codi.db-ingest`, see [`super::ingest`]), which takes new
//! log rows first. Every connection this module opens sees both: the main
//! database as `main` with the ingest file attached read-only as `ingest`,
//! or (the ingest writer's) the ingest file as `main` with the main
//! database attached read-only as `store`.
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
pub const SCHEMA_VERSION: i64 = 9;

/// The schema version of the ingest file.
pub const INGEST_VERSION: i64 = 3;

/// How long a connection waits for a lock held by another connection.
pub const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);

/// Forward steps: `MIGRATIONS[i]` takes `user_version` from `i` to `i + 1`.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [V1, V2, V3, V4, V5, V6, V7, V8, V9];

/// The ingest file's forward steps, as [`MIGRATIONS`].
const INGEST_MIGRATIONS: [&str; INGEST_VERSION as usize] = [INGEST_V1, INGEST_V2, INGEST_V3];

/// The columns of a log row, one text for `logs` and `ingest_logs` so that
/// the two tables cannot drift apart (the `all_logs` view unions them
/// column by column).
macro_rules! log_columns {
    () => {
        "(
  id INTEGER PRIMARY KEY,
  uuid BLOB NOT NULL,
  timestamp INTEGER NOT NULL,
  level TEXT NOT NULL,
  component TEXT NOT NULL,
  session_id TEXT,
  message TEXT NOT NULL,
  metadata TEXT,
  created_at INTEGER NOT NULL
)"
    };
}

/// Version 0 to 1: the whole initial schema.
const V1: &str = concat!(
    "
CREATE TABLE logs ",
    log_columns!(),
    ";
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
"
);

/// Version 1 to 2: no table changes. New logs now enter through the ingest
/// file, which hands out their row ids; a version-1 binary would insert into
/// `logs` directly with ids the ingest file may already hold, so the version
/// goes up to make it refuse this database.
const V2: &str = "";

/// Version 2 to 3: what export detection records. A watch may name its
/// session; an archive row keeps the content hash (identical content is
/// stored once), the source's size and modification time (so a rescan
/// knows what is already archived), when it was archived in microseconds,
/// and an error instead of an archive for a file that could not be copied.
const V3: &str = "
ALTER TABLE monitored_paths ADD COLUMN session_id TEXT;
ALTER TABLE export_archive ADD COLUMN content_hash TEXT;
ALTER TABLE export_archive ADD COLUMN source_mtime_ns INTEGER;
ALTER TABLE export_archive ADD COLUMN archived_at_us INTEGER;
ALTER TABLE export_archive ADD COLUMN error TEXT;
CREATE INDEX idx_export_archive_hash ON export_archive(content_hash);
CREATE INDEX idx_export_archive_source ON export_archive(original_path);
";

/// Version 3 to 4: who asked for each watch (`SO_PEERCRED` uid). Only
/// files that user owns are archived (any file for root or the daemon's own
/// user), and only that user, root or the daemon's user may change or stop
/// the watch. A watch saved before has none; the watcher adopts its
/// directory's owner.
const V4: &str = "
ALTER TABLE monitored_paths ADD COLUMN owner_uid INTEGER;
";

/// Version 4 to 5: who wrote each log and started each session: the
/// Unix client's `SO_PEERCRED` uid, or the writing process's own uid for a
/// standalone `codi2`; NULL over TCP and for rows stored before. The
/// ingest file gains the same column ([`INGEST_V3`]), last in both tables,
/// so that `all_logs` still unions them column by column.
const V5: &str = "
ALTER TABLE logs ADD COLUMN uid INTEGER;
ALTER TABLE sessions ADD COLUMN uid INTEGER;
";

/// Version 5 to 6: the record of every recovery from a damaged file
/// ([`super::recovery`]): which file, where it was moved, why, the id
/// floor the new files start above, how the salvage of its rows went, and
/// whether an operator has acknowledged it.
const V6: &str = "
CREATE TABLE recoveries (
  id INTEGER PRIMARY KEY,
  started_at INTEGER NOT NULL,
  file TEXT NOT NULL,
  moved_to TEXT NOT NULL UNIQUE,
  kind TEXT NOT NULL,
  reason TEXT NOT NULL,
  id_floor INTEGER NOT NULL,
  state TEXT NOT NULL,
  rows_salvaged INTEGER NOT NULL DEFAULT 0,
  logs_salvaged INTEGER NOT NULL DEFAULT 0,
  rows_unreadable INTEGER NOT NULL DEFAULT 0,
  detail TEXT,
  finished_at INTEGER,
  acknowledged_at INTEGER
);
";

/// Version 6 to 7: session expiry ([`super::retention`]). When the writer
/// recorded a session's start by its own clock (`started_at` is the
/// client's stamp, which may be far off), from which the timeout counts;
/// rows from before get their `started_at`. Why a session ended: NULL when
/// its client sent `SessionEnd`, `timeout` when the daemon ended it after
/// `general.session_timeout` without activity. The index finds open
/// sessions by `recorded_at` (`ended_at IS NULL`) and ended ones by
/// `ended_at`, so neither pass scans the whole table.
const V7: &str = "
ALTER TABLE sessions ADD COLUMN recorded_at INTEGER;
ALTER TABLE sessions ADD COLUMN end_reason TEXT;
UPDATE sessions SET recorded_at = started_at;
CREATE INDEX idx_sessions_ended ON sessions(ended_at, recorded_at);
";

/// Version 7 to 8: hub sync's record of the one batch in flight beside
/// its watermark (`last_log_id`, [`crate::hub::sync`]): the batch's id
/// range, its body and the body's SHA-256, written before it is sent, so
/// that a re-send is the same bytes whatever happened to the rows since.
const V8: &str = "
ALTER TABLE sync_state ADD COLUMN inflight_first INTEGER;
ALTER TABLE sync_state ADD COLUMN inflight_last INTEGER;
ALTER TABLE sync_state ADD COLUMN inflight_digest TEXT;
ALTER TABLE sync_state ADD COLUMN inflight_body BLOB;
";

/// Version 8 to 9: what hub sync ships of `sessions` and `export_archive`
/// ([`crate::hub::sync`]). Their rows change (a session ends), so an id
/// watermark cannot tell what is new: every insert and update appends the
/// row's key to `hub_changes`, whose `seq` (AUTOINCREMENT: never reused,
/// even after a delete) is the watermark of those targets; age retention
/// keeps a row with a change still there (by `row_key`). Deletes are not
/// recorded: the hub keeps what it was sent. The sync fills the table
/// with every existing row the first time it ships a kind.
const V9: &str = "
CREATE TABLE hub_changes (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  kind TEXT NOT NULL,
  row_key TEXT NOT NULL
);
CREATE INDEX idx_hub_changes_kind ON hub_changes(kind, seq);
CREATE INDEX idx_hub_changes_key ON hub_changes(kind, row_key);
CREATE TRIGGER hub_sessions_insert AFTER INSERT ON sessions
BEGIN INSERT INTO hub_changes (kind, row_key) VALUES ('sessions', NEW.id); END;
CREATE TRIGGER hub_sessions_update AFTER UPDATE ON sessions
BEGIN INSERT INTO hub_changes (kind, row_key) VALUES ('sessions', NEW.id); END;
CREATE TRIGGER hub_exports_insert AFTER INSERT ON export_archive
BEGIN INSERT INTO hub_changes (kind, row_key) VALUES ('export_archive', NEW.id); END;
CREATE TRIGGER hub_exports_update AFTER UPDATE ON export_archive
BEGIN INSERT INTO hub_changes (kind, row_key) VALUES ('export_archive', NEW.id); END;
";

/// The ingest file: `logs`' columns with only the unique uuid index (which
/// [`INGEST_V2`] drops), so that a commit dirties a handful of pages however
/// many sessions it spans.
const INGEST_V1: &str = concat!(
    "CREATE TABLE ingest_logs ",
    log_columns!(),
    "; CREATE UNIQUE INDEX idx_ingest_logs_uuid ON ingest_logs(uuid);"
);

/// Drops the uuid index: the ingest writer keeps the uuids in memory
/// instead (`ingest::PendingUuids`), and the merge into `logs` drops any
/// duplicate a writer without them let in. Adds the merged floor, below
/// which no id is handed out again.
const INGEST_V2: &str = "DROP INDEX IF EXISTS idx_ingest_logs_uuid;
CREATE TABLE ingest_meta (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  merged_floor INTEGER NOT NULL
);
INSERT INTO ingest_meta (id, merged_floor) VALUES (1, 0);";

/// The writer's uid on ingest rows, as [`V5`] adds it to `logs`.
const INGEST_V3: &str = "ALTER TABLE ingest_logs ADD COLUMN uid INTEGER;";

/// The ingest file that belongs to the database at `db_path`: the same
/// name with `-ingest` appended (like SQLite's own `-wal`).
pub fn ingest_path(db_path: &Path) -> PathBuf {
    with_suffix(db_path, "-ingest")
}

/// `path` with `suffix` appended to its file name (as SQLite names its
/// `-wal` and `-shm` companions).
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Page size of new databases, set explicitly because it decides the WAL's
/// volume: with a thousand sessions writing at once, every commit dirties a
/// leaf page of the session index per session, and each dirty page goes to
/// the WAL whole. In isolated bulk inserts 16 KiB pages were faster, but the
/// daemon under 1,000 clients acknowledged 20-25 % more logs/s with 4 KiB
/// pages (less WAL to write, checksum, checkpoint and restart); see
/// docs/PERFORMANCE.md.
pub const PAGE_SIZE: i64 = 4 * 1024;

/// Opens (creating if needed) the database read-write, with the directory
/// at mode 0700 and the files at 0600, WAL journaling, `synchronous=NORMAL`,
/// a busy timeout, a page cache of `cache_size_mb`, and the schema migrated
/// to [`SCHEMA_VERSION`]. Its ingest file is created and migrated too, and
/// attached read-only as `ingest`.
pub fn open_rw(path: &Path, cache_size_mb: u32) -> Result<Connection, StoreError> {
    prepare_directory(path)?;
    let mut conn = open_file_rw(path, cache_size_mb, AutoVacuum::Incremental)?;
    migrate(&mut conn, path, &MIGRATIONS)?;
    let ingest = ingest_path(path);
    let mut ingest_conn = open_file_rw(&ingest, 1, AutoVacuum::None)?;
    migrate(&mut ingest_conn, &ingest, &INGEST_MIGRATIONS)?;
    drop(ingest_conn);
    attach_read_only(&conn, &ingest, "ingest")?;
    conn.execute_batch(&super::ingest::CREATE_ALL_LOGS)?;
    Ok(conn)
}

/// Opens the ingest file of the database at `db_path` read-write (as
/// `main`), with the main database attached read-only as `store`, for the
/// one connection that inserts new logs. Both must already exist and be
/// migrated: call [`open_rw`] first.
pub fn open_ingest_rw(db_path: &Path, cache_size_mb: u32) -> Result<Connection, StoreError> {
    let ingest = ingest_path(db_path);
    let conn = open_file_rw(&ingest, cache_size_mb, AutoVacuum::None)?;
    check_version(&conn, &ingest, INGEST_VERSION)?;
    attach_read_only(&conn, db_path, "store")?;
    check_version_of(&conn, "store", db_path, SCHEMA_VERSION)?;
    Ok(conn)
}

/// Creates (or opens) the single file at `path` read-write with the
/// store's PRAGMAs and migrates it as the main database (`main`) or as an
/// ingest file, attaching nothing: for files built aside before they take
/// a store's place ([`super::recovery`]).
pub(super) fn open_single_rw(path: &Path, main: bool) -> Result<Connection, StoreError> {
    prepare_directory(path)?;
    let (steps, vacuum): (&[&str], _) = if main {
        (&MIGRATIONS, AutoVacuum::Incremental)
    } else {
        (&INGEST_MIGRATIONS, AutoVacuum::None)
    };
    let mut conn = open_file_rw(path, 1, vacuum)?;
    migrate(&mut conn, path, steps)?;
    Ok(conn)
}

/// Opens one existing file with `mode` (read-only or read-write), URI
/// names allowed (for [`attach_read_only`]) and the busy timeout.
pub(crate) fn open_file(path: &Path, mode: OpenFlags) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        mode | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

/// How a new file gives freed pages back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AutoVacuum {
    /// Never: freed pages are reused (the ingest file, whose rows come
    /// and go all the time).
    None,
    /// In steps the caller runs (`PRAGMA incremental_vacuum`): the main
    /// database, which retention deletes from (see [`super::retention`]).
    Incremental,
}

/// Opens one file read-write with the store's PRAGMAs (not yet migrated).
fn open_file_rw(
    path: &Path,
    cache_size_mb: u32,
    auto_vacuum: AutoVacuum,
) -> Result<Connection, StoreError> {
    prepare_file(path)?;
    let conn = open_file(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    // Both take effect only while the file is still empty, before WAL mode
    // writes its first page; existing databases keep their page size (WAL
    // mode cannot change it) and their auto-vacuum mode (until a VACUUM,
    // see `retention::convert_auto_vacuum`).
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    if auto_vacuum == AutoVacuum::Incremental {
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    }
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
    Ok(conn)
}

/// Attaches the SQLite file at `path` to `conn` read-only under `name`.
/// Read-only matters beyond safety: `BEGIN IMMEDIATE` takes the write lock
/// of every attached file that is writable, and the ingest writer and the
/// merger must never wait for each other's lock.
fn attach_read_only(conn: &Connection, path: &Path, name: &str) -> Result<(), StoreError> {
    conn.execute(
        &format!("ATTACH DATABASE ?1 AS {name}"),
        [read_only_uri(path)],
    )
    .map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })?;
    Ok(())
}

/// `path` as an SQLite URI that opens it read-only: every byte outside the
/// unreserved set and `/` is percent-encoded, so `?`, `#` and `%` in a file
/// name cannot be read as URI syntax.
pub(super) fn read_only_uri(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut uri = String::from("file:");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            uri.push(b as char);
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri.push_str("?mode=ro");
    uri
}

/// Opens an existing, migrated database read-only (`query_only` too), with
/// its ingest file attached read-only as `ingest` and the busy timeout.
/// Fails if either schema is not the one this binary writes.
pub fn open_ro(path: &Path) -> Result<Connection, StoreError> {
    let conn = open_file(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    check_version(&conn, path, SCHEMA_VERSION)?;
    let ingest = ingest_path(path);
    attach_read_only(&conn, &ingest, "ingest")?;
    check_version_of(&conn, "ingest", &ingest, INGEST_VERSION)?;
    conn.execute_batch(&super::ingest::CREATE_ALL_LOGS)?;
    conn.pragma_update(None, "query_only", true)?;
    Ok(conn)
}

/// Fails unless the `main` file of `conn` has schema version `expected`.
fn check_version(conn: &Connection, path: &Path, expected: i64) -> Result<(), StoreError> {
    check_version_of(conn, "main", path, expected)
}

/// Fails unless the attached file `schema` of `conn` has version `expected`.
fn check_version_of(
    conn: &Connection,
    schema: &str,
    path: &Path,
    expected: i64,
) -> Result<(), StoreError> {
    let found: i64 = conn.query_row(&format!("PRAGMA {schema}.user_version"), [], |r| r.get(0))?;
    if found > expected {
        return Err(StoreError::SchemaTooNew {
            path: path.to_owned(),
            found,
            supported: expected,
        });
    }
    if found != expected {
        return Err(StoreError::SchemaMismatch {
            path: path.to_owned(),
            found,
            expected,
        });
    }
    Ok(())
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Runs every missing step, each in its own IMMEDIATE transaction that
/// re-reads the version, so two processes opening at once cannot both
/// migrate.
fn migrate(conn: &mut Connection, path: &Path, steps: &[&str]) -> Result<(), StoreError> {
    let target = steps.len() as i64;
    // Up to date (the usual case): no write lock, so a `codi2` starting up
    // never waits behind, or holds up, the daemon's writers.
    if user_version(conn)? == target {
        return Ok(());
    }
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found = user_version(&tx)?;
        if found > target {
            return Err(StoreError::SchemaTooNew {
                path: path.to_owned(),
                found,
                supported: target,
            });
        }
        if found < 0 {
            return Err(StoreError::SchemaMismatch {
                path: path.to_owned(),
                found,
                expected: target,
            });
        }
        if found == target {
            return Ok(());
        }
        tx.execute_batch(steps[found as usize])?;
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
pub(super) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Creates the directory at 0700 if missing; refuses an existing one that
/// others may write to or another user owns.
pub(super) fn prepare_directory(path: &Path) -> Result<(), StoreError> {
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

/// Creates a database file at 0600 if missing; tightens an existing one
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
    fn upgrades_a_version_1_database_and_creates_its_ingest_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codi.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(V1).unwrap();
            conn.execute(
                "INSERT INTO logs (uuid, timestamp, level, component, message, created_at) \
                 VALUES (x'01', 1, 'Info', 'c', 'old', 1)",
                [],
            )
            .unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
        }
        let conn = open_rw(&path, 4).unwrap();
        assert_eq!(user_version(&conn).unwrap(), SCHEMA_VERSION);
        assert_eq!(mode(&ingest_path(&path)), 0o600);
        let all: i64 = conn
            .query_row("SELECT COUNT(*) FROM all_logs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(all, 1, "old rows stay visible");
    }

    #[test]
    fn version_6_records_existing_sessions_at_their_start_and_indexes_their_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codi.db");
        {
            let conn = Connection::open(&path).unwrap();
            for step in &MIGRATIONS[..5] {
                conn.execute_batch(step).unwrap();
            }
            conn.execute(
                "INSERT INTO sessions (id, identity, started_at) VALUES ('s', 'me', 77)",
                [],
            )
            .unwrap();
            conn.pragma_update(None, "user_version", 5).unwrap();
        }
        let conn = open_rw(&path, 4).unwrap();
        let (recorded, reason): (i64, Option<String>) = conn
            .query_row(
                "SELECT recorded_at, end_reason FROM sessions WHERE id = 's'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((recorded, reason), (77, None));
        let plan: String = conn
            .query_row(
                "EXPLAIN QUERY PLAN SELECT rowid FROM sessions WHERE ended_at IS NULL \
                 AND recorded_at < 100 ORDER BY recorded_at, rowid",
                [],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("idx_sessions_ended"), "{plan}");
    }

    #[test]
    fn upgrades_a_version_1_ingest_file_keeping_its_rows_and_dropping_the_uuid_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codi.db");
        drop(open_rw(&path, 4).unwrap());
        let ingest = ingest_path(&path);
        std::fs::remove_file(&ingest).unwrap();
        {
            let conn = Connection::open(&ingest).unwrap();
            conn.execute_batch(INGEST_V1).unwrap();
            conn.execute(
                "INSERT INTO ingest_logs (id, uuid, timestamp, level, component, message, \
                 created_at) VALUES (1, x'01', 1, 'Info', 'c', 'waiting', 1)",
                [],
            )
            .unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
        }
        // Opening the database migrates its ingest file.
        drop(open_rw(&path, 4).unwrap());
        let conn = open_ingest_rw(&path, 4).unwrap();
        assert_eq!(user_version(&conn).unwrap(), INGEST_VERSION);
        let indexes: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'index' \
                 AND tbl_name = 'ingest_logs'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 0);
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM ingest_logs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1, "rows waiting to be merged are kept");
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
