//! The ingest file: where new logs are committed (and acknowledged) first,
//! and how they move from there into the indexed `logs` table.
//!
//! Why two steps (for most batches): with a thousand sessions logging at
//! once, every commit to `logs` dirties one leaf page of the session index
//! per session, and SQLite writes each dirty page whole to the WAL and again
//! to the database, about 4 KiB per log. `ingest_logs` has no index but its
//! integer key, so an acknowledged commit appends a few pages for a
//! thousand logs, whatever their sessions. Its only writer keeps the uuids
//! of its rows in memory ([`PendingUuids`]) instead of a unique index,
//! which cost a fifth of the throughput. The merger thread then moves rows
//! into `logs` in large id-ordered chunks, so each session's index leaf is
//! written once per chunk instead of once per log. The two tables are in
//! separate files so that the merge never holds the lock the ingest
//! file's acknowledged commits need.
//!
//! The rules that keep every row visible exactly once:
//! - Row ids are handed out under the ingest file's write lock, above every
//!   id in either file; a row keeps its id when it
//!   moves.
//! - Rows move in id order, so `logs` always holds a prefix of the ids.
//! - A batch that costs less written straight into `logs` (rows from few
//!   sessions, or large rows) goes there only while no ingest row awaits
//!   merging, with ids the merger hands out while the writer holds the
//!   ingest file's write lock ([`super::direct`]): the prefix rule holds
//!   for it too.
//! - A row is deleted from `ingest_logs` only once its copy in `logs` is
//!   durable: not merely committed (at `synchronous=NORMAL` a commit sits
//!   unsynced in the WAL) but copied into the database file by a
//!   checkpoint that synced it ([`super::watermarks::Watermarks::durable_through`]).
//!   So at every moment, and after a power cut, it is in one file or both.
//! - A reader takes its snapshot of the ingest file before the one of the
//!   main database ([`begin_read`]) and skips ingest rows at or below the
//!   largest id of `logs` ([`VISIBLE_INGEST_ROW`]): a row merged between the two
//!   snapshots is then seen once, in `logs`.
//! - Ids are never handed out at or below the merge mark, which is
//!   recorded in the ingest file whenever merged rows are deleted.
//! - The one exception to "once": a resend that a writer without the
//!   daemon's uuid set let into the ingest file shows twice until the
//!   merge drops it and the merged rows leave the ingest file (a dropped
//!   duplicate with the largest id stays above every id in `logs` until
//!   then).
//!
//! `store::model_tests` checks these rules against random interleavings
//! of batches, merges, direct batches, `codi2` writes, checkpoints,
//! crashes, restarts and power cuts.

use super::ops::OpOutcome;
use super::LogRow;
use rusqlite::{
    params, params_from_iter, CachedStatement, Connection, OptionalExtension, ToSql, Transaction,
    TransactionBehavior,
};
use std::collections::{HashSet, VecDeque};
use std::sync::LazyLock;
use uuid::Uuid;

/// A temporary view of every stored log, with `logs`' columns: the indexed
/// table and the ingest rows not yet in it. Created by
/// [`super::schema::open_ro`]; read it inside [`begin_read`].
pub const ALL_LOGS: &str = "all_logs";

/// Visibility, defined once: the ingest rows a reader sees beside `logs`
/// are those above the largest id of `logs`; a merged row is seen in
/// `logs` only. A condition on a row of `ingest.ingest_logs`, read inside
/// [`begin_read`]; [`ALL_LOGS`] and [`super::query`] both apply it.
pub const VISIBLE_INGEST_ROW: &str = "id > (SELECT coalesce(max(id), 0) FROM main.logs)";

/// The statement creating [`ALL_LOGS`] on a connection with the ingest file
/// attached as `ingest`.
pub(super) static CREATE_ALL_LOGS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "CREATE TEMP VIEW IF NOT EXISTS {ALL_LOGS} AS SELECT * FROM main.logs UNION ALL \
         SELECT * FROM ingest.ingest_logs WHERE {VISIBLE_INGEST_ROW}"
    )
});

/// Where ids stand, seen from the ingest writer's connection (the ingest
/// file as `main`, the main database as `store`), inside its write
/// transaction: the largest id in the ingest file, and the largest id
/// merged (the largest in `logs`, or the recorded merge floor).
const ID_MARKS: &str = "SELECT coalesce((SELECT max(id) FROM main.ingest_logs), 0), \
    max(coalesce((SELECT max(id) FROM store.logs), 0), \
    coalesce((SELECT merged_floor FROM main.ingest_meta), 0))";

/// [`ID_MARKS`] seen from the merger's connection (the main database as
/// `main`, the ingest file as `ingest`), for rows written straight into
/// `logs`.
const ID_MARKS_FROM_MAIN: &str = "SELECT coalesce((SELECT max(id) FROM ingest.ingest_logs), 0), \
    max(coalesce((SELECT max(id) FROM main.logs), 0), \
    coalesce((SELECT merged_floor FROM ingest.ingest_meta), 0))";

/// Takes the ingest file's write lock on `conn` (the writer's connection)
/// without starting a snapshot of the attached main database: a
/// transaction that writes nothing, for as long as someone else hands out
/// ids (rows straight into `logs`, [`IdAllocator::for_indexed`]). Holding
/// no snapshot of the main database, it never keeps that database's WAL
/// from starting over.
pub fn lock_ids(conn: &mut Connection) -> rusqlite::Result<Transaction<'_>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
    // A write statement takes the write lock of the files it names only
    // (a BEGIN IMMEDIATE would also start a read of every attached file).
    tx.execute("DELETE FROM main.ingest_logs WHERE 0", [])?;
    Ok(tx)
}

/// [`ID_MARKS`] inside `tx`, the merged id raised to `merged_through` (the
/// merger's mark can pass the largest id in `logs` when a chunk ended in
/// a duplicate).
fn id_marks(tx: &Transaction, merged_through: i64) -> rusqlite::Result<(i64, i64)> {
    let (newest_ingest, merged): (i64, i64) = tx
        .prepare_cached(ID_MARKS)?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok((newest_ingest, merged.max(merged_through)))
}

/// Records that rows up to `?1` were merged and deleted: ids at or below
/// it must never be handed out again.
const NOTE_MERGED_FLOOR: &str = "UPDATE main.ingest_meta SET merged_floor = max(merged_floor, ?1)";

/// Inserts a row unless its uuid is in `logs`.
const INSERT: &str = "INSERT INTO main.ingest_logs \
    (uuid, timestamp, level, component, session_id, message, metadata, uid, created_at, id) \
    SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10 \
    WHERE NOT EXISTS (SELECT 1 FROM store.logs WHERE uuid = ?1)";

/// Inserts a row: for a uuid known to be above every uuid in `logs`.
const INSERT_NEWER: &str = "INSERT INTO main.ingest_logs \
    (uuid, timestamp, level, component, session_id, message, metadata, uid, created_at, id) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

/// Inserts a row into `logs` (the main database, `main` on the direct
/// writer's connection) unless its uuid is there. A clash of ids is an
/// error, never skipped: that row would be lost.
const INSERT_INDEXED: &str = "INSERT INTO main.logs \
    (uuid, timestamp, level, component, session_id, message, metadata, uid, created_at, id) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT(uuid) DO NOTHING";

/// Deletes at most `?2` of the oldest rows with ids up to `?1`.
const DELETE_MERGED: &str = "DELETE FROM main.ingest_logs WHERE id IN \
    (SELECT id FROM main.ingest_logs WHERE id <= ?1 ORDER BY id LIMIT ?2)";

/// The last id of the next chunk to merge: at most `?2` rows above `?1`.
const CHUNK_END: &str = "SELECT max(id) FROM \
    (SELECT id FROM ingest.ingest_logs WHERE id > ?1 ORDER BY id LIMIT ?2)";

/// Copies one chunk into `logs`, in id order.
const MERGE: &str = "INSERT OR IGNORE INTO main.logs \
    (id, uuid, timestamp, level, component, session_id, message, metadata, uid, created_at) \
    SELECT id, uuid, timestamp, level, component, session_id, message, metadata, uid, created_at \
    FROM ingest.ingest_logs WHERE id > ?1 AND id <= ?2 ORDER BY id";

/// The id after `id`: an error (the transaction fails, nothing is lost)
/// rather than an overflow once every id has been handed out.
fn after(id: i64) -> rusqlite::Result<i64> {
    id.checked_add(1).ok_or_else(|| {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            Some("every row id up to 2^63 - 1 has been handed out".into()),
        )
    })
}

/// Hands out row ids inside one ingest transaction.
#[derive(Debug)]
pub struct IdAllocator {
    next: i64,
}

impl IdAllocator {
    /// Reads the next free id, above `merged_through` too (the merger's
    /// mark can pass the largest id in `logs` when a chunk ended in a
    /// duplicate). Call inside the ingest write transaction: the write lock
    /// keeps anyone else from taking the same ids.
    pub fn new(tx: &Transaction, merged_through: i64) -> rusqlite::Result<Self> {
        let (newest_ingest, merged) = id_marks(tx, merged_through)?;
        Ok(IdAllocator {
            next: after(newest_ingest.max(merged))?,
        })
    }

    /// Ids for rows written straight into `logs`, read inside `tx` (the
    /// merger's write transaction of the main database, while the ingest
    /// file's write lock is held by [`lock_ids`], so that nobody else hands
    /// out ids until the rows are committed), or `None` while the ingest
    /// file holds rows not yet merged: rows with larger ids in `logs` would
    /// hide those from readers (the module's prefix rule).
    pub fn for_indexed(tx: &Transaction, merged_through: i64) -> rusqlite::Result<Option<Self>> {
        let (newest_ingest, merged): (i64, i64) = tx
            .prepare_cached(ID_MARKS_FROM_MAIN)?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let merged = merged.max(merged_through);
        if newest_ingest > merged {
            return Ok(None);
        }
        Ok(Some(IdAllocator {
            next: after(merged)?,
        }))
    }

    /// Runs `insert` (a statement taking a row's values, then its id) for
    /// `row` with the next id, which is used up only if a row was added.
    /// Returns the rows added (0 or 1).
    fn insert(
        &mut self,
        insert: &mut CachedStatement,
        row: &LogRow,
        now_us: i64,
    ) -> rusqlite::Result<usize> {
        let id = self.next;
        let values = row.values(&now_us);
        let added = insert.execute(params_from_iter(
            values.into_iter().chain([&id as &dyn ToSql]),
        ))?;
        if added > 0 {
            self.next = after(self.next)?;
        }
        Ok(added)
    }

    /// The id the last inserted row got (0 if none yet).
    pub fn last(&self) -> i64 {
        self.next - 1
    }
}

/// The uuids of the rows in the ingest table, kept by its only writer in
/// place of a unique index: a resend whose first copy is still in the
/// ingest file is found here. Changes made inside a transaction take hold
/// only when [`commit`](Self::commit) says it committed.
#[derive(Debug, Default)]
pub struct PendingUuids {
    /// Committed rows' uuids, plus those the open transaction added.
    set: HashSet<Uuid>,
    /// Committed rows, (id, uuid) in id order: merged rows are deleted
    /// oldest first.
    order: VecDeque<(i64, Uuid)>,
    /// Added by the open transaction.
    added: Vec<(i64, Uuid)>,
    /// Oldest rows the open transaction deleted.
    deleted: usize,
}

impl PendingUuids {
    /// Reads the uuids of every row in the ingest table (`main` on `conn`).
    pub fn load(conn: &Connection) -> rusqlite::Result<Self> {
        Self::load_newest(conn, i64::MAX)
    }

    /// Reads the uuids of the newest `rows` rows of the ingest table: for a
    /// writer that does not keep them (`codi2` without a daemon), which so
    /// finds a resend of a recent log; an older duplicate is dropped when
    /// the rows move into `logs`, whose uuid index is unique.
    pub fn load_newest(conn: &Connection, rows: i64) -> rusqlite::Result<Self> {
        let mut stmt = conn.prepare_cached(
            "SELECT id, uuid FROM main.ingest_logs WHERE id > \
             (SELECT coalesce(max(id), 0) FROM main.ingest_logs) - ?1 ORDER BY id",
        )?;
        let found = stmt.query_map([rows], |r| Ok((r.get(0)?, r.get::<_, Vec<u8>>(1)?)))?;
        let mut pending = PendingUuids::default();
        for row in found {
            let (id, uuid) = row?;
            // A row whose uuid is not 16 bytes (never written by this
            // program) still counts, so that deletions stay in step.
            let uuid = Uuid::from_slice(&uuid).unwrap_or(Uuid::nil());
            pending.set.insert(uuid);
            pending.order.push_back((id, uuid));
        }
        Ok(pending)
    }

    /// Forgets what a transaction that did not commit added or deleted;
    /// call as each transaction begins.
    pub fn begin(&mut self) {
        for (_, uuid) in self.added.drain(..) {
            self.set.remove(&uuid);
        }
        self.deleted = 0;
    }

    /// The open transaction committed.
    pub fn commit(&mut self) {
        for _ in 0..std::mem::take(&mut self.deleted) {
            let oldest = self.order.pop_front();
            debug_assert!(oldest.is_some(), "deleted more rows than were known");
            if let Some((_, uuid)) = oldest {
                self.set.remove(&uuid);
            }
        }
        self.order.extend(self.added.drain(..));
    }

    /// The largest committed row id known (0 if none).
    pub fn last_id(&self) -> i64 {
        self.order.back().map_or(0, |&(id, _)| id)
    }

    /// Rows in the ingest table (committed, plus added by the open
    /// transaction).
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether the ingest table holds no row.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    fn contains(&self, uuid: &Uuid) -> bool {
        self.set.contains(uuid)
    }

    fn add(&mut self, id: i64, uuid: Uuid) {
        self.set.insert(uuid);
        self.added.push((id, uuid));
    }
}

/// Inserts `rows` into the ingest table inside `tx` (an ingest writer
/// transaction), skipping rows whose uuid is already stored in either file:
/// `pending` knows the ingest file's, a lookup finds those in `logs`.
///
/// `logs_max_uuid`, if given, is at least the largest uuid in `logs` that
/// is no longer in the ingest file: a row above it skips the lookup in
/// `logs` (time-ordered UUIDv7 from live clients almost always are), since
/// such a row can only be stored in the ingest file.
pub fn insert_rows(
    tx: &Transaction,
    ids: &mut IdAllocator,
    pending: &mut PendingUuids,
    rows: &[LogRow],
    now_us: i64,
    logs_max_uuid: Option<Uuid>,
) -> rusqlite::Result<OpOutcome> {
    let mut probed = tx.prepare_cached(INSERT)?;
    let mut newer = tx.prepare_cached(INSERT_NEWER)?;
    let mut inserted = 0;
    for row in rows {
        if pending.contains(&row.uuid) {
            continue;
        }
        let insert = match logs_max_uuid {
            Some(max) if row.uuid > max => &mut newer,
            _ => &mut probed,
        };
        let id = ids.next;
        let added = ids.insert(insert, row, now_us)?;
        if added > 0 {
            pending.add(id, row.uuid);
        }
        inserted += added;
    }
    Ok(OpOutcome::Logs {
        inserted,
        duplicates: rows.len() - inserted,
    })
}

/// Inserts `rows` straight into `logs` inside `tx` (a write transaction of
/// the main database), with ids from `ids` ([`IdAllocator::for_indexed`]),
/// skipping rows whose uuid is already there.
pub fn insert_rows_indexed(
    tx: &Transaction,
    ids: &mut IdAllocator,
    rows: &[LogRow],
    now_us: i64,
) -> rusqlite::Result<OpOutcome> {
    let mut insert = tx.prepare_cached(INSERT_INDEXED)?;
    let mut inserted = 0;
    for row in rows {
        inserted += ids.insert(&mut insert, row, now_us)?;
    }
    Ok(OpOutcome::Logs {
        inserted,
        duplicates: rows.len() - inserted,
    })
}

/// Deletes at most `max_rows` ingest rows with ids up to `through` (rows
/// already committed to `logs`), telling `pending`. Returns how many it
/// deleted: fewer than `max_rows` means none up to `through` is left.
pub fn delete_merged(
    tx: &Transaction,
    through: i64,
    max_rows: usize,
    pending: &mut PendingUuids,
) -> rusqlite::Result<usize> {
    let deleted = tx
        .prepare_cached(DELETE_MERGED)?
        .execute(params![through, max_rows as i64])?;
    if deleted > 0 {
        // The merge mark can pass the largest id in `logs` (a chunk that
        // ended in duplicates); once those rows are gone, only this keeps
        // another writer (codi2 without a daemon) from reusing their ids
        // for rows the merger would then never move.
        tx.prepare_cached(NOTE_MERGED_FLOOR)?.execute([through])?;
    }
    // The oldest rows: the front of `pending.order`.
    pending.deleted += deleted;
    Ok(deleted)
}

/// What one merge step moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Merged {
    /// Rows copied into `logs`.
    pub rows: usize,
    /// Every ingest row up to this id is now in `logs` (or was a duplicate).
    pub through: i64,
}

/// The largest id in the ingest table (0 when empty), inside an ingest
/// writer's transaction.
pub fn max_ingest_id(tx: &Transaction) -> rusqlite::Result<i64> {
    tx.prepare_cached("SELECT coalesce(max(id), 0) FROM main.ingest_logs")?
        .query_row([], |r| r.get(0))
}

/// The largest uuid in `logs` (nil when empty), read on a connection to
/// the main database.
pub fn logs_max_uuid(conn: &Connection) -> rusqlite::Result<Uuid> {
    let max: Option<Vec<u8>> = conn
        .prepare_cached("SELECT max(uuid) FROM main.logs")?
        .query_row([], |r| r.get(0))?;
    Ok(max
        .and_then(|b| Uuid::from_slice(&b).ok())
        .unwrap_or(Uuid::nil()))
}

/// The largest id in `logs` (0 when empty), read on a connection to the
/// main database.
pub fn merged_floor(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT coalesce(max(id), 0) FROM main.logs")?
        .query_row([], |r| r.get(0))
}

/// Copies the next at most `max_rows` ingest rows above `floor` into `logs`
/// inside `tx` (a write transaction of the main database with the ingest
/// file attached as `ingest`). `None` when there is nothing to merge.
pub fn merge_chunk(
    tx: &Transaction,
    floor: i64,
    max_rows: usize,
) -> rusqlite::Result<Option<Merged>> {
    let end: Option<i64> = tx
        .prepare_cached(CHUNK_END)?
        .query_row(params![floor, max_rows as i64], |r| r.get(0))
        .optional()?
        .flatten();
    let Some(through) = end else {
        return Ok(None);
    };
    let rows = tx.prepare_cached(MERGE)?.execute(params![floor, through])?;
    Ok(Some(Merged { rows, through }))
}

/// Whether the ingest file (attached as `ingest` to `conn`, a connection
/// to the main database) holds a row above `floor`: a read, no lock.
pub fn holds_rows_above(conn: &Connection, floor: i64) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM ingest.ingest_logs WHERE id > ?1)")?
        .query_row([floor], |r| r.get(0))
}

/// Starts a read transaction on a connection of [`super::schema::open_ro`]
/// or [`super::schema::open_rw`], taking the ingest file's snapshot before
/// the main database's (see the module's rules). Read [`ALL_LOGS`], or
/// `logs` and the ingest rows [`VISIBLE_INGEST_ROW`] admits, inside it.
pub fn begin_read(conn: &Connection) -> rusqlite::Result<Transaction<'_>> {
    let tx = conn.unchecked_transaction()?;
    tx.prepare_cached("SELECT max(id) FROM ingest.ingest_logs")?
        .query_row([], |r| r.get::<_, Option<i64>>(0))?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::LogLevel;
    use crate::store::schema;
    use std::time::Duration;

    fn row(uuid: Uuid, session: &str) -> LogRow {
        LogRow {
            uuid,
            timestamp_us: 7,
            level: LogLevel::Info,
            component: "c".into(),
            session_id: Some(session.into()),
            message: "m".into(),
            metadata_json: None,
            uid: None,
        }
    }

    /// One ingest writer transaction, as the writer runs it.
    fn ingest(
        conn: &mut Connection,
        pending: &mut PendingUuids,
        rows: &[LogRow],
        max: Option<Uuid>,
    ) -> (OpOutcome, i64) {
        pending.begin();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        let mut ids = IdAllocator::new(&tx, 0).unwrap();
        let out = insert_rows(&tx, &mut ids, pending, rows, 1, max).unwrap();
        tx.commit().unwrap();
        pending.commit();
        (out, ids.last())
    }

    /// One ingest writer transaction deleting merged rows.
    fn delete(
        conn: &mut Connection,
        pending: &mut PendingUuids,
        through: i64,
        max: usize,
    ) -> usize {
        pending.begin();
        let tx = conn.transaction().unwrap();
        let deleted = delete_merged(&tx, through, max, pending).unwrap();
        tx.commit().unwrap();
        pending.commit();
        deleted
    }

    fn merge(conn: &mut Connection, max_rows: usize) -> Option<Merged> {
        let floor = merged_floor(conn).unwrap();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        let merged = merge_chunk(&tx, floor, max_rows).unwrap();
        tx.commit().unwrap();
        merged
    }

    fn all_ids(path: &std::path::Path) -> Vec<i64> {
        let ro = schema::open_ro(path).unwrap();
        let tx = begin_read(&ro).unwrap();
        let mut stmt = tx
            .prepare(&format!("SELECT id FROM {ALL_LOGS} ORDER BY id"))
            .unwrap();
        let ids = stmt.query_map([], |r| r.get(0)).unwrap();
        ids.map(Result::unwrap).collect()
    }

    #[test]
    fn rows_move_in_id_order_keep_their_ids_and_are_seen_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codi.db");
        let mut main = schema::open_rw(&path, 4).unwrap();
        let mut ing = schema::open_ingest_rw(&path, 4).unwrap();
        let uuids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        let rows: Vec<LogRow> = uuids.iter().map(|&u| row(u, "s")).collect();
        let mut pending = PendingUuids::default();
        assert_eq!(ingest(&mut ing, &mut pending, &rows[..3], None).1, 3);
        assert_eq!(all_ids(&path), [1, 2, 3]);

        let merged = merge(&mut main, 2).unwrap();
        assert_eq!(
            merged,
            Merged {
                rows: 2,
                through: 2
            }
        );
        assert_eq!(
            all_ids(&path),
            [1, 2, 3],
            "merged but not yet deleted: once"
        );

        // A resend of a merged row and of an unmerged one is skipped, with
        // or without the newest merged uuid (the merged one is not above
        // it, the unmerged one is in `pending`); new
        // rows get ids above both files.
        let max = logs_max_uuid(&main).unwrap();
        assert_eq!(max, uuids[1]);
        let resend = [rows[0].clone(), rows[2].clone()];
        for known in [None, Some(max)] {
            let (out, _) = ingest(&mut ing, &mut pending, &resend, known);
            assert_eq!(
                out,
                OpOutcome::Logs {
                    inserted: 0,
                    duplicates: 2
                }
            );
        }
        let (_, last) = ingest(&mut ing, &mut pending, &rows[3..4], Some(max));
        assert_eq!(last, 4);
        assert_eq!(pending.len(), 4);

        assert_eq!(delete(&mut ing, &mut pending, 2, 1), 1, "bounded");
        assert_eq!(delete(&mut ing, &mut pending, 2, 10), 1);
        assert_eq!(pending.len(), 2, "the deleted rows' uuids are gone");
        assert_eq!(all_ids(&path), [1, 2, 3, 4]);
        // Deleted from the ingest file, a merged row's resend is found in
        // `logs`.
        let (out, _) = ingest(&mut ing, &mut pending, &rows[..1], Some(max));
        assert_eq!(
            out,
            OpOutcome::Logs {
                inserted: 0,
                duplicates: 1
            }
        );

        assert_eq!(
            merge(&mut main, 100),
            Some(Merged {
                rows: 2,
                through: 4
            })
        );
        assert_eq!(merge(&mut main, 100), None);
        assert_eq!(delete(&mut ing, &mut pending, 4, 100), 2);
        assert!(pending.is_empty());

        // With the ingest table empty, ids continue above the main table.
        let (_, last) = ingest(&mut ing, &mut pending, &rows[4..], None);
        assert_eq!(last, 5);
        assert_eq!(all_ids(&path), [1, 2, 3, 4, 5]);
        let in_logs: i64 = main
            .query_row("SELECT count(*) FROM logs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(in_logs, 4);
    }

    #[test]
    fn ids_stay_above_the_merge_mark_and_checkpoints_skip_attached_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codi.db");
        let main = schema::open_rw(&path, 4).unwrap();
        let mut ing = schema::open_ingest_rw(&path, 4).unwrap();
        ing.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        let tx = ing.transaction().unwrap();
        let ids = IdAllocator::new(&tx, 41).unwrap();
        assert_eq!(ids.last(), 41, "the next id is 42");
        drop(tx);
        // The ingest file now has WAL frames not yet copied back; the main
        // connection (which attaches it read-only) checkpoints its own file.
        ingest(
            &mut ing,
            &mut PendingUuids::default(),
            &[row(Uuid::now_v7(), "s")],
            None,
        );
        let result = crate::store::wal::checkpoint(&main, "PASSIVE").unwrap();
        assert!(!result.busy);
        crate::store::wal::checkpoint(&ing, "PASSIVE").unwrap();
    }

    /// Writes `rows` straight into `logs` as the writer and the merger do:
    /// ids handed out on the merger's connection under the ingest file's
    /// lock. `None` if the ingest file holds unmerged rows.
    fn insert_indexed(
        main: &mut Connection,
        ing: &mut Connection,
        rows: &[LogRow],
    ) -> Option<(OpOutcome, i64)> {
        let _lock = lock_ids(ing).unwrap();
        let tx = main
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        let mut ids = IdAllocator::for_indexed(&tx, 0).unwrap()?;
        let out = insert_rows_indexed(&tx, &mut ids, rows, 1).unwrap();
        tx.commit().unwrap();
        Some((out, ids.last()))
    }

    #[test]
    fn the_id_lock_keeps_other_writers_out_and_holds_no_snapshot_of_logs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codi.db");
        let mut main = schema::open_rw(&path, 4).unwrap();
        let mut ing = schema::open_ingest_rw(&path, 4).unwrap();
        let rows: Vec<LogRow> = (0..2).map(|_| row(Uuid::now_v7(), "s")).collect();
        insert_indexed(&mut main, &mut ing, &rows[..1]).unwrap();
        let lock = lock_ids(&mut ing).unwrap();

        let mut other = schema::open_ingest_rw(&path, 4).unwrap();
        other.busy_timeout(Duration::ZERO).unwrap();
        let busy = other
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap_err();
        assert_eq!(
            busy.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy)
        );

        // Rows committed into `logs` meanwhile, and the WAL can start over:
        // the lock's holder reads nothing of the main database. (A BEGIN
        // IMMEDIATE there would hold a snapshot, and the RESTART would be
        // busy.)
        let tx = main
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        let mut ids = IdAllocator::for_indexed(&tx, 0).unwrap().unwrap();
        insert_rows_indexed(&tx, &mut ids, &rows[1..], 1).unwrap();
        tx.commit().unwrap();
        let restart = crate::store::wal::checkpoint(&main, "RESTART").unwrap();
        assert!(!restart.busy, "{restart:?}");
        assert_eq!(restart.backfilled, restart.log_frames);
        drop(lock);
    }

    #[test]
    fn rows_go_straight_into_logs_only_above_every_merged_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codi.db");
        let mut main = schema::open_rw(&path, 4).unwrap();
        let mut ing = schema::open_ingest_rw(&path, 4).unwrap();
        let rows: Vec<LogRow> = (0..4).map(|_| row(Uuid::now_v7(), "s")).collect();
        let (out, last) = insert_indexed(&mut main, &mut ing, &rows[..2]).unwrap();
        assert_eq!(
            (out, last),
            (
                OpOutcome::Logs {
                    inserted: 2,
                    duplicates: 0
                },
                2
            )
        );

        let mut pending = PendingUuids::default();
        assert_eq!(ingest(&mut ing, &mut pending, &rows[2..3], None).1, 3);
        assert!(
            insert_indexed(&mut main, &mut ing, &rows[3..]).is_none(),
            "row 3 awaits merging: a larger id in logs would hide it"
        );
        assert_eq!(all_ids(&path), [1, 2, 3]);

        merge(&mut main, 10).unwrap();
        let again = [rows[0].clone(), rows[2].clone(), rows[3].clone()];
        let (out, last) = insert_indexed(&mut main, &mut ing, &again).unwrap();
        assert_eq!(
            (out, last),
            (
                OpOutcome::Logs {
                    inserted: 1,
                    duplicates: 2
                },
                4
            ),
            "resends of rows from either path are skipped; ids continue above the merged ones"
        );
        assert_eq!(all_ids(&path), [1, 2, 3, 4]);
    }

    #[test]
    fn read_only_uri_escapes_special_characters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("we?ird #dir%").join("codi.db");
        let mut ing = {
            drop(schema::open_rw(&path, 4).unwrap());
            schema::open_ingest_rw(&path, 4).unwrap()
        };
        ingest(
            &mut ing,
            &mut PendingUuids::default(),
            &[row(Uuid::now_v7(), "s")],
            None,
        );
        assert_eq!(all_ids(&path), [1]);
    }

    #[test]
    fn ids_of_merged_duplicates_are_never_handed_out_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codi.db");
        let mut main = schema::open_rw(&path, 4).unwrap();
        let mut ing = schema::open_ingest_rw(&path, 4).unwrap();
        let mut daemon = PendingUuids::default();
        let rows: Vec<LogRow> = (0..2).map(|_| row(Uuid::now_v7(), "s")).collect();
        ingest(&mut ing, &mut daemon, &rows, None);
        // A writer that does not know every uuid (codi2 without a daemon)
        // lets a resend in: it is the newest row, id 3.
        let (_, last) = ingest(&mut ing, &mut PendingUuids::default(), &rows[1..], None);
        assert_eq!(last, 3);
        // The merge drops it, so the mark (3) passes the largest id in
        // `logs` (2); then the rows are deleted from the ingest file.
        assert_eq!(
            merge(&mut main, 100),
            Some(Merged {
                rows: 2,
                through: 3
            })
        );
        // (The writer rereads its uuids once it sees another process's row.)
        daemon = PendingUuids::load(&ing).unwrap();
        assert_eq!(daemon.last_id(), 3);
        assert_eq!(delete(&mut ing, &mut daemon, 3, 100), 3);
        assert!(daemon.is_empty());
        // The next row must get an id above the mark, or the merger (whose
        // floor is the mark) would never move it.
        let fresh = row(Uuid::now_v7(), "s");
        let (_, id) = ingest(
            &mut ing,
            &mut PendingUuids::default(),
            std::slice::from_ref(&fresh),
            None,
        );
        assert_eq!(id, 4);
        let tx = main.transaction().unwrap();
        let moved = merge_chunk(&tx, 3, 100).unwrap();
        tx.commit().unwrap();
        assert_eq!(
            moved,
            Some(Merged {
                rows: 1,
                through: 4
            })
        );
    }

    #[test]
    fn pending_uuids_follow_commits_and_rollbacks_and_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codi.db");
        drop(schema::open_rw(&path, 4).unwrap());
        let mut ing = schema::open_ingest_rw(&path, 4).unwrap();
        let mut pending = PendingUuids::default();
        let first = row(Uuid::now_v7(), "s");
        // Twice in one batch: stored once.
        let (out, _) = ingest(
            &mut ing,
            &mut pending,
            &[first.clone(), first.clone()],
            None,
        );
        assert_eq!(
            out,
            OpOutcome::Logs {
                inserted: 1,
                duplicates: 1
            }
        );

        // A transaction that rolls back leaves no uuid behind.
        let second = row(Uuid::now_v7(), "s");
        pending.begin();
        {
            let tx = ing.transaction().unwrap();
            let mut ids = IdAllocator::new(&tx, 0).unwrap();
            insert_rows(
                &tx,
                &mut ids,
                &mut pending,
                std::slice::from_ref(&second),
                1,
                None,
            )
            .unwrap();
            assert_eq!(pending.len(), 2);
        }
        let (out, _) = ingest(&mut ing, &mut pending, std::slice::from_ref(&second), None);
        assert_eq!(
            out,
            OpOutcome::Logs {
                inserted: 1,
                duplicates: 0
            }
        );
        let third = row(Uuid::now_v7(), "s");
        ingest(&mut ing, &mut pending, std::slice::from_ref(&third), None);

        // A restarted writer reads them back; codi2 reads the newest.
        assert_eq!(PendingUuids::load(&ing).unwrap().len(), 3);
        let mut newest = PendingUuids::load_newest(&ing, 2).unwrap();
        assert_eq!(newest.len(), 2);
        let (out, _) = ingest(&mut ing, &mut newest, &[second, third], None);
        assert_eq!(
            out,
            OpOutcome::Logs {
                inserted: 0,
                duplicates: 2
            }
        );
    }
}
