//! Realistic log rows for the storage benchmarks, shared by `writer.rs` and
//! `query.rs` (`#[path]`-included, so it is not a bench target itself).
//!
//! Deterministic: the same seed gives the same rows, so a cached database
//! and a fresh one hold the same data.

// Each bench uses a different part of this module.
#![allow(dead_code)]

use codi_monitor::proto::{LogLevel, Timestamp};
use codi_monitor::store::LogRow;
use std::fmt::Write;
use uuid::{Builder, Uuid};

/// Components a host's tools log under.
pub const COMPONENTS: [&str; 20] = [
    "build",
    "test",
    "deploy",
    "git",
    "lint",
    "fmt",
    "cargo",
    "npm",
    "docker",
    "ssh",
    "http",
    "db",
    "cache",
    "auth",
    "scheduler",
    "watcher",
    "export",
    "sync",
    "agent",
    "shell",
];

/// Appears in about one message in [`RARE_EVERY`]; no other word contains
/// it (no vocabulary word has a `z`).
pub const RARE_WORD: &str = "zeppelin";
/// One message in this many contains [`RARE_WORD`].
pub const RARE_EVERY: u64 = 10_000;

/// Bytes of every message.
pub const MESSAGE_LEN: usize = 150;

/// Sessions over the whole time span (plus up to 9 overlapping at the end).
pub const SESSIONS: u64 = 1_000;

/// Microseconds in the span the rows' timestamps cover.
pub const SPAN_US: i64 = 7 * 24 * 3_600 * 1_000_000;

const WORDS: [&str; 64] = [
    "compiled",
    "crate",
    "request",
    "handled",
    "in",
    "ms",
    "status",
    "ok",
    "failed",
    "retrying",
    "connection",
    "to",
    "upstream",
    "closed",
    "cache",
    "hit",
    "miss",
    "for",
    "key",
    "user",
    "session",
    "started",
    "finished",
    "with",
    "exit",
    "code",
    "wrote",
    "bytes",
    "file",
    "src/io/conn.rs:41",
    "target/release",
    "warning:",
    "unused",
    "import",
    "test",
    "passed",
    "skipped",
    "deploy",
    "step",
    "of",
    "the",
    "a",
    "pipeline",
    "queue",
    "depth",
    "latency",
    "p99",
    "threshold",
    "exceeded",
    "commit",
    "branch",
    "main",
    "merged",
    "into",
    "lock",
    "acquired",
    "released",
    "after",
    "timeout",
    "worker",
    "thread",
    "spawned",
    "checkpoint",
    "done",
];

/// splitmix64: small, fast, good enough for test data.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The first timestamp: 2026-11-19T00:00:00Z, seven days before the
/// benchmarks' date.
pub fn start_us() -> i64 {
    Timestamp::parse_rfc3339("2026-11-19T00:00:00Z")
        .unwrap()
        .as_micros()
}

/// Generates `rows` logs spread over [`SPAN_US`] from [`start_us`], in
/// arrival (roughly timestamp) order, as the daemon would store them.
///
/// About [`SESSIONS`] sessions, each live for about a tenth of a day with
/// about ten overlapping at any time; 5 % of logs have no session. Levels:
/// 10 % Trace, 30 % Debug, 45 % Info, 10 % Warn, 5 % Error. 70 % carry a
/// small metadata map.
pub struct RowGen {
    rows: u64,
    rng: Rng,
    sessions: Vec<String>,
    start_us: i64,
}

impl RowGen {
    /// A generator for a table of `rows` rows.
    pub fn new(rows: u64, seed: u64) -> Self {
        for w in WORDS {
            assert!(!w.contains('z'), "{w} could hide the rare word");
        }
        let mut rng = Rng::new(seed);
        let sessions = (0..SESSIONS + 10)
            .map(|_| {
                let bytes = (u128::from(rng.next()) << 64 | u128::from(rng.next())).to_le_bytes();
                Builder::from_random_bytes(bytes).into_uuid().to_string()
            })
            .collect();
        RowGen {
            rows,
            rng,
            sessions,
            start_us: start_us(),
        }
    }

    /// The id of session `n` (`0..SESSIONS + 10`).
    pub fn session(&self, n: usize) -> &str {
        &self.sessions[n]
    }

    /// Row `i` of `rows`.
    pub fn row(&mut self, i: u64) -> LogRow {
        let rng = &mut self.rng;
        let base = self.start_us + (i as i128 * SPAN_US as i128 / self.rows as i128) as i64;
        // Senders' clocks and queues jitter the order a little.
        let timestamp_us = base + rng.below(1_000_000) as i64 - 500_000;
        let mut random = [0u8; 10];
        random[..8].copy_from_slice(&rng.next().to_le_bytes());
        random[8..].copy_from_slice(&rng.next().to_le_bytes()[..2]);
        let uuid: Uuid =
            Builder::from_unix_timestamp_millis((timestamp_us / 1000) as u64, &random).into_uuid();
        let level = match rng.below(100) {
            0..10 => LogLevel::Trace,
            10..40 => LogLevel::Debug,
            40..85 => LogLevel::Info,
            85..95 => LogLevel::Warn,
            _ => LogLevel::Error,
        };
        let component = COMPONENTS[rng.below(COMPONENTS.len() as u64) as usize].to_owned();
        let session_id = if rng.below(20) == 0 {
            None
        } else {
            let slot = i * SESSIONS / self.rows + rng.below(10);
            Some(self.sessions[slot as usize].clone())
        };
        let mut message = String::with_capacity(MESSAGE_LEN + 32);
        let rare_at = (rng.below(RARE_EVERY) == 0).then(|| rng.below(5));
        let mut n = 0;
        while message.len() < MESSAGE_LEN {
            if !message.is_empty() {
                message.push(' ');
            }
            if rare_at == Some(n) {
                message.push_str(RARE_WORD);
            } else if rng.below(6) == 0 {
                write!(message, "{}", rng.below(100_000)).unwrap();
            } else {
                message.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
            }
            n += 1;
        }
        message.truncate(MESSAGE_LEN);
        let metadata_json = (rng.below(10) < 7).then(|| {
            format!(
                r#"{{"pid":{},"attempt":{},"host":"dev-{}"}}"#,
                1000 + rng.below(60_000),
                1 + rng.below(3),
                rng.below(8)
            )
        });
        LogRow {
            uuid,
            timestamp_us,
            level,
            component,
            session_id,
            message,
            metadata_json,
            uid: None,
        }
    }
}

/// True under `cargo bench` (criterion's own rule: `--bench` and not
/// `--test`); `--list` builds nothing big either.
pub fn benchmarking() -> bool {
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    has("--bench") && !has("--test") && !has("--list")
}
