//! `QueryLogs`: the filter turned into parameterised SQL, and the answer
//! trimmed to fit one frame.
//!
//! Values are always bound as parameters; only the fixed fragments below
//! are ever pasted into SQL text.

use super::{ingest, metadata, StoreError};
use crate::proto::{LogFilter, LogLevel, Message, Payload, StoredLog, Timestamp, MAX_FRAME_LEN};
use rusqlite::types::{Type, Value as SqlValue};
use rusqlite::{params_from_iter, Connection, Row};
use std::io;
use uuid::Uuid;

/// Most entries one answer may hold; larger limits are capped to this.
pub const MAX_QUERY_LIMIT: u64 = 10_000;

/// Bytes kept free below [`MAX_FRAME_LEN`] besides the measured envelope,
/// for encoding differences between the measured and the final message.
const FRAME_SAFETY_MARGIN: usize = 256;

const COLUMNS: &str = "id, uuid, timestamp, level, component, session_id, message, metadata";

/// Runs `filter`: returns the selected entries (in answer order) and the
/// number of all matches.
///
/// Without `after_id`: the newest `limit` matches, oldest first. With
/// `after_id`: the oldest `limit` matches stored after that row id, and the
/// count covers only rows after it. `limit` is capped at
/// [`MAX_QUERY_LIMIT`]; 0 only counts.
pub fn run_query(
    conn: &Connection,
    filter: &LogFilter,
    limit: u64,
) -> Result<(Vec<StoredLog>, u64), StoreError> {
    if filter.after_id.is_some_and(|id| id < 0) {
        return Err(StoreError::InvalidFilter(
            "after_id must not be negative".into(),
        ));
    }
    let limit = limit.min(MAX_QUERY_LIMIT);
    let (clause, params) = where_clause(filter);
    // One read transaction, so the count and the entries agree; it reads
    // the indexed table and the ingest rows not yet merged into it.
    let tx = ingest::begin_read(conn)?;
    let floor = ingest::merged_floor(&tx)?;
    let ingest_clause = format!(
        "{clause}{} id > ?",
        if clause.is_empty() { " WHERE" } else { " AND" }
    );
    let mut both: Vec<SqlValue> = params.iter().chain(params.iter()).cloned().collect();
    both.push(SqlValue::Integer(floor));
    let total: i64 = tx
        .prepare_cached(&format!(
            "SELECT (SELECT COUNT(*) FROM main.logs{clause}) + \
             (SELECT COUNT(*) FROM ingest.ingest_logs{ingest_clause})"
        ))?
        .query_row(params_from_iter(both.iter()), |r| r.get(0))?;
    let mut entries = Vec::new();
    if limit > 0 {
        let order = if filter.after_id.is_some() {
            "id ASC"
        } else {
            "timestamp DESC, id DESC"
        };
        // Each side picks its own first `limit` rows (`logs` through its
        // indexes), so that neither is read in full to sort the union.
        // The ingest rows have no index: for the newest ones they are read
        // newest id first (kept in that order by the `LIMIT -1`), so the
        // top-`limit` sorter keeps its first rows and skips nearly every
        // later one. Read oldest first, each row would be newer than all
        // kept so far and replace one: 4x the time (docs/PERFORMANCE.md).
        let ingest_rows = if filter.after_id.is_some() {
            format!("SELECT {COLUMNS} FROM ingest.ingest_logs{ingest_clause}")
        } else {
            format!(
                "SELECT * FROM (SELECT {COLUMNS} FROM ingest.ingest_logs{ingest_clause} \
                 ORDER BY id DESC LIMIT -1)"
            )
        };
        let sql = format!(
            "SELECT * FROM (SELECT {COLUMNS} FROM main.logs{clause} ORDER BY {order} LIMIT ?) \
             UNION ALL \
             SELECT * FROM ({ingest_rows} ORDER BY {order} LIMIT ?) ORDER BY {order} LIMIT ?"
        );
        let limit = SqlValue::Integer(limit as i64);
        let values: Vec<SqlValue> = params
            .iter()
            .cloned()
            .chain([limit.clone()])
            .chain(params.iter().cloned())
            .chain([SqlValue::Integer(floor), limit.clone(), limit])
            .collect();
        let mut stmt = tx.prepare_cached(&sql)?;
        let rows = stmt.query_map(params_from_iter(values.iter()), stored_log)?;
        for row in rows {
            entries.push(row?);
        }
        if filter.after_id.is_none() {
            entries.reverse();
        }
    }
    drop(tx);
    Ok((entries, total.max(0) as u64))
}

/// The `WHERE` text (with a leading space, or empty) and its parameters,
/// in placeholder order.
fn where_clause(filter: &LogFilter) -> (String, Vec<SqlValue>) {
    let mut clause = String::new();
    let mut params = Vec::new();
    let mut add = |condition: &str, values: &mut dyn Iterator<Item = SqlValue>| {
        clause.push_str(if clause.is_empty() {
            " WHERE "
        } else {
            " AND "
        });
        clause.push_str(condition);
        params.extend(values);
    };
    if let Some(min) = filter.min_level {
        let levels: Vec<LogLevel> = LogLevel::ALL.into_iter().filter(|l| *l >= min).collect();
        let marks = vec!["?"; levels.len()].join(", ");
        add(
            &format!("level IN ({marks})"),
            &mut levels.iter().map(|l| SqlValue::Text(l.as_str().into())),
        );
    }
    if let Some(component) = &filter.component {
        add(
            "component = ?",
            &mut std::iter::once(SqlValue::Text(component.clone())),
        );
    }
    if let Some(session) = &filter.session_id {
        add(
            "session_id = ?",
            &mut std::iter::once(SqlValue::Text(session.clone())),
        );
    }
    if let Some(since) = filter.since {
        add(
            "timestamp >= ?",
            &mut std::iter::once(SqlValue::Integer(since.as_micros())),
        );
    }
    if let Some(until) = filter.until {
        add(
            "timestamp < ?",
            &mut std::iter::once(SqlValue::Integer(until.as_micros())),
        );
    }
    if let Some(text) = &filter.contains {
        add(
            "instr(message, ?) > 0",
            &mut std::iter::once(SqlValue::Text(text.clone())),
        );
    }
    if let Some(after) = filter.after_id {
        add("id > ?", &mut std::iter::once(SqlValue::Integer(after)));
    }
    (clause, params)
}

fn conversion<E>(column: usize, ty: Type) -> impl FnOnce(E) -> rusqlite::Error
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    move |e| rusqlite::Error::FromSqlConversionFailure(column, ty, e.into())
}

fn stored_log(r: &Row) -> rusqlite::Result<StoredLog> {
    let uuid = Uuid::from_slice(r.get_ref(1)?.as_blob()?).map_err(conversion(1, Type::Blob))?;
    let level = r
        .get_ref(3)?
        .as_str()?
        .parse::<LogLevel>()
        .map_err(conversion(3, Type::Text))?;
    let metadata = r.get_ref(7)?.as_str_or_null()?.map(metadata::from_json);
    Ok(StoredLog {
        id: r.get(0)?,
        uuid,
        timestamp: Timestamp::from_micros(r.get(2)?),
        level,
        component: r.get(4)?,
        session_id: r.get(5)?,
        message: r.get(6)?,
        metadata,
    })
}

/// Counts bytes written, to measure an encoding without keeping it.
struct ByteCounter(usize);

impl io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn encoded_len<T: serde::Serialize>(value: &T) -> usize {
    let mut counter = ByteCounter(0);
    match rmp_serde::encode::write_named(&mut counter, value) {
        Ok(()) => counter.0,
        Err(_) => usize::MAX,
    }
}

/// Drops entries until a `LogResults` answer holding them encodes within
/// [`MAX_FRAME_LEN`]: the oldest ones (the front) when `keep_newest`,
/// otherwise the last ones (follow mode keeps the first rows after its
/// cursor, so the client resumes where the answer stops).
pub fn fit_to_frame(entries: &mut Vec<StoredLog>, keep_newest: bool) {
    let envelope = encoded_len(&Message::new(Payload::LogResults {
        entries: Vec::new(),
        total_count: u64::MAX,
    }));
    // An array header grows from 1 to at most 5 bytes with its length.
    let Some(mut room) = MAX_FRAME_LEN.checked_sub(envelope + 4 + FRAME_SAFETY_MARGIN) else {
        entries.clear();
        return;
    };
    let mut fits = |entry: &StoredLog| {
        let len = encoded_len(entry);
        if len <= room {
            room -= len;
            true
        } else {
            false
        }
    };
    if keep_newest {
        let kept = entries.iter().rev().take_while(|e| fits(e)).count();
        let dropped = entries.len() - kept;
        entries.drain(..dropped);
    } else {
        let kept = entries.iter().take_while(|e| fits(e)).count();
        entries.truncate(kept);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{encode_message, frame_body_len, HEADER_LEN};
    use crate::store::{ops, schema, LogRow, WriteOp};

    struct Db {
        _dir: tempfile::TempDir,
        conn: Connection,
    }

    /// Rows (timestamp, level, component, session, message), stored in
    /// this order so that ids are 1, 2, 3...
    fn db(rows: &[(i64, LogLevel, &str, Option<&str>, &str)]) -> Db {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = schema::open_rw(&dir.path().join("q.db"), 4).unwrap();
        let rows = rows
            .iter()
            .map(|(ts, level, component, session, message)| LogRow {
                uuid: Uuid::new_v4(),
                timestamp_us: *ts,
                level: *level,
                component: (*component).into(),
                session_id: session.map(str::to_owned),
                message: (*message).into(),
                metadata_json: Some(format!(r#"{{"ts":{ts}}}"#)),
            })
            .collect();
        let tx = conn.transaction().unwrap();
        ops::apply(&tx, &WriteOp::Logs(rows), 0).unwrap();
        tx.commit().unwrap();
        Db { _dir: dir, conn }
    }

    fn sample() -> Db {
        use LogLevel::*;
        db(&[
            (100, Trace, "build", Some("s1"), "compiling foo"),
            (300, Debug, "build", Some("s1"), "compiled foo"),
            (200, Info, "test", Some("s2"), "running Tests"),
            (400, Warn, "test", None, "slow test"),
            (500, Error, "deploy", Some("s2"), "deploy failed"),
            (300, Info, "build", None, "cache hit"),
        ])
    }

    fn ids(db: &Db, filter: &LogFilter, limit: u64) -> (Vec<i64>, u64) {
        let (entries, total) = run_query(&db.conn, filter, limit).unwrap();
        (entries.iter().map(|e| e.id).collect(), total)
    }

    #[test]
    fn the_newest_rows_come_from_both_files_in_order() {
        use crate::store::ingest::{self, IdAllocator, PendingUuids};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let mut conn = schema::open_rw(&path, 4).unwrap();
        let row = |ts: i64| LogRow {
            uuid: Uuid::now_v7(),
            timestamp_us: ts,
            level: LogLevel::Info,
            component: "c".into(),
            session_id: None,
            message: format!("at {ts}"),
            metadata_json: None,
        };
        // Ids 1-3 in `logs`, 4-7 still in the ingest file; timestamps
        // interleave across the two, and two ingest rows tie.
        let tx = conn.transaction().unwrap();
        ops::apply(&tx, &WriteOp::Logs(vec![row(100), row(400), row(250)]), 0).unwrap();
        tx.commit().unwrap();
        let mut ing = schema::open_ingest_rw(&path, 4).unwrap();
        let tx = ing.transaction().unwrap();
        let mut alloc = IdAllocator::new(&tx, 0).unwrap();
        let waiting = [row(300), row(50), row(500), row(300)];
        ingest::insert_rows(
            &tx,
            &mut alloc,
            &mut PendingUuids::default(),
            &waiting,
            0,
            None,
        )
        .unwrap();
        tx.commit().unwrap();
        let db = Db { _dir: dir, conn };
        // Newest by timestamp (500, 400, then the later 300), oldest first.
        assert_eq!(ids(&db, &LogFilter::default(), 3), (vec![7, 2, 6], 7));
        assert_eq!(ids(&db, &LogFilter::default(), 4), (vec![4, 7, 2, 6], 7));
        assert_eq!(ids(&db, &LogFilter::default(), 1), (vec![6], 7));
        // Paging by id crosses from one file into the other.
        let after = LogFilter {
            after_id: Some(1),
            ..LogFilter::default()
        };
        assert_eq!(ids(&db, &after, 3), (vec![2, 3, 4], 6));
    }

    #[test]
    fn newest_matches_oldest_first_with_ties_by_id() {
        let db = sample();
        let all = LogFilter::default();
        // Timestamp order: 1(100) 3(200) 2(300) 6(300) 4(400) 5(500).
        assert_eq!(ids(&db, &all, 100), (vec![1, 3, 2, 6, 4, 5], 6));
        assert_eq!(ids(&db, &all, 3), (vec![6, 4, 5], 6));
        assert_eq!(ids(&db, &all, 0), (vec![], 6), "limit 0 only counts");
    }

    #[test]
    fn each_filter_key() {
        let db = sample();
        let cases: Vec<(LogFilter, Vec<i64>)> = vec![
            (
                LogFilter {
                    min_level: Some(LogLevel::Info),
                    ..LogFilter::default()
                },
                vec![3, 6, 4, 5],
            ),
            (
                LogFilter {
                    min_level: Some(LogLevel::Trace),
                    ..LogFilter::default()
                },
                vec![1, 3, 2, 6, 4, 5],
            ),
            (
                LogFilter {
                    component: Some("build".into()),
                    ..LogFilter::default()
                },
                vec![1, 2, 6],
            ),
            (
                LogFilter {
                    session_id: Some("s2".into()),
                    ..LogFilter::default()
                },
                vec![3, 5],
            ),
            (
                LogFilter {
                    since: Some(Timestamp::from_micros(300)),
                    ..LogFilter::default()
                },
                vec![2, 6, 4, 5],
            ),
            (
                LogFilter {
                    until: Some(Timestamp::from_micros(300)),
                    ..LogFilter::default()
                },
                vec![1, 3],
            ),
            (
                LogFilter {
                    since: Some(Timestamp::from_micros(500)),
                    until: Some(Timestamp::from_micros(100)),
                    ..LogFilter::default()
                },
                vec![],
            ),
            (
                LogFilter {
                    contains: Some("compil".into()),
                    ..LogFilter::default()
                },
                vec![1, 2],
            ),
            (
                LogFilter {
                    contains: Some("tests".into()),
                    ..LogFilter::default()
                },
                vec![],
            ),
            (
                LogFilter {
                    contains: Some("Tests".into()),
                    ..LogFilter::default()
                },
                vec![3],
            ),
            (
                LogFilter {
                    contains: Some("%".into()),
                    ..LogFilter::default()
                },
                vec![],
            ),
            (
                LogFilter {
                    component: Some("build".into()),
                    min_level: Some(LogLevel::Debug),
                    since: Some(Timestamp::from_micros(300)),
                    ..LogFilter::default()
                },
                vec![2, 6],
            ),
            (
                LogFilter {
                    component: Some("x' OR '1'='1".into()),
                    ..LogFilter::default()
                },
                vec![],
            ),
        ];
        for (filter, want) in cases {
            let total = want.len() as u64;
            assert_eq!(ids(&db, &filter, 100), (want, total), "{filter:?}");
        }
    }

    #[test]
    fn after_id_returns_the_oldest_rows_after_the_cursor() {
        let db = sample();
        let after = |id, min_level| LogFilter {
            after_id: Some(id),
            min_level,
            ..LogFilter::default()
        };
        assert_eq!(ids(&db, &after(2, None), 100), (vec![3, 4, 5, 6], 4));
        assert_eq!(ids(&db, &after(2, None), 2), (vec![3, 4], 4));
        assert_eq!(
            ids(&db, &after(0, Some(LogLevel::Warn)), 100),
            (vec![4, 5], 2)
        );
        assert_eq!(ids(&db, &after(6, None), 100), (vec![], 0));
        assert!(matches!(
            run_query(&db.conn, &after(-1, None), 1),
            Err(StoreError::InvalidFilter(_))
        ));
    }

    #[test]
    fn entries_carry_every_field() {
        let db = sample();
        let filter = LogFilter {
            component: Some("deploy".into()),
            ..LogFilter::default()
        };
        let (entries, _) = run_query(&db.conn, &filter, 10).unwrap();
        let e = &entries[0];
        assert_eq!(e.id, 5);
        assert_eq!(e.timestamp, Timestamp::from_micros(500));
        assert_eq!(e.level, LogLevel::Error);
        assert_eq!(e.session_id.as_deref(), Some("s2"));
        assert_eq!(e.message, "deploy failed");
        assert_eq!(
            e.metadata,
            Some(rmpv::Value::Map(vec![("ts".into(), 500.into())]))
        );
    }

    #[test]
    fn limit_is_capped() {
        let rows: Vec<_> = (0..MAX_QUERY_LIMIT as i64 + 5)
            .map(|i| (i, LogLevel::Info, "c", None, "m"))
            .collect();
        let db = db(&rows);
        let (entries, total) = run_query(&db.conn, &LogFilter::default(), u64::MAX).unwrap();
        assert_eq!(entries.len() as u64, MAX_QUERY_LIMIT);
        assert_eq!(total, MAX_QUERY_LIMIT + 5);
        assert_eq!(entries.last().unwrap().id, MAX_QUERY_LIMIT as i64 + 5);
    }

    fn big(id: i64, len: usize) -> StoredLog {
        StoredLog {
            id,
            uuid: Uuid::new_v4(),
            timestamp: Timestamp::from_micros(id),
            level: LogLevel::Info,
            component: "c".into(),
            session_id: Some("s".into()),
            message: "x".repeat(len),
            metadata: Some(rmpv::Value::Binary(vec![7; 100])),
        }
    }

    fn encodes_in_one_frame(entries: Vec<StoredLog>) -> usize {
        let msg = Message::new(Payload::LogResults {
            entries,
            total_count: 5,
        });
        let mut out = Vec::new();
        encode_message(&msg, &mut out).expect("fits in one frame");
        frame_body_len(&out).unwrap().unwrap() + HEADER_LEN
    }

    #[test]
    fn fit_to_frame_keeps_newest_or_first() {
        let all: Vec<_> = (1..=5).map(|i| big(i, 300_000)).collect();
        let mut newest = all.clone();
        fit_to_frame(&mut newest, true);
        assert_eq!(newest.iter().map(|e| e.id).collect::<Vec<_>>(), [3, 4, 5]);
        encodes_in_one_frame(newest);

        let mut first = all.clone();
        fit_to_frame(&mut first, false);
        assert_eq!(first.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2, 3]);
        encodes_in_one_frame(first);

        let mut small: Vec<_> = (1..=5).map(|i| big(i, 10)).collect();
        fit_to_frame(&mut small, true);
        assert_eq!(small.len(), 5, "nothing dropped when it fits");
    }

    #[test]
    fn fit_to_frame_near_the_limit_still_encodes() {
        // Many small entries filling the frame almost exactly.
        let mut many: Vec<_> = (1..=20_000).map(|i| big(i, 40)).collect();
        fit_to_frame(&mut many, true);
        assert!(many.len() < 20_000);
        assert_eq!(many.last().unwrap().id, 20_000);
        let len = encodes_in_one_frame(many);
        assert!(len > MAX_FRAME_LEN - 4096, "frame well used: {len}");
    }

    #[test]
    fn fit_to_frame_drops_an_entry_too_big_for_any_frame() {
        let mut huge = vec![big(1, 10), big(2, MAX_FRAME_LEN)];
        fit_to_frame(&mut huge, true);
        assert!(
            huge.is_empty(),
            "the newest cannot fit, so nothing older may"
        );
        let mut huge = vec![big(1, 10), big(2, MAX_FRAME_LEN)];
        fit_to_frame(&mut huge, false);
        assert_eq!(huge.len(), 1);
    }
}
