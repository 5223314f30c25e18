//! One batch for the hub, read and serialised deterministically, so that
//! the same range always gives the same bytes (fixed column order,
//! serde_json's fixed number and string formatting, nothing left to the
//! hub's defaults) and a re-sent batch is one ClickHouse drops as a
//! duplicate block: an id range of `logs` ([`read`]), or a range of
//! `hub_changes` for `sessions` and `export_archive` ([`read_changes`]),
//! whose rows change after they are written.

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// A batch ready to send: its range (log ids, or `hub_changes` seqs),
/// body ([`rows_in`] counts its rows) and digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The first id in it.
    pub first: i64,
    /// The last id in it (the watermark once the hub has it).
    pub last: i64,
    /// The `JSONEachRow` body.
    pub body: Vec<u8>,
    /// SHA-256 of the body, hex.
    pub digest: String,
    /// `created_at` of each log in it (microseconds), for the sync's
    /// latency and lag; empty for a batch of changes.
    pub created_at: Vec<i64>,
    /// Whether it was cut by a bound (rows, bytes, month) rather than by
    /// running out of rows: more are waiting.
    pub more: bool,
}

impl Batch {
    /// The batch of `body` over `first..=last`, its digest computed.
    fn of(first: i64, last: i64, body: Vec<u8>, created_at: Vec<i64>, more: bool) -> Batch {
        let digest = hex(&Sha256::digest(&body));
        Batch {
            first,
            last,
            body,
            digest,
            created_at,
            more,
        }
    }
}

/// A kind of changing row shipped through `hub_changes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// `sessions`, keyed by their text id.
    Sessions,
    /// `export_archive`, keyed by their integer id.
    Exports,
}

impl ChangeKind {
    /// Its name in `hub_changes.kind` and `sync_state.target`: the local
    /// table's name.
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Sessions => "sessions",
            ChangeKind::Exports => "export_archive",
        }
    }

    /// Appends a change of every row the table holds to `hub_changes`
    /// (the first time the kind is shipped: rows from before the sync).
    pub fn record_every_row(self, conn: &Connection) -> rusqlite::Result<usize> {
        conn.execute(
            &format!(
                "INSERT INTO hub_changes (kind, row_key) SELECT ?1, id FROM {} ORDER BY rowid",
                self.name()
            ),
            [self.name()],
        )
    }
}

/// One session as the hub's `sessions` table takes it, columns in its
/// order.
#[derive(Serialize)]
struct HubSession<'a> {
    host_id: &'a str,
    id: String,
    identity: String,
    agent_type: Option<String>,
    started_at: i64,
    ended_at: Option<i64>,
    metadata: Option<String>,
    workspace: Option<String>,
    uid: Option<i64>,
    recorded_at: Option<i64>,
    end_reason: Option<String>,
}

/// One export record as the hub's `export_archive` table takes it,
/// columns in its order.
#[derive(Serialize)]
struct HubExport<'a> {
    host_id: &'a str,
    id: i64,
    original_path: String,
    archive_path: String,
    session_id: Option<String>,
    file_size: Option<i64>,
    processed_at: i64,
    content_hash: Option<String>,
    source_mtime_ns: Option<i64>,
    archived_at_us: Option<i64>,
    error: Option<String>,
}

/// One log as the hub's `logs` table takes it, columns in its order.
#[derive(Serialize)]
struct HubLog<'a> {
    host_id: &'a str,
    id: i64,
    uuid: String,
    timestamp: i64,
    level: String,
    component: String,
    session_id: Option<String>,
    message: String,
    metadata: Option<String>,
    created_at: i64,
    uid: Option<i64>,
}

/// Text of column `i` (lossy for bytes that are not UTF-8), `None` for NULL.
fn text(row: &rusqlite::Row, i: usize) -> rusqlite::Result<Option<String>> {
    Ok(match row.get_ref(i)? {
        ValueRef::Null => None,
        ValueRef::Text(t) | ValueRef::Blob(t) => Some(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Integer(n) => Some(n.to_string()),
        ValueRef::Real(f) => Some(f.to_string()),
    })
}

/// Integer of column `i`, `None` for NULL or a value that is not one (a
/// row the hub cannot take must not stop every batch after it).
fn int(row: &rusqlite::Row, i: usize) -> rusqlite::Result<Option<i64>> {
    Ok(match row.get_ref(i)? {
        ValueRef::Integer(n) => Some(n),
        ValueRef::Real(f) => Some(f as i64),
        ValueRef::Text(t) => std::str::from_utf8(t)
            .ok()
            .and_then(|t| t.trim().parse().ok()),
        ValueRef::Null | ValueRef::Blob(_) => None,
    })
}

/// The UUID text of a 16-byte blob (or the hex of whatever else is there).
fn uuid_text(row: &rusqlite::Row, i: usize) -> rusqlite::Result<String> {
    let bytes = match row.get_ref(i)? {
        ValueRef::Blob(b) => b.to_vec(),
        other => other.as_bytes().unwrap_or_default().to_vec(),
    };
    Ok(match uuid::Uuid::from_slice(&bytes) {
        Ok(u) => u.hyphenated().to_string(),
        Err(_) => uuid::Uuid::nil().hyphenated().to_string(),
    })
}

/// Reads the rows of `logs` with ids in `(after, through]` on `conn`, at
/// most `max_rows` and about `max_bytes` of body, stopping before a row of
/// another calendar month than the first (one partition, so one block on
/// the hub), and serialises them for `host_id`. `None` when there is no
/// such row.
pub fn read(
    conn: &Connection,
    host_id: &str,
    after: i64,
    through: i64,
    max_rows: usize,
    max_bytes: usize,
) -> rusqlite::Result<Option<Batch>> {
    let mut body = Vec::new();
    let mut created = Vec::new();
    let (mut first, mut last, mut month, mut more) = (0, 0, None, false);
    // Read in chunks, each its own short read transaction, and serialised
    // after it ends: a long read would keep the writer from starting the
    // WAL over (it grew past 1 GiB at 100,000 logs/s with one read per
    // batch). Rows at or below `through` do not come and go between
    // chunks (only retention may delete some, which a re-read sees too).
    let mut cursor = after;
    'chunks: loop {
        let want = (max_rows - created.len()).min(READ_CHUNK);
        if want == 0 {
            break;
        }
        let chunk = read_chunk(conn, host_id, cursor, through, want)?;
        let complete = chunk.len() == want;
        for log in chunk {
            let row_month = month_of(log.created_at);
            if *month.get_or_insert(row_month) != row_month {
                more = true;
                break 'chunks;
            }
            let line = serde_json::to_vec(&log).expect("a log serialises");
            if !created.is_empty() && body.len() + line.len() + 1 > max_bytes {
                more = true;
                break 'chunks;
            }
            grow_within(&mut body, line.len() + 1, max_bytes);
            body.extend_from_slice(&line);
            body.push(b'\n');
            if created.is_empty() {
                first = log.id;
            }
            last = log.id;
            cursor = log.id;
            created.push(log.created_at);
        }
        if !complete {
            break;
        }
    }
    if created.is_empty() {
        return Ok(None);
    }
    more |= created.len() >= max_rows;
    Ok(Some(Batch::of(first, last, body, created, more)))
}

/// Reads the changes of `kind` with seqs above `after` on `conn`, at most
/// `max_rows` of them and about `max_bytes` of body, and serialises each
/// changed row as it is now, once per batch however often it changed in
/// it, in the order of its first change. It stops before a row of another
/// calendar month than the first (of `started_at` or `processed_at`: one
/// partition on the hub). A change whose row is gone (retention) sends
/// nothing. `None` when there is no change; a batch whose rows are all
/// gone has an empty body (the sync moves its watermark without sending).
pub fn read_changes(
    conn: &Connection,
    kind: ChangeKind,
    host_id: &str,
    after: i64,
    max_rows: usize,
    max_bytes: usize,
) -> rusqlite::Result<Option<Batch>> {
    let mut changes = conn.prepare_cached(
        "SELECT seq, row_key FROM hub_changes WHERE kind = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let changes: Vec<(i64, String)> = changes
        .query_map(params![kind.name(), after, max_rows as i64], |r| {
            Ok((r.get(0)?, text(r, 1)?.unwrap_or_default()))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let (Some(&(first, _)), Some(&(mut last, _))) = (changes.first(), changes.last()) else {
        return Ok(None);
    };
    let mut more = changes.len() >= max_rows;
    let mut body = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut month = None;
    for (seq, key) in &changes {
        if !seen.insert(key.as_str()) {
            continue;
        }
        let Some((line, row_month)) = row_line(conn, kind, host_id, key)? else {
            continue;
        };
        let full = !body.is_empty() && body.len() + line.len() + 1 > max_bytes;
        if full || *month.get_or_insert(row_month) != row_month {
            last = seq - 1;
            more = true;
            break;
        }
        body.extend_from_slice(&line);
        body.push(b'\n');
    }
    Ok(Some(Batch::of(first, last, body, Vec::new(), more)))
}

/// The body line of row `key` of `kind` and the month it is filed under,
/// `None` if the row is gone.
fn row_line(
    conn: &Connection,
    kind: ChangeKind,
    host_id: &str,
    key: &str,
) -> rusqlite::Result<Option<(Vec<u8>, i64)>> {
    use rusqlite::OptionalExtension;
    match kind {
        ChangeKind::Sessions => conn
            .prepare_cached(
                "SELECT id, identity, agent_type, started_at, ended_at, metadata, workspace, \
                 uid, recorded_at, end_reason FROM sessions WHERE id = ?1",
            )?
            .query_row([key], |r| {
                let s = HubSession {
                    host_id,
                    id: text(r, 0)?.unwrap_or_default(),
                    identity: text(r, 1)?.unwrap_or_default(),
                    agent_type: text(r, 2)?,
                    started_at: int(r, 3)?.unwrap_or_default(),
                    ended_at: int(r, 4)?,
                    metadata: text(r, 5)?,
                    workspace: text(r, 6)?,
                    uid: int(r, 7)?,
                    recorded_at: int(r, 8)?,
                    end_reason: text(r, 9)?,
                };
                let line = serde_json::to_vec(&s).expect("a session serialises");
                Ok((line, month_of(s.started_at)))
            })
            .optional(),
        ChangeKind::Exports => {
            let Ok(id) = key.parse::<i64>() else {
                return Ok(None);
            };
            conn.prepare_cached(
                "SELECT id, original_path, archive_path, session_id, file_size, processed_at, \
                 content_hash, source_mtime_ns, archived_at_us, error FROM export_archive \
                 WHERE id = ?1",
            )?
            .query_row([id], |r| {
                let e = HubExport {
                    host_id,
                    id: r.get(0)?,
                    original_path: text(r, 1)?.unwrap_or_default(),
                    archive_path: text(r, 2)?.unwrap_or_default(),
                    session_id: text(r, 3)?,
                    file_size: int(r, 4)?,
                    processed_at: int(r, 5)?.unwrap_or_default(),
                    content_hash: text(r, 6)?,
                    source_mtime_ns: int(r, 7)?,
                    archived_at_us: int(r, 8)?,
                    error: text(r, 9)?,
                };
                let line = serde_json::to_vec(&e).expect("an export record serialises");
                Ok((line, month_of(e.processed_at.saturating_mul(1_000_000))))
            })
            .optional()
        }
    }
}

/// Makes room for `more` bytes in `body`, doubling its capacity as a
/// `Vec` does but never past `max` (so a 64 MiB batch never holds a
/// 128 MiB allocation).
fn grow_within(body: &mut Vec<u8>, more: usize, max: usize) {
    let need = body.len() + more;
    if need > body.capacity() {
        let target = (body.capacity() * 2).max(64 << 10).min(max).max(need);
        body.reserve_exact(target - body.len());
    }
}

/// Logs read per statement by [`read`].
const READ_CHUNK: usize = 4096;

/// Up to `limit` logs with ids in `(after, through]`, in id order, owned:
/// the statement (and its read transaction) is done when this returns.
fn read_chunk<'a>(
    conn: &Connection,
    host_id: &'a str,
    after: i64,
    through: i64,
    limit: usize,
) -> rusqlite::Result<Vec<HubLog<'a>>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, uuid, timestamp, level, component, session_id, message, metadata, \
         created_at, uid FROM main.logs WHERE id > ?1 AND id <= ?2 ORDER BY id LIMIT ?3",
    )?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let logs = stmt
        .query_map(params![after, through, limit], |r| {
            Ok(HubLog {
                host_id,
                id: r.get(0)?,
                uuid: uuid_text(r, 1)?,
                timestamp: int(r, 2)?.unwrap_or_default(),
                level: text(r, 3)?.unwrap_or_default(),
                component: text(r, 4)?.unwrap_or_default(),
                session_id: text(r, 5)?,
                message: text(r, 6)?.unwrap_or_default(),
                metadata: text(r, 7)?,
                created_at: int(r, 8)?.unwrap_or_default(),
                uid: int(r, 9)?,
            })
        })?
        .collect();
    logs
}

/// Rows in a body [`read`] made: one line each (a newline inside a value
/// is escaped, so every raw newline ends a row).
pub fn rows_in(body: &[u8]) -> usize {
    body.iter().filter(|&&b| b == b'\n').count()
}

/// The calendar month (UTC) of `micros` since the epoch, as the hub's
/// `toYYYYMM` partitions by it.
fn month_of(micros: i64) -> i64 {
    use chrono::{Datelike, TimeZone, Utc};
    match Utc.timestamp_micros(micros).single() {
        Some(t) => i64::from(t.year()) * 100 + i64::from(t.month()),
        None => 0,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::schema;

    fn store() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("codi.db");
        let conn = schema::open_rw(&db, 1).unwrap();
        (dir, conn)
    }

    fn insert(conn: &Connection, id: i64, created_at: i64, message: &str) {
        conn.execute(
            "INSERT INTO logs (id, uuid, timestamp, level, component, session_id, message, \
             metadata, created_at, uid) VALUES (?1, ?2, ?3, 'info', 'c', NULL, ?4, '{\"a\":1.5}', \
             ?3, 7)",
            params![
                id,
                uuid::Uuid::from_u128(id as u128).as_bytes().to_vec(),
                created_at,
                message
            ],
        )
        .unwrap();
    }

    #[test]
    fn the_same_range_gives_the_same_bytes_in_the_hub_s_column_order() {
        let (_dir, conn) = store();
        let day = 1_764_700_000_000_000;
        for id in 1..=5 {
            insert(&conn, id, day + id, &format!("message \"{id}\"\n"));
        }
        let a = read(&conn, "host-1", 0, 5, 100, 1 << 20).unwrap().unwrap();
        let b = read(&conn, "host-1", 0, 5, 100, 1 << 20).unwrap().unwrap();
        assert_eq!(a, b);
        assert_eq!((a.first, a.last, rows_in(&a.body)), (1, 5, 5));
        let first = String::from_utf8(a.body.clone()).unwrap();
        let line = first.lines().next().unwrap();
        assert_eq!(
            line,
            format!(
                "{{\"host_id\":\"host-1\",\"id\":1,\"uuid\":\"00000000-0000-0000-0000-000000000001\",\
                 \"timestamp\":{t},\"level\":\"info\",\"component\":\"c\",\"session_id\":null,\
                 \"message\":\"message \\\"1\\\"\\n\",\"metadata\":\"{{\\\"a\\\":1.5}}\",\
                 \"created_at\":{t},\"uid\":7}}",
                t = day + 1
            )
        );
        assert_eq!(a.digest.len(), 64);
        assert_eq!(rows_in(&a.body), 5, "a newline in a message is escaped");
    }

    #[test]
    fn odd_values_give_one_valid_line_per_row_and_never_stop_the_batch() {
        // What a salvage from a damaged file, or a hostile client, may leave:
        // NUL and controls, bytes that are not UTF-8, a megabyte of text,
        // text where an integer belongs, a real uid, a blob uuid too short.
        let (_dir, conn) = store();
        let day = 1_764_700_000_000_000i64;
        let huge = "\u{2028}\"'\\".repeat(300_000);
        conn.execute(
            "INSERT INTO logs (id, uuid, timestamp, level, component, session_id, message, \
             metadata, created_at, uid) VALUES (1, x'0102', 'soon', ?1, x'ff00fe0a', \
             'a\nb', ?2, x'c328', ?3, 1.5)",
            params!["lvl\0\r\n", huge, day],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO logs (id, uuid, timestamp, level, component, message, created_at) \
             VALUES (2, x'00', 1, 'info', 'c', 'm', ?1)",
            [format!(" {}", day + 2)],
        )
        .unwrap();
        insert(&conn, 3, day + 3, "after");
        let b = read(&conn, "h", 0, 3, 100, 64 << 20).unwrap().unwrap();
        assert_eq!(rows_in(&b.body), 3);
        let text = std::str::from_utf8(&b.body).expect("UTF-8");
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows[0]["level"], "lvl\0\r\n");
        assert_eq!(rows[0]["component"], "\u{fffd}\0\u{fffd}\n");
        assert_eq!(rows[0]["message"].as_str().unwrap().len(), huge.len());
        assert_eq!(rows[0]["timestamp"], 0);
        assert_eq!(rows[0]["uid"], 1);
        assert_eq!(rows[1]["created_at"], day + 2);
        assert_eq!(rows[2]["message"], "after");
        conn.execute("UPDATE logs SET created_at = 'yesterday' WHERE id = 3", [])
            .unwrap();
        let b = read(&conn, "h", 2, 3, 100, 64 << 20).unwrap().unwrap();
        assert!(b.body.starts_with(b"{\"host_id\":\"h\",\"id\":3,"));
        assert_eq!(b.created_at, [0]);
    }

    #[test]
    fn a_batch_stops_at_its_bounds_and_at_a_new_month() {
        let (_dir, conn) = store();
        let nov30 = 1_764_547_200_000_000 - 1; // 2025-11-30T23:59:59.999999Z
        insert(&conn, 1, nov30 - 10, "a");
        insert(&conn, 2, nov30, "b");
        insert(&conn, 3, nov30 + 1, "december");
        insert(&conn, 4, nov30 + 2, "december too");
        let b = read(&conn, "h", 0, 10, 100, 1 << 20).unwrap().unwrap();
        assert_eq!((b.first, b.last), (1, 2), "November only");
        let b = read(&conn, "h", 2, 10, 100, 1 << 20).unwrap().unwrap();
        assert_eq!((b.first, b.last), (3, 4));
        let b = read(&conn, "h", 2, 3, 100, 1 << 20).unwrap().unwrap();
        assert_eq!((b.first, b.last), (3, 3), "not past `through`");
        let b = read(&conn, "h", 2, 10, 1, 1 << 20).unwrap().unwrap();
        assert_eq!(rows_in(&b.body), 1, "not past max_rows");
        let b = read(&conn, "h", 2, 10, 100, 10).unwrap().unwrap();
        assert_eq!(
            rows_in(&b.body),
            1,
            "at least one row, then not past max_bytes"
        );
        assert!(read(&conn, "h", 4, 10, 100, 1 << 20).unwrap().is_none());
    }

    fn session(conn: &Connection, id: &str, started_at: i64) {
        conn.execute(
            "INSERT INTO sessions (id, identity, started_at, recorded_at) VALUES (?1, 'me', ?2, ?2)",
            params![id, started_at],
        )
        .unwrap();
    }

    #[test]
    fn a_changed_row_goes_once_per_batch_in_its_latest_state() {
        let (_dir, conn) = store();
        let day = 1_764_700_000_000_000;
        session(&conn, "a", day);
        session(&conn, "b", day + 1);
        conn.execute(
            "UPDATE sessions SET ended_at = ?1 WHERE id = 'a'",
            [day + 9],
        )
        .unwrap();
        let b = read_changes(&conn, ChangeKind::Sessions, "h", 0, 100, 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!((b.first, b.last, rows_in(&b.body)), (1, 3, 2));
        let body = String::from_utf8(b.body.clone()).unwrap();
        let first = body.lines().next().unwrap();
        assert_eq!(
            first,
            format!(
                "{{\"host_id\":\"h\",\"id\":\"a\",\"identity\":\"me\",\"agent_type\":null,\
                 \"started_at\":{day},\"ended_at\":{},\"metadata\":null,\"workspace\":null,\
                 \"uid\":null,\"recorded_at\":{day},\"end_reason\":null}}",
                day + 9
            )
        );
        assert_eq!(
            read_changes(&conn, ChangeKind::Sessions, "h", 0, 100, 1 << 20).unwrap(),
            Some(b),
            "the same bytes again"
        );
        assert!(
            read_changes(&conn, ChangeKind::Exports, "h", 0, 100, 1 << 20)
                .unwrap()
                .is_none()
        );
        // After seq 1: a's end (seq 3) and b (seq 2), in the order of their
        // first change in the range.
        let b = read_changes(&conn, ChangeKind::Sessions, "h", 1, 100, 1 << 20)
            .unwrap()
            .unwrap();
        let ids: Vec<_> = String::from_utf8(b.body)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].clone())
            .collect();
        assert_eq!(ids, ["b", "a"]);
    }

    #[test]
    fn changes_stop_at_a_new_month_and_a_gone_row_sends_nothing() {
        let (_dir, conn) = store();
        let nov30 = 1_764_547_200_000_000 - 1;
        session(&conn, "nov", nov30);
        session(&conn, "dec", nov30 + 1);
        let b = read_changes(&conn, ChangeKind::Sessions, "h", 0, 100, 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(
            (b.first, b.last, rows_in(&b.body)),
            (1, 1, 1),
            "November only"
        );
        conn.execute("DELETE FROM sessions", []).unwrap();
        let b = read_changes(&conn, ChangeKind::Sessions, "h", 0, 100, 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!((b.first, b.last), (1, 2));
        assert!(b.body.is_empty(), "both rows are gone");
    }

    #[test]
    fn every_row_from_before_is_recorded_once_asked() {
        let (_dir, conn) = store();
        conn.execute(
            "INSERT INTO export_archive (original_path, archive_path, processed_at) \
             VALUES ('/w/a.md', '/arch/a', 1764700000)",
            [],
        )
        .unwrap();
        conn.execute("DELETE FROM hub_changes", []).unwrap();
        assert!(
            read_changes(&conn, ChangeKind::Exports, "h", 0, 100, 1 << 20)
                .unwrap()
                .is_none()
        );
        assert_eq!(ChangeKind::Exports.record_every_row(&conn).unwrap(), 1);
        let b = read_changes(&conn, ChangeKind::Exports, "h", 0, 100, 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(
            String::from_utf8(b.body).unwrap(),
            "{\"host_id\":\"h\",\"id\":1,\"original_path\":\"/w/a.md\",\"archive_path\":\"/arch/a\",\
             \"session_id\":null,\"file_size\":null,\"processed_at\":1764700000,\"content_hash\":null,\
             \"source_mtime_ns\":null,\"archived_at_us\":null,\"error\":null}\n"
        );
    }
}
