//! One batch of logs for the hub: an id range of `logs`, read and
//! serialised deterministically, so that the same range always gives the
//! same bytes (fixed column order, serde_json's fixed number and string
//! formatting, nothing left to the hub's defaults) and a re-sent batch is
//! one ClickHouse drops as a duplicate block.

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// A batch ready to send: its id range, body ([`rows_in`] counts its rows)
/// and digest.
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
    /// `created_at` of its last row (microseconds), for the sync lag.
    pub newest_created_at: i64,
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
    let mut stmt = conn.prepare_cached(
        "SELECT id, uuid, timestamp, level, component, session_id, message, metadata, \
         created_at, uid FROM main.logs WHERE id > ?1 AND id <= ?2 ORDER BY id LIMIT ?3",
    )?;
    let mut rows = stmt.query(params![after, through, max_rows as i64])?;
    let mut body = Vec::new();
    let (mut first, mut last, mut count, mut newest, mut month) = (0, 0, 0, 0, None);
    while let Some(r) = rows.next()? {
        let created_at: i64 = r.get(8)?;
        let row_month = month_of(created_at);
        if *month.get_or_insert(row_month) != row_month {
            break;
        }
        let log = HubLog {
            host_id,
            id: r.get(0)?,
            uuid: uuid_text(r, 1)?,
            timestamp: r.get(2)?,
            level: text(r, 3)?.unwrap_or_default(),
            component: text(r, 4)?.unwrap_or_default(),
            session_id: text(r, 5)?,
            message: text(r, 6)?.unwrap_or_default(),
            metadata: text(r, 7)?,
            created_at,
            uid: r.get(9)?,
        };
        let line = serde_json::to_vec(&log).expect("a log serialises");
        if count > 0 && body.len() + line.len() + 1 > max_bytes {
            break;
        }
        body.extend_from_slice(&line);
        body.push(b'\n');
        if count == 0 {
            first = log.id;
        }
        last = log.id;
        newest = created_at;
        count += 1;
    }
    if count == 0 {
        return Ok(None);
    }
    let digest = hex(&Sha256::digest(&body));
    Ok(Some(Batch {
        first,
        last,
        body,
        digest,
        newest_created_at: newest,
    }))
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
}
