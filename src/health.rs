//! Why each component is in trouble, if it is, and since when. Two kinds of
//! entries share the table:
//!
//! - **failures**: a component reports trouble when an operation fails and
//!   clears it on the next success ([`Health::fail`], [`Health::recover`]),
//!   so `Status` says what is wrong now (not that something once failed);
//! - **conditions** a component or the watchdog observes (a nearly full
//!   disk, a writer backlog, a missing watched directory) and clears when
//!   they no longer hold ([`Health::set`]).
//!
//! An entry is named after its component (`writer`), or the component and
//! what is wrong (`storage/disk`); [`report`] turns the table into the one
//! health answer that `GetStatus`, `GET /health` and `codi2 status` share.

pub mod report;
pub mod watchdog;

use crate::proto::Timestamp;
use parking_lot::Mutex;
use std::collections::BTreeMap;

/// How bad a trouble is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Works, but not as it should: someone should look.
    Degraded,
    /// Does not work: logs are being lost or refused.
    Failed,
}

/// A component's trouble: the latest reason and when it began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trouble {
    /// What is wrong, in a sentence.
    pub reason: String,
    /// When the trouble began.
    pub since: Timestamp,
    /// Failed operations since then (0 for an observed condition).
    pub failures: u64,
    /// How bad it is.
    pub severity: Severity,
}

/// The components in trouble, by entry name.
#[derive(Debug, Default)]
pub struct Health {
    troubles: Mutex<BTreeMap<&'static str, Trouble>>,
}

impl Health {
    /// Records that an operation of `name` failed because of `reason`.
    pub fn fail(&self, name: &'static str, reason: impl Into<String>) {
        let reason = reason.into();
        let mut troubles = self.troubles.lock();
        let entry = troubles.entry(name).or_insert_with(|| Trouble {
            reason: String::new(),
            since: Timestamp::now(),
            failures: 0,
            severity: Severity::Degraded,
        });
        entry.reason = reason;
        entry.failures += 1;
    }

    /// Records that `name` works again; true if it was in trouble.
    pub fn recover(&self, name: &'static str) -> bool {
        let was = self.troubles.lock().remove(name);
        if let Some(d) = &was {
            log::info!(
                "{name} is healthy again after {} failures since {}",
                d.failures,
                d.since
            );
        }
        was.is_some()
    }

    /// Records whether condition `name` holds now: `Some` with how bad and
    /// why (keeping the time it began), `None` once it no longer does.
    pub fn set(&self, name: &'static str, condition: Option<(Severity, String)>) {
        let mut troubles = self.troubles.lock();
        match condition {
            Some((severity, reason)) => {
                let entry = troubles.entry(name).or_insert_with(|| {
                    log::warn!("{name}: {reason}");
                    Trouble {
                        reason: String::new(),
                        since: Timestamp::now(),
                        failures: 0,
                        severity,
                    }
                });
                entry.reason = reason;
                entry.severity = severity;
            }
            None => {
                if let Some(t) = troubles.remove(name) {
                    log::info!("{name} is healthy again (since {}: {})", t.since, t.reason);
                }
            }
        }
    }

    /// Entry `name`, if it is in trouble.
    pub fn get(&self, name: &str) -> Option<Trouble> {
        self.troubles.lock().get(name).cloned()
    }

    /// Every entry of `component`: the one named after it and those named
    /// `component/...`.
    pub fn of_component(&self, component: &str) -> Vec<(&'static str, Trouble)> {
        self.troubles
            .lock()
            .iter()
            .filter(|(name, _)| {
                name.strip_prefix(component)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
            .map(|(name, t)| (*name, t.clone()))
            .collect()
    }

    /// Every entry in trouble and why, by name.
    pub fn degraded(&self) -> Vec<(&'static str, Trouble)> {
        self.troubles
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

    #[test]
    fn a_condition_keeps_its_start_while_it_holds() {
        let h = Health::default();
        h.set(
            "storage/disk",
            Some((Severity::Degraded, "nearly full".into())),
        );
        let first = h.get("storage/disk").unwrap();
        h.set("storage/disk", Some((Severity::Failed, "full".into())));
        let now = h.get("storage/disk").unwrap();
        assert_eq!((now.since, now.failures), (first.since, 0));
        assert_eq!(
            (now.reason.as_str(), now.severity),
            ("full", Severity::Failed)
        );
        h.set("storage/disk", None);
        assert_eq!(h.get("storage/disk"), None);
    }

    #[test]
    fn entries_belong_to_their_component_by_name() {
        let h = Health::default();
        h.fail("writer", "x");
        h.set("writer/backlog", Some((Severity::Degraded, "y".into())));
        h.set("writers", Some((Severity::Degraded, "z".into())));
        let names: Vec<&str> = h.of_component("writer").iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["writer", "writer/backlog"]);
    }
}
