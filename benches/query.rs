//! `QueryLogs` latency on a 10-million-row database: `store::query::select`
//! (what a reader thread runs before it frames the answer) on a read-only
//! connection (`schema::open_ro`, as a reader thread has).
//!
//! The database is built once with the daemon's schema (via
//! `schema::open_rw`) and cached at `target/bench-data/query-10m.db`; it is
//! reused when its last row id is 10,000,000 (it is built under another name
//! and renamed only once complete). Delete it to rebuild, e.g. after
//! changing `benches/common/mod.rs`. Rows: ~1,000 sessions, 20 components,
//! 5 levels, timestamps over 7 days, 150-byte messages; see `common::RowGen`.
//!
//! `cargo bench --bench query`. Under `cargo test` (no `--bench` argument)
//! the same queries run once each against a 20,000-row database in a
//! temporary directory instead.

#[path = "common/mod.rs"]
mod common;

use codi_monitor::proto::{LogFilter, LogLevel, Timestamp};
use codi_monitor::store::{query::select, schema};
use common::{benchmarking, RowGen, RARE_WORD};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use rusqlite::{params_from_iter, Connection, OptionalExtension, ToSql};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FULL_ROWS: u64 = 10_000_000;
const TEST_ROWS: u64 = 20_000;
/// Rows per transaction while building.
const BUILD_TXN_ROWS: u64 = 500_000;
const SEED: u64 = 0x0C0D_1010;

fn last_id(path: &Path) -> Option<i64> {
    let conn = schema::open_ro(path).ok()?;
    conn.query_row("SELECT max(id) FROM logs", [], |r| r.get(0))
        .optional()
        .ok()
        .flatten()
        .flatten()
}

/// Builds `rows` rows into `path` unless a complete copy is there already.
fn ensure_db(path: &Path, rows: u64) {
    if last_id(path) == Some(rows as i64) {
        eprintln!("query bench: reusing {} ({rows} rows)", path.display());
        return;
    }
    let building = path.with_extension("db.building");
    for suffix in [
        "",
        "-wal",
        "-shm",
        "-journal",
        "-ingest",
        "-ingest-wal",
        "-ingest-shm",
    ] {
        let mut p = building.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    let _ = std::fs::remove_file(path);
    eprintln!("query bench: building {} ({rows} rows)", path.display());
    let started = Instant::now();
    // The daemon's schema and indexes; then, for the bulk load only, no
    // journal and no syncs (a crash just means rebuilding).
    let mut conn = schema::open_rw(&building, 64).unwrap();
    let mode: String = conn
        .query_row("PRAGMA main.journal_mode = OFF", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "off");
    conn.execute_batch(
        "PRAGMA main.synchronous = OFF; PRAGMA main.cache_size = -1048576; \
         PRAGMA main.locking_mode = EXCLUSIVE;",
    )
    .unwrap();
    let mut gen = RowGen::new(rows, SEED);
    let mut i = 0;
    while i < rows {
        let tx = conn.transaction().unwrap();
        {
            // The same columns as `store::ops`' insert.
            let mut stmt = tx
                .prepare(
                    "INSERT INTO logs (uuid, timestamp, level, component, session_id, \
                     message, metadata, uid, created_at, id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .unwrap();
            let end = (i + BUILD_TXN_ROWS).min(rows);
            while i < end {
                let row = gen.row(i);
                i += 1;
                let id = i as i64;
                // Stored a few ms after it was sent.
                let created = row.timestamp_us + 3_000;
                let values = row.values(&created);
                stmt.execute(params_from_iter(
                    values.into_iter().chain([&id as &dyn ToSql]),
                ))
                .unwrap();
            }
        }
        tx.commit().unwrap();
        if i % 1_000_000 == 0 || i == rows {
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "query bench:   {i:>10} rows, {secs:6.1} s, {:.0} rows/s",
                i as f64 / secs
            );
        }
    }
    let mode: String = conn
        .query_row("PRAGMA main.journal_mode = WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    drop(conn);
    // The (empty) ingest file goes with the database.
    let _ = std::fs::remove_file(schema::ingest_path(path));
    std::fs::rename(schema::ingest_path(&building), schema::ingest_path(path)).unwrap();
    std::fs::rename(&building, path).unwrap();
    assert_eq!(last_id(path), Some(rows as i64));
    let size = std::fs::metadata(path).unwrap().len();
    eprintln!(
        "query bench: built in {:.1} s, {:.2} GiB",
        started.elapsed().as_secs_f64(),
        size as f64 / (1u64 << 30) as f64
    );
}

/// The query cases: (name, filter, limit, slow). Slow ones count by
/// scanning the whole table and get fewer samples.
fn cases(gen: &RowGen) -> Vec<(&'static str, LogFilter, u64, bool)> {
    let session = gen.session(common::SESSIONS as usize / 2).to_owned();
    // 12:00 to 13:00 on the fourth day.
    let since = common::start_us() + 3 * 86_400_000_000 + 12 * 3_600_000_000;
    vec![
        (
            "session",
            LogFilter {
                session_id: Some(session.clone()),
                ..LogFilter::default()
            },
            100,
            false,
        ),
        (
            "session_count_only",
            LogFilter {
                session_id: Some(session.clone()),
                ..LogFilter::default()
            },
            0,
            false,
        ),
        (
            "time_range_1h",
            LogFilter {
                since: Some(Timestamp::from_micros(since)),
                until: Some(Timestamp::from_micros(since + 3_600_000_000)),
                ..LogFilter::default()
            },
            100,
            false,
        ),
        (
            "session_contains",
            LogFilter {
                session_id: Some(session),
                contains: Some("timeout".into()),
                ..LogFilter::default()
            },
            100,
            false,
        ),
        (
            "contains_rare",
            LogFilter {
                contains: Some(RARE_WORD.into()),
                ..LogFilter::default()
            },
            100,
            true,
        ),
        (
            "min_level_error",
            LogFilter {
                min_level: Some(LogLevel::Error),
                ..LogFilter::default()
            },
            100,
            true,
        ),
        ("no_filter", LogFilter::default(), 100, true),
    ]
}

/// What SQLite does for each statement `select` prepares for `filter`
/// (the same SQL shapes as `store::query`; for the report only).
fn plans(conn: &Connection, filter: &LogFilter, limit: u64) -> Vec<String> {
    let mut conds = Vec::new();
    if filter.min_level.is_some() {
        conds.push("level IN ('Error')".to_owned());
    }
    if let Some(s) = &filter.session_id {
        conds.push(format!("session_id = '{s}'"));
    }
    if let Some(t) = filter.since {
        conds.push(format!("timestamp >= {}", t.as_micros()));
    }
    if let Some(t) = filter.until {
        conds.push(format!("timestamp < {}", t.as_micros()));
    }
    if let Some(c) = &filter.contains {
        conds.push(format!("instr(message, '{c}') > 0"));
    }
    let clause = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    let mut sqls = vec![format!("SELECT COUNT(*) FROM logs{clause}")];
    if limit > 0 {
        // The ids of the answer, then each row by id.
        sqls.push(format!(
            "SELECT id, timestamp FROM logs{clause} ORDER BY timestamp DESC, id DESC LIMIT {limit}"
        ));
        sqls.push("SELECT * FROM logs WHERE id = 1".to_owned());
    }
    sqls.iter()
        .map(|sql| {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let steps: Vec<String> = stmt
                .query_map([], |r| r.get::<_, String>(3))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            steps.join("; ")
        })
        .collect()
}

fn queries(c: &mut Criterion) {
    let full = benchmarking();
    let rows = if full { FULL_ROWS } else { TEST_ROWS };
    // Under `cargo test` the small database lives in a temporary directory.
    let temp = (!full).then(|| tempfile::tempdir().unwrap());
    let path = match &temp {
        Some(dir) => dir.path().join("query.db"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data/query-10m.db"),
    };
    ensure_db(&path, rows);

    let conn = schema::open_ro(&path).unwrap();
    // As each reader thread of the daemon.
    conn.set_prepared_statement_cache_capacity(64);
    let gen = RowGen::new(rows, SEED);
    let cases = cases(&gen);

    for (name, filter, limit, _) in &cases {
        let started = Instant::now();
        let selection = select(&conn, filter, *limit).unwrap();
        let total = selection.total_count;
        eprintln!(
            "query bench: {name}: {} entries of {total} matches, {} rows read \
             (first run {:.1} ms)",
            selection.len(),
            selection.rows_read,
            started.elapsed().as_secs_f64() * 1e3
        );
        for plan in plans(&conn, filter, *limit) {
            eprintln!("    plan: {plan}");
        }
        assert!(total > 0, "{name} matches nothing");
    }

    let mut group = c.benchmark_group(format!("query_{}", if full { "10m" } else { "20k" }));
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for (name, filter, limit, slow) in &cases {
        if *slow {
            group.sampling_mode(SamplingMode::Flat).sample_size(10);
        } else {
            group.sampling_mode(SamplingMode::Auto).sample_size(50);
        }
        group.bench_function(BenchmarkId::new(*name, format!("limit{limit}")), |b| {
            b.iter(|| select(&conn, black_box(filter), *limit).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, queries);
criterion_main!(benches);
