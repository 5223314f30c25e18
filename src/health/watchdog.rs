//! The watchdog thread (`codi-health`): once a second it looks at what no
//! single operation reports by failing, and records it in the health
//! table: the database's filesystem nearly full, the writer not keeping up
//! (a backlog held for a while), clients turned away at the connection
//! limit. Each check is a pure function of its samples, tested on its own.

use super::report::{bytes, HealthSettings, Sources};
use super::Severity;
use crate::metrics::Metrics;
use crate::store::schema;
use crossbeam_channel::{RecvTimeoutError, Sender};
use std::collections::VecDeque;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How often the watchdog looks.
pub const TICK: Duration = Duration::from_secs(1);
/// Below this many free bytes the database's filesystem counts as full
/// (failed): the next WAL growth or checkpoint may fail.
pub const DISK_FULL_BYTES: u64 = 32 << 20;
/// The writer is backlogged while this share (percent) of the in-flight
/// budget or of its job queue is taken...
pub const BACKLOG_PERCENT: u64 = 80;
/// ... for at least this long.
pub const BACKLOG_AFTER: Duration = Duration::from_secs(10);
/// Connections refused at the limit within this window degrade `ipc`.
pub const REFUSALS_WINDOW: Duration = Duration::from_secs(60);

/// The database's files and filesystem at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageSample {
    /// Bytes free for the daemon (`f_bavail`) on the database's filesystem.
    pub free: u64,
    /// That filesystem's size.
    pub size: u64,
    /// The main database file.
    pub main: u64,
    /// The main database's WAL.
    pub main_wal: u64,
    /// The ingest file.
    pub ingest: u64,
    /// The ingest file's WAL.
    pub ingest_wal: u64,
}

impl StorageSample {
    /// A readable line: free space and file sizes.
    pub fn summary(&self) -> String {
        format!(
            "{} of {} free; database {} (WAL {}), ingest file {} (WAL {})",
            bytes(self.free),
            bytes(self.size),
            bytes(self.main),
            bytes(self.main_wal),
            bytes(self.ingest),
            bytes(self.ingest_wal)
        )
    }
}

fn wal_of(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len())
}

/// The free space for the daemon (`f_bavail`) and the size of the
/// filesystem holding the database `db`.
pub fn filesystem_space(db: &Path) -> io::Result<(u64, u64)> {
    let dir = db
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let vfs = rustix::fs::statvfs(dir)?;
    Ok((
        vfs.f_bavail.saturating_mul(vfs.f_frsize),
        vfs.f_blocks.saturating_mul(vfs.f_frsize),
    ))
}

/// Measures the database's files (a missing one counts 0) and its
/// filesystem's free space.
pub fn measure(db: &Path) -> io::Result<StorageSample> {
    let (free, size) = filesystem_space(db)?;
    let ingest = schema::ingest_path(db);
    Ok(StorageSample {
        free,
        size,
        main: file_len(db),
        main_wal: file_len(&wal_of(db)),
        ingest: file_len(&ingest),
        ingest_wal: file_len(&wal_of(&ingest)),
    })
}

/// When the database's filesystem counts as nearly full (`[health]`): the
/// watchdog's health check and retention's rotation
/// ([`crate::store::retention`]) share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskThresholds {
    /// Nearly full below this many free bytes...
    pub min_free_bytes: u64,
    /// ... or below this percentage of its size.
    pub min_free_percent: u32,
}

impl DiskThresholds {
    /// The thresholds of `s`.
    pub fn of(s: &HealthSettings) -> Self {
        DiskThresholds {
            min_free_bytes: s.disk_min_free_bytes,
            min_free_percent: s.disk_min_free_percent,
        }
    }

    /// The free bytes a filesystem of `size` bytes needs so as not to be
    /// nearly full (never less than [`DISK_FULL_BYTES`]). While it is
    /// (`troubled`), 1/16 more than the thresholds say, so that free
    /// space hovering at a threshold does not flap.
    pub fn free_wanted(&self, size: u64, troubled: bool) -> u64 {
        let margin = |n: u128| if troubled { n + n / 16 } else { n };
        let bytes = margin(u128::from(self.min_free_bytes));
        // free * 100 < margin(size * percent) exactly when free is below
        // the quotient rounded up.
        let percent = margin(u128::from(size) * u128::from(self.min_free_percent)).div_ceil(100);
        let wanted = bytes.max(percent).max(u128::from(DISK_FULL_BYTES));
        u64::try_from(wanted).unwrap_or(u64::MAX)
    }
}

/// Whether the database's filesystem is full or nearly full. While it is
/// (`troubled`), it must have 1/16 more free than the thresholds before it
/// counts as fine again (see [`DiskThresholds::free_wanted`]), so that
/// free space hovering at a threshold does not flap the health (and the
/// log) every second.
pub fn disk_condition(
    free: u64,
    size: u64,
    s: &HealthSettings,
    troubled: bool,
) -> Option<(Severity, String)> {
    let percent = u128::from(free) * 100 / u128::from(size.max(1));
    if free < DISK_FULL_BYTES {
        Some((
            Severity::Failed,
            format!(
                "the database's filesystem is full: {} free of {}",
                bytes(free),
                bytes(size)
            ),
        ))
    } else if free < DiskThresholds::of(s).free_wanted(size, troubled) {
        Some((
            Severity::Degraded,
            format!(
                "the database's filesystem is nearly full: {} free of {} ({percent}%; \
                 health.disk_min_free_mb = {}, health.disk_min_free_percent = {})",
                bytes(free),
                bytes(size),
                s.disk_min_free_bytes >> 20,
                s.disk_min_free_percent
            ),
        ))
    } else {
        None
    }
}

/// Tracks how long the writer has been backlogged.
#[derive(Debug, Default)]
pub struct Backlog {
    since: Option<Instant>,
}

impl Backlog {
    /// Looks at the in-flight bytes and the job queue now; says why the
    /// writer is backlogged once it has been for [`BACKLOG_AFTER`].
    pub fn observe(
        &mut self,
        now: Instant,
        (used, limit): (usize, usize),
        (queued, capacity): (u64, usize),
    ) -> Option<String> {
        let share = |n: u64, of: usize| n.saturating_mul(100) / (of as u64).max(1);
        let bytes_share = share(used as u64, limit);
        let queue_share = share(queued, capacity);
        if bytes_share.max(queue_share) < BACKLOG_PERCENT {
            self.since = None;
            return None;
        }
        let since = *self.since.get_or_insert(now);
        let held = now.saturating_duration_since(since);
        (held >= BACKLOG_AFTER).then(|| {
            format!(
                "the writer is not keeping up: {} of {} of accepted requests wait ({bytes_share}%), \
                 {queued} of {capacity} jobs queued, for {}s",
                bytes(used as u64),
                bytes(limit as u64),
                held.as_secs()
            )
        })
    }
}

/// Remembers the refused-connection counter over [`REFUSALS_WINDOW`].
#[derive(Debug, Default)]
pub struct Refusals {
    samples: VecDeque<(Instant, u64)>,
}

impl Refusals {
    /// Records the counter now; says how many connections were refused
    /// within the window, if any were.
    pub fn observe(&mut self, now: Instant, refused: u64, limit: usize) -> Option<String> {
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > REFUSALS_WINDOW)
        {
            self.samples.pop_front();
        }
        self.samples.push_back((now, refused));
        let oldest = self.samples.front().map_or(refused, |(_, n)| *n);
        let recent = refused.saturating_sub(oldest);
        (recent > 0).then(|| {
            format!(
                "{recent} connections refused at the connection limit ({limit}) in the last {}s \
                 (raise monitor.max_connections and LimitNOFILE)",
                REFUSALS_WINDOW.as_secs()
            )
        })
    }
}

/// The running watchdog; dropping the sender in [`Watchdog::stop`] ends it.
pub struct Watchdog {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Watchdog {
    /// Stops the thread and waits for it.
    pub fn stop(self) {
        drop(self.stop);
        if self.thread.join().is_err() {
            log::error!("the health watchdog panicked");
        }
    }
}

/// Starts the watchdog; it looks once at once, here (so that what happens
/// after start-up is measured from the counters as they are now, however
/// late the thread first runs), then every [`TICK`].
pub fn spawn_watchdog(sources: Arc<Sources>) -> io::Result<Watchdog> {
    let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
    let mut state = Looks::default();
    state.look(&sources, Instant::now());
    let thread = thread::Builder::new()
        .name("codi-health".into())
        .spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(TICK) {
                state.look(&sources, Instant::now());
            }
        })?;
    Ok(Watchdog { stop, thread })
}

/// What the watchdog remembers between looks.
#[derive(Debug, Default)]
struct Looks {
    backlog: Backlog,
    refusals: Refusals,
    measure_failed: bool,
}

impl Looks {
    fn look(&mut self, src: &Sources, now: Instant) {
        let m = &*src.metrics;
        let h = &m.health;
        match measure(&src.db) {
            Ok(sample) => {
                self.measure_failed = false;
                let troubled = h.get("storage/disk").is_some();
                h.set(
                    "storage/disk",
                    disk_condition(sample.free, sample.size, &src.settings, troubled),
                );
                *src.storage.lock() = Some(sample);
            }
            Err(e) => {
                if !self.measure_failed {
                    log::warn!("cannot measure the database's filesystem: {e}");
                }
                self.measure_failed = true;
            }
        }
        let backlog = self.backlog.observe(
            now,
            (src.budget.used(), src.budget.limit()),
            (
                Metrics::get(&m.writer_queue_depth),
                src.settings.queue_capacity,
            ),
        );
        h.set(
            "writer/backlog",
            backlog.map(|reason| (Severity::Degraded, reason)),
        );
        let refused = self.refusals.observe(
            now,
            Metrics::get(&m.connections_refused),
            src.settings.max_connections,
        );
        h.set(
            "ipc/limit",
            refused.map(|reason| (Severity::Degraded, reason)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> HealthSettings {
        HealthSettings {
            disk_min_free_bytes: 256 << 20,
            disk_min_free_percent: 5,
            failing_for: Duration::from_secs(30),
            queue_capacity: 100,
            max_connections: 10,
        }
    }

    #[test]
    fn disk_thresholds() {
        let s = settings();
        let gib = 1u64 << 30;
        assert_eq!(disk_condition(50 * gib, 100 * gib, &s, false), None);
        let (level, reason) = disk_condition(4 * gib, 100 * gib, &s, false).unwrap();
        assert_eq!(level, Severity::Degraded, "4% free is below 5%");
        assert!(
            reason.contains("nearly full: 4.0 GiB free of 100.0 GiB (4%"),
            "{reason}"
        );
        let (level, _) = disk_condition(200 << 20, 1 << 30, &s, false).unwrap();
        assert_eq!(level, Severity::Degraded, "200 MiB is below 256 MiB");
        let (level, reason) = disk_condition(1 << 20, 100 * gib, &s, false).unwrap();
        assert_eq!(level, Severity::Failed);
        assert!(reason.contains("is full"), "{reason}");
        assert_eq!(
            disk_condition(1 << 20, 0, &s, false).unwrap().0,
            Severity::Failed
        );
    }

    #[test]
    fn a_nearly_full_disk_clears_only_with_a_margin() {
        let s = settings();
        let gib = 1u64 << 30;
        // 5.2 % free: fine before, still nearly full once it was.
        let free = 52 * gib / 10;
        assert_eq!(disk_condition(free, 100 * gib, &s, false), None);
        assert!(disk_condition(free, 100 * gib, &s, true).is_some());
        assert_eq!(disk_condition(6 * gib, 100 * gib, &s, true), None);
        // 260 MiB on a small disk: the same for the byte threshold.
        assert_eq!(disk_condition(260 << 20, 4 * gib, &s, false), None);
        assert!(disk_condition(260 << 20, 4 * gib, &s, true).is_some());
    }

    #[test]
    fn free_wanted_is_where_nearly_full_ends() {
        let s = settings();
        let t = DiskThresholds::of(&s);
        for size in [0, 1 << 30, 4 << 30, 100 << 30, 7_777_777_777_777] {
            for troubled in [false, true] {
                let w = t.free_wanted(size, troubled);
                assert!(w >= 256 << 20, "{w}");
                assert!(disk_condition(w - 1, size, &s, troubled).is_some());
                assert_eq!(disk_condition(w, size, &s, troubled), None, "{size}");
            }
        }
        let none = DiskThresholds {
            min_free_bytes: 0,
            min_free_percent: 0,
        };
        assert_eq!(none.free_wanted(100 << 30, true), DISK_FULL_BYTES);
    }

    #[test]
    fn a_backlog_counts_once_it_has_held_for_a_while() {
        let mut b = Backlog::default();
        let t0 = Instant::now();
        assert_eq!(b.observe(t0, (10, 100), (0, 100)), None);
        assert_eq!(b.observe(t0, (90, 100), (0, 100)), None, "not for long yet");
        let later = t0 + BACKLOG_AFTER;
        let reason = b.observe(later, (85, 100), (0, 100)).unwrap();
        assert!(
            reason.contains("85%") && reason.contains("for 10s"),
            "{reason}"
        );
        assert_eq!(b.observe(later, (10, 100), (5, 100)), None, "cleared");
        assert_eq!(b.observe(later, (10, 100), (95, 100)), None, "starts over");
        assert!(b
            .observe(later + BACKLOG_AFTER, (10, 100), (95, 100))
            .unwrap()
            .contains("95 of 100 jobs"));
    }

    #[test]
    fn refusals_count_within_the_window() {
        let mut r = Refusals::default();
        let t0 = Instant::now();
        assert_eq!(
            r.observe(t0, 5, 10),
            None,
            "refused before the watchdog looked"
        );
        let reason = r.observe(t0 + TICK, 8, 10).unwrap();
        assert!(reason.starts_with("3 connections refused"), "{reason}");
        let much_later = t0 + REFUSALS_WINDOW + 2 * TICK;
        assert!(r.observe(much_later, 8, 10).is_none(), "none in the window");
    }

    #[test]
    fn measures_a_real_database_directory() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("codi.db");
        fs::write(&db, vec![0u8; 4096]).unwrap();
        fs::write(wal_of(&db), vec![0u8; 100]).unwrap();
        let s = measure(&db).unwrap();
        assert_eq!(
            (s.main, s.main_wal, s.ingest, s.ingest_wal),
            (4096, 100, 0, 0)
        );
        assert!(s.size >= s.free && s.size > 0);
        assert!(
            s.summary().contains("database 4.0 KiB (WAL 100 B)"),
            "{}",
            s.summary()
        );
    }

    #[test]
    fn a_look_records_the_disk_and_the_sample() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = crate::health::report::tests::sources();
        src.db = dir.path().join("codi.db");
        // Far more free space wanted than any disk has.
        src.settings.disk_min_free_bytes = u64::MAX;
        let mut looks = Looks::default();
        looks.look(&src, Instant::now());
        let t = src.metrics.health.get("storage/disk").expect("nearly full");
        assert_eq!(t.severity, Severity::Degraded);
        assert!(src.storage.lock().is_some());
        src.settings.disk_min_free_bytes = 0;
        src.settings.disk_min_free_percent = 0;
        looks.look(&src, Instant::now());
        let free = src.storage.lock().as_ref().unwrap().free;
        assert_eq!(
            src.metrics.health.get("storage/disk").is_some(),
            free < DISK_FULL_BYTES
        );
    }
}
