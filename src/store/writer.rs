//! The ingest writer thread: sole owner of the ingest file's read-write
//! connection, committing whatever is queued as one transaction (group
//! commit) and acknowledging it. It owns the merger thread (see
//! [`super::merger`]), which moves committed logs into the indexed table
//! and applies session changes, and the ingest file's checkpointer.
//!
//! Group commit needs no timers: while a transaction commits, new jobs queue
//! up, and the next transaction takes them all. One fsync thus covers many
//! requests exactly when load is high.
//!
//! One file per part: `handle` (settings, [`spawn_writer`],
//! [`WriterHandle`]), `thread` (the run loop), `body` (the transaction
//! machinery every write thread shares), `ingest_body` (the writer's body
//! for the ingest file), `indexed` (batches straight into `logs`) and
//! `recover` (where the files stand at start-up).

mod body;
mod handle;
mod indexed;
mod ingest_body;
mod recover;
mod thread;

pub use handle::{spawn_writer, WriterHandle, WriterSettings};

pub(super) use body::{Acker, JobResult, TxBody};
// For the model test, which drives batches itself.
#[cfg(test)]
pub(super) use body::write_batch;
pub(super) use handle::spawn_named;
pub(super) use indexed::insert_indexed;
pub(super) use ingest_body::{IngestBody, MAX_PENDING_ROWS};
pub(super) use recover::recover;
pub(super) use thread::FINAL_CHECKPOINT_LOCK_WAIT;

#[cfg(test)]
mod tests;
