//! A bounded fuzz run of the real daemon: a few hundred hostile connections
//! over Unix and TCP (authenticated and not) send mutated frames of every
//! request variant, lie about lengths, trickle, half-close and drop
//! mid-frame, while valid bystander clients check that every answer they
//! get is exactly right. At the end the daemon must still run and answer,
//! every log acknowledged `Accepted` must be stored exactly once and as
//! sent, no row may come from a frame the codec refuses, and the daemon's
//! stderr must show no panic.
//!
//! `CODI_FUZZ_SECONDS` (default 30) bounds the run; `CODI_FUZZ_SEED` picks
//! the seed, which is printed at the start so that a failure's frames can be
//! generated again (the interleaving of threads is not reproducible, the
//! input is). The seed also picks the daemon's configuration among
//! [`PROFILES`] (`CODI_FUZZ_PROFILE=tight` forces one). `scripts/fuzz [SECONDS]` runs it for longer. Regression tests
//! for what it found are in `regressions` below.

#[allow(dead_code)]
mod common;

#[path = "fuzz/bystander.rs"]
mod bystander;
#[path = "fuzz/gen.rs"]
mod gen;
#[path = "fuzz/hostile.rs"]
mod hostile;

use common::*;
use gen::{Made, Rng};
use hostile::{Candidate, Hostile, Step};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// Seconds of fuzzing when `CODI_FUZZ_SECONDS` is not set: with start-up
/// and the checks, about 40 s of wall time.
const DEFAULT_SECONDS: u64 = 30;
/// Threads driving hostile connections.
const HOSTILE_THREADS: usize = 4;
/// Hostile connections each thread keeps open at once.
const CONNECTIONS_PER_THREAD: usize = 64;
/// Valid clients: half over Unix, half over authenticated TCP; the last
/// one only pings, one at a time.
const BYSTANDERS: usize = 5;
/// Failures kept for the report (the first ones matter most).
const MAX_FAILURES: usize = 40;

/// Daemon configurations a run may use, picked by the seed (or by
/// `CODI_FUZZ_PROFILE`), so that the pause paths are fuzzed too: the
/// defaults; the smallest in-flight budget, two answers owed per connection
/// and small commits (global and backlog pauses); a rate limit (throttled
/// connections on timers).
const PROFILES: &[(&str, &str)] = &[
    ("default", ""),
    (
        "tight",
        "[storage]\ninflight_bytes = 1048576\nbatch_max_rows = 16\n\
         [monitor]\nmax_pending_per_connection = 2\n",
    ),
    (
        "throttled",
        "[monitor]\nrate_limit = 3000\nrate_burst = 40\n",
    ),
];

/// Counters for the summary line.
#[derive(Debug, Default)]
pub struct Stats {
    /// Hostile connections opened.
    pub connections: AtomicU64,
    /// Hostile connects refused by the operating system.
    pub connect_failures: AtomicU64,
    /// Hostile bytes written.
    pub bytes: AtomicU64,
    /// Complete hostile frames that decode / do not.
    pub decodable: AtomicU64,
    /// See `decodable`.
    pub undecodable: AtomicU64,
    /// Answers read on hostile connections.
    pub answers: AtomicU64,
    /// Of which `Error`s.
    pub errors: AtomicU64,
    /// Of which `Rejected` acknowledgments.
    pub rejected: AtomicU64,
    /// Hostile connections the daemon closed.
    pub closed_by_daemon: AtomicU64,
    /// Hostile connections dropped at the end of their lifetime.
    pub dropped_at_lifetime: AtomicU64,
    /// Bystander requests answered `Unavailable` or `RateLimited`.
    pub bystander_overloaded: AtomicU64,
    /// Bystander connection attempts that failed and were retried.
    pub bystander_connect_retries: AtomicU64,
    /// Hostile frames by how they were made (`Made` order).
    pub made: [AtomicU64; 7],
}

impl Stats {
    /// Counts one hostile frame.
    pub fn count(&self, made: Made) {
        self.made[made as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// What the threads share.
#[derive(Default)]
pub struct Shared {
    stop: AtomicBool,
    failures: Mutex<(Vec<String>, usize)>,
    /// Row uuids that complete, decodable hostile frames carried, with the
    /// fields each frame gave them.
    pub may_store: Mutex<HashMap<Uuid, Vec<Candidate>>>,
    /// Row uuids of hostile logs acknowledged `Accepted`.
    pub hostile_accepted: Mutex<Vec<Uuid>>,
    /// Counters.
    pub stats: Stats,
}

impl Shared {
    /// True once the run is over.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Records a failure (the test fails at the end with all of them).
    pub fn fail(&self, what: String) {
        let mut f = self.failures.lock().unwrap();
        f.1 += 1;
        if f.0.len() < MAX_FAILURES {
            eprintln!("fuzz failure: {what}");
            f.0.push(what);
        }
    }
}

fn env_u64(key: &str) -> Option<u64> {
    let text = std::env::var(key).ok()?;
    Some(
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{key}={text} is not a number")),
    )
}

fn hostile_thread(
    mut rng: Rng,
    socket: PathBuf,
    tcp: SocketAddr,
    token: String,
    shared: Arc<Shared>,
) {
    let mut open: Vec<Hostile> = Vec::with_capacity(CONNECTIONS_PER_THREAD);
    while !shared.stopping() {
        while open.len() < CONNECTIONS_PER_THREAD {
            match Hostile::open(&mut rng, &socket, tcp, &token, &shared) {
                Some(h) => open.push(h),
                None => break,
            }
        }
        open.retain_mut(|h| h.step(&shared) == Step::Open);
        thread::sleep(Duration::from_millis(3));
    }
}

/// One stored row, as the checks need it.
struct StoredRow {
    level: String,
    component: String,
    message: String,
    timestamp: i64,
    has_metadata: bool,
    session_id: Option<String>,
}

/// Every stored row by uuid (a list, so that a uuid stored twice shows).
fn stored_rows(db: &Db) -> HashMap<Uuid, Vec<StoredRow>> {
    let tx = db.snapshot();
    let mut stmt = tx
        .prepare(
            "SELECT uuid, level, component, message, timestamp, metadata IS NOT NULL, \
             session_id FROM all_logs",
        )
        .unwrap();
    let mut rows: HashMap<Uuid, Vec<StoredRow>> = HashMap::new();
    let mapped = stmt
        .query_map([], |r| {
            Ok((
                Uuid::from_slice(&r.get::<_, Vec<u8>>(0)?).expect("16-byte uuid"),
                StoredRow {
                    level: r.get(1)?,
                    component: r.get(2)?,
                    message: r.get(3)?,
                    timestamp: r.get(4)?,
                    has_metadata: r.get(5)?,
                    session_id: r.get(6)?,
                },
            ))
        })
        .unwrap();
    for row in mapped {
        let (id, row) = row.unwrap();
        rows.entry(id).or_default().push(row);
    }
    rows
}

/// Acknowledged logs are stored exactly once and as sent; nothing is stored
/// that no decodable frame carried.
fn check_database(d: &Daemon, records: &[bystander::Record], shared: &Shared) -> (usize, usize) {
    let db = d.db();
    let rows = stored_rows(&db);
    let sent: HashMap<Uuid, &bystander::Sent> = records
        .iter()
        .flat_map(|r| r.sent.iter())
        .map(|(k, v)| (*k, v))
        .collect();
    let may_store = shared.may_store.lock().unwrap();
    for (id, list) in &rows {
        if list.len() > 1 {
            shared.fail(format!("log {id} is stored {} times", list.len()));
        }
        let row = &list[0];
        if let Some(s) = sent.get(id) {
            if row.level != s.level.as_str()
                || row.component != s.component
                || row.message != s.message
                || row.timestamp != s.timestamp
                || row.has_metadata != s.has_metadata
                || row.session_id != s.session_id
            {
                shared.fail(format!(
                    "bystander log {id} is stored as ({}, {:?}, {:?}, {}, session {:?}) but was \
                     sent as {s:?}",
                    row.level, row.component, row.message, row.timestamp, row.session_id
                ));
            }
        } else if let Some(candidates) = may_store.get(id) {
            let matches = candidates.iter().any(|c| {
                c.level == row.level
                    && c.component == row.component
                    && c.message == hostile::text_digest(&row.message)
                    && c.timestamp == row.timestamp
            });
            if !matches {
                shared.fail(format!(
                    "hostile log {id} is stored as ({}, {:?}, {} bytes of message, {}) which no \
                     frame carrying it said: {:?}",
                    row.level,
                    row.component,
                    row.message.len(),
                    row.timestamp,
                    candidates.first()
                ));
            }
        } else {
            shared.fail(format!(
                "log {id} ({}, {:?}, {} bytes of message) is stored but no frame the codec \
                 decodes carried it",
                row.level,
                row.component,
                row.message.len()
            ));
        }
    }
    let mut acked = 0;
    for rec in records {
        for id in &rec.acked {
            acked += 1;
            let n = rows.get(id).map_or(0, Vec::len);
            if n != 1 {
                shared.fail(format!(
                    "bystander log {id} was acknowledged Accepted but is stored {n} times"
                ));
            }
        }
    }
    // The harness's own helper agrees on a sample.
    for id in records.iter().flat_map(|r| r.acked.iter()).step_by(97) {
        let n = db.count_uuid(*id);
        if n != 1 {
            shared.fail(format!("count_uuid({id}) is {n} for an acknowledged log"));
        }
    }
    let hostile: HashSet<Uuid> = shared
        .hostile_accepted
        .lock()
        .unwrap()
        .iter()
        .copied()
        .collect();
    for id in &hostile {
        if !rows.contains_key(id) {
            shared.fail(format!(
                "hostile log {id} was acknowledged Accepted but is not stored"
            ));
        }
    }
    let uuids = db.uuids();
    if uuids.len() != rows.len() {
        shared.fail(format!(
            "uuids() lists {} logs, all_logs {}",
            uuids.len(),
            rows.len()
        ));
    }
    (acked, hostile.len())
}

#[test]
fn hostile_connections_never_disturb_valid_clients() {
    let seconds = env_u64("CODI_FUZZ_SECONDS").unwrap_or(DEFAULT_SECONDS);
    let seed = env_u64("CODI_FUZZ_SEED").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let (profile, config) = match std::env::var("CODI_FUZZ_PROFILE") {
        Ok(name) => *PROFILES
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("CODI_FUZZ_PROFILE={name} is not one of {PROFILES:?}")),
        Err(_) => PROFILES[(seed % PROFILES.len() as u64) as usize],
    };
    println!(
        "fuzz: seed {seed}, {seconds} s, profile {profile} (again: CODI_FUZZ_SEED={seed} \
         CODI_FUZZ_SECONDS={seconds} cargo test --test fuzz -- --nocapture)"
    );
    let limit = raise_nofile_limit();
    assert!(
        limit as usize >= 2 * HOSTILE_THREADS * CONNECTIONS_PER_THREAD + 256,
        "RLIMIT_NOFILE hard limit {limit} is too low for this test"
    );
    let sandbox = Sandbox::new();
    sandbox.write_config(config);
    let mut d = Daemon::start(sandbox, Opts::default().with_config());
    let token = d.token.clone().expect("test daemons have a token");
    let shared = Arc::new(Shared::default());
    let mut rng = Rng::new(seed);
    let started = Instant::now();

    let hostiles: Vec<_> = (0..HOSTILE_THREADS)
        .map(|i| {
            let (rng, socket, tcp, token, shared) = (
                rng.fork(),
                d.socket().to_path_buf(),
                d.tcp_addr(),
                token.clone(),
                Arc::clone(&shared),
            );
            thread::Builder::new()
                .name(format!("hostile-{i}"))
                .spawn(move || hostile_thread(rng, socket, tcp, token, shared))
                .unwrap()
        })
        .collect();
    let bystanders: Vec<_> = (0..BYSTANDERS)
        .map(|k| {
            let endpoint = if k % 2 == 0 {
                bystander::Endpoint::Unix(d.socket().to_path_buf())
            } else {
                bystander::Endpoint::Tcp(d.tcp_addr(), token.clone())
            };
            let (rng, shared) = (rng.fork(), Arc::clone(&shared));
            thread::Builder::new()
                .name(format!("bystander-{k}"))
                .spawn(move || bystander::run(k, endpoint, k == BYSTANDERS - 1, rng, shared))
                .unwrap()
        })
        .collect();

    let end = started + Duration::from_secs(seconds);
    let mut peak_rss_kib = 0;
    while Instant::now() < end {
        thread::sleep(Duration::from_millis(100));
        if !d.is_running() {
            shared.fail("the daemon exited during the run".into());
            break;
        }
        peak_rss_kib = peak_rss_kib.max(d.rss_kib());
    }
    shared.stop.store(true, Ordering::Release);
    for h in hostiles {
        if h.join().is_err() {
            shared.fail("a hostile thread panicked".into());
        }
    }
    let records: Vec<bystander::Record> = bystanders
        .into_iter()
        .filter_map(|b| match b.join() {
            Ok(r) => Some(r),
            Err(_) => {
                shared.fail("a bystander panicked".into());
                None
            }
        })
        .collect();
    let fuzzed = started.elapsed();

    let alive = d.is_running();
    if alive {
        d.unix().ping();
        d.tcp().ping();
    } else {
        shared.fail("the daemon is not running after the run".into());
    }
    if alive {
        d.terminate();
        let status = d.wait_exit();
        if !status.success() {
            shared.fail(format!("the daemon exited with {status} on SIGTERM"));
        }
    }
    // Once the daemon has drained and stopped: hostile logs still queued
    // at the end of the run are committed by then, so the checks' two
    // reads see the same rows.
    let (acked, hostile_acked) = check_database(&d, &records, &shared);
    let stderr = d.stderr();
    for line in stderr.lines().filter(|l| l.contains("panicked")) {
        shared.fail(format!("daemon stderr: {line}"));
    }

    let s = &shared.stats;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "fuzz: {:.1} s; hostile: {} connections ({} connects refused), {} MiB, frames made \
         valid/bytes/structure/garbage/length/deep/big {:?}, {} decodable, {} not; {} answers \
         ({} errors, {} rejected); {} closed by the daemon, {} dropped at their lifetime; \
         {hostile_acked} hostile logs accepted",
        fuzzed.as_secs_f64(),
        get(&s.connections),
        get(&s.connect_failures),
        get(&s.bytes) >> 20,
        s.made.iter().map(get).collect::<Vec<_>>(),
        get(&s.decodable),
        get(&s.undecodable),
        get(&s.answers),
        get(&s.errors),
        get(&s.rejected),
        get(&s.closed_by_daemon),
        get(&s.dropped_at_lifetime),
    );
    println!(
        "fuzz: bystanders: {} requests, {acked} logs accepted, slowest burst {:.0} ms, {} \
         answers Unavailable or RateLimited (retried), {} connects retried, {} reconnects; \
         daemon: peak RSS {} MiB, stderr {} lines, {} at ERROR",
        records.iter().map(|r| r.requests).sum::<u64>(),
        records
            .iter()
            .map(|r| r.slowest.as_secs_f64() * 1e3)
            .fold(0.0, f64::max),
        records.iter().map(|r| r.overloaded).sum::<u64>(),
        get(&s.bystander_connect_retries),
        records.iter().map(|r| r.reconnects).sum::<u64>(),
        peak_rss_kib >> 10,
        stderr.lines().count(),
        stderr.lines().filter(|l| l.contains("ERROR")).count(),
    );
    let mut by_kind: HashMap<&str, Duration> = HashMap::new();
    for (k, t) in records.iter().flat_map(|r| r.slowest_by_kind.iter()) {
        let slot = by_kind.entry(k).or_default();
        *slot = (*slot).max(*t);
    }
    let mut by_kind: Vec<_> = by_kind.into_iter().collect();
    by_kind.sort();
    println!(
        "fuzz: bystanders' slowest answer to the first request of a burst: {by_kind:?}; \
         slowest lone ping {:?}",
        records.last().map(|r| r.slowest)
    );
    let mut seen = HashSet::new();
    for line in stderr
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
    {
        // Alike lines once: ignore the digits (times, counts, ids).
        let shape: String = line.chars().filter(|c| !c.is_ascii_digit()).collect();
        if seen.insert(shape) && seen.len() <= 12 {
            println!("fuzz: daemon said: {line}");
        }
    }
    let (failures, total) = std::mem::take(&mut *shared.failures.lock().unwrap());
    assert!(
        failures.is_empty(),
        "{total} fuzz failures with seed {seed} (CODI_FUZZ_SEED={seed}, profile {profile}); the \
         first {}:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(acked > 0, "the bystanders got no log accepted at all");
}

/// What the fuzzer and the property tests found, one test each.
mod regressions {
    use super::*;
    use codi_monitor::proto::{ErrorCode, LogFilter, Message, Payload};
    use rmpv::Value;

    /// `value` as one frame.
    fn frame_of(value: &Value) -> Vec<u8> {
        let mut body = Vec::new();
        rmpv::encode::write_value(&mut body, value).unwrap();
        gen::framed(&body)
    }

    /// Found by the codec's property tests: a log stamped with an offset
    /// that UTC puts past year 9999 was accepted and stored, after which
    /// every query answer listing it held `+10000-01-01T00:59:59.000000Z`,
    /// which no client can decode.
    #[test]
    fn a_log_stamped_past_year_9999_in_utc_is_refused_and_queries_still_decode() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        for stamp in ["9999-12-31T23:59:59-01:00", "0000-01-01T00:00:00+00:01"] {
            let log = Value::Map(vec![
                (
                    "id".into(),
                    Value::Binary(Uuid::now_v7().as_bytes().to_vec()),
                ),
                ("timestamp".into(), stamp.into()),
                (
                    "payload".into(),
                    Value::Map(vec![(
                        "LogEntry".into(),
                        Value::Map(vec![
                            ("level".into(), "Info".into()),
                            ("component".into(), "edge".into()),
                            ("message".into(), stamp.into()),
                            ("metadata".into(), Value::Nil),
                        ]),
                    )]),
                ),
            ]);
            c.send_raw(&frame_of(&log)).unwrap();
            assert_error(&c.recv(), ErrorCode::InvalidMessage);
        }
        assert_eq!(d.db().count_logs(), 0);
        let answer = c.call(Payload::QueryLogs {
            filter: LogFilter::default(),
            limit: 10,
        });
        assert!(
            matches!(answer.payload, Payload::LogResults { .. }),
            "{answer:?}"
        );
    }

    /// Found by the codec's property tests: a frame packing two messages
    /// was taken as the first alone, and the second went unanswered.
    #[test]
    fn two_messages_in_one_frame_are_refused_and_the_connection_goes_on() {
        let d = Daemon::start_default();
        let mut c = d.unix();
        let first = log(codi_monitor::proto::LogLevel::Info, "two", "first");
        let second = Message::new(Payload::Ping);
        let body = [
            rmp_serde::to_vec_named(&first).unwrap(),
            rmp_serde::to_vec_named(&second).unwrap(),
        ]
        .concat();
        c.send_raw(&gen::framed(&body)).unwrap();
        assert_error(&c.recv(), ErrorCode::InvalidMessage);
        c.ping();
        assert_eq!(d.db().count_uuid(first.id), 0);
    }
}
