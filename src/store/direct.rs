//! Batches straight into `logs`. A batch of log jobs whose rows come from
//! few sessions (or are large) skips the ingest file, when no ingest row
//! awaits merging. Two threads share the work, so that the main database
//! keeps one read-write owner:
//!
//! 1. the writer takes the ingest file's write lock without a snapshot of
//!    the main database ([`ingest::lock_ids`]) and hands the batch to the
//!    merger ([`hand_over`]);
//! 2. the merger hands out the batch's ids above every row of both files
//!    ([`IdAllocator::for_indexed`]), commits the rows into `logs`
//!    ([`commit`]) and publishes them as merged;
//! 3. the writer then lets go of the lock: nobody (no `codi2` without a
//!    daemon) hands out ids in between.
//!
//! The writer holds no snapshot of the main database meanwhile, so the
//! merger's WAL policy after the commit can start the WAL over. A batch
//! the merger has not taken within [`DIRECT_TAKE_WAIT`] is taken back and goes
//! to the ingest file, as does one that finds unmerged ingest rows, one
//! whose commit fails, and one the merger dies holding ([`Taken`] gives
//! its jobs back).

use super::ingest::{self, IdAllocator};
use super::merger::MergerMsg;
use super::tx::JobResult;
use super::watermarks::Watermarks;
use super::{schema, LogRow, WriteJob, WriteOp};
use crossbeam_channel::{RecvTimeoutError, Sender};
use parking_lot::Mutex;
use rusqlite::{Connection, TransactionBehavior};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Bytes SQLite writes for one index leaf page a commit dirties.
const INDEX_PAGE_BYTES: usize = schema::PAGE_SIZE as usize;

/// How long the merger waits for the main database's lock (an operator's
/// `codi-monitor recover --acknowledge` may hold it) for a batch bound
/// straight for `logs`, before the batch goes to the ingest file instead.
pub(super) const DIRECT_LOCK_WAIT: Duration = Duration::from_millis(200);

/// How long the writer waits for the merger to take a batch before taking
/// it back for the ingest file. The merger may be busy for a while with a
/// WAL restart after a large batch (copying the WAL back), a sync write
/// or a retention pass; the writer would have paused as long to do that
/// work itself. Shorter, a batch taken back during a WAL restart sent the
/// next ones to the ingest file too under steady load (no batch goes
/// straight in while ingest rows await merging), and 1 KB batches lost a
/// third of their throughput.
pub(super) const DIRECT_TAKE_WAIT: Duration = Duration::from_secs(2);

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

/// A batch the writer hands the merger, under the ingest file's lock.
#[derive(Debug)]
pub struct DirectBatch {
    /// The jobs, until the merger takes them or the writer takes them back
    /// (whoever empties the slot first).
    slot: Arc<Mutex<Option<Vec<WriteJob>>>>,
    now_us: i64,
    done: Sender<Written>,
}

/// What became of a batch the merger took: the jobs, and each one's
/// outcome (`None` when unmerged ingest rows kept them out of `logs`), or
/// the error that did.
type Written = (Vec<WriteJob>, rusqlite::Result<Option<Vec<JobResult>>>);

/// A batch written straight into `logs`: its jobs, and each one's outcome.
type Answered = (Vec<WriteJob>, Vec<JobResult>);

/// A batch not written straight into `logs`: its jobs back, and why.
type TakenBack = (Vec<WriteJob>, NotDirect);

/// Why a batch was not written straight into `logs`.
#[derive(Debug)]
pub(super) enum NotDirect {
    /// The ingest file holds rows not yet merged: rows with larger ids in
    /// `logs` would hide them from readers.
    Unmerged,
    /// The merger did not take the batch within [`DIRECT_TAKE_WAIT`].
    MergerBusy,
    /// The merger is gone.
    NoMerger,
    /// Taking the ingest file's lock, or the commit, failed.
    Failed(rusqlite::Error),
}

/// Hands `jobs` (log jobs only) to the merger to commit straight into
/// `logs`, holding the ingest file's write lock (taken on `ingest`, the
/// writer's connection) until the merger has answered. Returns the jobs
/// with each one's outcome, or the jobs back and why they were not
/// written, to go to the ingest file.
pub(super) fn hand_over(
    ingest: &mut Connection,
    merger: &Sender<MergerMsg>,
    jobs: Vec<WriteJob>,
    now_us: i64,
) -> Result<Answered, TakenBack> {
    let lock = match ingest::lock_ids(ingest) {
        Ok(lock) => lock,
        Err(e) => return Err((jobs, NotDirect::Failed(e))),
    };
    let slot = Arc::new(Mutex::new(Some(jobs)));
    let (done, written) = crossbeam_channel::bounded(1);
    let batch = DirectBatch {
        slot: Arc::clone(&slot),
        now_us,
        done,
    };
    // The merger gives the jobs back into the slot if it dies holding
    // them (a panic), so whatever it did not answer is found there.
    let take_back = |why| (slot.lock().take().unwrap_or_default(), why);
    if merger.send(MergerMsg::Direct(batch)).is_err() {
        return Err(take_back(NotDirect::NoMerger));
    }
    let outcome = match written.recv_timeout(DIRECT_TAKE_WAIT) {
        Ok(written) => written,
        Err(RecvTimeoutError::Timeout) => match slot.lock().take() {
            Some(jobs) => return Err((jobs, NotDirect::MergerBusy)),
            // The merger took the batch just now: its answer follows.
            None => match written.recv() {
                Ok(written) => written,
                Err(_) => return Err(take_back(NotDirect::NoMerger)),
            },
        },
        Err(RecvTimeoutError::Disconnected) => return Err(take_back(NotDirect::NoMerger)),
    };
    // Let go of the lock only once the rows are committed (or not).
    drop(lock);
    match outcome {
        (jobs, Ok(Some(outcomes))) => Ok((jobs, outcomes)),
        (jobs, Ok(None)) => Err((jobs, NotDirect::Unmerged)),
        (jobs, Err(e)) => Err((jobs, NotDirect::Failed(e))),
    }
}

/// The merger's half: commits `batch` into `logs` on `main` (its
/// connection) unless the writer has taken it back, publishes the rows as
/// merged in `state`, and tells the writer. Returns whether it committed.
pub(super) fn commit_handed(main: &mut Connection, state: &Watermarks, batch: DirectBatch) -> bool {
    let Some(mut taken) = Taken::from(batch) else {
        return false;
    };
    let written = main
        .busy_timeout(DIRECT_LOCK_WAIT)
        .and_then(|()| commit(main, state, taken.jobs(), taken.now_us));
    if let Err(e) = main.busy_timeout(schema::BUSY_TIMEOUT) {
        log::error!("the merger cannot set its busy timeout back: {e}");
    }
    let committed = matches!(written, Ok(Some(_)));
    taken.answer(written);
    committed
}

/// A batch the merger has taken out of its slot. Answered, it goes back to
/// the writer with its outcome; dropped unanswered (the merger panicked),
/// its jobs go back into the slot before the writer hears the answer
/// channel close, so that none is lost unanswered with the thread.
struct Taken {
    jobs: Option<Vec<WriteJob>>,
    slot: Arc<Mutex<Option<Vec<WriteJob>>>>,
    now_us: i64,
    done: Sender<Written>,
}

impl Taken {
    /// Empties the batch's slot, unless the writer has taken it back.
    fn from(batch: DirectBatch) -> Option<Taken> {
        let DirectBatch { slot, now_us, done } = batch;
        let jobs = slot.lock().take()?;
        Some(Taken {
            jobs: Some(jobs),
            slot,
            now_us,
            done,
        })
    }

    fn jobs(&self) -> &[WriteJob] {
        self.jobs.as_deref().unwrap_or_default()
    }

    /// Sends the jobs and their outcome to the writer.
    fn answer(&mut self, written: rusqlite::Result<Option<Vec<JobResult>>>) {
        let jobs = self.jobs.take().unwrap_or_default();
        // The writer waits for this answer; it is gone only if it panicked.
        let _ = self.done.send((jobs, written));
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if let Some(jobs) = self.jobs.take() {
            *self.slot.lock() = Some(jobs);
        }
    }
}

/// Inserts the rows of `jobs` (log jobs only) into `logs` in one
/// transaction on `main` (a connection with the ingest file attached as
/// `ingest`), with ids above every row of both files, and publishes them
/// as merged in `state`; `None` (nothing written) while the ingest file
/// holds rows not yet merged. Call while the ingest file's write lock is
/// held ([`ingest::lock_ids`]), so that nobody else hands out ids.
pub(super) fn commit(
    main: &mut Connection,
    state: &Watermarks,
    jobs: &[WriteJob],
    now_us: i64,
) -> rusqlite::Result<Option<Vec<JobResult>>> {
    let tx = main.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(mut ids) = IdAllocator::for_indexed(&tx, state.merged_through())? else {
        return Ok(None);
    };
    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut newest = Uuid::nil();
    for job in jobs {
        let WriteOp::Logs(rows) = &job.op else {
            return Err(rusqlite::Error::InvalidQuery);
        };
        newest = rows.iter().map(|r| r.uuid).fold(newest, std::cmp::max);
        outcomes.push(Ok(ingest::insert_rows_indexed(
            &tx, &mut ids, rows, now_us,
        )?));
    }
    tx.commit()?;
    if ids.last() > state.merged_through() {
        state.note_merged(ids.last(), newest);
    }
    Ok(Some(outcomes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::LogLevel;
    use crate::reply::ReplyTo;

    fn log_job(seq: u64) -> WriteJob {
        let row = LogRow {
            uuid: Uuid::now_v7(),
            timestamp_us: 7,
            level: LogLevel::Info,
            component: "c".into(),
            session_id: Some("s".into()),
            message: "m".into(),
            metadata_json: None,
            uid: None,
        };
        WriteJob {
            reply: ReplyTo {
                worker: 0,
                token: 0,
                serial: 0,
                seq,
                query: false,
            },
            request_id: Uuid::from_u128(seq.into()),
            op: WriteOp::Logs(vec![row]),
            cost: 1,
        }
    }

    #[test]
    fn a_merger_that_dies_holding_a_batch_gives_its_jobs_back_to_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codi.db");
        drop(schema::open_rw(&path, 4).unwrap());
        let mut ingest = schema::open_ingest_rw(&path, 4).unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let merger = std::thread::spawn(move || {
            let Ok(MergerMsg::Direct(batch)) = rx.recv() else {
                panic!("no batch came");
            };
            let _taken = Taken::from(batch).expect("the slot holds the jobs");
            panic!("the merger dies holding the batch");
        });

        let jobs = vec![log_job(1), log_job(2)];
        let (back, why) = hand_over(&mut ingest, &tx, jobs, 0).expect_err("nothing committed");

        assert!(merger.join().is_err(), "the merger panicked");
        assert!(matches!(why, NotDirect::NoMerger), "{why:?}");
        let seqs: Vec<u64> = back.iter().map(|job| job.reply.seq).collect();
        assert_eq!(seqs, [1, 2], "every job comes back, in order");
    }

    #[test]
    fn a_batch_the_merger_answers_comes_back_with_its_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codi.db");
        let mut main = schema::open_rw(&path, 4).unwrap();
        let mut ingest = schema::open_ingest_rw(&path, 4).unwrap();
        let state = Arc::new(Watermarks::default());
        let (tx, rx) = crossbeam_channel::unbounded();
        let merger_state = Arc::clone(&state);
        let merger = std::thread::spawn(move || match rx.recv() {
            Ok(MergerMsg::Direct(batch)) => commit_handed(&mut main, &merger_state, batch),
            _ => false,
        });

        let (jobs, outcomes) =
            hand_over(&mut ingest, &tx, vec![log_job(1), log_job(2)], 0).expect("committed");

        assert!(merger.join().unwrap(), "the merger committed");
        assert_eq!(jobs.len(), 2);
        assert_eq!(outcomes.len(), 2);
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        assert!(
            state.merged_through() >= 2,
            "the rows are published as merged"
        );
    }
}
