//! Recovery from a damaged database file: detect it at start-up, move it
//! aside, start again on fresh files at once, and salvage every row SQLite
//! can still read into them while the daemon serves.
//!
//! # Detect
//! [`inspect`] runs `PRAGMA quick_check` on both files within a time bound
//! (a file too large to check in time is served and said so), and also
//! treats as damaged: a file that is not SQLite, a main database emptied
//! (zero length) while its ingest file shows it held rows, an ingest file
//! emptied while the main database holds rows, and a file the running
//! daemon marked suspect ([`mark_suspect`]) after SQLite called it corrupt.
//!
//! # Set aside
//! [`set_aside`] moves a damaged file (with its WAL; the shm is rebuilt)
//! to `<name>.corrupt.<UTC timestamp>`. The ingest file is always replaced:
//! when only the main database is damaged, the healthy ingest file is moved
//! to `<name>.salvage.<UTC timestamp>` and its rows salvaged like the
//! others. The fresh ingest file starts handing out ids above
//! [`ID_MARGIN`] past every id still readable, so no id a hub may already
//! hold for a row now unreadable is handed out again. The moves follow a
//! redo record: the fresh files are built aside first (`*.new`), the
//! `recoveries` rows say which file goes where, and [`finish_set_aside`],
//! run at every start, completes a set-aside a crash interrupted.
//!
//! # Salvage
//! [`Salvage`] reads each table of a moved file through SQLite's own
//! b-tree code in rowid order and steps around what it cannot read
//! ([`scan_table`]); the rows go into the new main database with `INSERT
//! OR IGNORE`, keeping their ids (a uuid or id already there wins, so
//! nothing is doubled). SQLite's recovery extension (`sqlite3recover.c`,
//! behind the shell's `.recover`) would also find rows under a damaged
//! interior page, but it is not part of the amalgamation rusqlite bundles,
//! and Debian 12's `sqlite3` shell is built without the `sqlite_dbpage`
//! table it needs (`.recover` fails there with "SQL logic error"). What
//! this cannot recover: rows on a damaged page, rows under a damaged
//! interior page, and every table of a file whose schema page is damaged.
//! The rows skipped are counted as an upper bound from the gaps in rowids.

use super::lock::DatabaseLock;
use super::schema::{self, ingest_path, with_suffix};
use super::StoreError;
use crate::proto::Timestamp;
use rusqlite::types::Value;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long [`inspect`] checks each file at start-up before it serves it
/// and finishes the check in the background ([`spawn_background_check`])
/// rather than keep every client waiting (a 1 GiB file takes about 1 s
/// from the page cache, over 10 s from a cold disk here).
pub const CHECK_DEADLINE: Duration = Duration::from_secs(2);
/// How long a start after a corruption error checks each file fully; a
/// file whose check does not finish by then is salvaged anyway (which
/// loses nothing readable) rather than trusted.
pub const SUSPECT_DEADLINE: Duration = Duration::from_secs(120);
/// How far above every readable id the fresh files hand out ids: the rows
/// of the unreadable pages had ids nobody can read any more, and a hub may
/// hold them (2^32 ids; an i64 has room for two billion such jumps).
pub const ID_MARGIN: i64 = 1 << 32;
/// How far above every readable export record id a fresh main database
/// starts its own ([`ID_MARGIN`]'s counterpart: export records come by
/// the file, not by the thousand a second).
pub const EXPORT_ID_MARGIN: i64 = 1 << 20;
/// Most rows one salvage step moves, so the merger (which applies it)
/// is held for a few milliseconds at a time.
pub const STEP_ROWS: usize = 2_000;
/// Most bytes of values one salvage step carries.
const STEP_BYTES: usize = 4 << 20;

/// Which of the store's two files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// The main database (`codi.db`).
    Main,
    /// The ingest file (`codi.db-ingest`).
    Ingest,
}

impl FileKind {
    /// The name recorded in `recoveries.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::Main => "main",
            FileKind::Ingest => "ingest",
        }
    }

    fn parse(s: &str) -> FileKind {
        if s == "ingest" {
            FileKind::Ingest
        } else {
            FileKind::Main
        }
    }

    /// The tables salvaged from a file of this kind: (source, target).
    fn tables(self) -> &'static [(&'static str, &'static str)] {
        match self {
            FileKind::Main => &[
                ("logs", "logs"),
                ("sessions", "sessions"),
                ("export_archive", "export_archive"),
                ("monitored_paths", "monitored_paths"),
            ],
            FileKind::Ingest => &[("ingest_logs", "logs")],
        }
    }
}

/// A file found damaged, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The file.
    pub path: PathBuf,
    /// Which of the two it is.
    pub kind: FileKind,
    /// What is wrong, in a sentence.
    pub reason: String,
}

/// The marker a running daemon leaves when SQLite calls a file corrupt:
/// `<db>.suspect`, holding the error.
pub fn suspect_path(db: &Path) -> PathBuf {
    with_suffix(db, ".suspect")
}

/// Records that SQLite called a file of the store at `db` corrupt
/// (`reason`), so that the next start checks both files fully.
pub fn mark_suspect(db: &Path, reason: &str) -> std::io::Result<()> {
    let tmp = with_suffix(db, ".suspect.tmp");
    fs::write(&tmp, format!("{}\n", reason.replace('\n', " ")))?;
    fs::File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, suspect_path(db))
}

/// True for the SQLite errors that mean a damaged file rather than a busy,
/// full or missing one.
pub fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

/// Which files (device, inode) the store at `db` is now, to tell whether
/// a set-aside replaced them since.
pub fn identity(db: &Path) -> Option<[(u64, u64); 2]> {
    use std::os::unix::fs::MetadataExt;
    let of = |p: &Path| fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    Some([of(db)?, of(&ingest_path(db))?])
}

/// Whether a set-aside is under way (its fresh files exist): a standalone
/// `codi2` must then not write, since the files it would open are about
/// to be replaced.
pub fn in_progress(db: &Path) -> bool {
    with_suffix(db, ".new").exists() || with_suffix(&ingest_path(db), ".new").exists()
}

/// What [`inspect`] found.
#[derive(Debug, Default)]
pub struct Inspection {
    /// The damaged files.
    pub damage: Vec<Damage>,
    /// Files served although their check ran out of time: finish it with
    /// [`spawn_background_check`].
    pub unchecked: Vec<PathBuf>,
}

/// Checks both files of the store at `db` (see the module doc), each for
/// at most `deadline`; `full` runs `integrity_check` (indexes against
/// their tables too) instead of `quick_check`. Fails when a file cannot
/// be checked for a reason that is not damage (permissions, a lock): the
/// daemon must not start on it, nor move it aside.
pub fn inspect(db: &Path, deadline: Duration, full: bool) -> Result<Inspection, StoreError> {
    let ingest = ingest_path(db);
    let mut found = Inspection::default();
    let main_len = fs::metadata(db).map(|m| m.len()).ok();
    let ingest_len = fs::metadata(&ingest).map(|m| m.len()).ok();
    let files = [
        (db, FileKind::Main, main_len),
        (ingest.as_path(), FileKind::Ingest, ingest_len),
    ];
    let suspect = fs::read_to_string(suspect_path(db))
        .ok()
        .map(|why| why.trim().to_owned());
    for (path, kind, len) in files {
        if len.unwrap_or(0) == 0 {
            continue;
        }
        let damage = |reason: String| Damage {
            path: path.to_owned(),
            kind,
            reason,
        };
        match &suspect {
            // The running daemon could not say which file: check both
            // fully (indexes against their tables too), for longer.
            Some(why) => match check_file(path, SUSPECT_DEADLINE, true)? {
                Check::Sound => {}
                Check::Damaged(reason) => found.damage.push(damage(format!(
                    "{reason} (the running daemon had reported: {why})"
                ))),
                Check::Unfinished => found.damage.push(damage(format!(
                    "the running daemon reported: {why}; a full check did not finish within {} \
                     s, so it is salvaged rather than trusted",
                    SUSPECT_DEADLINE.as_secs()
                ))),
            },
            None => match check_file(path, deadline, full)? {
                Check::Sound => {}
                Check::Damaged(reason) => found.damage.push(damage(reason)),
                Check::Unfinished => {
                    log::warn!(
                        "`{}` ({} MiB) is served before its check finished (it takes over {} s); \
                         the check goes on in the background",
                        path.display(),
                        len.unwrap_or(0) >> 20,
                        deadline.as_secs()
                    );
                    found.unchecked.push(path.to_owned());
                }
            },
        }
    }
    let damaged = |found: &Inspection, kind| found.damage.iter().any(|d| d.kind == kind);
    // An emptied file beside a partner that shows it held rows.
    if main_len == Some(0) && !damaged(&found, FileKind::Ingest) && ingest_holds_history(&ingest) {
        found.damage.push(Damage {
            path: db.to_owned(),
            kind: FileKind::Main,
            reason: "it is empty (0 bytes) although its ingest file shows logs were merged into it"
                .into(),
        });
    }
    if ingest_len == Some(0) && !damaged(&found, FileKind::Main) && main_holds_logs(db) {
        found.damage.push(Damage {
            path: ingest.clone(),
            kind: FileKind::Ingest,
            reason: "it is empty (0 bytes) although the main database holds logs".into(),
        });
    }
    if let Some(why) = suspect {
        if found.damage.is_empty() {
            log::warn!(
                "the last run found the store `{}` corrupt ({why}), but a full check of both \
                 files finds no damage: serving on",
                db.display()
            );
            let _ = fs::rename(suspect_path(db), cleared_path(db));
        }
    }
    Ok(found)
}

/// Finishes, in a thread of its own (`codi-check`, at the bulk threads'
/// priority), the `quick_check` of each file in `paths` that start-up
/// served unchecked; damage found stops the daemon to salvage it, as a
/// corruption error does ([`damage_found`]).
pub fn spawn_background_check(paths: Vec<PathBuf>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("codi-check".into())
        .spawn(move || {
            crate::sched::lower_current_thread_priority(crate::sched::WRITER_NICE);
            for path in paths {
                let started = Instant::now();
                match check_file(&path, Duration::MAX, false) {
                    Ok(Check::Damaged(reason)) => {
                        damage_found(&format!("`{}`: {reason}", path.display()));
                        return;
                    }
                    Ok(_) => log::info!(
                        "`{}` passed quick_check in the background ({:.1?})",
                        path.display(),
                        started.elapsed()
                    ),
                    Err(e) => log::error!("the background check could not run: {e}"),
                }
            }
        })
        .map(|_| ())
}

/// The outcome of checking one file.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
    /// Nothing found.
    Sound,
    /// What is wrong.
    Damaged(String),
    /// The check ran out of time.
    Unfinished,
}

/// Checks the SQLite file at `path` for at most `deadline`. Damage is
/// what SQLite calls corrupt, not a database, or cannot read (an I/O
/// error); an error that says nothing of the file's contents (no
/// permission, a lock) is returned, never mistaken for damage.
fn check_file(path: &Path, deadline: Duration, full: bool) -> Result<Check, StoreError> {
    let unreadable = |e: &rusqlite::Error| {
        is_corruption(e) || e.sqlite_error_code() == Some(ErrorCode::SystemIoFailure)
    };
    let conn = match schema::open_file(path, OpenFlags::SQLITE_OPEN_READ_ONLY) {
        Ok(c) => c,
        Err(StoreError::Open { source, .. }) if unreadable(&source) => {
            return Ok(Check::Damaged(format!("SQLite cannot read it: {source}")));
        }
        Err(e) => return Err(e),
    };
    let started = Instant::now();
    conn.progress_handler(10_000, Some(move || started.elapsed() > deadline));
    let pragma = if full {
        "integrity_check(20)"
    } else {
        "quick_check(20)"
    };
    let outcome = conn.prepare(&format!("PRAGMA {pragma}")).and_then(|mut s| {
        s.query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<String>>>()
    });
    Ok(match outcome {
        Ok(lines) if lines.len() == 1 && lines[0] == "ok" => Check::Sound,
        Ok(lines) => Check::Damaged(format!("{pragma} found: {}", lines.join("; "))),
        Err(e) if e.sqlite_error_code() == Some(ErrorCode::OperationInterrupted) => {
            Check::Unfinished
        }
        Err(e) if unreadable(&e) => Check::Damaged(format!("{pragma} failed: {e}")),
        Err(source) => {
            return Err(StoreError::Open {
                path: path.to_owned(),
                source,
            })
        }
    })
}

/// Whether the ingest file at `path` records merges (a merge floor above 0).
fn ingest_holds_history(path: &Path) -> bool {
    read_i64(
        path,
        "SELECT coalesce((SELECT merged_floor FROM ingest_meta), 0)",
    )
    .unwrap_or(0)
        > 0
}

/// Whether the main database at `path` holds any log.
fn main_holds_logs(path: &Path) -> bool {
    read_i64(path, "SELECT EXISTS (SELECT 1 FROM logs)").unwrap_or(0) > 0
}

/// One integer from `sql` on the file at `path` opened read-only.
fn read_i64(path: &Path, sql: &str) -> Option<i64> {
    let conn = schema::open_file(path, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    conn.query_row(sql, [], |r| r.get::<_, Option<i64>>(0))
        .ok()
        .flatten()
}

/// The largest id readable anywhere in the store at `db`: `logs`, the
/// ingest file's rows and its merge floor (each best effort).
fn highest_id(db: &Path) -> i64 {
    let ingest = ingest_path(db);
    [
        highest_rowid(db, "logs"),
        highest_rowid(&ingest, "ingest_logs"),
        read_i64(&ingest, "SELECT merged_floor FROM ingest_meta"),
        read_i64(db, "SELECT max(id_floor) FROM recoveries"),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(0)
}

/// The largest rowid of `table` in the file at `path`, or, when a damaged
/// page keeps `max()` from answering, the largest one bisection can still
/// read (rows on a damaged rightmost page are above it; [`ID_MARGIN`]
/// covers them, and a jump of ids inside them is in the recorded id
/// floors). `None` for a file or table that cannot be read at all.
fn highest_rowid(path: &Path, table: &str) -> Option<i64> {
    let conn = schema::open_file(path, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    if let Ok(max) = conn.query_row(&format!("SELECT max(rowid) FROM main.{table}"), [], |r| {
        r.get::<_, Option<i64>>(0)
    }) {
        return max;
    }
    let readable_from = |at: i64| first_rowid_from(&conn, table, at).ok().flatten();
    // A readable row at or above `low`, none found at or above `high`.
    let (mut low, mut high) = (readable_from(0)?, i64::MAX);
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        match readable_from(mid) {
            Some(row) => low = row.max(mid),
            None => high = mid,
        }
    }
    Some(low)
}

/// One recorded recovery (a row of `recoveries`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Its row id.
    pub id: i64,
    /// When it began (microseconds since the epoch).
    pub started_at: i64,
    /// The file that was replaced.
    pub file: PathBuf,
    /// Where that file was moved.
    pub moved_to: PathBuf,
    /// Which of the two files it was.
    pub kind: FileKind,
    /// Why it was replaced.
    pub reason: String,
    /// `moving`, `pending` (rows still to salvage) or `done`.
    pub state: String,
    /// Rows salvaged (every table).
    pub rows_salvaged: i64,
    /// Logs salvaged.
    pub logs_salvaged: i64,
    /// Rows that could not be read, at most (gaps in rowids).
    pub rows_unreadable: i64,
    /// What the salvage could not read, per table.
    pub detail: Option<String>,
    /// When an operator acknowledged it, if one has.
    pub acknowledged_at: Option<i64>,
}

impl Recovery {
    /// One line for the log and the health report.
    pub fn summary(&self) -> String {
        let when = Timestamp::from_micros(self.started_at);
        match self.state.as_str() {
            "done" => format!(
                "`{}` was replaced at {when} ({}); moved to `{}`; {} logs ({} rows in all) \
                 salvaged, up to {} rows unreadable{}",
                self.file.display(),
                self.reason,
                self.moved_to.display(),
                self.logs_salvaged,
                self.rows_salvaged,
                self.rows_unreadable,
                self.detail
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            ),
            _ => format!(
                "`{}` was replaced at {when} ({}); moved to `{}`; salvaging its rows ({} logs \
                 so far)",
                self.file.display(),
                self.reason,
                self.moved_to.display(),
                self.logs_salvaged
            ),
        }
    }
}

const RECOVERY_COLUMNS: &str = "id, started_at, file, moved_to, kind, reason, state, \
    rows_salvaged, logs_salvaged, rows_unreadable, detail, acknowledged_at";

fn recovery_row(r: &rusqlite::Row) -> rusqlite::Result<Recovery> {
    Ok(Recovery {
        id: r.get(0)?,
        started_at: r.get(1)?,
        file: PathBuf::from(r.get::<_, String>(2)?),
        moved_to: PathBuf::from(r.get::<_, String>(3)?),
        kind: FileKind::parse(&r.get::<_, String>(4)?),
        reason: r.get(5)?,
        state: r.get(6)?,
        rows_salvaged: r.get(7)?,
        logs_salvaged: r.get(8)?,
        rows_unreadable: r.get(9)?,
        detail: r.get(10)?,
        acknowledged_at: r.get(11)?,
    })
}

/// The recoveries recorded in the main database on `conn` that match
/// `condition` (an SQL expression over `recoveries`' columns), oldest
/// first.
pub fn recoveries(conn: &Connection, condition: &str) -> rusqlite::Result<Vec<Recovery>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {RECOVERY_COLUMNS} FROM main.recoveries WHERE {condition} ORDER BY id"
    ))?;
    let rows = stmt.query_map([], recovery_row)?;
    rows.collect()
}

/// Marks every recovery not yet acknowledged as acknowledged; returns how
/// many were.
pub fn acknowledge(conn: &Connection) -> rusqlite::Result<usize> {
    // A store from before recoveries were recorded (schema 5) has none.
    let recorded: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM main.sqlite_master WHERE name = 'recoveries')",
        [],
        |r| r.get(0),
    )?;
    if !recorded {
        return Ok(0);
    }
    conn.execute(
        "UPDATE main.recoveries SET acknowledged_at = ?1 WHERE acknowledged_at IS NULL",
        [Timestamp::now().as_micros()],
    )
}

/// The main database at `db`, opened read-write (never created) to
/// acknowledge recoveries while the daemon may be running.
pub fn open_for_acknowledgment(db: &Path) -> Result<Connection, StoreError> {
    schema::open_file(db, OpenFlags::SQLITE_OPEN_READ_WRITE)
}

/// A UTC timestamp for file names: `20261203T124501Z`.
fn file_stamp(now: Timestamp) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_micros(now.as_micros())
        .unwrap_or_default()
        .format("%Y%m%dT%H%M%SZ")
        .to_string()
}

/// `<file><infix><stamp>`, or with `-2`, `-3`, ... appended when that name
/// (or its WAL) is taken by an earlier recovery in the same second.
fn unique_name(file: &Path, infix: &str, stamp: &str) -> PathBuf {
    let mut n = 1;
    loop {
        let tail = if n == 1 {
            String::new()
        } else {
            format!("-{n}")
        };
        let name = with_suffix(file, &format!("{infix}{stamp}{tail}"));
        if !name.exists() && !with_suffix(&name, "-wal").exists() {
            return name;
        }
        n += 1;
    }
}

/// Moves the damaged files of the store at `db` aside and puts fresh ones
/// in their place (see the module doc), recording a pending recovery per
/// moved file. Run with no connection open, holding `db`'s lock (which
/// keeps every `codi2` write out, see [`super::lock`]).
pub fn set_aside(
    db: &Path,
    _sole_writer: &DatabaseLock,
    damage: &[Damage],
) -> Result<Vec<Recovery>, StoreError> {
    if damage.is_empty() {
        return Ok(Vec::new());
    }
    let now = Timestamp::now();
    let stamp = file_stamp(now);
    let floor = highest_id(db).saturating_add(ID_MARGIN);
    let ingest = ingest_path(db);
    let main_damage = damage.iter().find(|d| d.kind == FileKind::Main);
    let ingest_damage = damage.iter().find(|d| d.kind == FileKind::Ingest);
    let mut moves: Vec<(PathBuf, PathBuf, FileKind, String)> = Vec::new();
    if let Some(d) = main_damage {
        moves.push((
            db.to_owned(),
            unique_name(db, ".corrupt.", &stamp),
            FileKind::Main,
            d.reason.clone(),
        ));
    }
    match (ingest_damage, main_damage) {
        (Some(d), _) => moves.push((
            ingest.clone(),
            unique_name(&ingest, ".corrupt.", &stamp),
            FileKind::Ingest,
            d.reason.clone(),
        )),
        (None, Some(_)) if ingest.exists() => moves.push((
            ingest.clone(),
            unique_name(&ingest, ".salvage.", &stamp),
            FileKind::Ingest,
            "replaced with its damaged main database; its rows are salvaged".into(),
        )),
        _ => {}
    }
    for (file, to, kind, reason) in &moves {
        let why = if ingest_damage.is_none() && *kind == FileKind::Ingest {
            "is sound, but goes with its damaged main database".to_owned()
        } else {
            format!("is damaged ({reason})")
        };
        log::error!(
            "`{}` {why}: moving it to `{}` and salvaging its rows into a new file; new ids \
             start above {floor}",
            file.display(),
            to.display()
        );
    }
    // The fresh ingest file first: a main database built aside is what
    // says the set-aside is complete enough to finish (`finish_set_aside`).
    let ingest_new = with_suffix(&ingest, ".new");
    build_aside(&ingest_new, FileKind::Ingest, |conn| {
        conn.execute("UPDATE ingest_meta SET merged_floor = ?1", [floor])?;
        Ok(())
    })?;
    let record = |conn: &Connection| -> rusqlite::Result<()> {
        for (file, to, kind, reason) in &moves {
            conn.execute(
                "INSERT OR IGNORE INTO recoveries (started_at, file, moved_to, kind, reason, \
                 id_floor, state) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'moving')",
                rusqlite::params![
                    now.as_micros(),
                    file.to_string_lossy(),
                    to.to_string_lossy(),
                    kind.as_str(),
                    reason,
                    floor
                ],
            )?;
        }
        Ok(())
    };
    if main_damage.is_some() {
        // The damaged main database's own record of earlier recoveries
        // (one still to salvage above all) goes on into the fresh one.
        let earlier = schema::open_file(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()
            .and_then(|conn| recoveries(&conn, "1").ok())
            .unwrap_or_default();
        // Export records keep their ids too: new ones start above every
        // readable one (and a margin for an unreadable tail), so that a
        // watch recording exports during the salvage cannot take an id a
        // salvaged record needs.
        let export_floor = highest_rowid(db, "export_archive")
            .unwrap_or(0)
            .saturating_add(EXPORT_ID_MARGIN);
        // So is hub sync's watermark and batch in flight: the hub has what
        // it acknowledged, and a re-send must be the same bytes.
        let sync_state = read_sync_state(db);
        // hub_changes' seqs are the watermark of sessions and export
        // records: the fresh file's must start above the carried one (and
        // the batch in flight), or the salvaged rows' changes, and every
        // later one up to there, fall below it and are never shipped.
        let changes_floor = read_i64(
            db,
            "SELECT seq FROM sqlite_sequence WHERE name = 'hub_changes'",
        )
        .unwrap_or(0);
        build_aside(&with_suffix(db, ".new"), FileKind::Main, |conn| {
            for r in &earlier {
                carry_over(conn, r)?;
            }
            for row in &sync_state {
                conn.execute(
                    "INSERT OR REPLACE INTO sync_state (target, last_log_id, updated_at, \
                     inflight_first, inflight_last, inflight_digest, inflight_body) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    rusqlite::params_from_iter(row.iter()),
                )?;
            }
            conn.execute(
                "INSERT INTO sqlite_sequence (name, seq) VALUES ('export_archive', ?1)",
                [export_floor],
            )?;
            conn.execute(
                "INSERT INTO sqlite_sequence (name, seq) SELECT 'hub_changes', \
                 max(coalesce(max(last_log_id), 0), coalesce(max(inflight_last), 0), ?2, 0) \
                 FROM sync_state WHERE target <> ?1",
                rusqlite::params![crate::hub::sync::LOGS, changes_floor],
            )?;
            record(conn)
        })?;
    } else {
        let conn = schema::open_single_rw(db, true)?;
        record(&conn)?;
    }
    finish_set_aside(db)?;
    let conn = schema::open_file(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    Ok(recoveries(&conn, "state = 'pending'")?)
}

/// The rows of `sync_state` of the (damaged) main database at `db`, as far
/// as they can be read.
fn read_sync_state(db: &Path) -> Vec<Vec<Value>> {
    let Ok(conn) = schema::open_file(db, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return Vec::new();
    };
    let rows = conn
        .prepare(
            "SELECT target, last_log_id, updated_at, inflight_first, inflight_last, \
             inflight_digest, inflight_body FROM sync_state",
        )
        .and_then(|mut stmt| {
            stmt.query_map([], |r| (0..7).map(|i| r.get::<_, Value>(i)).collect())?
                .collect::<rusqlite::Result<Vec<Vec<Value>>>>()
        });
    rows.unwrap_or_default()
}

/// Copies recovery `r` into the `recoveries` table on `conn`.
fn carry_over(conn: &Connection, r: &Recovery) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO recoveries (started_at, file, moved_to, kind, reason, id_floor, \
         state, rows_salvaged, logs_salvaged, rows_unreadable, detail, acknowledged_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7, ?8, ?9, ?10, ?11)",
        rusqlite::params![
            r.started_at,
            r.file.to_string_lossy(),
            r.moved_to.to_string_lossy(),
            r.kind.as_str(),
            r.reason,
            r.state,
            r.rows_salvaged,
            r.logs_salvaged,
            r.rows_unreadable,
            r.detail,
            r.acknowledged_at
        ],
    )?;
    Ok(())
}

/// Builds a fresh, migrated file at `target` (through `<target>.tmp`, so
/// that `target` exists only complete), runs `fill` on it, and syncs it.
fn build_aside(
    target: &Path,
    kind: FileKind,
    fill: impl FnOnce(&Connection) -> rusqlite::Result<()>,
) -> Result<(), StoreError> {
    let tmp = with_suffix(target, ".tmp");
    for stale in [
        tmp.clone(),
        with_suffix(&tmp, "-wal"),
        with_suffix(&tmp, "-shm"),
    ] {
        remove_if_present(&stale)?;
    }
    {
        let conn = schema::open_single_rw(&tmp, kind == FileKind::Main)?;
        fill(&conn)?;
        // Everything into the file itself, which then stands alone.
        conn.pragma_update(None, "journal_mode", "DELETE")?;
    }
    sync_file(&tmp)?;
    rename(&tmp, target)
}

/// Completes a set-aside that a crash interrupted (or the one just begun):
/// moves each file the record names, then puts the fresh files in place.
/// Does nothing when none is under way; removes a half-built one.
pub fn finish_set_aside(db: &Path) -> Result<(), StoreError> {
    let ingest = ingest_path(db);
    let main_new = with_suffix(db, ".new");
    let ingest_new = with_suffix(&ingest, ".new");
    // The record is in a fresh main database not yet in place, else in the
    // live one (a healthy main database, or the fresh one once renamed).
    let record = if main_new.exists() {
        main_new.clone()
    } else {
        db.to_owned()
    };
    let moving = schema::open_file(&record, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .ok()
        .and_then(|conn| recoveries(&conn, "state = 'moving'").ok())
        .unwrap_or_default();
    if moving.is_empty() {
        // Fresh files with no record: a set-aside that stopped before it
        // recorded itself; the next check starts it over.
        for stale in [&main_new, &ingest_new] {
            if stale.exists() {
                log::warn!(
                    "removing `{}`, left by a recovery that stopped before recording itself",
                    stale.display()
                );
                remove_if_present(stale)?;
            }
        }
        return Ok(());
    }
    for r in &moving {
        move_aside(&r.file, &r.moved_to)?;
    }
    // The main database first: once it is in place, the record is in the
    // live database, and a crash from here on finishes from there.
    for (new, live) in [(&main_new, &db.to_owned()), (&ingest_new, &ingest)] {
        if new.exists() {
            remove_if_present(&with_suffix(live, "-wal"))?;
            remove_if_present(&with_suffix(live, "-shm"))?;
            rename(new, live)?;
        }
    }
    remove_if_present(&suspect_path(db))?;
    let conn = schema::open_file(db, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    conn.execute(
        "UPDATE recoveries SET state = 'pending' WHERE state = 'moving'",
        [],
    )?;
    Ok(())
}

/// Moves `file` to `to`: its WAL first (a fresh file must never meet the
/// old WAL), its shm dropped (SQLite rebuilds it), the file itself last.
fn move_aside(file: &Path, to: &Path) -> Result<(), StoreError> {
    // Once `to` exists the file is moved: what is at `file` now, WAL and
    // all, is the fresh file, which a finished set-aside may already serve.
    if to.exists() {
        return Ok(());
    }
    let wal = with_suffix(file, "-wal");
    if wal.exists() {
        rename(&wal, &with_suffix(to, "-wal"))?;
    }
    remove_if_present(&with_suffix(file, "-shm"))?;
    if file.exists() {
        rename(file, to)?;
    }
    Ok(())
}

fn rename(from: &Path, to: &Path) -> Result<(), StoreError> {
    fs::rename(from, to).map_err(|source| StoreError::Io {
        action: "rename",
        path: from.to_owned(),
        source,
    })?;
    sync_parent(to)
}

fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(StoreError::Io {
            action: "remove",
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn sync_file(path: &Path) -> Result<(), StoreError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| StoreError::Io {
            action: "sync",
            path: path.to_owned(),
            source,
        })
}

fn sync_parent(path: &Path) -> Result<(), StoreError> {
    sync_file(&schema::parent_dir(path))
}

/// One step of a salvage, applied by whoever owns the main database's
/// read-write connection ([`apply_step`]).
#[derive(Debug)]
pub enum SalvageStep {
    /// Rows for `table`, each with a value per column.
    Rows {
        /// The target table.
        table: &'static str,
        /// Its columns, in the values' order.
        columns: Vec<String>,
        /// The rows.
        rows: Vec<Vec<Value>>,
    },
    /// The salvage of recovery `id` is over.
    Finish {
        /// The recovery.
        id: i64,
        /// Rows salvaged, every table.
        rows: i64,
        /// Logs salvaged.
        logs: i64,
        /// Rows unreadable, at most.
        unreadable: i64,
        /// What could not be read, if anything.
        detail: Option<String>,
    },
}

/// Applies `step` in one transaction on `conn` (the main database, as
/// `main`); returns the rows inserted (0 for `Finish`).
pub fn apply_step(conn: &mut Connection, step: &SalvageStep) -> rusqlite::Result<usize> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut inserted = 0;
    match step {
        SalvageStep::Rows {
            table,
            columns,
            rows,
        } => {
            let marks = vec!["?"; columns.len()].join(", ");
            let sql = format!(
                "INSERT OR IGNORE INTO main.{table} ({}) VALUES ({marks})",
                columns.join(", ")
            );
            let mut stmt = tx.prepare_cached(&sql)?;
            for row in rows {
                inserted += stmt.execute(rusqlite::params_from_iter(row.iter()))?;
            }
            drop(stmt);
            if *table == "sessions" {
                // Sessions from a file older than schema 7 have no
                // `recorded_at`, from which session expiry counts: as the
                // migration does, their start stands in for it.
                tx.execute(
                    "UPDATE main.sessions SET recorded_at = started_at WHERE recorded_at IS NULL",
                    [],
                )?;
            }
        }
        SalvageStep::Finish {
            id,
            rows,
            logs,
            unreadable,
            detail,
        } => {
            tx.execute(
                "UPDATE main.recoveries SET state = 'done', rows_salvaged = ?2, \
                 logs_salvaged = ?3, rows_unreadable = ?4, detail = ?5, finished_at = ?6 \
                 WHERE id = ?1",
                rusqlite::params![
                    id,
                    rows,
                    logs,
                    unreadable,
                    detail,
                    Timestamp::now().as_micros()
                ],
            )?;
        }
    }
    tx.commit()?;
    Ok(inserted)
}

/// What one table's scan found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TableScan {
    /// Rows read and handed on.
    pub read: u64,
    /// Rows inserted by the sink (not already there).
    pub inserted: u64,
    /// Rowid slots skipped as unreadable (an upper bound on rows lost).
    pub unreadable: u64,
    /// The first error met, if any.
    pub error: Option<String>,
}

/// Salvages the rows of one moved file into the new main database through
/// `apply` (the merger while serving, a direct connection offline).
pub struct Salvage<'a> {
    /// Applies one step; returns the rows it inserted.
    pub apply: &'a mut dyn FnMut(SalvageStep) -> Result<usize, String>,
    /// The new main database's columns of each target table.
    pub target_columns: &'a dyn Fn(&str) -> Vec<String>,
}

impl Salvage<'_> {
    /// Salvages `recovery`'s moved file and records its outcome.
    pub fn run(&mut self, recovery: &Recovery) -> Result<(), String> {
        let mut logs = 0;
        let mut rows = 0;
        let mut unreadable = 0;
        let mut problems = Vec::new();
        match schema::open_file(&recovery.moved_to, OpenFlags::SQLITE_OPEN_READ_ONLY) {
            Ok(source) => {
                for (from, to) in recovery.kind.tables() {
                    let scan = self.table(&source, from, to)?;
                    rows += scan.inserted as i64;
                    unreadable += scan.unreadable as i64;
                    if *to == "logs" {
                        logs += scan.inserted as i64;
                    }
                    if let Some(e) = scan.error {
                        problems.push(format!("{from}: {e}; {} rowids skipped", scan.unreadable));
                    }
                }
            }
            Err(e) => problems.push(format!("cannot open it: {e}")),
        }
        let detail = (!problems.is_empty()).then(|| problems.join("; "));
        (self.apply)(SalvageStep::Finish {
            id: recovery.id,
            rows,
            logs,
            unreadable,
            detail,
        })?;
        Ok(())
    }

    /// Moves table `from` of `source` into `to`.
    fn table(
        &mut self,
        source: &Connection,
        from: &str,
        to: &'static str,
    ) -> Result<TableScan, String> {
        let wanted = (self.target_columns)(to);
        let present = match table_columns(source, from) {
            Ok(c) if !c.is_empty() => c,
            Ok(_) => {
                return Ok(TableScan {
                    error: Some("no such table (or its schema is unreadable)".into()),
                    ..TableScan::default()
                })
            }
            Err(e) => {
                return Ok(TableScan {
                    error: Some(format!("schema unreadable: {e}")),
                    ..TableScan::default()
                })
            }
        };
        let columns: Vec<String> = wanted.into_iter().filter(|c| present.contains(c)).collect();
        let mut failure = None;
        let mut inserted = 0u64;
        let mut scan = scan_table(source, from, &columns, &mut |rows| {
            let step = SalvageStep::Rows {
                table: to,
                columns: columns.clone(),
                rows,
            };
            match (self.apply)(step) {
                Ok(n) => {
                    inserted += n as u64;
                    true
                }
                Err(e) => {
                    failure = Some(e);
                    false
                }
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        scan.inserted = inserted;
        Ok(scan)
    }
}

/// The columns of `table` in the file on `conn`.
fn table_columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(&format!("PRAGMA main.table_info({table})"))?;
    let names = stmt.query_map([], |r| r.get::<_, String>(1))?;
    names.collect()
}

/// The columns of `table` in the main database on `conn`, for
/// [`Salvage::target_columns`].
pub fn target_columns(conn: &Connection, table: &str) -> Vec<String> {
    table_columns(conn, table).unwrap_or_default()
}

/// Reads `columns` of every row of `table` it can, in rowid order, handing
/// them to `sink` in steps of at most [`STEP_ROWS`] (stops when `sink`
/// returns false). Where a read fails on a damaged page it looks for the
/// next rowid it can read (`next_readable`) and goes on from there,
/// counting the rowids passed over.
pub fn scan_table(
    conn: &Connection,
    table: &str,
    columns: &[String],
    sink: &mut dyn FnMut(Vec<Vec<Value>>) -> bool,
) -> TableScan {
    let mut out = TableScan::default();
    if columns.is_empty() {
        return out;
    }
    let sql = format!(
        "SELECT rowid, {} FROM main.{table} WHERE rowid >= ?1 ORDER BY rowid LIMIT ?2",
        columns.join(", ")
    );
    let mut from = 0;
    loop {
        let mut rows = Vec::new();
        let mut bytes = 0usize;
        let mut last = None;
        let read = (|| -> rusqlite::Result<()> {
            let mut stmt = conn.prepare_cached(&sql)?;
            let mut cursor = stmt.query(rusqlite::params![from, STEP_ROWS as i64])?;
            while let Some(r) = cursor.next()? {
                let rowid: i64 = r.get(0)?;
                let mut values = Vec::with_capacity(columns.len());
                for i in 0..columns.len() {
                    let v: Value = r.get(i + 1)?;
                    bytes += value_len(&v);
                    values.push(v);
                }
                rows.push(values);
                last = Some(rowid);
                if bytes >= STEP_BYTES {
                    break;
                }
            }
            Ok(())
        })();
        let full = rows.len() >= STEP_ROWS || bytes >= STEP_BYTES;
        out.read += rows.len() as u64;
        if !rows.is_empty() && !sink(rows) {
            return out;
        }
        match read {
            Ok(()) if full => match last {
                Some(l) if l < i64::MAX => from = l + 1,
                _ => return out,
            },
            Ok(()) => return out,
            Err(e) => {
                if out.error.is_none() {
                    out.error = Some(e.to_string());
                }
                // Nothing read from `from`: the row there (its key may
                // read while its payload does not) is passed over too.
                let after = last.unwrap_or(from);
                let passed = u64::from(last.is_none());
                match next_readable(conn, table, after) {
                    Some(next) => {
                        out.unreadable +=
                            passed + next.saturating_sub(after).saturating_sub(1).max(0) as u64;
                        from = next;
                    }
                    None => {
                        out.unreadable += passed;
                        return out;
                    }
                }
            }
        }
    }
}

fn value_len(v: &Value) -> usize {
    match v {
        Value::Text(s) => s.len(),
        Value::Blob(b) => b.len(),
        _ => 8,
    }
}

/// The first rowid of `table` at or above `at` (a seek down the b-tree to
/// it; an error when a page on the way is damaged).
fn first_rowid_from(conn: &Connection, table: &str, at: i64) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        &format!("SELECT rowid FROM main.{table} WHERE rowid >= ?1 ORDER BY rowid LIMIT 1"),
        [at],
        |r| r.get::<_, i64>(0),
    )
    .optional()
}

/// The smallest rowid above `after` from which `table` reads again, if
/// any: probes `after + 1, + 2, + 4, ...` until a read succeeds, then
/// narrows the gap by bisection.
fn next_readable(conn: &Connection, table: &str, after: i64) -> Option<i64> {
    let probe = |at: i64| first_rowid_from(conn, table, at).map_err(|_| ());
    let mut failing = after;
    let mut step: i64 = 1;
    let found = loop {
        let at = failing.saturating_add(step);
        match probe(at) {
            Ok(Some(rowid)) => break (at, rowid),
            Ok(None) => {
                // Nothing readable from `at` on; something may still be
                // readable below it.
                if step == 1 {
                    return None;
                }
                break (at, i64::MAX);
            }
            Err(()) if at == i64::MAX => return None,
            Err(()) => {
                failing = at;
                step = step.saturating_mul(2);
            }
        }
    };
    let (mut good, mut rowid) = found;
    // `failing` fails, `good` reads (up to `rowid`): narrow the gap.
    while good - failing > 1 {
        let mid = failing + (good - failing) / 2;
        match probe(mid) {
            Ok(Some(r)) => {
                good = mid;
                rowid = r;
            }
            Ok(None) => good = mid,
            Err(()) => failing = mid,
        }
    }
    (rowid != i64::MAX).then_some(rowid)
}

/// `codi-monitor recover`: with the daemon stopped (its lock is taken),
/// finishes an interrupted recovery, checks both files fully, sets aside
/// what is damaged (everything when `force`, to rebuild by hand) and
/// salvages every pending recovery at once; returns those salvaged.
pub fn recover_offline(db: &Path, force: bool) -> Result<Vec<Recovery>, StoreError> {
    let lock = DatabaseLock::acquire(db)?;
    finish_set_aside(db)?;
    let mut damage = inspect(db, Duration::MAX, true)?.damage;
    if damage.is_empty() && force {
        damage.push(Damage {
            path: db.to_owned(),
            kind: FileKind::Main,
            reason: "a rebuild was asked for (codi-monitor recover --force)".into(),
        });
    }
    set_aside(db, &lock, &damage)?;
    let mut conn = schema::open_rw(db, 64)?;
    let columns_conn = schema::open_file(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let pending = recoveries(&conn, "state = 'pending'")?;
    for r in &pending {
        let mut apply = |step: SalvageStep| apply_step(&mut conn, &step).map_err(|e| e.to_string());
        let columns = |table: &str| target_columns(&columns_conn, table);
        Salvage {
            apply: &mut apply,
            target_columns: &columns,
        }
        .run(r)
        .map_err(|e| StoreError::Io {
            action: "salvage rows from",
            path: r.moved_to.clone(),
            source: std::io::Error::other(e),
        })?;
    }
    let ids: Vec<String> = pending.iter().map(|r| r.id.to_string()).collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(recoveries(&conn, &format!("id IN ({})", ids.join(", ")))?)
}

/// Where the running daemon's store is, once it serves, and whether a
/// storage thread has met corruption since ([`corruption_seen`]).
static WATCH: std::sync::OnceLock<Watch> = std::sync::OnceLock::new();

struct Watch {
    db: PathBuf,
    stop: Box<dyn Fn() + Send + Sync>,
    seen: std::sync::atomic::AtomicBool,
}

/// How long after a start that found a suspect file sound a new corruption
/// error only degrades the daemon instead of restarting it again (so an
/// error the checks cannot confirm cannot make it restart in a loop).
pub const RESTART_QUIET: Duration = Duration::from_secs(3600);

/// Exit code of a daemon that stopped to salvage a file it found corrupt
/// while running (the service manager starts it again).
pub const EXIT_TO_SALVAGE: u8 = 3;

/// Arms [`corruption_seen`] for the store at `db`: `stop` begins the
/// daemon's orderly stop. Once per process.
pub fn watch_for_corruption(db: &Path, stop: impl Fn() + Send + Sync + 'static) {
    let _ = WATCH.set(Watch {
        db: db.to_owned(),
        stop: Box::new(stop),
        seen: std::sync::atomic::AtomicBool::new(false),
    });
}

/// Whether a storage thread met corruption and the daemon stops to
/// salvage it at its next start.
pub fn stopping_to_salvage() -> bool {
    WATCH
        .get()
        .is_some_and(|w| w.seen.load(std::sync::atomic::Ordering::Acquire))
}

/// Called by the storage threads with every error they meet: a
/// corruption error (the first one) marks the store suspect
/// ([`mark_suspect`]), says so, and stops the daemon so that its next
/// start moves the file aside and salvages it; unless a start within
/// [`RESTART_QUIET`] found a suspect file sound, when it only says so.
/// Returns true for a corruption error.
pub fn corruption_seen(e: &rusqlite::Error, what: &str) -> bool {
    if !is_corruption(e) {
        return false;
    }
    damage_found(&format!("{what}: {e}"));
    true
}

/// Damage found while serving (`what`): marks the store suspect and stops
/// the daemon, once, as [`corruption_seen`] describes.
pub fn damage_found(what: &str) {
    let Some(w) = WATCH.get() else {
        return;
    };
    if w.seen.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return;
    }
    let quiet = fs::metadata(cleared_path(&w.db))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < RESTART_QUIET);
    if quiet {
        log::error!(
            "SQLite reports the store `{}` corrupt ({what}), but a full check at the last \
             start found it sound; serving on: run `codi-monitor verify --full` and, if it \
             fails, restart the daemon to salvage it",
            w.db.display()
        );
        return;
    }
    if let Err(io) = mark_suspect(&w.db, what) {
        log::error!(
            "cannot mark `{}` suspect: {io}",
            suspect_path(&w.db).display()
        );
    }
    log::error!(
        "SQLite reports the store `{}` corrupt ({what}): stopping (exit code \
         {EXIT_TO_SALVAGE}) so that the next start moves the damaged file aside and salvages \
         its rows; under systemd it starts again by itself",
        w.db.display()
    );
    (w.stop)();
}

/// `<db>.suspect.cleared`: when a start last found a suspect store sound.
fn cleared_path(db: &Path) -> PathBuf {
    with_suffix(db, ".suspect.cleared")
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod retention_tests;
