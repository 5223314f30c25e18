//! `QueryLogs`: the filter turned into parameterised SQL, and the answer
//! streamed into one frame.
//!
//! An answer is built in two steps inside one read transaction. The first
//! statement picks the ids of the rows to answer, at most `limit`, in
//! reading order (newest first for a normal query, oldest first after an
//! `after_id`); it sorts only ids and timestamps. (Sorting whole rows, as
//! the union of the two files needs, made SQLite read and hold up to twice
//! `limit` rows, however large, before handing out the first.) The second
//! step reads the picked rows one at a time by id, converts each to its
//! answer encoding and appends it, and stops as soon as the next would not
//! fit in the frame or [`MAX_QUERY_READ_BYTES`] of stored text have been
//! read: rows past that point are never read, and no more than one row is
//! ever held decoded.
//!
//! A row stored within [`MAX_ROW_BYTES`] (every row built since that bound)
//! comes back whole when its answer fits an empty frame. One that does not
//! (a row stored before the bound, or one whose answer encoding is much
//! larger than its stored JSON) comes back **cut**: its message shortened
//! to [`TRUNCATED_MESSAGE_BYTES`], its component and session id to
//! [`MAX_NAME_LEN`], and its metadata replaced by
//! `{"$truncated": <stored bytes of the row>}`. A row over the bound is cut
//! without its metadata ever being read. So no row can hide the rows older
//! than it from a query, or keep a follower's cursor from moving past it.
//!
//! Values are always bound as parameters; only the fixed fragments below
//! are ever pasted into SQL text.

use super::{ingest, metadata, StoreError, MAX_NAME_LEN, MAX_ROW_BYTES};
use crate::proto::{
    encode_log_results, EncodeError, LogFilter, LogLevel, StoredLog, Timestamp, HEADER_LEN,
    MAX_FRAME_LEN,
};
use rusqlite::types::{Type, Value as SqlValue};
use rusqlite::{params, params_from_iter, Connection, Row};
use std::sync::LazyLock;
use uuid::Uuid;

/// Most entries one answer may hold; larger limits are capped to this.
pub const MAX_QUERY_LIMIT: u64 = 10_000;

/// Stored text (component, session id, message, metadata) one query reads
/// at most: twice a frame, so rows whose stored JSON is much larger than
/// their answer (escapes, long integers) cannot make one query read and
/// decode without bound. At least one row is always read.
pub const MAX_QUERY_READ_BYTES: usize = 2 * 1024 * 1024;

/// Longest message a cut entry keeps (see the module docs).
pub const TRUNCATED_MESSAGE_BYTES: usize = 64 * 1024;

/// The columns the first step sorts by; each side adds a third, whether
/// the row is in the ingest file.
const KEY_COLUMNS: &str = "id, timestamp";

/// A row's stored text bytes. `octet_length` of a column reads only the
/// record's header, never the text itself.
const ROW_LEN: &str = "(octet_length(component) + coalesce(octet_length(session_id), 0) \
     + octet_length(message) + coalesce(octet_length(metadata), 0))";

/// The second step's statement for `table`: one row by id (`?1`); a row
/// whose text exceeds `?2` bytes comes with its component and session id
/// cut to `?3` characters, its message to `?4`, and no metadata, so that
/// none of its large values is loaded.
fn fetch_sql(table: &str) -> String {
    let len = ROW_LEN;
    format!(
        "SELECT id, uuid, timestamp, level, {len}, \
         CASE WHEN {len} > ?2 THEN substr(component, 1, ?3) ELSE component END, \
         CASE WHEN {len} > ?2 THEN substr(session_id, 1, ?3) ELSE session_id END, \
         CASE WHEN {len} > ?2 THEN substr(message, 1, ?4) ELSE message END, \
         CASE WHEN {len} > ?2 THEN NULL ELSE metadata END, uid \
         FROM {table} WHERE id = ?1"
    )
}

static FETCH_MAIN: LazyLock<String> = LazyLock::new(|| fetch_sql("main.logs"));
static FETCH_INGEST: LazyLock<String> = LazyLock::new(|| fetch_sql("ingest.ingest_logs"));

/// The entries picked for one `LogResults` answer, each already in its
/// answer encoding, and the count of all matches.
#[derive(Debug, Default)]
pub struct Selection {
    /// The entries' encodings, one after another in reading order.
    encoded: Vec<u8>,
    /// Where each entry ends in `encoded`.
    ends: Vec<usize>,
    /// Read newest first (a normal query): the answer lists them reversed.
    newest_first: bool,
    /// How many logs match the filter in all.
    pub total_count: u64,
    /// Rows read from the database (the entries, and at most one more that
    /// did not fit).
    pub rows_read: usize,
    /// Stored text bytes read.
    pub bytes_read: usize,
    /// Entries cut to fit (see the module docs).
    pub rows_cut: usize,
}

impl Selection {
    /// Entries in the answer.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when the answer holds no entry.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Each entry's encoding, in answer order (oldest first).
    fn spans(&self) -> Vec<&[u8]> {
        let mut start = 0;
        let mut spans: Vec<&[u8]> = self
            .ends
            .iter()
            .map(|&end| {
                let span = &self.encoded[start..end];
                start = end;
                span
            })
            .collect();
        if self.newest_first {
            spans.reverse();
        }
        spans
    }

    /// Appends the whole `LogResults` frame (header included) to `out`.
    pub fn encode_frame(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        encode_log_results(
            Uuid::now_v7(),
            Timestamp::now(),
            self.spans().into_iter(),
            self.total_count,
            out,
        )
    }

    /// The entries decoded, in answer order.
    pub fn entries(&self) -> Vec<StoredLog> {
        self.spans()
            .into_iter()
            .map(|span| rmp_serde::from_slice(span).expect("an entry `select` encoded"))
            .collect()
    }
}

/// Runs `filter` and returns the selected entries (in answer order) and
/// the number of all matches, decoded: [`select`] for callers that want
/// values (`codi2` without a daemon, tests, benchmarks).
pub fn run_query(
    conn: &Connection,
    filter: &LogFilter,
    limit: u64,
) -> Result<(Vec<StoredLog>, u64), StoreError> {
    let selection = select(conn, filter, limit)?;
    Ok((selection.entries(), selection.total_count))
}

/// Whose logs a query may match besides what its filter says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Writers {
    /// Anyone's (the filter's `uid`, if any, narrows it).
    #[default]
    Any,
    /// Only logs with no uid: written over TCP, or before uids were stored.
    NoUid,
}

/// Runs `filter` over anyone's logs: [`select_by`] with [`Writers::Any`].
pub fn select(conn: &Connection, filter: &LogFilter, limit: u64) -> Result<Selection, StoreError> {
    select_by(conn, filter, Writers::Any, limit)
}

/// Runs `filter` over the logs of `writers`: picks the entries of its
/// answer and counts all matches.
///
/// Without `after_id`: the newest `limit` matches, oldest first. With
/// `after_id`: the oldest `limit` matches stored after that row id, and the
/// count covers only rows after it. `limit` is capped at
/// [`MAX_QUERY_LIMIT`]; 0 only counts. Entries are read in that order until
/// the next would not fit in one frame or [`MAX_QUERY_READ_BYTES`] are read,
/// so the answer keeps the newest (normal) or the first (after `after_id`)
/// of them, and always holds at least one entry when anything matches.
pub fn select_by(
    conn: &Connection,
    filter: &LogFilter,
    writers: Writers,
    limit: u64,
) -> Result<Selection, StoreError> {
    if filter.after_id.is_some_and(|id| id < 0) {
        return Err(StoreError::InvalidFilter(
            "after_id must not be negative".into(),
        ));
    }
    let limit = limit.min(MAX_QUERY_LIMIT);
    let (clause, params) = where_clause(filter, writers);
    // One read transaction, so the count and the entries agree; it reads
    // the indexed table and the ingest rows not yet merged into it.
    let tx = ingest::begin_read(conn)?;
    let ingest_clause = format!(
        "{clause}{} {}",
        if clause.is_empty() { " WHERE" } else { " AND" },
        ingest::VISIBLE_INGEST_ROW
    );
    let both: Vec<SqlValue> = params.iter().chain(params.iter()).cloned().collect();
    let total: i64 = tx
        .prepare_cached(&format!(
            "SELECT (SELECT COUNT(*) FROM main.logs{clause}) + \
             (SELECT COUNT(*) FROM ingest.ingest_logs{ingest_clause})"
        ))?
        .query_row(params_from_iter(both.iter()), |r| r.get(0))?;
    let mut selection = Selection {
        newest_first: filter.after_id.is_none(),
        total_count: total.max(0) as u64,
        ..Selection::default()
    };
    if limit == 0 {
        return Ok(selection);
    }
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
        format!("SELECT {KEY_COLUMNS}, 1 FROM ingest.ingest_logs{ingest_clause}")
    } else {
        format!(
            "SELECT * FROM (SELECT {KEY_COLUMNS}, 1 FROM ingest.ingest_logs{ingest_clause} \
             ORDER BY id DESC LIMIT -1)"
        )
    };
    let sql = format!(
        "SELECT * FROM (SELECT {KEY_COLUMNS}, 0 FROM main.logs{clause} ORDER BY {order} LIMIT ?) \
         UNION ALL \
         SELECT * FROM ({ingest_rows} ORDER BY {order} LIMIT ?) ORDER BY {order} LIMIT ?"
    );
    let limit = SqlValue::Integer(limit as i64);
    let values: Vec<SqlValue> = params
        .iter()
        .cloned()
        .chain([limit.clone()])
        .chain(params.iter().cloned())
        .chain([limit.clone(), limit])
        .collect();
    let mut keys = tx.prepare_cached(&sql)?;
    let mut fetch_main = tx.prepare_cached(&FETCH_MAIN)?;
    let mut fetch_ingest = tx.prepare_cached(&FETCH_INGEST)?;
    let empty_frame_room = entry_room();
    let mut room = empty_frame_room;
    let mut picked = keys.query(params_from_iter(values.iter()))?;
    while let Some(key) = picked.next()? {
        if selection.bytes_read >= MAX_QUERY_READ_BYTES {
            break;
        }
        let id: i64 = key.get(0)?;
        let fetch = if key.get(2)? {
            &mut fetch_ingest
        } else {
            &mut fetch_main
        };
        let args = params![
            id,
            MAX_ROW_BYTES as i64,
            MAX_NAME_LEN as i64,
            TRUNCATED_MESSAGE_BYTES as i64
        ];
        let mut entry = fetch.query_row(args, fetched)?;
        selection.rows_read += 1;
        selection.bytes_read += entry.loaded;
        let start = selection.encoded.len();
        let mut len = append(&mut selection.encoded, &entry.log);
        if entry.over || len > empty_frame_room {
            selection.encoded.truncate(start);
            cut(&mut entry);
            selection.rows_cut += 1;
            len = append(&mut selection.encoded, &entry.log);
        }
        if len > room {
            selection.encoded.truncate(start);
            break;
        }
        room -= len;
        selection.ends.push(selection.encoded.len());
    }
    drop(picked);
    drop(keys);
    drop(fetch_main);
    drop(fetch_ingest);
    drop(tx);
    Ok(selection)
}

/// Bytes the entries of one `LogResults` frame may take: the frame less
/// the envelope with the largest `total_count`, and 4 more for the entries
/// array's header, which grows from 1 to at most 5 bytes with its length.
fn entry_room() -> usize {
    let mut envelope = Vec::new();
    encode_log_results(
        Uuid::nil(),
        Timestamp::now(),
        std::iter::empty(),
        u64::MAX,
        &mut envelope,
    )
    .expect("an empty answer fits");
    (MAX_FRAME_LEN + HEADER_LEN).saturating_sub(envelope.len() + 4)
}

/// Appends `log`'s answer encoding to `out`; returns its length.
fn append(out: &mut Vec<u8>, log: &StoredLog) -> usize {
    let start = out.len();
    match rmp_serde::encode::write_named(out, log) {
        Ok(()) => out.len() - start,
        Err(_) => {
            out.truncate(start);
            usize::MAX
        }
    }
}

/// A row as the second step read it.
struct Fetched {
    log: StoredLog,
    /// Its stored text bytes.
    stored: usize,
    /// Text bytes actually loaded (less than `stored` for a cut row).
    loaded: usize,
    /// Over [`MAX_ROW_BYTES`]: read already cut, its metadata not at all.
    over: bool,
}

/// Turns `row` into the answer's cut form (module docs).
fn cut(row: &mut Fetched) {
    let log = &mut row.log;
    truncate_at_char(&mut log.message, TRUNCATED_MESSAGE_BYTES);
    truncate_at_char(&mut log.component, MAX_NAME_LEN);
    if let Some(session) = &mut log.session_id {
        truncate_at_char(session, MAX_NAME_LEN);
    }
    log.metadata = Some(rmpv::Value::Map(vec![(
        metadata::TRUNCATED_KEY.into(),
        rmpv::Value::from(row.stored as u64),
    )]));
}

fn truncate_at_char(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// The `WHERE` text (with a leading space, or empty) and its parameters,
/// in placeholder order.
fn where_clause(filter: &LogFilter, writers: Writers) -> (String, Vec<SqlValue>) {
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
    if let Some(uid) = filter.uid {
        add(
            "uid = ?",
            &mut std::iter::once(SqlValue::Integer(i64::from(uid))),
        );
    }
    if writers == Writers::NoUid {
        add("uid IS NULL", &mut std::iter::empty());
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

/// Reads a row of [`fetch_sql`]; a row within the bound has its metadata
/// decoded (at most [`MAX_ROW_BYTES`] of JSON).
fn fetched(r: &Row) -> rusqlite::Result<Fetched> {
    let uuid = Uuid::from_slice(r.get_ref(1)?.as_blob()?).map_err(conversion(1, Type::Blob))?;
    let level = r
        .get_ref(3)?
        .as_str()?
        .parse::<LogLevel>()
        .map_err(conversion(3, Type::Text))?;
    let stored = usize::try_from(r.get::<_, i64>(4)?).unwrap_or(0);
    let component: String = r.get(5)?;
    let session_id: Option<String> = r.get(6)?;
    let message: String = r.get(7)?;
    let json = r.get_ref(8)?.as_str_or_null()?;
    let loaded = component.len()
        + session_id.as_ref().map_or(0, String::len)
        + message.len()
        + json.map_or(0, str::len);
    Ok(Fetched {
        log: StoredLog {
            id: r.get(0)?,
            uuid,
            timestamp: Timestamp::from_micros(r.get(2)?),
            level,
            component,
            session_id,
            message,
            metadata: json.map(metadata::from_json),
            uid: r.get(9)?,
        },
        stored,
        loaded,
        over: stored > MAX_ROW_BYTES,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{frame_body_len, Payload};
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
                uid: None,
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
            uid: None,
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
        // `u64::MAX` as an SQLite LIMIT would be -1, no limit at all.
        let rows: Vec<_> = (0..MAX_QUERY_LIMIT as i64 + 5)
            .map(|i| (i, LogLevel::Info, "c", None, "m"))
            .collect();
        let db = db(&rows);
        let s = select(&db.conn, &LogFilter::default(), u64::MAX).unwrap();
        assert_eq!(s.total_count, MAX_QUERY_LIMIT + 5);
        assert!(s.rows_read <= MAX_QUERY_LIMIT as usize);
        assert_eq!(s.entries().last().unwrap().id, MAX_QUERY_LIMIT as i64 + 5);
    }

    /// A `logs` row stamped `ts` with this message and stored metadata
    /// text, built directly (as rows stored before the row bound were).
    fn raw(ts: i64, message: String, metadata_json: Option<String>) -> LogRow {
        LogRow {
            uuid: Uuid::new_v4(),
            timestamp_us: ts,
            level: LogLevel::Info,
            component: "c".into(),
            session_id: Some("s".into()),
            message,
            metadata_json,
            uid: None,
        }
    }

    /// A database holding `rows` in `logs`, with ids 1, 2, 3...
    fn db_of(rows: Vec<LogRow>) -> Db {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = schema::open_rw(&dir.path().join("q.db"), 4).unwrap();
        let tx = conn.transaction().unwrap();
        ops::apply(&tx, &WriteOp::Logs(rows), 0).unwrap();
        tx.commit().unwrap();
        Db { _dir: dir, conn }
    }

    fn picked(selection: &Selection) -> Vec<i64> {
        selection.entries().iter().map(|e| e.id).collect()
    }

    /// The frame encodes within the limit and decodes to the same entries.
    fn frame_holds(selection: &Selection) -> usize {
        let mut frame = Vec::new();
        selection
            .encode_frame(&mut frame)
            .expect("fits in one frame");
        let len = frame_body_len(&frame).unwrap().unwrap();
        assert_eq!(frame.len(), HEADER_LEN + len);
        let msg = crate::proto::decode_message(&frame[HEADER_LEN..]).unwrap();
        match msg.payload {
            Payload::LogResults {
                entries,
                total_count,
            } => {
                assert_eq!(entries, selection.entries());
                assert_eq!(total_count, selection.total_count);
            }
            other => panic!("{other:?}"),
        }
        len
    }

    #[test]
    fn answers_keep_the_newest_or_the_first_rows_that_fit() {
        let db = db_of((1..=5).map(|i| raw(i, "x".repeat(300_000), None)).collect());
        let newest = select(&db.conn, &LogFilter::default(), 100).unwrap();
        assert_eq!(picked(&newest), [3, 4, 5]);
        assert_eq!(newest.total_count, 5);
        // Read newest first: 5, 4, 3 went in, 2 did not fit, 1 was never read.
        assert_eq!(newest.rows_read, 4);
        frame_holds(&newest);

        let follow = LogFilter {
            after_id: Some(0),
            ..LogFilter::default()
        };
        let first = select(&db.conn, &follow, 100).unwrap();
        assert_eq!(picked(&first), [1, 2, 3]);
        assert_eq!(first.rows_read, 4);
        frame_holds(&first);

        let db = db_of((1..=5).map(|i| raw(i, "x".repeat(10), None)).collect());
        let small = select(&db.conn, &LogFilter::default(), 100).unwrap();
        assert_eq!(
            picked(&small),
            [1, 2, 3, 4, 5],
            "nothing dropped when it fits"
        );
    }

    #[test]
    fn reading_stops_at_the_full_frame_not_at_the_limit() {
        // 200 rows of 100 KB and a limit of 200: about ten fit, and only
        // one more is ever read.
        let db = db_of(
            (1..=200)
                .map(|i| raw(i, "y".repeat(100_000), None))
                .collect(),
        );
        let s = select(&db.conn, &LogFilter::default(), 200).unwrap();
        assert_eq!(s.len(), 10);
        assert_eq!(s.rows_read, 11);
        assert_eq!(picked(&s), (191..=200).collect::<Vec<_>>());
        assert!(s.bytes_read < 1_200_000, "{}", s.bytes_read);
    }

    #[test]
    fn a_full_frame_is_well_used_and_still_encodes() {
        let rows = (1..=MAX_QUERY_LIMIT as i64)
            .map(|i| raw(i, format!("{i:06} {}", "m".repeat(100)), None))
            .collect();
        let db = db_of(rows);
        let s = select(&db.conn, &LogFilter::default(), MAX_QUERY_LIMIT).unwrap();
        assert!(s.len() < MAX_QUERY_LIMIT as usize);
        assert_eq!(
            s.entries().last().unwrap().id,
            MAX_QUERY_LIMIT as i64,
            "the newest are kept"
        );
        let len = frame_holds(&s);
        assert!(len > MAX_FRAME_LEN - 512, "frame well used: {len}");
    }

    #[test]
    fn rows_too_large_to_answer_come_back_cut_and_hide_nothing() {
        // Stored before the row bound: a 700 KB message and 3.4 MB of
        // binary metadata as an array of byte values.
        let legacy_json = format!("[{}255]", "255,".repeat(850_000));
        let legacy = raw(2, "L".repeat(700_000), Some(legacy_json.clone()));
        let legacy_len = "c".len() + "s".len() + 700_000 + legacy_json.len();
        // Within the bound, but its answer is twice its JSON: 120,000
        // floats of 4 bytes stored, 9 bytes each as MessagePack.
        let floats = format!("[{}1.5]", "1.5,".repeat(119_999));
        let floats_len = "c".len() + "s".len() + "floats".len() + floats.len();
        assert!(floats_len < MAX_ROW_BYTES);
        let db = db_of(vec![
            raw(1, "old".into(), Some(r#"{"k":1}"#.into())),
            legacy,
            raw(3, "floats".into(), Some(floats)),
            raw(4, "new".into(), None),
        ]);
        let s = select(&db.conn, &LogFilter::default(), 10).unwrap();
        assert_eq!(picked(&s), [1, 2, 3, 4], "nothing older is hidden");
        assert_eq!(s.rows_cut, 2);
        // The legacy row's metadata was never read, its message only in
        // part (the floats row was read whole).
        assert!(s.bytes_read < floats_len + 100_000, "{}", s.bytes_read);
        let entries = s.entries();
        let marker = |n: usize| {
            Some(rmpv::Value::Map(vec![(
                "$truncated".into(),
                rmpv::Value::from(n as u64),
            )]))
        };
        assert_eq!(entries[1].message, "L".repeat(TRUNCATED_MESSAGE_BYTES));
        assert_eq!(entries[1].metadata, marker(legacy_len));
        assert_eq!(entries[2].message, "floats");
        assert_eq!(entries[2].metadata, marker(floats_len));
        assert_eq!(
            entries[0].metadata,
            Some(rmpv::Value::Map(vec![("k".into(), 1.into())]))
        );
        frame_holds(&s);

        // A follower's cursor moves past the legacy row.
        let after = |id| LogFilter {
            after_id: Some(id),
            ..LogFilter::default()
        };
        let s = select(&db.conn, &after(1), 1).unwrap();
        assert_eq!(picked(&s), [2]);
        let s = select(&db.conn, &after(2), 10).unwrap();
        assert_eq!(picked(&s), [3, 4]);
    }

    #[test]
    fn cut_names_and_messages_end_on_a_character() {
        let mut row = raw(1, "é".repeat(700_000), None);
        row.component = "ü".repeat(1000);
        row.session_id = Some("ß".repeat(1000));
        let db = db_of(vec![row]);
        let s = select(&db.conn, &LogFilter::default(), 1).unwrap();
        let e = &s.entries()[0];
        assert_eq!(e.message.len(), TRUNCATED_MESSAGE_BYTES);
        assert_eq!(e.component.len(), MAX_NAME_LEN);
        assert_eq!(e.session_id.as_ref().unwrap().len(), MAX_NAME_LEN);
    }

    #[test]
    fn reading_stops_after_max_query_read_bytes() {
        // 400 KB of JSON escapes per row, 66 KB of answer each: ten would
        // fit in a frame, but reading stops once 2 MiB are read.
        let escapes = format!("\"{}\"", "\\u0000".repeat(66_666));
        let db = db_of(
            (1..=10)
                .map(|i| raw(i, "e".into(), Some(escapes.clone())))
                .collect(),
        );
        let s = select(&db.conn, &LogFilter::default(), 10).unwrap();
        assert_eq!(s.len(), 6);
        assert_eq!(s.rows_read, 6);
        assert!(s.bytes_read >= MAX_QUERY_READ_BYTES);
        assert_eq!(picked(&s), [5, 6, 7, 8, 9, 10]);
        assert_eq!(s.rows_cut, 0);
    }
}
