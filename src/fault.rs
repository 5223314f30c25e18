//! Fault points for crash tests: `CODI_FAULT=NAME` (or `NAME:N`, the
//! `N`th time) makes the process abort at the point called `NAME`, as a
//! `kill -9` there would: no destructor runs, nothing more is written.
//! Unset (always, outside tests), a point costs one check of a value read once.
//! Only whoever starts the daemon sets its environment.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The fault asked for: its point's name and on which hit it fires.
fn wanted() -> Option<&'static (String, u64)> {
    static WANTED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    WANTED
        .get_or_init(|| {
            let spec = std::env::var("CODI_FAULT").ok()?;
            let (name, nth) = match spec.split_once(':') {
                Some((name, n)) => (name, n.parse().ok()?),
                None => (spec.as_str(), 1),
            };
            Some((name.to_owned(), nth))
        })
        .as_ref()
}

/// Aborts the process if `CODI_FAULT` names `name` and this is its hit.
pub fn point(name: &str) {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let Some((wanted, nth)) = wanted() else {
        return;
    };
    if wanted == name && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *nth {
        eprintln!("codi-monitor: fault point {name} reached (CODI_FAULT): aborting");
        std::process::abort();
    }
}
