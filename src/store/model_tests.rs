//! A model test of the storage rules: random interleavings of what the
//! daemon's storage threads, a standalone `codi2`, crashes, restarts and
//! power cuts do to the two files, run against the real functions on
//! temporary files one step at a time, and checked after every step
//! against a simple model: which logs were acknowledged, which of them a
//! checkpoint has made durable, and which ids they were given.
//!
//! After every step each acknowledged log is visible exactly once through
//! the readers' view (more only for the documented exception: a resend a
//! writer without the daemon's uuid set let into the ingest file, until it
//! is merged and deleted), nothing else is visible, a log's id never
//! changes, and a new log's id is above every id seen before (retention
//! included: it deletes old merged rows but never the largest id). After a
//! power cut (emulated as in the integration tests: each WAL cut back to
//! what its checkpoints copied) every log whose commit a checkpoint of its
//! file had made durable is still there, wherever it has moved since.
//!
//! `CODI_MODEL_CASES` sets the number of random cases (default 48, a few
//! seconds); failures shrink to a short sequence of steps.

use super::direct;
use super::ingest::{self, IdAllocator, PendingUuids, ALL_LOGS};
use super::merger::{self, MERGE_MAX_ROWS};
use super::power_cut::{self, WalIndex};
use super::standalone::StandaloneStore;
use super::tx::{self, TxBody};
use super::wal::FINAL_CHECKPOINT_LOCK_WAIT;
use super::watermarks::Watermarks;
use super::writer::{self, IngestBody, MAX_PENDING_ROWS};
use super::{ops, retention, schema, wal, LogRow, WriteJob, WriteOp};
use crate::metrics::Metrics;
use crate::proto::LogLevel;
use crate::reply::ReplyTo;
use proptest::prelude::*;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// What may happen next.
#[derive(Debug, Clone)]
enum Op {
    /// The writer commits a batch into the ingest file, deleting at most
    /// `delete` rows that are in `logs` on disk.
    Ingest {
        rows: usize,
        resend: Option<usize>,
        delete: usize,
    },
    /// The writer commits a batch straight into `logs` (or, if rows await
    /// merging, into the ingest file as it then does).
    Direct { rows: usize, resend: Option<usize> },
    /// `codi2` without a daemon commits logs into the ingest file.
    Standalone { rows: usize, resend: Option<usize> },
    /// A writer that knows none of the ingest file's uuids (a `codi2`
    /// whose resend is older than the rows it checks) resends a log.
    BlindResend { of: usize },
    /// The merger moves a chunk of at most `max_rows`.
    Merge { max_rows: usize },
    /// The main database's checkpointer runs once (and may publish the
    /// durable mark).
    CheckpointMain,
    /// The ingest file's checkpointer runs once.
    CheckpointIngest,
    /// A reader takes a snapshot of both files and keeps it, or lets go of
    /// the one it keeps: checkpoints cannot copy past it.
    Reader,
    /// Retention with every row old: the merger deletes every log it may
    /// (all but the largest id and those still in the ingest file).
    Retention,
    /// The daemon dies (in the middle of `during`, which is rolled back)
    /// and starts again.
    Crash { during: Stage, rows: usize },
    /// The daemon stops cleanly (final merges, checkpoints, deletions) and
    /// starts again.
    Restart,
    /// The power goes: each file keeps what its checkpoints copied; the
    /// daemon starts on what is left.
    PowerCut,
    /// Hub sync forms a batch: it reads the merged mark and the rows up to
    /// it, then commits the record of the batch in flight with
    /// `synchronous = FULL` on its own connection, which syncs the main
    /// database's WAL; only then would the batch be sent.
    Ship,
}

/// What a crash interrupts.
#[derive(Debug, Clone, Copy)]
enum Stage {
    Idle,
    IngestBatch,
    Merge,
    DirectBatch,
}

fn op() -> impl Strategy<Value = Op> {
    let rows = 1..6usize;
    let resend = proptest::option::weighted(0.3, 0..1000usize);
    prop_oneof![
        6 => (rows.clone(), resend.clone(), 0..4usize)
            .prop_map(|(rows, resend, delete)| Op::Ingest { rows, resend, delete }),
        3 => (rows.clone(), resend.clone()).prop_map(|(rows, resend)| Op::Direct { rows, resend }),
        2 => (rows.clone(), resend).prop_map(|(rows, resend)| Op::Standalone { rows, resend }),
        1 => (0..1000usize).prop_map(|of| Op::BlindResend { of }),
        5 => (1..8usize).prop_map(|max_rows| Op::Merge { max_rows }),
        3 => Just(Op::CheckpointMain),
        3 => Just(Op::CheckpointIngest),
        1 => Just(Op::Reader),
        2 => Just(Op::Retention),
        1 => (
            prop_oneof![
                Just(Stage::Idle),
                Just(Stage::IngestBatch),
                Just(Stage::Merge),
                Just(Stage::DirectBatch)
            ],
            rows
        )
            .prop_map(|(during, rows)| Op::Crash { during, rows }),
        1 => Just(Op::Restart),
        1 => Just(Op::PowerCut),
        2 => Just(Op::Ship),
    ]
}

/// Which file's commit acknowledged a log, at which step.
#[derive(Debug, Clone, Copy)]
enum Place {
    Ingest(u64),
    Main(u64),
    /// Survived a power cut, in a file the model does not know: durable
    /// once both files are checkpointed.
    Either(u64),
}

/// What should be stored.
#[derive(Debug, Default)]
struct Model {
    /// Every acknowledged log still stored, and where it was committed.
    acked: HashMap<Uuid, Place>,
    /// The same, in the order they were acknowledged (resends pick from
    /// it; lost ones are skipped).
    order: Vec<Uuid>,
    /// Extra rows a blind resend let into the ingest file, per log.
    blind: HashMap<Uuid, u32>,
    /// Logs of transactions that never committed.
    never: HashSet<Uuid>,
    /// Logs retention deleted: no longer expected, but they may be seen
    /// again (a power cut can undo the deletion, a blind resend store one
    /// anew), with any id.
    expired: HashSet<Uuid>,
    /// Each stored log's id, once seen.
    ids: HashMap<Uuid, i64>,
    /// The largest id seen.
    max_id: i64,
    /// Every row seen in `logs` (the indexed table, which hub sync reads)
    /// at or below `logs_mark`, by id.
    in_logs: HashMap<i64, Uuid>,
    /// The furthest a hub sync's watermark could have gone: the largest id
    /// seen in `logs` at or below the merger's durable mark.
    logs_mark: i64,
    /// Steps so far: the model's clock.
    step: u64,
    /// Every commit to the ingest file up to this step is on disk.
    ingest_durable: u64,
    /// Every commit to the main database up to this step is on disk.
    main_durable: u64,
    /// The main database's WAL index right after hub sync's last
    /// `synchronous = FULL` commit: the frames up to it survive a power cut.
    main_synced: Option<WalIndex>,
}

impl Model {
    fn ack(&mut self, uuid: Uuid, place: Place) {
        // A resend keeps the place of the row that holds it.
        if let std::collections::hash_map::Entry::Vacant(entry) = self.acked.entry(uuid) {
            entry.insert(place);
            self.order.push(uuid);
        }
    }

    /// A stored log to resend, if any.
    fn pick(&self, n: usize) -> Option<Uuid> {
        let stored: Vec<&Uuid> = self
            .order
            .iter()
            .filter(|u| self.acked.contains_key(u))
            .collect();
        (!stored.is_empty()).then(|| *stored[n % stored.len()])
    }

    fn durable(&self, place: Place) -> bool {
        match place {
            Place::Ingest(at) => at <= self.ingest_durable,
            Place::Main(at) => at <= self.main_durable,
            Place::Either(at) => at <= self.ingest_durable && at <= self.main_durable,
        }
    }
}

/// A lock wait: a single thread never waits for anyone, so a wait is a
/// bug; fail fast rather than hang.
const LOCK_WAIT: Duration = Duration::from_millis(50);

/// The daemon's storage, as `spawn_writer` and the threads it starts hold
/// it, driven one step at a time instead of by threads.
struct Daemon {
    /// The writer's: the ingest file, with the main database attached.
    ingest: Connection,
    /// The merger's (batches straight into `logs` included).
    main: Connection,
    /// Hub sync's, at `synchronous = FULL`.
    sync: Connection,
    /// The checkpointers'.
    main_checkpointer: Connection,
    ingest_checkpointer: Connection,
    state: Arc<Watermarks>,
    body: IngestBody,
}

impl Daemon {
    /// Starts on the database at `path` as the daemon does (recovery
    /// included).
    fn start(path: &Path) -> Daemon {
        let policy = wal::WalPolicy::default();
        let main = schema::open_rw(path, 1).unwrap();
        let mut ingest = schema::open_ingest_rw(path, 1).unwrap();
        for conn in [&main, &ingest] {
            wal::configure_writer(conn, &policy).unwrap();
            conn.busy_timeout(LOCK_WAIT).unwrap();
        }
        let (state, pending) =
            writer::recover(&mut ingest, ingest::logs_max_uuid(&main).unwrap()).unwrap();
        let state = Arc::new(state);
        let last_own_id = pending.last_id();
        let checkpointer = |file: &Path| {
            let conn = Connection::open_with_flags(
                file,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .unwrap();
            conn.busy_timeout(LOCK_WAIT).unwrap();
            conn
        };
        let sync = schema::open_rw(path, 1).unwrap();
        sync.pragma_update(None, "synchronous", "FULL").unwrap();
        sync.busy_timeout(LOCK_WAIT).unwrap();
        Daemon {
            sync,
            main_checkpointer: checkpointer(path),
            ingest_checkpointer: checkpointer(&schema::ingest_path(path)),
            body: IngestBody::new(Arc::clone(&state), pending, last_own_id, MAX_PENDING_ROWS),
            state,
            ingest,
            main,
        }
    }

    /// The writer's path for a batch into the ingest file.
    fn ingest_batch(&mut self, op: &WriteOp, delete: usize) {
        self.body.delete_at_most(delete);
        let mut out = Vec::new();
        tx::write_batch(
            &mut self.ingest,
            std::iter::once(op),
            1,
            &mut self.body,
            &mut out,
        );
        match &out[..] {
            [Ok(ops::OpOutcome::Logs { .. })] => {}
            other => panic!("ingest batch failed: {other:?}"),
        }
    }
}

/// Fresh rows, and a resend of `resend` if given.
fn rows(fresh: usize, resend: Option<Uuid>) -> (Vec<LogRow>, Vec<Uuid>) {
    let uuids: Vec<Uuid> = (0..fresh).map(|_| Uuid::now_v7()).collect();
    let rows = uuids
        .iter()
        .copied()
        .chain(resend)
        .map(|uuid| LogRow {
            uuid,
            timestamp_us: 1,
            level: LogLevel::Info,
            component: "model".into(),
            session_id: Some("s".into()),
            message: "m".into(),
            metadata_json: None,
            uid: None,
        })
        .collect();
    (rows, uuids)
}

fn job(op: WriteOp) -> WriteJob {
    WriteJob {
        reply: ReplyTo {
            worker: 0,
            token: 0,
            serial: 0,
            seq: 0,
            query: false,
        },
        request_id: Uuid::nil(),
        op,
        cost: 0,
    }
}

/// The files of one run: a directory per power cut.
struct Files {
    root: tempfile::TempDir,
    path: PathBuf,
    generation: usize,
    /// Open all along (idle), so that no connection closing (a crash)
    /// checkpoints a file as SQLite does when its last connection closes.
    bystander: Connection,
    /// A reader holding its snapshot ([`Op::Reader`]).
    held: Option<Connection>,
}

impl Files {
    fn new() -> Files {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("0/codi.db");
        drop(schema::open_rw(&path, 1).unwrap());
        let bystander = schema::open_ro(&path).unwrap();
        Files {
            root,
            path,
            generation: 0,
            bystander,
            held: None,
        }
    }

    fn release_reader(&mut self) {
        if let Some(reader) = self.held.take() {
            reader.execute_batch("COMMIT").unwrap();
        }
    }

    /// Every visible row, (id, uuid), in id order, as a reader sees them.
    fn visible(&self) -> Vec<(i64, Uuid)> {
        self.rows(ALL_LOGS)
    }

    /// Every row of `logs` alone, (id, uuid), in id order.
    fn indexed(&self) -> Vec<(i64, Uuid)> {
        self.rows("main.logs")
    }

    /// Every row of `table` (or view), (id, uuid), in id order.
    fn rows(&self, table: &str) -> Vec<(i64, Uuid)> {
        let tx = ingest::begin_read(&self.bystander).unwrap();
        let mut stmt = tx
            .prepare(&format!("SELECT id, uuid FROM {table} ORDER BY id"))
            .unwrap();
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, Vec<u8>>(1)?)))
            .unwrap()
            .map(|row| {
                let (id, uuid) = row.unwrap();
                (id, Uuid::from_slice(&uuid).unwrap())
            })
            .collect();
        rows
    }
}

/// Checks the files against the model after `op`.
fn check(files: &Files, model: &mut Model, op: &Op) {
    let visible = files.visible();
    let mut seen: HashMap<Uuid, (u32, i64)> = HashMap::new();
    for &(id, uuid) in &visible {
        let entry = seen.entry(uuid).or_insert((0, id));
        entry.0 += 1;
    }
    for (uuid, &(count, id)) in &seen {
        assert!(
            !model.never.contains(uuid),
            "after {op:?}: {uuid} of a transaction that never committed is visible"
        );
        if model.expired.contains(uuid) && !model.acked.contains_key(uuid) {
            continue;
        }
        assert!(
            model.acked.contains_key(uuid),
            "after {op:?}: {uuid} is visible but was never acknowledged (or was lost)"
        );
        let allowed = 1 + model.blind.get(uuid).copied().unwrap_or(0);
        assert!(
            count <= allowed,
            "after {op:?}: {uuid} is visible {count} times (at most {allowed})"
        );
        match model.ids.get(uuid) {
            Some(&known) => assert_eq!(known, id, "after {op:?}: the id of {uuid} changed"),
            None => assert!(
                id > model.max_id,
                "after {op:?}: new log {uuid} got id {id}, not above {} seen before",
                model.max_id
            ),
        }
    }
    for uuid in model.acked.keys() {
        assert!(
            seen.contains_key(uuid),
            "after {op:?}: acknowledged {uuid} is not visible"
        );
    }
    for (uuid, &(_, id)) in &seen {
        model.ids.insert(*uuid, id);
    }
    let newest = visible.last().map_or(0, |&(id, _)| id);
    model.max_id = model.max_id.max(newest);
}

/// The rule hub sync's watermark will rest on (issue 13): the sync ships
/// rows of `logs` (the indexed table) only up to the merger's durable mark
/// (`durable_through`), and no row may ever come into `logs` at or below
/// an id it has shipped. So once a row at or below that mark has been
/// seen, that id holds that row for good: it may leave (retention) and
/// come back (a power cut undoes a merge the ingest file then redoes), but
/// only as itself. Above the mark no such promise holds: a row written
/// straight into `logs` that a power cut takes before it is durable
/// leaves its id to the next log.
fn check_watermark(files: &Files, model: &mut Model, op: &Op, durable: i64) {
    let indexed = files.indexed();
    for &(id, uuid) in &indexed {
        if id <= model.logs_mark {
            assert_eq!(
                model.in_logs.get(&id),
                Some(&uuid),
                "after {op:?}: {uuid} came into logs at id {id}, at or below the durable mark \
                 {} a hub sync may already have shipped",
                model.logs_mark
            );
        }
    }
    let newest = indexed.last().map_or(0, |&(id, _)| id);
    model.logs_mark = model.logs_mark.max(newest.min(durable));
    for &(id, uuid) in &indexed {
        if id <= model.logs_mark {
            model.in_logs.entry(id).or_insert(uuid);
        }
    }
}

/// Runs `ops` from an empty database, checking after each.
fn run(ops: &[Op]) {
    let mut files = Files::new();
    let mut daemon = Some(Daemon::start(&files.path));
    let mut model = Model::default();
    for op in ops {
        model.step += 1;
        let now = model.step;
        let d = daemon.as_mut().unwrap();
        match *op {
            Op::Ingest {
                rows: n,
                resend,
                delete,
            } => {
                let (batch, fresh) = rows(n, resend.and_then(|r| model.pick(r)));
                d.ingest_batch(&WriteOp::Logs(batch), delete);
                fresh
                    .into_iter()
                    .for_each(|u| model.ack(u, Place::Ingest(now)));
            }
            Op::Direct { rows: n, resend } => {
                let (batch, fresh) = rows(n, resend.and_then(|r| model.pick(r)));
                let jobs = [job(WriteOp::Logs(batch))];
                // As `direct::hand_over` and the merger's
                // `direct::commit_handed` do it, on one thread.
                let lock = ingest::lock_ids(&mut d.ingest).unwrap();
                let written = direct::commit(&mut d.main, &d.state, &jobs, 1).unwrap();
                drop(lock);
                let place = match written {
                    Some(outcomes) => {
                        assert!(matches!(outcomes[..], [Ok(ops::OpOutcome::Logs { .. })]));
                        Place::Main(now)
                    }
                    None => {
                        d.ingest_batch(&jobs[0].op, 0);
                        Place::Ingest(now)
                    }
                };
                fresh.into_iter().for_each(|u| model.ack(u, place));
            }
            Op::Standalone { rows: n, resend } => {
                let (batch, fresh) = rows(n, resend.and_then(|r| model.pick(r)));
                let mut codi2 = StandaloneStore::open(&files.path).unwrap();
                codi2.apply(&WriteOp::Logs(batch)).unwrap();
                fresh
                    .into_iter()
                    .for_each(|u| model.ack(u, Place::Ingest(now)));
            }
            Op::BlindResend { of } => {
                if let Some(uuid) = model.pick(of) {
                    let (batch, _) = rows(0, Some(uuid));
                    let mut conn = schema::open_ingest_rw(&files.path, 1).unwrap();
                    let tx = conn
                        .transaction_with_behavior(TransactionBehavior::Immediate)
                        .unwrap();
                    let mut ids = IdAllocator::new(&tx, 0).unwrap();
                    let mut knows_nothing = PendingUuids::default();
                    let outcome =
                        ingest::insert_rows(&tx, &mut ids, &mut knows_nothing, &batch, 1, None)
                            .unwrap();
                    tx.commit().unwrap();
                    if let ops::OpOutcome::Logs { inserted: 1, .. } = outcome {
                        *model.blind.entry(uuid).or_insert(0) += 1;
                    }
                }
            }
            Op::Merge { max_rows } => {
                merger::merge_once(&mut d.main, &d.state, max_rows).unwrap();
            }
            Op::Retention => {
                let doomed: Vec<Uuid> = {
                    let mut stmt = d
                        .main
                        .prepare(&format!(
                            "SELECT uuid FROM main.logs WHERE id < ({})",
                            retention::DELETABLE_BELOW
                        ))
                        .unwrap();
                    let rows = stmt
                        .query_map([], |r| r.get::<_, Vec<u8>>(0))
                        .unwrap()
                        .map(|u| Uuid::from_slice(&u.unwrap()).unwrap())
                        .collect();
                    rows
                };
                let deadline = std::time::Instant::now() + Duration::from_secs(3600);
                let (deleted, _) =
                    retention::expire_logs(&mut d.main, i64::MAX, i64::MAX, deadline).unwrap();
                assert_eq!(deleted as usize, doomed.len());
                for uuid in doomed {
                    model.acked.remove(&uuid);
                    model.expired.insert(uuid);
                }
            }
            Op::CheckpointMain => {
                let before = WalIndex::read(&files.path);
                let result =
                    wal::checkpoint_marking(&d.main_checkpointer, "PASSIVE", Some(&*d.state))
                        .unwrap();
                if result.complete() {
                    assert_emulated_durable(&files.path, before);
                    model.main_durable = now;
                }
            }
            Op::CheckpointIngest => {
                let file = schema::ingest_path(&files.path);
                let before = WalIndex::read(&file);
                let result = wal::checkpoint(&d.ingest_checkpointer, "PASSIVE").unwrap();
                if result.complete() {
                    assert_emulated_durable(&file, before);
                    model.ingest_durable = now;
                }
            }
            Op::Reader => {
                if files.held.is_some() {
                    files.release_reader();
                } else {
                    let reader = schema::open_ro(&files.path).unwrap();
                    // As `ingest::begin_read`: the ingest file first.
                    reader
                        .execute_batch(
                            "BEGIN; SELECT max(id) FROM ingest.ingest_logs; \
                             SELECT max(id) FROM main.logs;",
                        )
                        .unwrap();
                    files.held = Some(reader);
                }
            }
            Op::Crash { during, rows: n } => {
                let (batch, fresh) = rows(n, None);
                model.never.extend(fresh);
                crash_during(d, during, WriteOp::Logs(batch));
                drop(daemon.take());
                daemon = Some(Daemon::start(&files.path));
            }
            Op::Restart => {
                files.release_reader();
                stop(daemon.take().unwrap(), &files.path);
                model.main_durable = now;
                model.ingest_durable = now;
                model.blind.clear();
                daemon = Some(Daemon::start(&files.path));
            }
            Op::Ship => {
                let through = d.state.merged_through();
                let shipped: Vec<(i64, Uuid)> = files
                    .indexed()
                    .into_iter()
                    .filter(|&(id, _)| id <= through)
                    .collect();
                d.sync
                    .execute(
                        "INSERT OR REPLACE INTO sync_state (target, last_log_id, updated_at) \
                         VALUES ('model', 0, ?1)",
                        [now as i64],
                    )
                    .unwrap();
                model.main_synced = WalIndex::read(&files.path);
                model.main_durable = now;
                // The batch may now go: these ids are the hub's.
                if let Some(&(newest, _)) = shipped.last() {
                    model.logs_mark = model.logs_mark.max(newest);
                    d.state.note_shipped(newest);
                }
                for (id, uuid) in shipped {
                    model.in_logs.entry(id).or_insert(uuid);
                }
            }
            Op::PowerCut => {
                files.release_reader();
                // Copied while the daemon's connections are still open, as
                // if the power went now.
                power_cut(&mut files, &mut model, now);
                drop(daemon.take());
                daemon = Some(Daemon::start(&files.path));
            }
        }
        let d = daemon.as_ref().unwrap();
        check(&files, &mut model, op);
        check_watermark(&files, &mut model, op, d.state.durable_through());
        if let Err(broken) = d.state.marks().hold() {
            panic!("after {op:?}: {broken}");
        }
    }
}

/// A checkpoint reported complete: what the power-cut emulation keeps of
/// `file` (frames up to `nBackfill`) must then hold every frame that was
/// committed `before` it, or the model's idea of durable and the
/// emulation's would differ.
fn assert_emulated_durable(file: &Path, before: Option<WalIndex>) {
    let (Some(before), Some(after)) = (before, WalIndex::read(file)) else {
        return;
    };
    assert!(
        after.backfilled_past(&before),
        "a complete checkpoint of {file:?} left frames uncopied: {before:?} -> {after:?}"
    );
}

/// Starts `op` in the middle of `during` and drops it uncommitted, then
/// drops every connection: what a crash at that moment leaves.
fn crash_during(d: &mut Daemon, during: Stage, op: WriteOp) {
    match during {
        Stage::Idle => {}
        Stage::IngestBatch => {
            d.body.before();
            let tx = d
                .ingest
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .unwrap();
            d.body.begin(&tx).unwrap();
            d.body.apply(&tx, &op, 1).unwrap();
        }
        Stage::Merge => {
            let floor = ingest::merged_floor(&d.main)
                .unwrap()
                .max(d.state.merged_through());
            let tx = d
                .main
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .unwrap();
            ingest::merge_chunk(&tx, floor, MERGE_MAX_ROWS).unwrap();
        }
        Stage::DirectBatch => {
            let _lock = ingest::lock_ids(&mut d.ingest).unwrap();
            let merged = d.state.merged_through();
            let tx = d
                .main
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .unwrap();
            if let Some(mut ids) = IdAllocator::for_indexed(&tx, merged).unwrap() {
                let WriteOp::Logs(rows) = &op else {
                    unreachable!()
                };
                ingest::insert_rows_indexed(&tx, &mut ids, rows, 1).unwrap();
            }
        }
    }
}

/// The clean stop, in the order the merger's and the writer's threads run
/// it: merge everything, the main database's final TRUNCATE (which
/// publishes the durable mark), delete what it made durable, the ingest
/// file's final TRUNCATE.
fn stop(mut d: Daemon, path: &Path) {
    let metrics = Metrics::default();
    loop {
        let before = d.state.merged_through();
        let merged = merger::merge_once(&mut d.main, &d.state, MERGE_MAX_ROWS).unwrap();
        if merged.through <= before {
            break;
        }
    }
    let mark: &dyn wal::DurableMark = &*d.state;
    wal::final_truncate(
        &d.main,
        None,
        FINAL_CHECKPOINT_LOCK_WAIT,
        "the database",
        &metrics,
        Some(mark),
    );
    d.body.delete_all_durable(&mut d.ingest);
    wal::final_truncate(
        &d.ingest,
        None,
        FINAL_CHECKPOINT_LOCK_WAIT,
        "the ingest file",
        &metrics,
        None,
    );
    let left: i64 = d
        .ingest
        .query_row("SELECT count(*) FROM main.ingest_logs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0, "a clean stop leaves the ingest file empty");
    for file in [path.to_owned(), schema::ingest_path(path)] {
        let mut wal_file = file.into_os_string();
        wal_file.push("-wal");
        let len = std::fs::metadata(&wal_file).map_or(0, |m| m.len());
        assert_eq!(len, 0, "the final checkpoints truncated {wal_file:?}");
    }
}

/// Moves `files` to a copy as a power cut would leave them, then checks
/// that every durable log survived (once), lets the others go, and
/// starts the model over from what survived.
fn power_cut(files: &mut Files, model: &mut Model, now: u64) {
    // One thread: no checkpoint can be half-way.
    let ingest = schema::ingest_path(&files.path);
    files.generation += 1;
    let dir = files.root.path().join(files.generation.to_string());
    power_cut::copy_cut_synced(&[(&files.path, model.main_synced), (&ingest, None)], &dir);
    files.path = dir.join(files.path.file_name().unwrap());
    files.bystander = schema::open_ro(&files.path).unwrap();
    let seen: HashSet<Uuid> = files.visible().into_iter().map(|(_, u)| u).collect();
    // What survived is on disk: the frames the read just recovered from
    // the cut WAL stay through the next cut, as synced ones.
    model.main_synced = WalIndex::read(&files.path);
    let acked: Vec<(Uuid, Place)> = model.acked.iter().map(|(u, p)| (*u, *p)).collect();
    for (uuid, place) in acked {
        if seen.contains(&uuid) {
            model.acked.insert(uuid, Place::Either(now));
        } else {
            assert!(
                !model.durable(place),
                "{uuid}, committed at {place:?}, was durable (ingest file checkpointed at \
                 step {}, main database at {}) but a power cut lost it",
                model.ingest_durable,
                model.main_durable
            );
            model.acked.remove(&uuid);
            model.ids.remove(&uuid);
        }
    }
    // Ids of rows lost may be handed out again; none at or below one that
    // survived.
    model.max_id = files.visible().last().map_or(0, |&(id, _)| id);
}

fn cases() -> u32 {
    std::env::var("CODI_MODEL_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(48)
}

/// A row hub sync has read and made durable with its own `synchronous =
/// FULL` commit survives a power cut without any checkpoint, so the sync
/// may ship up to the merged mark (rows in `logs`), not only up to the
/// checkpointed one; the emulated cut would lose the row (and this test
/// fail) if that commit did not sync the frames before it.
#[test]
fn a_row_the_sync_made_durable_keeps_its_id_through_a_power_cut() {
    let direct = || Op::Direct {
        rows: 1,
        resend: None,
    };
    run(&[direct(), Op::Ship, Op::PowerCut, direct()]);
    run(&[direct(), Op::Ship, Op::PowerCut, Op::PowerCut, direct()]);
    run(&[
        direct(),
        Op::Ingest {
            rows: 2,
            resend: None,
            delete: 0,
        },
        Op::Merge { max_rows: 8 },
        Op::Ship,
        direct(),
        Op::PowerCut,
        direct(),
    ]);
}

/// The case the watermark check found when its mark ignored durability: a
/// row written straight into `logs` and taken by a power cut before any
/// checkpoint leaves its id to the next log (allowed: it was never
/// durable, so no sync shipped it); once checkpointed, it stays.
#[test]
fn a_power_cut_frees_only_ids_above_the_durable_mark() {
    let direct = || Op::Direct {
        rows: 1,
        resend: None,
    };
    run(&[direct(), Op::PowerCut, direct()]);
    run(&[direct(), Op::CheckpointMain, Op::PowerCut, direct()]);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_acknowledged_log_is_visible_once_and_ids_never_go_backwards(
        ops in proptest::collection::vec(op(), 1..60)
    ) {
        run(&ops);
    }
}
