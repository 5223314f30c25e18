//! When the writer waits a moment for more rows before it commits: a
//! bounded, adaptive group-commit delay, in the spirit of PostgreSQL's
//! `commit_delay`.
//!
//! Under steady load many small commits each pay SQLite's whole commit
//! cost (WAL frames, locks, the wake-ups of every loop that waits on an
//! answer) for one or two rows. So while commits come close together
//! (load is steady) and little is queued, the writer sleeps before it
//! looks at the queue again, and then takes everything queued meanwhile
//! as one batch: for as long as [`TARGET_ROWS`] take to arrive at the rate
//! rows have been arriving, and never longer than the configured delay.
//! It sleeps rather than waiting on the queue: the event loops that queue
//! jobs meanwhile wake nobody, and the writer wakes once per batch. A job
//! after a quiet moment, and a queue already holding a full batch, never
//! wait; an answer waits at most the delay longer than without it.

use std::time::{Duration, Instant};

/// Rows a pause aims to gather: past a few dozen rows a commit's fixed
/// cost is spread thin, and waiting longer only adds latency.
pub(super) const TARGET_ROWS: f64 = 64.0;

/// Queued jobs from which the writer takes the next batch at once.
pub(super) const FULL_ENOUGH_JOBS: usize = 256;

/// Weight of the newest batch in the arrival-rate estimate.
const RATE_WEIGHT: f64 = 0.25;

/// The group-commit policy and what it remembers of the last commits.
#[derive(Debug)]
pub(super) struct GroupCommit {
    /// Longest pause; zero turns pausing off.
    max_delay: Duration,
    /// When the last commit ended.
    last_commit: Option<Instant>,
    /// Whether the last commit ended soon after the one before it.
    steady: bool,
    /// Rows per second arriving, estimated over the last steady batches.
    rate: f64,
}

impl GroupCommit {
    /// A policy pausing at most `max_delay` between steady batches.
    pub(super) fn new(max_delay: Duration) -> Self {
        GroupCommit {
            max_delay,
            last_commit: None,
            steady: false,
            rate: 0.0,
        }
    }

    /// How long to sleep before taking the next batch, with `queued` jobs
    /// waiting now: zero unless load is steady and the queue is short.
    pub(super) fn pause(&self, queued: usize) -> Duration {
        if !self.steady || queued >= FULL_ENOUGH_JOBS || self.rate <= 0.0 {
            return Duration::ZERO;
        }
        let fill = Duration::from_secs_f64((TARGET_ROWS / self.rate).min(1.0));
        fill.min(self.max_delay)
    }

    /// Notes that a commit of `rows` rows ended at `at`.
    pub(super) fn committed(&mut self, rows: usize, at: Instant) {
        let since = self
            .last_commit
            .map(|last| at.saturating_duration_since(last));
        self.last_commit = Some(at);
        self.steady =
            !self.max_delay.is_zero() && since.is_some_and(|since| since < self.max_delay * 2);
        if !self.steady {
            self.rate = 0.0;
            return;
        }
        let since = since.unwrap_or_default().as_secs_f64().max(1e-6);
        let now = rows as f64 / since;
        self.rate = if self.rate > 0.0 {
            self.rate + RATE_WEIGHT * (now - self.rate)
        } else {
            now
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_first_commit_and_one_after_a_quiet_moment_do_not_wait() {
        let t0 = Instant::now();
        let mut group = GroupCommit::new(MS);
        assert_eq!(group.pause(1), Duration::ZERO, "no commit yet");
        group.committed(1, t0);
        assert_eq!(
            group.pause(1),
            Duration::ZERO,
            "one commit is not steady load"
        );
        group.committed(1, t0 + 5 * MS);
        assert_eq!(
            group.pause(1),
            Duration::ZERO,
            "5 ms between commits is quiet"
        );
    }

    #[test]
    fn slow_steady_load_waits_the_whole_delay() {
        let t0 = Instant::now();
        let mut group = GroupCommit::new(2 * MS);
        group.committed(1, t0);
        // 1 row in 3 ms: 64 rows would take far longer than the cap.
        group.committed(1, t0 + 3 * MS);
        assert_eq!(group.pause(0), 2 * MS);
        assert_eq!(group.pause(FULL_ENOUGH_JOBS - 1), 2 * MS);
    }

    #[test]
    fn fast_steady_load_waits_as_long_as_the_target_takes_to_arrive() {
        let t0 = Instant::now();
        let mut group = GroupCommit::new(2 * MS);
        group.committed(10, t0);
        // 128 rows in 1 ms: 64 more arrive in half a millisecond.
        group.committed(128, t0 + MS);
        let pause = group.pause(0);
        assert!(pause > MS / 4 && pause < 3 * MS / 4, "{pause:?}");
    }

    #[test]
    fn a_full_queue_and_a_zero_delay_never_wait() {
        let t0 = Instant::now();
        let mut group = GroupCommit::new(MS);
        group.committed(1, t0);
        group.committed(1, t0 + MS / 2);
        assert!(group.pause(0) > Duration::ZERO);
        assert_eq!(group.pause(FULL_ENOUGH_JOBS), Duration::ZERO);
        let mut off = GroupCommit::new(Duration::ZERO);
        off.committed(1, t0);
        off.committed(1, t0);
        assert_eq!(off.pause(0), Duration::ZERO);
    }
}
