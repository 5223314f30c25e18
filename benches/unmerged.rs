//! `QueryLogs` while the ingest file holds rows not yet merged into `logs`:
//! they have no index, so every query reads all of them. A busy daemon's
//! queries see between a few thousand and [`UNMERGED_ROWS`] of them.
//!
//! `cargo bench --bench unmerged`. Under `cargo test` (no `--bench`
//! argument) the query runs once against 2,000 rows instead.

#[path = "common/mod.rs"]
mod common;

use codi_monitor::proto::LogFilter;
use codi_monitor::store::{ingest, query::run_query, schema};
use common::{benchmarking, RowGen};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::time::Duration;

/// The most rows the writer lets wait for the merger
/// (`merger::MAX_UNMERGED_ROWS`).
const UNMERGED_ROWS: u64 = 262_144;
const SEED: u64 = 0x0C0D_1010;

/// The newest rows while the ingest file holds rows not yet merged, which
/// have no index: each query reads all of them.
fn unmerged(c: &mut Criterion) {
    let full = benchmarking();
    let rows = if full { UNMERGED_ROWS } else { 2_000 };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unmerged.db");
    drop(schema::open_rw(&path, 16).unwrap());
    let mut ing = schema::open_ingest_rw(&path, 16).unwrap();
    let mut gen = RowGen::new(rows, SEED);
    let batch: Vec<_> = (1..=rows).map(|i| gen.row(i)).collect();
    let tx = ing.transaction().unwrap();
    let mut ids = ingest::IdAllocator::new(&tx, 0).unwrap();
    let mut pending = ingest::PendingUuids::default();
    ingest::insert_rows(&tx, &mut ids, &mut pending, &batch, 0, None).unwrap();
    tx.commit().unwrap();

    let conn = schema::open_ro(&path).unwrap();
    conn.set_prepared_statement_cache_capacity(64);
    let newest = LogFilter::default();
    let (entries, total) = run_query(&conn, &newest, 100).unwrap();
    assert_eq!((entries.len(), total), (100, rows));
    let mut group = c.benchmark_group(format!("query_unmerged_{rows}"));
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sample_size(20);
    group.bench_function("no filter, limit 100", |b| {
        b.iter(|| run_query(&conn, black_box(&newest), 100).unwrap())
    });
    group.finish();
}

criterion_group!(benches, unmerged);
criterion_main!(benches);
