//! Where a log id stands on its way through storage: one [`Watermarks`]
//! shared by every thread that moves a mark, so that the rules between the
//! marks are stated, and checked, in one place.
//!
//! Every mark is a log id and only ever grows. In order along a log's way:
//!
//! | mark | every log at or below it is | moved by |
//! |---|---|---|
//! | `committed` | committed (an id handed out and kept) | the writer, after each commit to the ingest file; a merge or a direct batch raises it too |
//! | `merged` | in `logs` (perhaps only in the main database's WAL) | the merger, after each merge or direct batch |
//! | `durable` | in `logs` on disk (a checkpoint synced it) | the main database's checkpointer |
//! | `ingest_deleted` | gone from the ingest file | the writer, after a transaction that deleted every merged row up to it |
//! | `shipped` | acknowledged by the hub | hub sync, after the record of a batch |
//!
//! The rules ([`Marks::hold`] checks them; the storage model test calls it
//! after every step): `durable <= merged <= committed`, since a row is
//! made durable in `logs` only once it is there and in `logs` only once
//! committed; `ingest_deleted <= durable`, the ordering rule (a row leaves
//! the ingest file only once its copy in `logs` is on disk, or a power cut
//! could take it from both); `shipped <= merged`, since hub sync reads
//! `logs` only up to the merged mark (rows in the ingest file may still be
//! joined below it by a `codi2` without a daemon).

use parking_lot::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use uuid::Uuid;

/// The marks shared by the writer, the merger, the main database's
/// checkpointer and hub sync (see the module doc).
#[derive(Debug, Default)]
pub struct Watermarks {
    committed: AtomicI64,
    merged: AtomicI64,
    durable: AtomicI64,
    ingest_deleted: AtomicI64,
    shipped: AtomicI64,
    /// The largest uuid in `logs` as of (at least) `merged`.
    logs_max_uuid: Mutex<Uuid>,
}

/// The marks at one moment, for checks and for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marks {
    /// Every log up to here is committed.
    pub committed: i64,
    /// Every log up to here is in `logs`.
    pub merged: i64,
    /// Every log up to here is in `logs` on disk.
    pub durable: i64,
    /// Every log up to here has left the ingest file.
    pub ingest_deleted: i64,
    /// Every log up to here is at the hub.
    pub shipped: i64,
}

impl Marks {
    /// Whether the marks keep the rules of the module doc; the first one
    /// broken otherwise.
    pub fn hold(&self) -> Result<(), String> {
        let rules = [
            ("durable <= merged", self.durable <= self.merged),
            ("merged <= committed", self.merged <= self.committed),
            (
                "ingest_deleted <= durable",
                self.ingest_deleted <= self.durable,
            ),
            ("shipped <= merged", self.shipped <= self.merged),
        ];
        match rules.iter().find(|(_, holds)| !holds) {
            Some((rule, _)) => Err(format!("{rule} is broken: {self:?}")),
            None => Ok(()),
        }
    }
}

impl Watermarks {
    /// The marks of a store whose ingest file holds ids up to `committed`
    /// and whose `logs` table holds ids up to `merged` and uuids up to
    /// `max_uuid`.
    ///
    /// Nothing is durable yet: the rows in `logs` may still be only in the
    /// main database's WAL, unsynced, until its checkpointer has run; nor
    /// deleted or shipped, until the writer and hub sync say so.
    pub fn new(committed: i64, merged: i64, max_uuid: Uuid) -> Self {
        Watermarks {
            committed: AtomicI64::new(committed.max(merged)),
            merged: AtomicI64::new(merged),
            logs_max_uuid: Mutex::new(max_uuid),
            ..Watermarks::default()
        }
    }

    /// Every mark, each read once (marks read at different instants: a
    /// later one may have moved past an earlier one's reading, so they are
    /// read from the last along a log's way to the first).
    pub fn marks(&self) -> Marks {
        let shipped = self.shipped.load(Ordering::Acquire);
        let ingest_deleted = self.ingest_deleted.load(Ordering::Acquire);
        let durable = self.durable.load(Ordering::Acquire);
        let merged = self.merged.load(Ordering::Acquire);
        let committed = self.committed.load(Ordering::Acquire);
        Marks {
            committed,
            merged,
            durable,
            ingest_deleted,
            shipped,
        }
    }

    /// Every ingest row up to the returned id is in `logs`, and no uuid in
    /// `logs` from those rows is above the returned uuid.
    pub fn merged_mark(&self) -> (i64, Uuid) {
        let through = self.merged.load(Ordering::Acquire);
        (through, *self.logs_max_uuid.lock())
    }

    /// Records a commit of the ingest writer up to `id`.
    pub fn note_committed(&self, id: i64) {
        self.committed.fetch_max(id, Ordering::Release);
    }

    /// Every ingest row up to this id is in `logs` (perhaps only in its
    /// WAL: see [`durable_through`](Self::durable_through)).
    pub fn merged_through(&self) -> i64 {
        self.merged.load(Ordering::Acquire)
    }

    /// Every ingest row up to this id is in `logs` on disk and may be
    /// deleted from the ingest file; never above
    /// [`merged_through`](Self::merged_through).
    pub fn durable_through(&self) -> i64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Committed rows not yet merged.
    pub fn unmerged(&self) -> i64 {
        (self.committed.load(Ordering::Acquire) - self.merged_through()).max(0)
    }

    /// Publishes a merge (or rows written straight into `logs`, up to
    /// `through`); the uuid first, so that a reader of the new `through`
    /// sees a uuid at least as new.
    pub(super) fn note_merged(&self, through: i64, max_uuid: Uuid) {
        {
            let mut newest = self.logs_max_uuid.lock();
            *newest = (*newest).max(max_uuid);
        }
        // Rows `codi2` committed standalone count as committed once merged.
        self.committed.fetch_max(through, Ordering::Release);
        self.merged.fetch_max(through, Ordering::Release);
    }

    /// Records that every ingest row up to `through` has left the ingest
    /// file (a transaction that deleted them committed).
    pub(super) fn note_ingest_deleted(&self, through: i64) {
        self.ingest_deleted.fetch_max(through, Ordering::Release);
    }

    /// Records that the hub has acknowledged every log up to `through`.
    pub fn note_shipped(&self, through: i64) {
        self.shipped.fetch_max(through, Ordering::Release);
    }
}

/// The main database's checkpoints make merges durable: its checkpointer
/// reads the merged-through id before each checkpoint and, if the
/// checkpoint copied the whole WAL, publishes it as durable.
impl super::wal::DurableMark for Watermarks {
    fn committed(&self) -> i64 {
        // Acquire: pairs with `note_merged`, which publishes the mark
        // after the commit that reached it returned.
        self.merged.load(Ordering::Acquire)
    }

    fn made_durable(&self, mark: i64) {
        self.durable.fetch_max(mark, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::wal::DurableMark;

    #[test]
    fn marks_move_only_forward_and_each_rule_is_checked() {
        let marks = Watermarks::new(10, 4, Uuid::nil());
        marks.note_merged(8, Uuid::from_u128(3));
        marks.note_merged(6, Uuid::from_u128(1));
        marks.made_durable(7);
        marks.note_ingest_deleted(7);
        marks.note_shipped(8);
        marks.note_shipped(5);
        let now = marks.marks();
        assert_eq!(
            now,
            Marks {
                committed: 10,
                merged: 8,
                durable: 7,
                ingest_deleted: 7,
                shipped: 8
            }
        );
        assert_eq!(marks.merged_mark(), (8, Uuid::from_u128(3)));
        assert_eq!(marks.unmerged(), 2);
        assert_eq!(now.hold(), Ok(()));

        let broken = [
            Marks { durable: 9, ..now },
            Marks {
                merged: 11,
                durable: 7,
                ..now
            },
            Marks {
                ingest_deleted: 8,
                ..now
            },
            Marks { shipped: 9, ..now },
        ];
        let rules: Vec<String> = broken
            .iter()
            .map(|m| {
                m.hold()
                    .unwrap_err()
                    .split(" is")
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            rules,
            [
                "durable <= merged",
                "merged <= committed",
                "ingest_deleted <= durable",
                "shipped <= merged"
            ]
        );
    }

    #[test]
    fn a_merge_past_the_committed_mark_raises_it() {
        // Rows a `codi2` without a daemon wrote: merged, never committed
        // by this writer.
        let marks = Watermarks::new(3, 3, Uuid::nil());
        marks.note_merged(9, Uuid::nil());
        assert_eq!(marks.marks().committed, 9);
        assert_eq!(marks.unmerged(), 0);
    }
}
