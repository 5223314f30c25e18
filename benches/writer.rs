//! Write throughput of the storage layer, in rows per second.
//!
//! `insert_batch/N`: N realistic rows (150-byte message, small metadata,
//! session, UUIDv7 id) inserted with `store::ops::apply` in one IMMEDIATE
//! transaction, committed, on a fresh database opened with
//! `store::schema::open_rw` (the daemon's schema, indexes and PRAGMAs, and
//! `wal_autocheckpoint=0` as its writer sets). Only the transaction is timed;
//! building the rows is not. Every 20,000 rows a TRUNCATE checkpoint runs
//! outside the timed region, standing in for the daemon's checkpointer
//! thread, so the WAL stays small.
//!
//! `writer_thread/*`: the real writer thread (`store::writer::spawn_writer`,
//! default settings, its own checkpointer) end to end: send N `WriteJob`s,
//! wait for all N acknowledgments on the reply channel.
//!
//! `cargo bench --bench writer`; under `cargo test` each runs once.

#[path = "common/mod.rs"]
mod common;

use codi_monitor::budget::InflightBudget;
use codi_monitor::metrics::Metrics;
use codi_monitor::proto::{AckStatus, Payload};
use codi_monitor::reply::{self, Completion, Replies, ReplyTo};
use codi_monitor::store::writer::{spawn_writer, WriterSettings};
use codi_monitor::store::{ops, schema, LogRow, WriteJob, WriteOp};
use common::RowGen;
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use crossbeam_channel::Receiver;
use rusqlite::{Connection, TransactionBehavior};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Rows between two checkpoints in `insert_batch`.
const CHECKPOINT_EVERY_ROWS: u64 = 20_000;

/// Rows the generators pretend to spread over a week (only affects how
/// fast timestamps advance).
const NOMINAL_ROWS: u64 = 10_000_000;

fn rows(gen: &mut RowGen, next: &mut u64, n: usize) -> Vec<LogRow> {
    (0..n)
        .map(|_| {
            *next += 1;
            gen.row(*next % NOMINAL_ROWS)
        })
        .collect()
}

fn insert_batch(c: &mut Criterion) {
    let mut group = c.benchmark_group("insert_batch");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    for batch in [1usize, 10, 100, 1_000, 10_000] {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = schema::open_rw(
            &dir.path().join("w.db"),
            WriterSettings::default().cache_size_mb,
        )
        .unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        let mut gen = RowGen::new(NOMINAL_ROWS, batch as u64);
        let mut next = 0u64;
        let mut since_checkpoint = 0u64;
        let now_us = common::start_us();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::from_parameter(batch), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let op = WriteOp::Logs(rows(&mut gen, &mut next, batch));
                    let start = Instant::now();
                    let tx = conn
                        .transaction_with_behavior(TransactionBehavior::Immediate)
                        .unwrap();
                    let outcome = ops::apply(&tx, &op, now_us).unwrap();
                    tx.commit().unwrap();
                    timed += start.elapsed();
                    assert_eq!(
                        outcome,
                        ops::OpOutcome::Logs {
                            inserted: batch,
                            duplicates: 0
                        }
                    );
                    since_checkpoint += batch as u64;
                    if since_checkpoint >= CHECKPOINT_EVERY_ROWS {
                        checkpoint(&conn);
                        since_checkpoint = 0;
                    }
                }
                timed
            })
        });
        checkpoint(&conn);
    }
    group.finish();
}

fn checkpoint(conn: &Connection) {
    let busy: i64 = conn
        .query_row("PRAGMA main.wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
        .unwrap();
    assert_eq!(busy, 0, "nobody else uses the database");
}

/// The reply routing of one event loop, as in the writer's own tests: a
/// real mio `Poll` and `Waker`, and the channel the loop would drain.
struct Loop {
    _poll: mio::Poll,
    rx: Receiver<Completion>,
}

fn one_loop() -> (Replies, Loop) {
    let poll = mio::Poll::new().unwrap();
    let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
    let (sink, rx) = reply::channel(waker);
    (Replies::new(vec![sink]), Loop { _poll: poll, rx })
}

fn writer_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("writer_thread");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    // (name, jobs per iteration, rows per job): single `LogEntry`s as many
    // `codi2 log` calls send them, and `LogBatch`es of 100.
    for (name, jobs, rows_per_job) in [
        ("log_entry_jobs", 1_000usize, 1usize),
        ("log_batch_jobs", 100, 100),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let (replies, lp) = one_loop();
        let metrics = Arc::new(Metrics::default());
        let budget = Arc::new(InflightBudget::new(usize::MAX));
        let (tx, handle) = spawn_writer(
            &path,
            &WriterSettings::default(),
            replies,
            Arc::clone(&metrics),
            budget,
        )
        .unwrap();
        let mut gen = RowGen::new(NOMINAL_ROWS, 7);
        let mut next = 0u64;
        let mut seq = 0u64;
        let total_rows = (jobs * rows_per_job) as u64;
        group.throughput(Throughput::Elements(total_rows));
        let id = BenchmarkId::new(name, format!("{jobs}x{rows_per_job}"));
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let batch: Vec<WriteJob> = (0..jobs)
                        .map(|_| {
                            seq += 1;
                            WriteJob {
                                reply: ReplyTo {
                                    worker: 0,
                                    token: 1,
                                    serial: 1,
                                    seq,
                                    query: false,
                                },
                                request_id: Uuid::now_v7(),
                                op: WriteOp::Logs(rows(&mut gen, &mut next, rows_per_job)),
                                cost: 0,
                            }
                        })
                        .collect();
                    let start = Instant::now();
                    for job in batch {
                        tx.send(job).unwrap();
                    }
                    for _ in 0..jobs {
                        let done = lp.rx.recv().unwrap();
                        match done.answer.into_message().unwrap().payload {
                            Payload::Acknowledgment {
                                status: AckStatus::Accepted,
                                ..
                            } => {}
                            other => panic!("unexpected answer {other:?}"),
                        }
                    }
                    timed += start.elapsed();
                }
                timed
            })
        });
        drop(tx);
        handle.join();
        let stored = Metrics::get(&metrics.logs_stored);
        let commits = Metrics::get(&metrics.commits).max(1);
        println!(
            "writer_thread/{name}: {stored} rows in {commits} commits ({:.1} rows per commit)",
            stored as f64 / commits as f64
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = insert_batch, writer_thread
}
criterion_main!(benches);
