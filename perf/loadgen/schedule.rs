//! The open-loop schedule: when each client's frames are due.
//!
//! The total rate is split evenly over the clients; each client sends one
//! frame every `period`, and client `i` of `n` is offset by `i/n` of a period
//! so the frames of all clients interleave evenly instead of arriving in
//! bursts. A frame's latency is measured from its due time, never from when
//! it actually left: a daemon that stalls shows up as latency, not as a lower
//! offered rate (coordinated omission).

use std::time::Duration;

/// One client's send times, relative to the start of the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Nanoseconds between two frames of this client.
    period_ns: f64,
    /// This client's offset, as a fraction of a period in `[0, 1)`.
    phase: f64,
    /// Frames due before the end of the load phase.
    frames: u64,
}

impl Schedule {
    /// Client `index` of `clients` sending `rate` frames per second in total
    /// (so `rate / clients` each) during `duration`.
    pub fn new(frame_rate: f64, clients: usize, index: usize, duration: Duration) -> Self {
        let per_client = frame_rate / clients as f64;
        let period_ns = 1e9 / per_client;
        let phase = index as f64 / clients as f64;
        let total_ns = duration.as_nanos() as f64;
        // Frames k with (phase + k) * period < duration.
        let frames = if period_ns.is_finite() && period_ns > 0.0 {
            let ahead = total_ns / period_ns - phase;
            if ahead <= 0.0 {
                0
            } else {
                ahead.ceil() as u64
            }
        } else {
            0
        };
        Schedule {
            period_ns,
            phase,
            frames,
        }
    }

    /// When frame `k` is due, from the start of the run.
    pub fn due(&self, k: u64) -> Duration {
        Duration::from_nanos(((self.phase + k as f64) * self.period_ns) as u64)
    }

    /// Frames this client sends during the load phase.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// The time between two of this client's frames.
    pub fn period(&self) -> Duration {
        Duration::from_nanos(self.period_ns as u64)
    }
}

/// Frames per second in total for `logs_per_sec` logs carried `batch` to a
/// frame: with `--batch 100 --rate 100000`, 1,000 frames per second.
pub fn frame_rate(logs_per_sec: f64, batch: usize) -> f64 {
    logs_per_sec / batch as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_entries_count_toward_the_rate() {
        assert_eq!(frame_rate(100_000.0, 100), 1000.0);
        assert_eq!(frame_rate(20_000.0, 1), 20_000.0);
    }

    #[test]
    fn rate_is_split_over_clients_and_phases_interleave() {
        // 1,000 frames/s over 10 clients: 100/s each, every 10 ms.
        let d = Duration::from_secs(1);
        let s0 = Schedule::new(1000.0, 10, 0, d);
        let s5 = Schedule::new(1000.0, 10, 5, d);
        assert_eq!(s0.period(), Duration::from_millis(10));
        assert_eq!(s0.due(0), Duration::ZERO);
        assert_eq!(s0.due(3), Duration::from_millis(30));
        assert_eq!(s5.due(0), Duration::from_millis(5));
        assert_eq!(s5.due(1), Duration::from_millis(15));
        assert_eq!(s0.frames(), 100);
        assert_eq!(s5.frames(), 100);
        let total: u64 = (0..10)
            .map(|i| Schedule::new(1000.0, 10, i, d).frames())
            .sum();
        assert_eq!(total, 1000, "the whole run offers rate x duration frames");
    }

    #[test]
    fn every_due_time_is_inside_the_load_phase() {
        let d = Duration::from_millis(2500);
        for i in 0..7 {
            let s = Schedule::new(333.0, 7, i, d);
            assert!(s.frames() > 0);
            assert!(s.due(s.frames() - 1) < d);
            assert!(s.due(s.frames()) >= d);
        }
    }

    #[test]
    fn a_rate_too_low_for_every_client_leaves_some_idle() {
        // 1 frame/s over 4 clients for 1 s: one frame each every 4 s, and
        // only client 0 (phase 0) is due inside the second.
        let d = Duration::from_secs(1);
        let frames: Vec<u64> = (0..4)
            .map(|i| Schedule::new(1.0, 4, i, d).frames())
            .collect();
        assert_eq!(frames, [1, 0, 0, 0]);
    }
}
