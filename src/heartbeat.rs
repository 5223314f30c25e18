//! Progress markers that let a supervisor tell a working daemon from a
//! stuck one, so that systemd's watchdog restarts the daemon only when it
//! really stopped serving (see [`crate::notify`]).
//!
//! A timer that pings regardless would prove only that one thread runs.
//! Instead each component that must keep moving holds a [`Pulse`] and says
//! what it is doing: an event loop beats each time it comes round (its poll
//! timeout is bounded by [`Heartbeats::tick`] so an idle loop still comes
//! round); the writer beats when a transaction ends and says when it is
//! idle with nothing queued, which is healthy however long it lasts. A
//! component is stuck when it is not idle and has not beaten for longer
//! than the limit: a writer blocked in SQLite on another connection's lock
//! while logs wait is stuck; a writer with nothing to do is not.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Every registered pulse, and the limit they are held to.
#[derive(Debug)]
pub struct Heartbeats {
    epoch: Instant,
    /// How long a working component may go without progress, in
    /// microseconds; 0 while nobody watches (no watchdog).
    limit_us: AtomicU64,
    pulses: Mutex<Vec<Arc<PulseState>>>,
}

impl Default for Heartbeats {
    fn default() -> Self {
        Heartbeats {
            epoch: Instant::now(),
            limit_us: AtomicU64::new(0),
            pulses: Mutex::new(Vec::new()),
        }
    }
}

/// A component found stuck by [`Heartbeats::stuck`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stuck {
    /// The component, as registered.
    pub name: String,
    /// What it failed to do, as registered.
    pub stalled: &'static str,
    /// How long it has gone without progress.
    pub stalled_for: Duration,
}

impl std::fmt::Display for Stuck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} for {:.1}s",
            self.name,
            self.stalled,
            self.stalled_for.as_secs_f64()
        )
    }
}

impl Heartbeats {
    /// Holds every component to `limit` from now on: components must show
    /// progress at least that often, and loops come round at least every
    /// [`tick`](Self::tick). Call before the components start.
    pub fn watch(&self, limit: Duration) {
        let us = u64::try_from(limit.as_micros()).unwrap_or(u64::MAX).max(1);
        self.limit_us.store(us, Ordering::Relaxed);
    }

    /// The limit set by [`watch`](Self::watch), if any.
    pub fn limit(&self) -> Option<Duration> {
        match self.limit_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// The longest a component waiting for events may sleep: half the
    /// limit, so an idle loop beats twice per limit. `None` (sleep as long
    /// as you like) while nobody watches.
    pub fn tick(&self) -> Option<Duration> {
        self.limit().map(|limit| limit / 2)
    }

    /// Registers a component called `name` that is working from now on;
    /// `stalled` says what it fails to do when stuck (e.g. "has not come
    /// round"), for the log and `Status`.
    pub fn register(&self, name: impl Into<String>, stalled: &'static str) -> Pulse {
        let state = Arc::new(PulseState {
            name: name.into(),
            stalled,
            progress_us: AtomicU64::new(self.micros(Instant::now())),
            idle: AtomicBool::new(false),
        });
        self.pulses.lock().push(Arc::clone(&state));
        Pulse {
            epoch: self.epoch,
            state,
        }
    }

    /// The components that, at `now`, have been working without progress
    /// for longer than `limit`.
    pub fn stuck(&self, now: Instant, limit: Duration) -> Vec<Stuck> {
        let now_us = self.micros(now);
        self.pulses
            .lock()
            .iter()
            .filter_map(|p| {
                // Idle first: a component that stops idling stores its new
                // start before it clears the flag (see `Pulse::working`).
                if p.idle.load(Ordering::Acquire) {
                    return None;
                }
                let since = p.progress_us.load(Ordering::Acquire);
                let stalled_for = Duration::from_micros(now_us.saturating_sub(since));
                (stalled_for > limit).then(|| Stuck {
                    name: p.name.clone(),
                    stalled: p.stalled,
                    stalled_for,
                })
            })
            .collect()
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }
}

#[derive(Debug)]
struct PulseState {
    name: String,
    stalled: &'static str,
    /// When the component last made progress (or began working after
    /// being idle), in microseconds since the epoch.
    progress_us: AtomicU64,
    /// Waiting for work with nothing to do.
    idle: AtomicBool,
}

/// One component's progress marker; only that component's thread updates
/// it.
#[derive(Debug)]
pub struct Pulse {
    epoch: Instant,
    state: Arc<PulseState>,
}

impl Pulse {
    /// Progress now (a loop came round, a transaction ended).
    pub fn beat(&self) {
        self.beat_at(Instant::now());
    }

    /// Nothing to do: healthy however long it lasts, until
    /// [`working`](Self::working).
    pub fn idle(&self) {
        self.state.idle.store(true, Ordering::Release);
    }

    /// Work has arrived: if the component was idle, the time it may take
    /// without progress starts now; if it was working already, it goes on
    /// counting from the last progress.
    pub fn working(&self) {
        self.working_at(Instant::now());
    }

    /// Progress at `now`, for a caller that has just read the clock.
    pub fn beat_at(&self, now: Instant) {
        self.state
            .progress_us
            .store(self.micros(now), Ordering::Release);
    }

    fn working_at(&self, now: Instant) {
        if self.state.idle.load(Ordering::Relaxed) {
            self.beat_at(now);
            self.state.idle.store(false, Ordering::Release);
        }
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    fn names(stuck: &[Stuck]) -> Vec<&str> {
        stuck.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn a_working_component_is_stuck_once_it_goes_past_the_limit_without_a_beat() {
        let h = Heartbeats::default();
        let start = Instant::now();
        let pulse = h.register("loop 0", "has not come round");
        pulse.beat_at(start);
        assert!(h.stuck(start + LIMIT, LIMIT).is_empty());
        let stuck = h.stuck(start + LIMIT + MS, LIMIT);
        assert_eq!(names(&stuck), ["loop 0"]);
        assert_eq!(stuck[0].stalled_for, LIMIT + MS);
        assert_eq!(stuck[0].to_string(), "loop 0 has not come round for 1.0s");
        // One beat and it is fine again.
        pulse.beat_at(start + 5 * LIMIT);
        assert!(h.stuck(start + 5 * LIMIT + LIMIT / 2, LIMIT).is_empty());
    }

    #[test]
    fn an_idle_component_is_never_stuck_and_its_clock_starts_when_work_arrives() {
        let h = Heartbeats::default();
        let start = Instant::now();
        let writer = h.register("writer", "has not finished a transaction");
        writer.beat_at(start);
        writer.idle();
        // An hour with nothing queued is healthy.
        let later = start + Duration::from_secs(3600);
        assert!(h.stuck(later, LIMIT).is_empty());
        // Work arrives: the hour of idling does not count against it.
        writer.working_at(later);
        assert!(h.stuck(later + LIMIT / 2, LIMIT).is_empty());
        // Blocked (say on a lock) past the limit with that work: stuck.
        assert_eq!(names(&h.stuck(later + 2 * LIMIT, LIMIT)), ["writer"]);
    }

    #[test]
    fn more_work_while_working_does_not_restart_the_clock() {
        let h = Heartbeats::default();
        let start = Instant::now();
        let writer = h.register("writer", "has not finished a transaction");
        writer.beat_at(start);
        // Batch after batch fails on a lock: each takes the next one, but
        // only a transaction that ends counts as progress.
        for i in 1..5 {
            writer.working_at(start + i * LIMIT);
        }
        assert_eq!(names(&h.stuck(start + 5 * LIMIT, LIMIT)), ["writer"]);
    }

    #[test]
    fn only_the_stuck_components_are_named() {
        let h = Heartbeats::default();
        let start = Instant::now();
        let a = h.register("loop 0", "has not come round");
        let b = h.register("loop 1", "has not come round");
        a.beat_at(start);
        b.beat_at(start + 2 * LIMIT);
        assert_eq!(names(&h.stuck(start + 2 * LIMIT, LIMIT)), ["loop 0"]);
    }

    #[test]
    fn nobody_watches_until_a_limit_is_set() {
        let h = Heartbeats::default();
        assert_eq!((h.limit(), h.tick()), (None, None));
        h.watch(Duration::from_secs(15));
        assert_eq!(h.limit(), Some(Duration::from_secs(15)));
        assert_eq!(h.tick(), Some(Duration::from_millis(7500)));
    }
}
