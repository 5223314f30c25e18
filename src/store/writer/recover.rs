//! Start-up recovery: where the ingest file and `logs` stand when the
//! writer starts, read from the files before any thread runs.

use crate::store::ingest::{self, PendingUuids};
use crate::store::watermarks::Watermarks;
use crate::store::StoreError;
use rusqlite::{Connection, TransactionBehavior};
use uuid::Uuid;

/// Reads where the ingest file and `logs` stand (after a crash the ingest
/// file may hold rows not yet merged, and merged rows not yet deleted) and
/// the uuids of the ingest file's rows.
///
/// Merged rows stay: their copies in `logs` may be only in the main
/// database's WAL, which nothing has synced (the daemon may have been
/// killed right after the merge). The writer deletes them once the main
/// database's checkpointer has made them durable, as it does while
/// running.
pub(in crate::store) fn recover(
    conn: &mut Connection,
    logs_max_uuid: Uuid,
) -> Result<(Watermarks, PendingUuids), StoreError> {
    let merged: i64 = conn.query_row("SELECT coalesce(max(id), 0) FROM store.logs", [], |r| {
        r.get(0)
    })?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let pending = PendingUuids::load(&tx)?;
    let committed = ingest::max_ingest_id(&tx)?;
    tx.commit()?;
    if committed > merged {
        log::info!(
            "{} logs committed before the last stop are not yet in the indexed table; merging them",
            committed - merged
        );
    }
    Ok((Watermarks::new(committed, merged, logs_max_uuid), pending))
}
