//! What the hot-path metrics cost: one request-to-answer record into the
//! sharded histogram (alone, and with a second thread recording into its
//! own shard at the same time, as two event loops do), compared with the
//! clock read it needs, and one `/metrics` render of an idle daemon's
//! figures.
//!
//! `cargo bench --bench metrics`; under `cargo test` each runs once.

use codi_monitor::admin::exposition;
use codi_monitor::budget::InflightBudget;
use codi_monitor::health::report::{HealthSettings, Sources};
use codi_monitor::metrics::histogram::{Sharded, IPC_BOUNDS};
use codi_monitor::metrics::Metrics;
use codi_monitor::store::watermarks::Watermarks;
use criterion::{criterion_group, criterion_main, Criterion};
use parking_lot::Mutex;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn record(c: &mut Criterion) {
    let h = Arc::new(Sharded::new(IPC_BOUNDS));
    let mut group = c.benchmark_group("ipc_histogram");
    group.bench_function("instant_now", |b| b.iter(|| black_box(Instant::now())));
    group.bench_function("record", |b| {
        let mut d = 0u64;
        b.iter(|| {
            d = d.wrapping_add(7919) % 20_000_000;
            h.record_duration(0, Duration::from_nanos(black_box(d)));
        })
    });
    // A second loop records into shard 1 all the while.
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (h, stop) = (Arc::clone(&h), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                h.record_duration(1, Duration::from_micros(300));
            }
        })
    };
    group.bench_function("record_beside_another_loop", |b| {
        b.iter(|| h.record_duration(0, Duration::from_nanos(black_box(250_000))))
    });
    stop.store(true, Ordering::Relaxed);
    other.join().unwrap();
    group.finish();
}

fn render(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let sources = Arc::new(Sources {
        metrics: Arc::new(Metrics::default()),
        budget: Arc::new(InflightBudget::new(64 << 20)),
        answer_pool: Arc::new(InflightBudget::new(64 << 20)),
        started: Instant::now(),
        settings: HealthSettings {
            disk_min_free_bytes: 256 << 20,
            disk_min_free_percent: 5,
            failing_for: Duration::from_secs(30),
            queue_capacity: 65_536,
            max_connections: 2048,
        },
        db: dir.path().join("codi.db"),
        storage: Mutex::new(None),
        admin: Mutex::new("bench".into()),
        hub: Mutex::new("off".into()),
        watermarks: Arc::new(Watermarks::default()),
    });
    let registry = exposition::registry(sources);
    c.bench_function("metrics_render", |b| {
        b.iter(|| black_box(exposition::render(&registry)))
    });
}

criterion_group!(benches, record, render);
criterion_main!(benches);
