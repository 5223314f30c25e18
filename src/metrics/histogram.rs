//! Histograms cheap enough for the hot path: fixed bucket bounds and one
//! relaxed atomic add per bucket count and per sum, with no lock. A
//! [`Sharded`] histogram gives each event loop its own cache lines, so
//! loops recording at once never write to the same line; a scrape adds the
//! shards up. (`prometheus-client`'s own histogram takes a mutex on every
//! observation, which the loops would contend for.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Most bucket bounds a histogram may have (plus the overflow bucket).
pub const MAX_BOUNDS: usize = 23;
/// Shards of a [`Sharded`] histogram; loop `i` records into shard
/// `i % SHARDS` (loops beyond it share, still correctly).
pub const SHARDS: usize = 8;

/// One histogram's counts: `counts[i]` holds values `<= bounds[i]` and
/// `> bounds[i - 1]`; the last used slot holds everything above the
/// largest bound. Aligned so that two shards never share a cache line.
#[derive(Debug)]
#[repr(align(128))]
struct Cells {
    counts: [AtomicU64; MAX_BOUNDS + 1],
    sum: AtomicU64,
}

impl Default for Cells {
    fn default() -> Self {
        Cells {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0),
        }
    }
}

impl Cells {
    fn record(&self, bounds: &[u64], value: u64) {
        let bucket = bounds.partition_point(|&b| b < value);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    fn add_to(&self, snapshot: &mut Snapshot) {
        for (total, count) in snapshot.counts.iter_mut().zip(&self.counts) {
            *total += count.load(Ordering::Relaxed);
        }
        snapshot.sum = snapshot.sum.wrapping_add(self.sum.load(Ordering::Relaxed));
    }
}

/// The counts of a histogram at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The upper bounds (inclusive), ascending, in the recorded unit.
    pub bounds: &'static [u64],
    /// Observations per bucket (not cumulative); one more than `bounds`,
    /// the last for values above every bound.
    pub counts: Vec<u64>,
    /// Sum of every value recorded, in the recorded unit.
    pub sum: u64,
}

impl Snapshot {
    fn empty(bounds: &'static [u64]) -> Self {
        Snapshot {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0,
        }
    }

    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// A histogram one thread (or a few) records into.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    cells: Cells,
}

impl Histogram {
    /// A histogram with these inclusive upper bounds (ascending, at most
    /// [`MAX_BOUNDS`]).
    pub fn new(bounds: &'static [u64]) -> Self {
        assert!(
            valid_bounds(bounds),
            "at most {MAX_BOUNDS} ascending bounds"
        );
        Histogram {
            bounds,
            cells: Cells::default(),
        }
    }

    /// Records one value.
    pub fn record(&self, value: u64) {
        self.cells.record(self.bounds, value);
    }

    /// Records a duration in nanoseconds.
    pub fn record_duration(&self, d: Duration) {
        self.record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// The counts now.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::empty(self.bounds);
        self.cells.add_to(&mut s);
        s
    }
}

/// A histogram with one shard per event loop.
#[derive(Debug)]
pub struct Sharded {
    bounds: &'static [u64],
    shards: Box<[Cells]>,
}

impl Sharded {
    /// A sharded histogram with these inclusive upper bounds.
    pub fn new(bounds: &'static [u64]) -> Self {
        assert!(
            valid_bounds(bounds),
            "at most {MAX_BOUNDS} ascending bounds"
        );
        Sharded {
            bounds,
            shards: (0..SHARDS).map(|_| Cells::default()).collect(),
        }
    }

    /// Records a duration in nanoseconds into `shard`'s cells.
    pub fn record_duration(&self, shard: usize, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.shards[shard % SHARDS].record(self.bounds, nanos);
    }

    /// Every shard added up.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::empty(self.bounds);
        for shard in self.shards.iter() {
            shard.add_to(&mut s);
        }
        s
    }
}

fn valid_bounds(bounds: &[u64]) -> bool {
    bounds.len() <= MAX_BOUNDS && bounds.windows(2).all(|w| w[0] < w[1])
}

const US: u64 = 1_000;
const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;

/// Bounds (nanoseconds) of the request-to-answer time.
pub const IPC_BOUNDS: &[u64] = &[
    25 * US,
    50 * US,
    100 * US,
    250 * US,
    500 * US,
    MS,
    2500 * US,
    5 * MS,
    10 * MS,
    25 * MS,
    50 * MS,
    100 * MS,
    250 * MS,
    500 * MS,
    S,
    2500 * MS,
    5 * S,
    10 * S,
];

/// Bounds (nanoseconds) of one commit.
pub const COMMIT_BOUNDS: &[u64] = &[
    100 * US,
    250 * US,
    500 * US,
    MS,
    2500 * US,
    5 * MS,
    10 * MS,
    25 * MS,
    50 * MS,
    100 * MS,
    250 * MS,
    500 * MS,
    S,
    2500 * MS,
    5 * S,
    10 * S,
];

/// Bounds (nanoseconds) from a log's commit to the hub's acknowledgment.
pub const SYNC_BOUNDS: &[u64] = &[
    50 * MS,
    100 * MS,
    250 * MS,
    500 * MS,
    750 * MS,
    S,
    1500 * MS,
    2 * S,
    3 * S,
    4 * S,
    5 * S,
    7500 * MS,
    10 * S,
    15 * S,
    30 * S,
    60 * S,
    120 * S,
    300 * S,
    600 * S,
    1800 * S,
    3600 * S,
];

/// Bounds (rows) of one committed batch.
pub const BATCH_BOUNDS: &[u64] = &[
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_fall_into_the_first_bucket_whose_bound_holds_them() {
        let h = Histogram::new(&[10, 20]);
        for v in [0, 10, 11, 20, 21, u64::MAX / 2] {
            h.record(v);
        }
        let s = h.snapshot();
        assert_eq!(s.counts, [2, 2, 2]);
        assert_eq!(s.count(), 6);
        assert_eq!(s.sum, 10 + 11 + 20 + 21 + u64::MAX / 2);
    }

    #[test]
    fn shards_add_up() {
        let h = Sharded::new(IPC_BOUNDS);
        h.record_duration(0, Duration::from_micros(30));
        h.record_duration(1, Duration::from_micros(30));
        h.record_duration(SHARDS + 1, Duration::from_secs(100));
        let s = h.snapshot();
        assert_eq!(s.count(), 3);
        assert_eq!(s.counts[1], 2, "two in the 50 µs bucket");
        assert_eq!(*s.counts.last().unwrap(), 1, "one above every bound");
        assert_eq!(s.sum, 60_000 + 100 * S);
    }

    #[test]
    fn the_bound_tables_fit() {
        for b in [IPC_BOUNDS, COMMIT_BOUNDS, BATCH_BOUNDS, SYNC_BOUNDS] {
            assert!(valid_bounds(b));
        }
    }
}
