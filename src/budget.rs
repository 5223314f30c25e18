//! Global caps on bytes held for clients: requests accepted but not yet
//! answered (so that memory stays bounded when clients outpace the disk),
//! and query answers not yet written out (so that clients that do not read
//! cannot make the daemon hold answers without bound).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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

/// A running total of the bytes one party (a connection) holds through its
/// [`Reservation`]s; clones share the total.
#[derive(Debug, Clone, Default)]
pub struct Holder(Arc<AtomicUsize>);

impl Holder {
    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// Bytes taken from a budget and charged to a [`Holder`]; given back to
/// both when dropped, on whichever thread and path that happens.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<InflightBudget>,
    holder: Holder,
    bytes: usize,
}

impl InflightBudget {
    /// Takes `bytes` for `holder` if they fit (by the rule of
    /// [`InflightBudget::try_acquire`]).
    pub fn try_reserve(self: &Arc<Self>, bytes: usize, holder: &Holder) -> Option<Reservation> {
        if !self.try_acquire(bytes) {
            return None;
        }
        holder.0.fetch_add(bytes, Ordering::AcqRel);
        Some(Reservation {
            budget: Arc::clone(self),
            holder: holder.clone(),
            bytes,
        })
    }
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Gives back all but `bytes` (nothing if it holds no more than that).
    pub fn shrink_to(&mut self, bytes: usize) {
        if bytes < self.bytes {
            let freed = self.bytes - bytes;
            self.bytes = bytes;
            self.budget.release(freed);
            self.holder.0.fetch_sub(freed, Ordering::AcqRel);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.shrink_to(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_charge_budget_and_holder_until_dropped() {
        let pool = Arc::new(InflightBudget::new(100));
        let (a, b) = (Holder::default(), Holder::default());
        let mut first = pool.try_reserve(60, &a).unwrap();
        let second = pool.try_reserve(30, &a).unwrap();
        assert!(pool.try_reserve(20, &b).is_none(), "90 of 100 used");
        assert_eq!((pool.used(), a.held(), b.held()), (90, 90, 0));
        first.shrink_to(10);
        assert_eq!((pool.used(), a.held(), first.bytes()), (40, 40, 10));
        first.shrink_to(50);
        assert_eq!(first.bytes(), 10, "shrinking never grows");
        let third = pool.try_reserve(60, &b).unwrap();
        assert_eq!((pool.used(), b.held()), (100, 60));
        // Dropped on another thread, as a reader or a closing loop would.
        std::thread::spawn(move || drop((first, second, third)))
            .join()
            .unwrap();
        assert_eq!((pool.used(), a.held(), b.held()), (0, 0, 0));
    }

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
