//! A global cap on bytes of requests accepted but not yet answered, so that
//! memory stays bounded when clients outpace the disk.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes in flight between the event loops and the writer.
#[derive(Debug)]
pub struct InflightBudget {
    limit: usize,
    used: AtomicUsize,
}

impl InflightBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        InflightBudget {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// Takes `bytes` if they fit; a request larger than the whole budget is
    /// let through when nothing else is in flight, so it cannot starve.
    pub fn try_acquire(&self, bytes: usize) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used != 0 && used + bytes > self.limit {
                return false;
            }
            match self.used.compare_exchange_weak(
                used,
                used + bytes,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    /// Returns `bytes` taken by [`InflightBudget::try_acquire`].
    pub fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Bytes currently in flight.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The configured limit.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acquire_release_and_oversize() {
        let b = InflightBudget::new(100);
        assert!(b.try_acquire(60));
        assert!(!b.try_acquire(41));
        assert!(b.try_acquire(40));
        b.release(100);
        assert_eq!(b.used(), 0);
        assert!(b.try_acquire(500), "oversize passes when idle");
        assert!(!b.try_acquire(1));
    }
}
