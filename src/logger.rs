//! The daemon's own log: one line per record on stderr (journald adds its
//! own metadata under systemd). The level can change at run time.
//!
//! Two protections keep the log trustworthy when clients or faults are
//! hostile. Control characters in a record (a directory name with a newline,
//! an escape sequence in an error text) are escaped, so no record can forge
//! another line or drive the operator's terminal. And each call site may
//! write at most [`BURST_PER_SITE`] lines per [`WINDOW`]: a fault that fails
//! every request (a full disk) gives a few lines and then one summary of how
//! many were suppressed, not one line per request.

use crate::text::escape_controls;
use log::{LevelFilter, Log, Metadata, Record};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::Write;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// Lines one call site may write per window.
pub const BURST_PER_SITE: u32 = 10;
/// The rate-limit window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Call sites tracked; beyond it the table is cleared rather than grown.
const MAX_SITES: usize = 4096;

/// What one call site wrote in the current window.
#[derive(Debug, Clone, Copy)]
struct Site {
    window_start: Instant,
    written: u32,
    suppressed: u64,
}

/// Decides, per call site, whether a line is written now, and reports the
/// lines suppressed in the previous window when a new one opens.
#[derive(Debug, Default)]
pub struct RateLimiter {
    sites: HashMap<(&'static str, u32), Site>,
}

/// The rate limiter's verdict on one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Write it; `suppressed` lines from this site were dropped before it.
    Write {
        /// Lines dropped since the last one written.
        suppressed: u64,
    },
    /// Drop it (counted).
    Suppress,
}

impl RateLimiter {
    /// The verdict on a line from `site` at `now`.
    pub fn check(&mut self, site: (&'static str, u32), now: Instant) -> Verdict {
        if self.sites.len() >= MAX_SITES && !self.sites.contains_key(&site) {
            self.sites.clear();
        }
        let entry = self.sites.entry(site).or_insert(Site {
            window_start: now,
            written: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(entry.window_start) >= WINDOW {
            entry.window_start = now;
            entry.written = 0;
        }
        if entry.written < BURST_PER_SITE {
            entry.written += 1;
            let suppressed = std::mem::take(&mut entry.suppressed);
            Verdict::Write { suppressed }
        } else {
            entry.suppressed += 1;
            Verdict::Suppress
        }
    }
}

struct StderrLogger;

static LOGGER: StderrLogger = StderrLogger;
static LIMITER: LazyLock<Mutex<RateLimiter>> = LazyLock::new(Mutex::default);

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let site = (
            record
                .file_static()
                .or(record.module_path_static())
                .unwrap_or("?"),
            record.line().unwrap_or(0),
        );
        let Verdict::Write { suppressed } = LIMITER.lock().check(site, Instant::now()) else {
            return;
        };
        let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ");
        let text = record.args().to_string();
        let text = escape_controls(&text);
        let mut err = std::io::stderr().lock();
        if suppressed > 0 {
            let _ = writeln!(
                err,
                "{now} {:<5} (suppressed {suppressed} similar lines from {}:{} in the last {}s)",
                record.level(),
                site.0,
                site.1,
                WINDOW.as_secs()
            );
        }
        let _ = writeln!(err, "{now} {:<5} {text}", record.level());
    }

    fn flush(&self) {}
}

/// Installs the logger at `level` (once; later calls only change the level).
pub fn init(level: LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_site_gets_a_burst_per_window_then_a_summary_of_what_was_dropped() {
        let mut limiter = RateLimiter::default();
        let start = Instant::now();
        let site = ("src/x.rs", 7);
        for _ in 0..BURST_PER_SITE {
            assert_eq!(limiter.check(site, start), Verdict::Write { suppressed: 0 });
        }
        for _ in 0..500 {
            assert_eq!(limiter.check(site, start), Verdict::Suppress);
        }
        // Another site is not affected.
        assert_eq!(
            limiter.check(("src/y.rs", 1), start),
            Verdict::Write { suppressed: 0 }
        );
        assert_eq!(
            limiter.check(site, start + WINDOW),
            Verdict::Write { suppressed: 500 }
        );
        assert_eq!(
            limiter.check(site, start + WINDOW),
            Verdict::Write { suppressed: 0 }
        );
    }
}
