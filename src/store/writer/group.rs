//! When the writer waits a moment for more rows before it commits: a
//! bounded, adaptive group-commit pause, in the spirit of PostgreSQL's
//! `commit_delay`.
//!
//! Under steady load many small commits each pay SQLite's whole commit
//! cost (WAL frames, locks, the wake-ups of every loop that waits on an
//! answer) for one or two rows. So while commits come close together
//! (load is steady), the last batch was not already full and little is
//! queued, the writer sleeps before it looks at the queue again, and then
//! takes everything queued meanwhile as one batch. It sleeps for as long
//! as [`TARGET_ROWS`] take to arrive at the rate rows have been arriving,
//! and never longer than the configured delay. It sleeps rather than
//! waiting on the queue: the event loops that queue jobs meanwhile wake
//! nobody, and the writer wakes once per batch.
//!
//! A pause that gathers no second job was wasted (one client sending one
//! request at a time, say, whose next request waits for this answer).
//! After [`WASTED_BEFORE_SHRINKING`] wasted pauses in a row the next pause
//! is half as long, down to 1/64 of the delay, and a pause that gathers
//! company doubles it back. (One wasted pause proves little: at 1,000
//! clients sending 1,000 logs/s in all, a 2 ms pause gathers a single job
//! about a third of the time.) At the shortest, only every
//! [`PROBE_EVERY`]th batch pauses, to find out whether company has come. A job after a quiet moment, and a
//! queue already holding a full batch, never wait; an answer waits at
//! most the delay longer than without it.

use std::time::{Duration, Instant};

/// Rows a pause aims to gather: past a few dozen rows a commit's fixed
/// cost is spread thin, and waiting longer only adds latency.
pub(super) const TARGET_ROWS: usize = 64;

/// Queued jobs from which the writer takes the next batch at once.
pub(super) const FULL_ENOUGH_JOBS: usize = 256;

/// Weight of the newest batch in the arrival-rate estimate.
const RATE_WEIGHT: f64 = 0.25;

/// The shortest pause, as a fraction of the delay, after wasted pauses.
const MIN_SCALE: f64 = 1.0 / 64.0;

/// At the shortest pause, one batch in this many pauses.
pub(super) const PROBE_EVERY: u32 = 16;

/// Wasted pauses in a row that halve the next one.
pub(super) const WASTED_BEFORE_SHRINKING: u32 = 4;

/// What one committed batch was, as the policy needs to know it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Batch {
    /// Log rows in it.
    pub(super) rows: usize,
    /// Log jobs in it.
    pub(super) jobs: usize,
    /// Whether the writer paused before taking it.
    pub(super) paused: bool,
    /// Whether it stopped at the batch's row limit with more queued.
    pub(super) full: bool,
}

/// The group-commit policy and what it remembers of the last commits.
#[derive(Debug)]
pub(super) struct GroupCommit {
    /// Longest pause; zero turns pausing off.
    max_delay: Duration,
    /// Rows one pause aims at: [`TARGET_ROWS`], or fewer when a batch may
    /// hold fewer.
    target_rows: usize,
    /// When the last commit ended.
    last_commit: Option<Instant>,
    /// Whether the last commit ended soon after the one before it, with
    /// nothing left behind.
    steady: bool,
    /// Rows per second arriving, estimated over the last steady batches.
    rate: f64,
    /// The share of the delay a pause may take now (halved by each wasted
    /// pause).
    scale: f64,
    /// Batches left before the next pause while at the shortest one.
    probe_in: u32,
    /// Wasted pauses since the last one that gathered company.
    wasted_in_row: u32,
}

impl GroupCommit {
    /// A policy pausing at most `max_delay` between steady batches of at
    /// most `batch_max_rows` rows.
    pub(super) fn new(max_delay: Duration, batch_max_rows: usize) -> Self {
        GroupCommit {
            max_delay,
            target_rows: TARGET_ROWS.min(batch_max_rows.max(1)),
            last_commit: None,
            steady: false,
            rate: 0.0,
            scale: 1.0,
            probe_in: 0,
            wasted_in_row: 0,
        }
    }

    /// How long to sleep, at `now`, before taking the next batch, with
    /// `queued` jobs waiting: zero unless load is steady, the last commit
    /// was recent and the queue is short.
    pub(super) fn pause(&self, queued: usize, now: Instant) -> Duration {
        let recent = self
            .last_commit
            .is_some_and(|at| now.saturating_duration_since(at) < self.steady_gap());
        let resting = self.probe_in > 0;
        if !self.steady || !recent || resting || queued >= FULL_ENOUGH_JOBS || self.rate <= 0.0 {
            return Duration::ZERO;
        }
        let fill = Duration::from_secs_f64((self.target_rows as f64 / self.rate).min(1.0));
        fill.min(self.max_delay.mul_f64(self.scale))
    }

    /// Notes that `batch` committed (or failed: either way it is done) at
    /// `at`.
    pub(super) fn committed(&mut self, batch: Batch, at: Instant) {
        if batch.paused && batch.jobs <= 1 {
            self.wasted_in_row += 1;
            if self.scale <= MIN_SCALE {
                self.probe_in = PROBE_EVERY - 1;
            } else if self.wasted_in_row >= WASTED_BEFORE_SHRINKING {
                self.scale = (self.scale / 2.0).max(MIN_SCALE);
                self.wasted_in_row = 0;
            }
        } else if batch.paused {
            self.wasted_in_row = 0;
            self.scale = (self.scale * 2.0).min(1.0);
        } else {
            self.probe_in = self.probe_in.saturating_sub(1);
        }
        let since = self
            .last_commit
            .map(|last| at.saturating_duration_since(last));
        self.last_commit = Some(at);
        self.steady = !self.max_delay.is_zero()
            && !batch.full
            && since.is_some_and(|since| since < self.steady_gap());
        if !self.steady {
            self.rate = 0.0;
            return;
        }
        let since = since.unwrap_or_default().as_secs_f64().max(1e-6);
        let now = batch.rows as f64 / since;
        self.rate = if self.rate > 0.0 {
            self.rate + RATE_WEIGHT * (now - self.rate)
        } else {
            now
        };
    }

    /// Commits closer together than this count as steady load.
    fn steady_gap(&self) -> Duration {
        self.max_delay.saturating_mul(2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn batch(rows: usize, paused: bool) -> Batch {
        Batch {
            rows,
            jobs: rows,
            paused,
            full: false,
        }
    }

    #[test]
    fn the_first_commit_and_one_after_a_quiet_moment_do_not_wait() {
        let t0 = Instant::now();
        let mut group = GroupCommit::new(MS, 8192);
        assert_eq!(group.pause(1, t0), Duration::ZERO, "no commit yet");
        group.committed(batch(1, false), t0);
        assert_eq!(
            group.pause(1, t0),
            Duration::ZERO,
            "one commit is not steady load"
        );
        group.committed(batch(1, false), t0 + 5 * MS);
        assert_eq!(
            group.pause(1, t0 + 5 * MS),
            Duration::ZERO,
            "5 ms apart is quiet"
        );
    }

    #[test]
    fn steady_load_stops_counting_once_it_has_gone_quiet() {
        let t0 = Instant::now();
        let mut group = GroupCommit::new(2 * MS, 8192);
        group.committed(batch(1, false), t0);
        group.committed(batch(1, false), t0 + 3 * MS);
        assert_eq!(group.pause(0, t0 + 3 * MS), 2 * MS);
        assert_eq!(group.pause(0, t0 + 3600 * 1000 * MS), Duration::ZERO);
    }

    #[test]
    fn slow_steady_load_waits_the_whole_delay() {
        let t0 = Instant::now();
        let mut group = GroupCommit::new(2 * MS, 8192);
        group.committed(batch(1, false), t0);
        // 1 row in 3 ms: 64 rows would take far longer than the cap.
        let at = t0 + 3 * MS;
        group.committed(batch(1, false), at);
        assert_eq!(group.pause(0, at), 2 * MS);
        assert_eq!(group.pause(FULL_ENOUGH_JOBS - 1, at), 2 * MS);
    }

    #[test]
    fn fast_steady_load_waits_as_long_as_the_target_takes_to_arrive() {
        let t0 = Instant::now();
        let mut group = GroupCommit::new(2 * MS, 8192);
        group.committed(batch(10, false), t0);
        // 128 rows in 1 ms: 64 more arrive in half a millisecond.
        group.committed(batch(128, false), t0 + MS);
        let pause = group.pause(0, t0 + MS);
        assert!(pause > MS / 4 && pause < 3 * MS / 4, "{pause:?}");
    }

    #[test]
    fn wasted_pauses_shrink_and_fruitful_ones_grow_back() {
        let t0 = Instant::now();
        let mut group = GroupCommit::new(2 * MS, 8192);
        let mut at = t0;
        group.committed(batch(1, false), at);
        // Three wasted pauses, then one with company: nothing shrinks.
        for _ in 0..WASTED_BEFORE_SHRINKING - 1 {
            at += 2 * MS;
            group.committed(batch(1, true), at);
        }
        at += 2 * MS;
        group.committed(batch(3, true), at);
        assert_eq!(group.pause(0, at), 2 * MS);
        // One client, one request at a time: every pause gathers one job,
        // down to the shortest pause (six halvings), and one more there.
        for _ in 0..6 * WASTED_BEFORE_SHRINKING + 1 {
            at += 2 * MS;
            group.committed(batch(1, true), at);
        }
        // At the shortest pause only every PROBE_EVERY-th batch pauses.
        assert_eq!(group.pause(0, at), Duration::ZERO);
        for _ in 0..PROBE_EVERY - 1 {
            assert_eq!(group.pause(0, at), Duration::ZERO);
            at += MS / 10;
            group.committed(batch(1, false), at);
        }
        assert_eq!(group.pause(0, at), (2 * MS).mul_f64(MIN_SCALE));
        for _ in 0..6 {
            at += 2 * MS;
            group.committed(batch(2, true), at);
        }
        assert_eq!(group.pause(0, at), 2 * MS);
    }

    #[test]
    fn a_full_batch_a_full_queue_and_a_zero_delay_never_wait() {
        let t0 = Instant::now();
        let mut group = GroupCommit::new(MS, 8192);
        group.committed(batch(1, false), t0);
        group.committed(batch(1, false), t0 + MS / 2);
        assert!(group.pause(0, t0 + MS / 2) > Duration::ZERO);
        assert_eq!(group.pause(FULL_ENOUGH_JOBS, t0 + MS / 2), Duration::ZERO);
        let full = Batch {
            full: true,
            ..batch(8192, false)
        };
        group.committed(full, t0 + MS);
        assert_eq!(group.pause(0, t0 + MS), Duration::ZERO);
        let mut off = GroupCommit::new(Duration::ZERO, 8192);
        off.committed(batch(1, false), t0);
        off.committed(batch(1, false), t0);
        assert_eq!(off.pause(0, t0), Duration::ZERO);
    }

    #[test]
    fn a_small_batch_limit_lowers_the_target() {
        let t0 = Instant::now();
        let mut group = GroupCommit::new(2 * MS, 4);
        group.committed(batch(4, false), t0);
        // 4 rows per ms: a batch of 4 fills in 1 ms.
        group.committed(batch(4, false), t0 + MS);
        let pause = group.pause(0, t0 + MS);
        assert!(pause > MS / 2 && pause < 3 * MS / 2, "{pause:?}");
    }
}
