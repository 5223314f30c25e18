//! The daemon's own log: one line per record on stderr. The level can
//! change at run time.
//!
//! On a terminal or in a file each line starts with a UTC timestamp and the
//! level. When stderr is systemd's journal stream (`$JOURNAL_STREAM` names
//! the device and inode of fd 2, as systemd documents), journald stamps
//! each line itself, so the timestamp goes and a syslog priority prefix
//! (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug and trace) comes
//! instead: `journalctl -p err` then finds the daemon's errors.
//!
//! Two protections keep the log trustworthy when clients or faults are
//! hostile. Control characters in a record (a directory name with a newline,
//! an escape sequence in an error text) are escaped, so no record can forge
//! another line or drive the operator's terminal. And each call site may
//! write at most [`BURST_PER_SITE`] lines per [`WINDOW`]: a fault that fails
//! every request (a full disk) gives a few lines and then one summary of how
//! many were suppressed, not one line per request.

use crate::text::escape_controls;
use log::{Level, LevelFilter, Log, Metadata, Record};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt::Display;
use std::io::Write;
use std::sync::{LazyLock, OnceLock};
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

/// How each line starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// `2024-05-01T12:00:00.000Z INFO  text`: for a terminal or a file.
    Plain,
    /// `<6>INFO  text`: for journald, which adds the time itself and reads
    /// the priority from the prefix.
    Journal,
}

impl Style {
    /// [`Style::Journal`] when `$JOURNAL_STREAM` names the file behind
    /// fd 2, else [`Style::Plain`]. Read once: stderr does not change.
    pub fn of_stderr() -> Style {
        static STYLE: OnceLock<Style> = OnceLock::new();
        *STYLE.get_or_init(|| {
            use std::os::fd::AsFd;
            use std::os::unix::fs::MetadataExt;
            // A duplicate of fd 2, only to stat it.
            let stat = std::io::stderr()
                .as_fd()
                .try_clone_to_owned()
                .and_then(|fd| std::fs::File::from(fd).metadata())
                .ok()
                .map(|m| (m.dev(), m.ino()));
            Style::detect(std::env::var_os("JOURNAL_STREAM").as_deref(), stat)
        })
    }

    /// The style for a `$JOURNAL_STREAM` of `journal_stream` ("DEV:INODE",
    /// both decimal) and a stderr with device and inode `stderr`: journal
    /// only if both match, so a variable inherited by a process whose
    /// stderr was redirected elsewhere is ignored.
    pub fn detect(journal_stream: Option<&OsStr>, stderr: Option<(u64, u64)>) -> Style {
        let named = journal_stream
            .and_then(OsStr::to_str)
            .and_then(|s| s.split_once(':'))
            .and_then(|(dev, ino)| Some((dev.parse().ok()?, ino.parse().ok()?)));
        match (named, stderr) {
            (Some(named), Some(actual)) if named == actual => Style::Journal,
            _ => Style::Plain,
        }
    }

    /// Writes one line (with its newline) of `level` and `text` (already
    /// escaped) to `out`; `now` is the timestamp a plain line starts with.
    pub fn write_line(
        self,
        out: &mut impl Write,
        level: Level,
        now: impl Display,
        text: impl Display,
    ) -> std::io::Result<()> {
        match self {
            Style::Plain => writeln!(out, "{now} {level:<5} {text}"),
            Style::Journal => writeln!(out, "<{}>{level:<5} {text}", priority(level)),
        }
    }
}

/// The syslog priority of `level`.
pub fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// Reports a failure that ends the process before (or instead of) the
/// log: `codi-monitor: text` on stderr, one escaped line with the error
/// priority when stderr is the journal.
pub fn fatal(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = match Style::of_stderr() {
        Style::Plain => writeln!(err, "codi-monitor: {text}"),
        Style::Journal => writeln!(
            err,
            "<{}>codi-monitor: {}",
            priority(Level::Error),
            escape_controls(text)
        ),
    };
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
        let style = Style::of_stderr();
        let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ");
        let text = record.args().to_string();
        let text = escape_controls(&text);
        let mut err = std::io::stderr().lock();
        if suppressed > 0 {
            let _ = style.write_line(
                &mut err,
                record.level(),
                &now,
                format_args!(
                    "(suppressed {suppressed} similar lines from {}:{} in the last {}s)",
                    site.0,
                    site.1,
                    WINDOW.as_secs()
                ),
            );
        }
        let _ = style.write_line(&mut err, record.level(), &now, text);
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

    fn line(style: Style, level: Level, text: &str) -> String {
        let mut out = Vec::new();
        let now = "2024-05-01T12:00:00.000Z";
        style
            .write_line(&mut out, level, now, escape_controls(text))
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn plain_lines_carry_a_timestamp_and_the_level() {
        assert_eq!(
            line(Style::Plain, Level::Warn, "disk full"),
            "2024-05-01T12:00:00.000Z WARN  disk full\n"
        );
    }

    #[test]
    fn journal_lines_carry_a_priority_prefix_and_no_timestamp() {
        assert_eq!(line(Style::Journal, Level::Error, "x"), "<3>ERROR x\n");
        assert_eq!(line(Style::Journal, Level::Warn, "x"), "<4>WARN  x\n");
        assert_eq!(line(Style::Journal, Level::Info, "x"), "<6>INFO  x\n");
        assert_eq!(line(Style::Journal, Level::Debug, "x"), "<7>DEBUG x\n");
        assert_eq!(line(Style::Journal, Level::Trace, "x"), "<7>TRACE x\n");
    }

    #[test]
    fn a_multi_line_record_stays_one_journal_line() {
        let out = line(Style::Journal, Level::Error, "first\n<6>forged\x1b[2J");
        assert_eq!(out, "<3>ERROR first\\n<6>forged\\x1b[2J\n");
        assert_eq!(out.matches('\n').count(), 1);
    }

    #[test]
    fn the_journal_style_needs_journal_stream_to_name_stderr() {
        let stream = |s: &str| Some(OsStr::new(s).to_owned());
        let at = Some((64769, 1234));
        assert_eq!(
            Style::detect(stream("64769:1234").as_deref(), at),
            Style::Journal
        );
        // Inherited, but stderr now goes elsewhere.
        assert_eq!(
            Style::detect(stream("64769:999").as_deref(), at),
            Style::Plain
        );
        assert_eq!(Style::detect(None, at), Style::Plain);
        assert_eq!(
            Style::detect(stream("64769:1234").as_deref(), None),
            Style::Plain
        );
        for bad in ["", "64769", "x:1234", "64769:1234:5", "-1:1234"] {
            assert_eq!(
                Style::detect(stream(bad).as_deref(), at),
                Style::Plain,
                "{bad}"
            );
        }
    }

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
