//! The ingest writer thread: sole owner of the ingest file's read-write
//! connection, committing whatever is queued as one transaction (group
//! commit) and acknowledging it. It owns the merger thread (see
//! [`super::merger`]), which moves committed logs into the indexed table
//! and applies session changes, and the ingest file's checkpointer.
//!
//! Group commit: while a transaction commits, new jobs queue up, and the
//! next transaction takes them all, so one commit covers many requests when
//! load is high. Under steady lighter load, when commits would carry a row
//! or two each, the writer also pauses a bounded, adaptive moment before
//! taking the next batch (`group`, `storage.commit_delay_us`).
//!
//! One file per part: `handle` (settings, [`spawn_writer`],
//! [`WriterHandle`]), `thread` (the run loop), `group` (when to pause for
//! more rows), `ingest_body` (the writer's body for the ingest file) and
//! `recover` (where the files stand at start-up). Batches straight into
//! `logs` go through the merger, the main database's only writer
//! (`store::direct`). The transaction machinery it shares with the merger
//! and the salvager is in `store::tx`.

mod group;
mod handle;
mod ingest_body;
mod recover;
mod thread;

pub use handle::{spawn_writer, WriterHandle, WriterSettings};

pub(super) use ingest_body::{IngestBody, MAX_PENDING_ROWS};
pub(super) use recover::recover;

#[cfg(test)]
mod tests;
