//! Why each component is degraded, if it is, and since when. A component
//! reports trouble when an operation fails and clears it on the next
//! success, so `Status` says what is wrong now (not that something once
//! failed) and turns healthy again when the fault goes away.

use crate::proto::Timestamp;
use parking_lot::Mutex;
use std::collections::BTreeMap;

/// A degraded component: the latest reason and when the trouble began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Degraded {
    /// What failed last, in a sentence.
    pub reason: String,
    /// When the component stopped being healthy.
    pub since: Timestamp,
    /// Failures since then.
    pub failures: u64,
}

/// The degraded components, by name.
#[derive(Debug, Default)]
pub struct Health {
    degraded: Mutex<BTreeMap<&'static str, Degraded>>,
}

impl Health {
    /// Records that `component` failed because of `reason`.
    pub fn fail(&self, component: &'static str, reason: impl Into<String>) {
        let reason = reason.into();
        let mut degraded = self.degraded.lock();
        let entry = degraded.entry(component).or_insert_with(|| Degraded {
            reason: String::new(),
            since: Timestamp::now(),
            failures: 0,
        });
        entry.reason = reason;
        entry.failures += 1;
    }

    /// Records that `component` works again; true if it was degraded.
    pub fn recover(&self, component: &'static str) -> bool {
        let was = self.degraded.lock().remove(component);
        if let Some(d) = &was {
            log::info!(
                "{component} is healthy again after {} failures since {}",
                d.failures,
                d.since
            );
        }
        was.is_some()
    }

    /// Whether `component` is degraded, and why.
    pub fn get(&self, component: &str) -> Option<Degraded> {
        self.degraded.lock().get(component).cloned()
    }

    /// Every degraded component and why, by name.
    pub fn degraded(&self) -> Vec<(&'static str, Degraded)> {
        self.degraded
            .lock()
            .iter()
            .map(|(name, d)| (*name, d.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_degrades_until_the_next_success() {
        let h = Health::default();
        assert_eq!(h.get("writer"), None);
        h.fail("writer", "disk full");
        h.fail("writer", "disk still full");
        let d = h.get("writer").unwrap();
        assert_eq!((d.reason.as_str(), d.failures), ("disk still full", 2));
        h.fail("merger", "locked");
        let names: Vec<&str> = h.degraded().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["merger", "writer"]);
        assert!(h.recover("writer"));
        assert_eq!(h.get("writer"), None);
        assert!(!h.recover("writer"));
    }
}
