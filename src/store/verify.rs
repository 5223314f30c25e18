//! `codi-monitor verify`: checks a database at rest (or while the daemon
//! runs) without writing to it: both files' SQLite structure and schema
//! versions, the id and merge-mark rules of [`super::ingest`], and every
//! archived export against its recorded size and SHA-256.
//!
//! The merge rules as they can be seen in files (the merger's
//! `durable_through` mark lives only in the daemon's memory): with `M` the
//! larger of `logs`' largest id and the ingest file's `merged_floor`, an
//! ingest row at or below `M` was merged, so its uuid must be in `logs`
//! (at its own id, or at another when the merge dropped it as a resend);
//! an id in both files must hold the same log (a row keeps its id when it
//! moves); and `logs` holds each uuid once. Unmerged ingest rows whose uuid
//! is already stored are resends the merge will drop, not damage.

use super::schema::{self, ingest_path, INGEST_VERSION, SCHEMA_VERSION};
use super::StoreError;
use rusqlite::{Connection, OpenFlags};
use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// At most this many problems are named per check.
const MAX_NAMED: usize = 10;

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// Counts, or what is wrong.
    pub detail: String,
}

/// Every check run on one database, in order.
#[derive(Debug, Default)]
pub struct Report {
    /// The checks.
    pub checks: Vec<Check>,
}

impl Report {
    /// Whether every check passed.
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    fn push(&mut self, name: &str, ok: bool, detail: String) {
        self.checks.push(Check {
            name: name.to_owned(),
            ok,
            detail,
        });
    }

    /// Records `result`: passed with its detail, or failed with the error.
    fn record(&mut self, name: &str, result: rusqlite::Result<(bool, String)>) -> bool {
        let (ok, detail) = result.unwrap_or_else(|e| (false, format!("cannot check: {e}")));
        self.push(name, ok, detail);
        ok
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.checks {
            let mark = if c.ok { "OK  " } else { "FAIL" };
            writeln!(f, "{mark} {}: {}", c.name, c.detail)?;
        }
        let failed = self.checks.iter().filter(|c| !c.ok).count();
        if failed == 0 {
            write!(f, "all {} checks passed", self.checks.len())
        } else {
            write!(f, "{failed} of {} checks FAILED", self.checks.len())
        }
    }
}

/// Checks the database at `db` and its ingest file. `full` runs SQLite's
/// `integrity_check` instead of the faster `quick_check` (which skips
/// comparing indexes with their tables). Errors only when a file cannot be
/// opened at all; everything found wrong inside is in the report.
pub fn verify(db: &Path, full: bool) -> Result<Report, StoreError> {
    let ingest = ingest_path(db);
    for path in [db, ingest.as_path()] {
        std::fs::metadata(path).map_err(|source| StoreError::Io {
            action: "open",
            path: path.to_owned(),
            source,
        })?;
    }
    let conn = schema::open_file(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.execute(
        "ATTACH DATABASE ?1 AS ingest",
        [schema::read_only_uri(&ingest)],
    )
    .map_err(|source| StoreError::Open {
        path: ingest.clone(),
        source,
    })?;
    conn.pragma_update(None, "query_only", true)?;
    let mut report = Report::default();
    let pragma = if full {
        "integrity_check"
    } else {
        "quick_check"
    };
    let mut sound = true;
    for (schema, path, expected) in [
        ("main", db, SCHEMA_VERSION),
        ("ingest", ingest.as_path(), INGEST_VERSION),
    ] {
        let name = format!("{} {pragma}", path.display());
        sound &= report.record(&name, structure(&conn, schema, pragma));
        let name = format!("{} schema version", path.display());
        sound &= report.record(&name, version(&conn, schema, expected));
    }
    if !sound {
        report.push(
            "ids and merge marks",
            false,
            "not checked: a file is damaged or has another schema version".into(),
        );
        report.push(
            "archived exports",
            false,
            "not checked: a file is damaged or has another schema version".into(),
        );
        return Ok(report);
    }
    report.record("logs hold each uuid once", unique_uuids(&conn));
    report.record("ingest merge mark", merge_mark(&conn));
    report.record("merged ingest rows are in logs", merged_in_logs(&conn));
    report.record("ids shared by both files hold one log", shared_ids(&conn));
    report.record("unmerged ingest rows", unmerged(&conn));
    report.record("archived exports", archives(&conn));
    Ok(report)
}

/// `PRAGMA <schema>.<pragma>`: passes when it answers the single row `ok`.
fn structure(conn: &Connection, schema: &str, pragma: &str) -> rusqlite::Result<(bool, String)> {
    let mut stmt = conn.prepare(&format!("PRAGMA {schema}.{pragma}({MAX_NAMED})"))?;
    let lines: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let pages: i64 = conn.query_row(&format!("PRAGMA {schema}.page_count"), [], |r| r.get(0))?;
    if lines == ["ok"] {
        Ok((true, format!("{pages} pages")))
    } else {
        Ok((false, lines.join("; ")))
    }
}

fn version(conn: &Connection, schema: &str, expected: i64) -> rusqlite::Result<(bool, String)> {
    let found: i64 = conn.query_row(&format!("PRAGMA {schema}.user_version"), [], |r| r.get(0))?;
    Ok((
        found == expected,
        format!("{found} (this binary reads {expected})"),
    ))
}

/// Where the merge stands: the largest id in `logs` and the recorded floor.
const MARKS: &str = "SELECT (SELECT coalesce(max(id), 0) FROM main.logs), \
    (SELECT coalesce(max(merged_floor), 0) FROM ingest.ingest_meta)";

/// Every ingest row at or below this was merged.
const MERGED: &str = "max((SELECT coalesce(max(id), 0) FROM main.logs), \
    (SELECT coalesce(max(merged_floor), 0) FROM ingest.ingest_meta))";

fn unique_uuids(conn: &Connection) -> rusqlite::Result<(bool, String)> {
    let (rows, repeated): (i64, i64) = conn.query_row(
        "SELECT (SELECT count(*) FROM main.logs), (SELECT count(*) FROM \
         (SELECT uuid FROM main.logs GROUP BY uuid HAVING count(*) > 1))",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok((
        repeated == 0,
        format!("{rows} rows, {repeated} uuids stored more than once"),
    ))
}

fn merge_mark(conn: &Connection) -> rusqlite::Result<(bool, String)> {
    let meta_rows: i64 =
        conn.query_row("SELECT count(*) FROM ingest.ingest_meta", [], |r| r.get(0))?;
    let (newest, floor): (i64, i64) = conn.query_row(MARKS, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok((
        meta_rows == 1 && floor >= 0,
        format!("merged_floor {floor} ({meta_rows} row), largest id in logs {newest}"),
    ))
}

fn merged_in_logs(conn: &Connection) -> rusqlite::Result<(bool, String)> {
    let (merged, lost): (i64, Vec<i64>) = {
        let merged = conn.query_row(
            &format!("SELECT count(*) FROM ingest.ingest_logs WHERE id <= {MERGED}"),
            [],
            |r| r.get(0),
        )?;
        let mut stmt = conn.prepare(&format!(
            "SELECT id FROM ingest.ingest_logs i WHERE id <= {MERGED} AND NOT EXISTS \
             (SELECT 1 FROM main.logs l WHERE l.uuid = i.uuid) ORDER BY id"
        ))?;
        let lost = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        (merged, lost)
    };
    if lost.is_empty() {
        Ok((
            true,
            format!("{merged} merged rows awaiting deletion, all in logs"),
        ))
    } else {
        Ok((
            false,
            format!(
                "{} merged rows are in neither logs nor the view of unmerged rows \
                 (lost), ids {}",
                lost.len(),
                first(&lost)
            ),
        ))
    }
}

fn shared_ids(conn: &Connection) -> rusqlite::Result<(bool, String)> {
    let mut stmt = conn.prepare(
        "SELECT i.id FROM ingest.ingest_logs i JOIN main.logs l ON l.id = i.id \
         WHERE l.uuid <> i.uuid ORDER BY i.id",
    )?;
    let clashes: Vec<i64> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    if clashes.is_empty() {
        Ok((true, "no id holds two different logs".into()))
    } else {
        Ok((
            false,
            format!(
                "{} ids hold different logs in the two files, ids {}",
                clashes.len(),
                first(&clashes)
            ),
        ))
    }
}

fn unmerged(conn: &Connection) -> rusqlite::Result<(bool, String)> {
    let (rows, resent): (i64, i64) = conn.query_row(
        &format!(
            "SELECT count(*), coalesce(sum(EXISTS (SELECT 1 FROM main.logs l WHERE l.uuid = i.uuid) \
             OR EXISTS (SELECT 1 FROM ingest.ingest_logs j WHERE j.uuid = i.uuid AND j.id < i.id \
             AND j.id > {MERGED})), 0) FROM ingest.ingest_logs i WHERE i.id > {MERGED}"
        ),
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok((
        true,
        format!("{rows} rows await the merge, {resent} of them resends the merge drops"),
    ))
}

/// One archived copy as recorded.
struct Archived {
    path: String,
    size: Option<i64>,
    hash: Option<String>,
}

fn archives(conn: &Connection) -> rusqlite::Result<(bool, String)> {
    let mut stmt = conn.prepare(
        "SELECT archive_path, max(file_size), max(content_hash), count(*) FROM main.export_archive \
         WHERE error IS NULL AND archive_path <> '' GROUP BY archive_path ORDER BY archive_path",
    )?;
    let mut rows = 0i64;
    let files: Vec<Archived> = stmt
        .query_map([], |r| {
            Ok((
                Archived {
                    path: r.get(0)?,
                    size: r.get(1)?,
                    hash: r.get(2)?,
                },
                r.get::<_, i64>(3)?,
            ))
        })?
        .map(|row| {
            row.map(|(a, n)| {
                rows += n;
                a
            })
        })
        .collect::<rusqlite::Result<_>>()?;
    let problems: Vec<String> = files.iter().filter_map(archive_problem).collect();
    if problems.is_empty() {
        Ok((
            true,
            format!(
                "{} files ({rows} rows) match their recorded size and SHA-256",
                files.len()
            ),
        ))
    } else {
        let named: Vec<&str> = problems
            .iter()
            .take(MAX_NAMED)
            .map(String::as_str)
            .collect();
        Ok((
            false,
            format!(
                "{} of {} files do not match: {}",
                problems.len(),
                files.len(),
                named.join("; ")
            ),
        ))
    }
}

/// What is wrong with one archived copy, if anything.
fn archive_problem(a: &Archived) -> Option<String> {
    let path = Path::new(&a.path);
    let (size, hash) = match hash_file(path) {
        Ok(found) => found,
        Err(e) => return Some(format!("{}: {e}", a.path)),
    };
    if let Some(recorded) = a.size {
        if recorded != size as i64 {
            return Some(format!("{}: {size} bytes, recorded {recorded}", a.path));
        }
    }
    match &a.hash {
        Some(recorded) if !recorded.eq_ignore_ascii_case(&hash) => {
            Some(format!("{}: SHA-256 {hash}, recorded {recorded}", a.path))
        }
        _ => None,
    }
}

/// The size and SHA-256 (lower-case hex) of the file at `path`.
fn hash_file(path: &Path) -> io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                size += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((size, hex))
}

/// The first few of `ids`, comma-separated.
fn first(ids: &[i64]) -> String {
    let mut text: Vec<String> = ids.iter().take(MAX_NAMED).map(i64::to_string).collect();
    if ids.len() > MAX_NAMED {
        text.push("...".into());
    }
    text.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A migrated, empty store at `dir/codi.db`.
    fn store(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("codi.db");
        drop(schema::open_rw(&path, 4).unwrap());
        path
    }

    fn failed(report: &Report) -> Vec<&str> {
        report
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.as_str())
            .collect()
    }

    const ROW: &str = "(id, uuid, timestamp, level, component, message, created_at) \
        VALUES (?1, ?2, 1, 'Info', 'c', 'm', 1)";

    #[test]
    fn passes_an_empty_store_and_names_a_lost_merged_row_and_an_id_clash() {
        let dir = tempfile::tempdir().unwrap();
        let db = store(dir.path());
        let report = verify(&db, true).unwrap();
        assert!(report.ok(), "{report}");
        let main = Connection::open(&db).unwrap();
        let ingest = Connection::open(ingest_path(&db)).unwrap();
        main.execute(
            &format!("INSERT INTO logs {ROW}"),
            rusqlite::params![5, b"a".to_vec()],
        )
        .unwrap();
        // Merged (id 3 <= 5) and in logs by uuid: fine.
        ingest
            .execute(
                &format!("INSERT INTO ingest_logs {ROW}"),
                rusqlite::params![3, b"a".to_vec()],
            )
            .unwrap();
        // Unmerged resend: fine.
        ingest
            .execute(
                &format!("INSERT INTO ingest_logs {ROW}"),
                rusqlite::params![7, b"a".to_vec()],
            )
            .unwrap();
        let report = verify(&db, false).unwrap();
        assert!(report.ok(), "{report}");
        assert!(report.to_string().contains("1 of them resends"), "{report}");
        // Merged but in no file's visible part: lost.
        ingest
            .execute(
                &format!("INSERT INTO ingest_logs {ROW}"),
                rusqlite::params![4, b"b".to_vec()],
            )
            .unwrap();
        // The same id as a different log in logs.
        ingest
            .execute(
                &format!("INSERT INTO ingest_logs {ROW}"),
                rusqlite::params![5, b"c".to_vec()],
            )
            .unwrap();
        let report = verify(&db, false).unwrap();
        assert_eq!(
            failed(&report),
            [
                "merged ingest rows are in logs",
                "ids shared by both files hold one log"
            ],
            "{report}"
        );
        assert!(report.to_string().contains("ids 4, 5"), "{report}");
    }

    #[test]
    fn the_merge_floor_counts_as_merged() {
        let dir = tempfile::tempdir().unwrap();
        let db = store(dir.path());
        let ingest = Connection::open(ingest_path(&db)).unwrap();
        ingest
            .execute(
                &format!("INSERT INTO ingest_logs {ROW}"),
                rusqlite::params![2, b"x".to_vec()],
            )
            .unwrap();
        assert!(verify(&db, false).unwrap().ok());
        ingest
            .execute("UPDATE ingest_meta SET merged_floor = 2", [])
            .unwrap();
        let report = verify(&db, false).unwrap();
        assert_eq!(
            failed(&report),
            ["merged ingest rows are in logs"],
            "{report}"
        );
    }

    #[test]
    fn names_another_schema_version_and_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let db = store(dir.path());
        Connection::open(ingest_path(&db))
            .unwrap()
            .pragma_update(None, "user_version", 2)
            .unwrap();
        let report = verify(&db, false).unwrap();
        assert!(!report.ok());
        assert!(
            report
                .to_string()
                .contains("schema version: 2 (this binary reads 3)"),
            "{report}"
        );
        std::fs::remove_file(ingest_path(&db)).unwrap();
        assert!(matches!(verify(&db, false), Err(StoreError::Io { .. })));
    }

    #[test]
    fn names_a_tampered_and_a_missing_archive_file() {
        let dir = tempfile::tempdir().unwrap();
        let db = store(dir.path());
        let good = dir.path().join("good");
        std::fs::write(&good, b"hello").unwrap();
        let main = Connection::open(&db).unwrap();
        let hello = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        for path in [&good, &dir.path().join("gone")] {
            main.execute(
                "INSERT INTO export_archive (original_path, archive_path, file_size, content_hash) \
                 VALUES ('src', ?1, 5, ?2)",
                rusqlite::params![path.to_str().unwrap(), hello],
            )
            .unwrap();
        }
        let report = verify(&db, false).unwrap();
        let text = report.to_string();
        assert!(text.contains("1 of 2 files do not match"), "{text}");
        assert!(text.contains("gone: No such file"), "{text}");
        std::fs::write(&good, b"hellO").unwrap();
        let text = verify(&db, false).unwrap().to_string();
        assert!(text.contains("2 of 2 files do not match"), "{text}");
        assert!(text.contains(&format!("recorded {hello}")), "{text}");
    }
}
