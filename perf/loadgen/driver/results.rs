//! What a driver thread counts and measures: the counters and histograms it
//! shares with the main thread, the counts and result it hands back, and the
//! accounting for every answer and every request given up on.

use super::Driver;
use crate::fifo::{Kind, Matched};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use uuid::Uuid;

/// Highest latency a histogram holds: one hour, in microseconds.
pub const HIST_MAX_US: u64 = 3_600_000_000;
/// Accepted ids kept for the stored-rows check (per thread).
pub const ACCEPTED_ID_CAP: usize = 1_000_000;
/// Error messages kept per thread for the report.
const KEPT_ERRORS: usize = 5;

/// A fresh latency histogram in microseconds (1 µs to 1 h, 3 digits).
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

/// Counters every thread updates for the live progress line.
#[derive(Debug, Default)]
pub struct Progress {
    /// Log entries sent.
    pub entries_sent: AtomicU64,
    /// Log entries acknowledged `Accepted`.
    pub entries_acked: AtomicU64,
    /// Frames sent (logs, pings, queries).
    pub frames_sent: AtomicU64,
    /// Frames answered or given up on.
    pub frames_done: AtomicU64,
    /// Answers that were not `Accepted` or expected results.
    pub failures: AtomicU64,
}

/// What the threads share with the main thread.
pub struct Shared {
    /// Live counters.
    pub progress: Progress,
    /// Acknowledgment latency from the scheduled time, all threads merged.
    pub ack: Mutex<Histogram<u64>>,
}

impl Shared {
    /// Empty counters and histogram.
    pub fn new() -> Self {
        Shared {
            progress: Progress::default(),
            ack: Mutex::new(new_hist()),
        }
    }
}

/// Counts of one thread (and, summed, of the run).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Load frames sent.
    pub frames_sent: u64,
    /// Log entries sent.
    pub entries_sent: u64,
    /// Load frames acknowledged `Accepted`.
    pub frames_accepted: u64,
    /// Log entries acknowledged `Accepted`.
    pub entries_accepted: u64,
    /// Log entries acknowledged `Queued` (not durable).
    pub entries_queued: u64,
    /// Load frames `Rejected`.
    pub frames_rejected: u64,
    /// Log entries `Rejected`.
    pub entries_rejected: u64,
    /// `Error` answers (any request).
    pub errors: u64,
    /// Log entries answered with `Error`.
    pub entries_errored: u64,
    /// Answers that did not fit their request.
    pub protocol_errors: u64,
    /// Answers with no request outstanding.
    pub unsolicited: u64,
    /// Frames sent after their due time because the window was full.
    pub late_sends: u64,
    /// Load frames due during the run that were never sent (window full at the end).
    pub frames_unsent: u64,
    /// Requests never answered (connection lost or drain deadline).
    pub frames_unanswered: u64,
    /// Log entries in those.
    pub entries_unanswered: u64,
    /// Connections the daemon closed or that failed.
    pub connections_lost: u64,
    /// Pings sent.
    pub pings_sent: u64,
    /// Pings answered.
    pub pings_answered: u64,
    /// Queries sent.
    pub queries_sent: u64,
    /// Queries answered with `LogResults`.
    pub queries_answered: u64,
}

impl Counts {
    /// Adds `other` into `self`.
    pub fn add(&mut self, o: &Counts) {
        self.frames_sent += o.frames_sent;
        self.entries_sent += o.entries_sent;
        self.frames_accepted += o.frames_accepted;
        self.entries_accepted += o.entries_accepted;
        self.entries_queued += o.entries_queued;
        self.frames_rejected += o.frames_rejected;
        self.entries_rejected += o.entries_rejected;
        self.errors += o.errors;
        self.entries_errored += o.entries_errored;
        self.protocol_errors += o.protocol_errors;
        self.unsolicited += o.unsolicited;
        self.late_sends += o.late_sends;
        self.frames_unsent += o.frames_unsent;
        self.frames_unanswered += o.frames_unanswered;
        self.entries_unanswered += o.entries_unanswered;
        self.connections_lost += o.connections_lost;
        self.pings_sent += o.pings_sent;
        self.pings_answered += o.pings_answered;
        self.queries_sent += o.queries_sent;
        self.queries_answered += o.queries_answered;
    }
}

/// What a thread hands back when it is done.
pub struct ThreadResult {
    /// Its counts.
    pub counts: Counts,
    /// Acknowledgment latency from the real send time (service time).
    pub service: Histogram<u64>,
    /// Ping round trips, from the scheduled time.
    pub ping: Histogram<u64>,
    /// Query latency, from the scheduled time.
    pub query: Histogram<u64>,
    /// (id, entries) of every accepted load frame, up to [`ACCEPTED_ID_CAP`].
    pub accepted: Vec<(Uuid, u32)>,
    /// True if `accepted` hit its cap.
    pub accepted_truncated: bool,
    /// The first few failure messages.
    pub errors: Vec<String>,
    /// When the last accepted answer arrived.
    pub last_ack: Option<Instant>,
}

impl Driver {
    /// Accounts for one matched answer received at `now`.
    pub(super) fn record(&mut self, matched: Matched, now: Instant) {
        let us = |from: Instant| now.saturating_duration_since(from).as_micros() as u64;
        let r = &mut self.result;
        let c = &mut r.counts;
        let (done, failure) = match matched {
            Matched::Accepted(p) => {
                c.frames_accepted += 1;
                c.entries_accepted += u64::from(p.entries);
                self.shared
                    .progress
                    .entries_acked
                    .fetch_add(u64::from(p.entries), Ordering::Relaxed);
                self.ack_interval.saturating_record(us(p.scheduled));
                r.service.saturating_record(us(p.sent));
                r.last_ack = Some(now);
                if r.accepted.len() < ACCEPTED_ID_CAP {
                    r.accepted.push((p.id, p.entries));
                } else {
                    r.accepted_truncated = true;
                }
                (true, None)
            }
            Matched::Answered(p) => {
                match p.kind {
                    Kind::Ping => {
                        c.pings_answered += 1;
                        r.ping.saturating_record(us(p.scheduled));
                    }
                    Kind::Query => {
                        c.queries_answered += 1;
                        r.query.saturating_record(us(p.scheduled));
                    }
                    Kind::Logs => {}
                }
                (true, None)
            }
            Matched::Queued(p) => {
                c.entries_queued += u64::from(p.entries);
                (
                    true,
                    Some("Queued: acknowledged but not durable".to_owned()),
                )
            }
            Matched::Rejected(p, why) => {
                c.frames_rejected += 1;
                c.entries_rejected += u64::from(p.entries);
                (true, Some(format!("Rejected: {why}")))
            }
            Matched::Error(p, why) => {
                c.errors += 1;
                c.entries_errored += u64::from(p.entries);
                (true, Some(format!("Error {why}")))
            }
            Matched::Protocol(_, why) => {
                c.protocol_errors += 1;
                (true, Some(format!("protocol: {why}")))
            }
            Matched::Unsolicited(what) => {
                c.unsolicited += 1;
                (false, Some(format!("unsolicited answer: {what}")))
            }
        };
        let progress = &self.shared.progress;
        if done {
            progress.frames_done.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(message) = failure {
            progress.failures.fetch_add(1, Ordering::Relaxed);
            self.note_error(message);
        }
    }

    /// A request that will never be answered.
    pub(super) fn finish(&mut self, entries: u32) {
        self.result.counts.frames_unanswered += 1;
        self.result.counts.entries_unanswered += u64::from(entries);
        self.shared
            .progress
            .frames_done
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Keeps `message` for the report if fewer than [`KEPT_ERRORS`] are kept.
    pub(super) fn note_error(&mut self, message: String) {
        if self.result.errors.len() < KEPT_ERRORS {
            self.result.errors.push(message);
        }
    }

    /// Moves this thread's recent ack latencies into the shared histogram.
    pub(super) fn publish(&mut self) {
        if self.ack_interval.is_empty() {
            return;
        }
        let mut shared = self.shared.ack.lock();
        // Same bounds on both sides, so adding cannot fail.
        let _ = shared.add(&self.ack_interval);
        drop(shared);
        self.ack_interval.reset();
    }
}

/// Counts one frame of `kind` (with `entries` log entries) as sent.
pub(super) fn count_sent(c: &mut Counts, progress: &Progress, kind: Kind, entries: u32) {
    match kind {
        Kind::Logs => {
            c.frames_sent += 1;
            c.entries_sent += u64::from(entries);
            progress
                .entries_sent
                .fetch_add(u64::from(entries), Ordering::Relaxed);
        }
        Kind::Ping => c.pings_sent += 1,
        Kind::Query => c.queries_sent += 1,
    }
    progress.frames_sent.fetch_add(1, Ordering::Relaxed);
}
