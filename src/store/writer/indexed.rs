//! Batches straight into `logs`: a batch whose rows come from few sessions
//! skips the ingest file and commits into the indexed table at once, when
//! no ingest row awaits merging.

use crate::store::ingest::{self, IdAllocator};
use crate::store::merger::MergeState;
use crate::store::tx::JobResult;
use crate::store::{schema, LogRow, WriteJob, WriteOp};
use rusqlite::{Connection, TransactionBehavior};
use std::collections::HashSet;
use std::time::Duration;
use uuid::Uuid;

/// Bytes SQLite writes for one index leaf page a commit dirties.
const INDEX_PAGE_BYTES: usize = schema::PAGE_SIZE as usize;

/// How long a batch bound straight for `logs` waits for the main
/// database's lock (a session change, an export row, a WAL restart) before
/// it goes to the ingest file instead: acknowledgments never wait long.
pub(super) const INDEXED_LOCK_WAIT: Duration = Duration::from_millis(200);

/// Commits `jobs` (log jobs only) straight into `logs` in one transaction
/// on `indexed`, with ids handed out under the ingest file's write lock,
/// taken on `ingest` and held (having written nothing) until the rows are
/// committed, so that nobody else hands out ids meanwhile, and publishes
/// the rows as merged in `state`. Returns each job's outcome, or `None`
/// when the ingest file holds rows not yet merged (see
/// [`IdAllocator::for_indexed`]).
pub(in crate::store) fn insert_indexed(
    ingest: &mut Connection,
    indexed: &mut Connection,
    jobs: &[WriteJob],
    state: &MergeState,
    now_us: i64,
) -> rusqlite::Result<Option<Vec<JobResult>>> {
    let (merged_through, _) = state.merged_mark();
    let lock = ingest.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(mut ids) = IdAllocator::for_indexed(&lock, merged_through)? else {
        return Ok(None);
    };
    let tx = indexed.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut newest = Uuid::nil();
    for job in jobs {
        let WriteOp::Logs(rows) = &job.op else {
            return Ok(None);
        };
        newest = rows.iter().map(|r| r.uuid).fold(newest, std::cmp::max);
        outcomes.push(Ok(ingest::insert_rows_indexed(
            &tx, &mut ids, rows, now_us,
        )?));
    }
    tx.commit()?;
    drop(lock);
    if ids.last() > merged_through {
        state.note_merged(ids.last(), newest);
    }
    Ok(Some(outcomes))
}

/// Whether a batch of log jobs costs less written straight into `logs` than
/// through the ingest file: when its rows come from so few sessions that
/// the session-index leaves they dirty (about one page each per commit)
/// weigh less than the rows' own bytes, which the ingest file writes twice.
pub(super) fn prefers_indexed(jobs: &[WriteJob]) -> bool {
    let rows = || {
        jobs.iter().flat_map(|job| match &job.op {
            WriteOp::Logs(rows) => rows.as_slice(),
            _ => &[],
        })
    };
    let bytes: usize = rows().map(LogRow::stored_len).sum();
    let most_sessions = bytes / INDEX_PAGE_BYTES;
    let mut sessions = HashSet::new();
    for row in rows() {
        if sessions.insert(row.session_id.as_deref()) && sessions.len() > most_sessions {
            return false;
        }
    }
    !sessions.is_empty()
}
