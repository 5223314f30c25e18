//! The writer's transaction body: log rows go into the ingest file, and
//! each transaction first deletes some rows the merger has moved and the
//! main database has made durable.

use crate::store::ingest::{self, IdAllocator, PendingUuids};
use crate::store::ops::OpOutcome;
use crate::store::tx::{JobResult, TxBody};
use crate::store::watermarks::Watermarks;
use crate::store::WriteOp;
use rusqlite::{Connection, Transaction, TransactionBehavior};
use std::sync::Arc;
use uuid::Uuid;

/// Most rows the ingest file holds before new logs are refused: reached
/// only while the merger is stalled (the writer waits for it below
/// [`MAX_UNMERGED_ROWS`]); bounds [`PendingUuids`] at about 40 MiB.
///
/// [`MAX_UNMERGED_ROWS`]: crate::store::merger::MAX_UNMERGED_ROWS
pub(in crate::store) const MAX_PENDING_ROWS: usize = 1 << 20;

/// Merged rows deleted from the ingest file at shutdown per transaction.
const FINAL_DELETE_ROWS: usize = 65_536;

/// Log rows go into the ingest table, after deleting some rows the merger
/// has already moved and the main database has synced.
pub(in crate::store) struct IngestBody {
    pub(super) state: Arc<Watermarks>,
    /// The merge mark read before the current transaction began.
    mark: (i64, Uuid),
    /// Ingest rows up to this id may be deleted: the durable mark read
    /// before the current transaction began.
    deletable: i64,
    ids: Option<IdAllocator>,
    /// Merged rows the next transaction may delete.
    delete_rows: usize,
    /// Every ingest row up to here is gone once the current transaction
    /// commits: its deletions left none up to the durable mark.
    deleted_through: Option<i64>,
    /// The uuids in the ingest table.
    pending: PendingUuids,
    /// The largest ingest id this writer knows of: a larger one means a
    /// `codi2` without a daemon wrote too, and `pending` is read again.
    last_own_id: i64,
    /// Rows the ingest file may hold before logs are refused
    /// ([`MAX_PENDING_ROWS`]).
    max_pending: usize,
}

impl IngestBody {
    /// The writer's body for an ingest file holding the rows in `pending`,
    /// of which this writer knows ids up to `last_own_id`; logs are refused
    /// once it holds `max_pending` rows.
    pub(in crate::store) fn new(
        state: Arc<Watermarks>,
        pending: PendingUuids,
        last_own_id: i64,
        max_pending: usize,
    ) -> Self {
        IngestBody {
            state,
            mark: (0, Uuid::nil()),
            deletable: 0,
            ids: None,
            delete_rows: 0,
            deleted_through: None,
            pending,
            last_own_id,
            max_pending,
        }
    }

    /// Lets the next transaction delete at most `rows` rows already in
    /// `logs` on disk.
    pub(in crate::store) fn delete_at_most(&mut self, rows: usize) {
        self.delete_rows = rows;
    }

    /// Starts `pending` on the transaction `tx`, reading it again if
    /// another process wrote rows meanwhile: deletions must know every row.
    fn begin_pending(&mut self, tx: &Transaction) -> rusqlite::Result<()> {
        self.pending.begin();
        let newest = ingest::max_ingest_id(tx)?;
        if newest > self.last_own_id {
            log::info!("another process wrote logs into the ingest file; rereading their ids");
            self.pending = PendingUuids::load(tx)?;
            self.last_own_id = newest;
        }
        Ok(())
    }

    /// Deletes every ingest row that is in `logs` on disk, in transactions
    /// of at most [`FINAL_DELETE_ROWS`] on `conn` (the writer's).
    pub(in crate::store) fn delete_all_durable(&mut self, conn: &mut Connection) {
        let through = self.state.durable_through();
        let result = (|| loop {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            self.begin_pending(&tx)?;
            let deleted =
                ingest::delete_merged(&tx, through, FINAL_DELETE_ROWS, &mut self.pending)?;
            tx.commit()?;
            self.pending.commit();
            if deleted < FINAL_DELETE_ROWS {
                self.state.note_ingest_deleted(through);
                return Ok::<_, rusqlite::Error>(());
            }
        })();
        if let Err(e) = result {
            log::warn!(
                "cannot delete merged rows from the ingest file (the writer will after \
                 the next start): {e}"
            );
        }
    }
}

impl TxBody for IngestBody {
    fn before(&mut self) {
        // Read before BEGIN: the transaction's snapshot of `logs` (taken at
        // BEGIN) then holds every row merged up to this mark, which the
        // id floor and the skipped uuid lookups rely on.
        self.mark = self.state.merged_mark();
        // Never the merge mark: a merge may still be only in the main
        // database's WAL, and a power cut would lose a row deleted here.
        self.deletable = self.state.durable_through();
    }

    fn begin(&mut self, tx: &Transaction) -> rusqlite::Result<()> {
        let (through, _) = self.mark;
        self.begin_pending(tx)?;
        let deleted =
            ingest::delete_merged(tx, self.deletable, self.delete_rows, &mut self.pending)?;
        // Fewer than asked for: none up to the mark is left.
        self.deleted_through = (deleted < self.delete_rows).then_some(self.deletable);
        self.ids = Some(IdAllocator::new(tx, through)?);
        Ok(())
    }

    fn apply(&mut self, tx: &Transaction, op: &WriteOp, now_us: i64) -> JobResult {
        match (op, self.ids.as_mut()) {
            (WriteOp::Logs(_), _) if self.pending.len() >= self.max_pending => {
                Ok(OpOutcome::Rejected(format!(
                    "storage is not keeping up: {} logs wait to be moved into the indexed \
                     table, which has taken none for a while (see the daemon's log)",
                    self.pending.len()
                )))
            }
            (WriteOp::Logs(rows), Some(ids)) => {
                ingest::insert_rows(tx, ids, &mut self.pending, rows, now_us, Some(self.mark.1))
            }
            _ => Ok(OpOutcome::Rejected(
                "internal: only logs go to the ingest file".into(),
            )),
        }
    }

    fn committed(&mut self) {
        self.pending.commit();
        if let Some(through) = self.deleted_through.take() {
            self.state.note_ingest_deleted(through);
        }
        if let Some(ids) = self.ids.take() {
            self.last_own_id = self.last_own_id.max(ids.last());
            self.state.note_committed(ids.last());
        }
    }
}
