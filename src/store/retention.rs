//! Retention (`storage.retention_days`) and session expiry
//! (`general.session_timeout`), run by the merger thread between merges.
//!
//! Why the merger: it owns the main database's read-write connection, so
//! deleting needs no connection of its own, and a pass never runs while a
//! merge does: the two cannot fight over the write lock, and the ingest
//! rules below hold by construction. A pass comes at most every
//! [`PASS_INTERVAL`] ([`BACKLOG_INTERVAL`] while a backlog remains), and
//! stops starting new batches once it has run for [`PASS_BUDGET`], so a
//! session change or a merge waits for it only briefly, and a batch
//! straight into `logs` waits at most for one batch.
//!
//! What a pass does, each step in transactions of at most [`BATCH_ROWS`]
//! rows and each step at least one batch (so that none starves):
//! - ends open sessions with no activity for `session_timeout` (their last
//!   activity: the daemon's `created_at` of their newest log, found
//!   through `idx_logs_session`, else when their start was recorded, by
//!   the writer's clock too: `started_at` is the client's stamp; a session
//!   with a log still waiting in the ingest file is active), recording
//!   `end_reason = 'timeout'`;
//! - deletes logs whose `created_at` is older than the cutoff, in id
//!   order, never the row with the largest id (the ingest rules count on
//!   `max(id)` of `logs`: ids are handed out above it, and readers skip
//!   ingest rows at or below it, see [`super::ingest`]) and never a row
//!   whose copy is still in the ingest file (so `verify`'s merge rules
//!   keep holding);
//! - deletes ended sessions whose `ended_at` is older than the cutoff, and
//!   export rows archived before it; an archive file no remaining row
//!   references (identical content is stored once and shared) is deleted
//!   with it, inside the archive directory only, through directory
//!   descriptors that never follow a symbolic link, and its directories
//!   are removed once empty;
//! - with a size cap (`storage.max_db_size_mb`), rotates the oldest logs
//!   out, whatever their age, under the same two rules (see "Rotation" below);
//! - gives freed pages back to the filesystem with `incremental_vacuum`
//!   in steps of [`VACUUM_STEP_PAGES`].
//!
//! Logs are walked in id order in windows of [`BATCH_ROWS`] rows, and the
//! walk stops at the first window holding no old row: `created_at` comes
//! from the writer's clock as ids are handed out, so old rows come first.
//! There is no index on `created_at` to keep up (the merge would pay for
//! it on every row).
//!
//! # Rotation
//!
//! With a [`SizeCap`], logs are deleted oldest id first, whatever their
//! age, in the same [`BATCH_ROWS`] transactions and within the same
//! [`PASS_BUDGET`], for either of two reasons:
//! - **cap**: the main database uses more than the cap. "Uses" is
//!   `(page_count - freelist_count) * page_size`: the pages holding logs,
//!   sessions, export rows and their indexes. Its WAL is left out (the
//!   checkpointer bounds it, and it shrinks back on its own: counting it
//!   would delete rows for space a checkpoint gives back), and so is the
//!   ingest file (acknowledged logs not yet merged, which rotation may not
//!   delete anyway, bounded by [`super::merger::MAX_UNMERGED_ROWS`]).
//!   Rotation goes on until the database uses at most 90 % of the cap
//!   ([`SizeCap::low_water`]), so that it does not start again with the
//!   next few rows;
//! - **disk**: the database's filesystem is nearly full by the health
//!   thresholds ([`DiskThresholds::free_wanted`], shared with the
//!   watchdog). Space already free inside the file (free pages, and pages
//!   past its end that the next checkpoint cuts off) counts as free, since
//!   the database grows into it first; rotation goes on until that and
//!   the filesystem's free space reach the thresholds with the watchdog's
//!   margin of 1/16. This happens only with a cap set: without one the
//!   operator has not agreed to lose logs for space, and a filesystem
//!   filled by something else must not silently empty the store; the
//!   watchdog's `storage/disk` says it is nearly full either way.
//!
//! The size is checked every [`SIZE_CHECK_INTERVAL`] (a few `PRAGMA`s and
//! a `statvfs`), not only on the full passes, so that a fast client meets
//! the cap within a second. Every log rotated out is counted by reason and
//! logged at most once a minute, and `storage/rotation` is degraded while
//! rotation goes on.
//!
//! With hub sync on, age-based retention stops at its watermark (the
//! largest id the hub has acknowledged, [`crate::hub::sync`]): no log the
//! hub has not acknowledged is deleted for its age. Rotation does not: a
//! hard cap forces such rows out too (counting rows above the watermark
//! apart is still to do).
//!
//! The export watcher may, at the same moment, decide to record a new row
//! pointing at an archived file whose last row is being deleted (identical
//! content). It claims that path in [`ArchiveClaims`] under the same lock
//! it checks the file under, and a claimed path is never deleted.

use super::merger::MERGE_MIN_ROWS;
use super::watermarks::Watermarks;
use crate::export::walk;
use crate::health::report::bytes;
use crate::health::watchdog::{self, DiskThresholds};
use crate::health::Severity;
use crate::metrics::Metrics;
use parking_lot::{Mutex, MutexGuard};
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use rustix::fs::AtFlags;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most rows one retention transaction deletes (or sessions it ends).
pub const BATCH_ROWS: usize = 1_000;
/// A pass starts no new batch once it has run this long.
pub const PASS_BUDGET: Duration = Duration::from_millis(20);
/// Time between passes when the last one finished its work.
pub const PASS_INTERVAL: Duration = Duration::from_secs(5);
/// Time between passes while the last one stopped on [`PASS_BUDGET`] with
/// work left (a backlog, such as retention turned on for a large store):
/// at most a sixth of the merger's time, which deletes 6,000-9,000 old
/// logs a second here, faster than most hosts log (perf/retention_ab.sh;
/// at 500 ms it was 2,000 a second, less than a busy host logs).
pub const BACKLOG_INTERVAL: Duration = Duration::from_millis(100);
/// Pages one `incremental_vacuum` step gives back (512 KiB of 4 KiB pages).
pub const VACUUM_STEP_PAGES: i64 = 128;
/// A database still without auto-vacuum is converted at start (one
/// `VACUUM`, which rewrites the whole file) only up to this size.
pub const VACUUM_AT_START_MAX_BYTES: u64 = 256 << 20;
/// How often, with a [`SizeCap`], the database's size and filesystem are
/// looked at between full passes.
pub const SIZE_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The health entry set while rotation goes on.
pub const ROTATION_HEALTH: &str = "storage/rotation";
/// Open sessions older than the timeout looked at per transaction.
const SESSION_BATCH: usize = 100;
/// How often the totals of expired rows are logged at most.
const REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// What retention keeps and for how long.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Logs, ended sessions and export rows older than this are deleted;
    /// `None` keeps them forever.
    pub keep_for: Option<Duration>,
    /// Open sessions with no activity for this long are ended; `None`
    /// leaves them open.
    pub session_timeout: Option<Duration>,
    /// The archive directory the export rows' files are in; `None` (or a
    /// file outside it) deletes no file.
    pub archive_dir: Option<PathBuf>,
    /// Rotates the oldest logs out of a database above it, or on a nearly
    /// full filesystem; `None` never does.
    pub cap: Option<SizeCap>,
    /// Hub sync is on: age retention keeps every log above the hub's
    /// watermark (not yet shipped); rotation does not. Off, each pass
    /// empties `hub_changes`.
    pub keep_unshipped: bool,
}

/// A size cap on the main database (`storage.max_db_size_mb`), and when
/// its filesystem counts as nearly full (see [Rotation](self#rotation)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeCap {
    /// Bytes the main database's pages may use.
    pub max_bytes: u64,
    /// The health thresholds of a nearly full filesystem.
    pub disk: DiskThresholds,
}

impl SizeCap {
    /// The cap of `storage.max_db_size_mb` (0: none), with the filesystem
    /// thresholds `disk`.
    pub fn from_mib(max_db_size_mb: u64, disk: DiskThresholds) -> Option<SizeCap> {
        (max_db_size_mb > 0).then(|| SizeCap {
            max_bytes: max_db_size_mb.saturating_mul(1 << 20),
            disk,
        })
    }

    /// Rotation, once started for the cap, goes on down to this (90 %).
    pub fn low_water(&self) -> u64 {
        self.max_bytes / 10 * 9
    }
}

/// Where rotation learns the free space of the database's filesystem.
pub trait FreeSpace: Send + fmt::Debug {
    /// Bytes free for the daemon, and the filesystem's size.
    fn free_and_size(&self) -> io::Result<(u64, u64)>;
}

/// The filesystem holding a database file, by `statvfs` (as the watchdog
/// measures it).
#[derive(Debug)]
pub struct DbFilesystem(pub PathBuf);

impl FreeSpace for DbFilesystem {
    fn free_and_size(&self) -> io::Result<(u64, u64)> {
        watchdog::filesystem_space(&self.0)
    }
}

impl RetentionPolicy {
    /// The policy of `storage.retention_days` (0 keeps forever) and
    /// `general.session_timeout`, with the archive at `archive_dir`.
    pub fn new(retention_days: u32, session_timeout: Duration, archive_dir: PathBuf) -> Self {
        RetentionPolicy {
            keep_for: (retention_days > 0)
                .then(|| Duration::from_secs(u64::from(retention_days) * 86_400)),
            session_timeout: Some(session_timeout),
            archive_dir: Some(archive_dir),
            cap: None,
            keep_unshipped: false,
        }
    }

    /// The same policy, keeping logs the hub has not acknowledged from age
    /// retention when `hub_sync` is on.
    pub fn with_hub_sync(self, hub_sync: bool) -> Self {
        RetentionPolicy {
            keep_unshipped: hub_sync,
            ..self
        }
    }

    /// The same policy with the size cap `cap`.
    pub fn with_cap(self, cap: Option<SizeCap>) -> Self {
        RetentionPolicy { cap, ..self }
    }

    /// Whether logs may be deleted at all (by age or for space).
    pub fn deletes_logs(&self) -> bool {
        self.keep_for.is_some() || self.cap.is_some()
    }

    fn is_off(&self) -> bool {
        self.keep_for.is_none() && self.session_timeout.is_none() && self.cap.is_none()
    }
}

/// Archive paths the export watcher is about to record in rows not yet
/// committed, with how many rows each: retention never deletes them.
#[derive(Debug, Default)]
pub struct ArchiveClaims {
    paths: Mutex<HashMap<String, usize>>,
}

/// [`ArchiveClaims`] held: checks and claims are atomic with whatever the
/// holder does meanwhile (the watcher's check that the file is there,
/// retention's deletion).
#[derive(Debug)]
pub struct ClaimsGuard<'a>(MutexGuard<'a, HashMap<String, usize>>);

impl ArchiveClaims {
    /// Takes the claims' lock (held briefly by either side).
    pub fn lock(&self) -> ClaimsGuard<'_> {
        ClaimsGuard(self.paths.lock())
    }

    /// Drops one claim of `path` (its row is committed, or will not be).
    pub fn release(&self, path: &str) {
        let mut paths = self.paths.lock();
        if let Some(n) = paths.get_mut(path) {
            *n -= 1;
            if *n == 0 {
                paths.remove(path);
            }
        }
    }
}

impl ClaimsGuard<'_> {
    /// Claims `path` for one more row.
    pub fn claim(&mut self, path: &str) {
        *self.0.entry(path.to_owned()).or_insert(0) += 1;
    }

    /// Whether a row not yet committed will reference `path`.
    pub fn is_claimed(&self, path: &str) -> bool {
        self.0.contains_key(path)
    }
}

/// What one pass (or several) expired.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// Log rows deleted.
    pub logs: u64,
    /// Ended sessions deleted.
    pub sessions: u64,
    /// Export rows deleted.
    pub exports: u64,
    /// Archive files deleted (no row referenced them any more).
    pub files: u64,
    /// Open sessions ended for inactivity.
    pub timed_out: u64,
    /// Pages given back to the filesystem.
    pub pages_freed: u64,
    /// Logs rotated out for the size cap, whatever their age.
    pub rotated_cap: u64,
    /// Logs rotated out for a nearly full filesystem.
    pub rotated_disk: u64,
    /// Of the logs rotated out, those the hub did not have yet (with hub
    /// sync on): they never reach it.
    pub rotated_unshipped: u64,
    /// The pass stopped on its time bound with work left.
    pub more: bool,
}

impl Expired {
    fn any(&self) -> bool {
        self.logs
            + self.sessions
            + self.exports
            + self.files
            + self.timed_out
            + self.pages_freed
            + self.rotated_cap
            + self.rotated_disk
            > 0
    }

    fn add(&mut self, other: &Expired) {
        self.logs += other.logs;
        self.sessions += other.sessions;
        self.exports += other.exports;
        self.files += other.files;
        self.timed_out += other.timed_out;
        self.pages_freed += other.pages_freed;
        self.rotated_cap += other.rotated_cap;
        self.rotated_disk += other.rotated_disk;
        self.rotated_unshipped += other.rotated_unshipped;
    }
}

/// Why logs are being rotated out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Cap,
    Disk,
}

/// The main database's pages in use and its file's length, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbSize {
    /// `(page_count - freelist_count) * page_size`.
    pub used: u64,
    /// The file's length: with free pages and pages past the end (cut off
    /// at the next checkpoint), more than `used`.
    pub file: u64,
}

impl DbSize {
    /// The size of `conn`'s main database now.
    pub fn of(conn: &Connection) -> rusqlite::Result<DbSize> {
        let pragma = |name: &str| -> rusqlite::Result<u64> {
            let n: i64 =
                conn.pragma_query_value(Some(rusqlite::DatabaseName::Main), name, |r| r.get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        };
        let page = pragma("page_size")?;
        let pages = pragma("page_count")?;
        let used = pages.saturating_sub(pragma("freelist_count")?) * page;
        let file = conn
            .path()
            .filter(|p| !p.is_empty())
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(pages * page, |m| m.len());
        Ok(DbSize { used, file })
    }

    /// Bytes the database can grow into without the filesystem: free pages
    /// and pages past its end.
    fn reclaimable(&self) -> u64 {
        self.file.saturating_sub(self.used)
    }
}

/// How far one rotation goes, and why.
#[derive(Debug, Clone, Copy)]
struct Target {
    /// Rotate until the database uses at most this.
    used: u64,
    reason: Reason,
}

/// The merger's retention state: when the next pass is due, where session
/// expiry goes on, and what to report.
#[derive(Debug)]
pub struct Retention {
    policy: RetentionPolicy,
    claims: Arc<ArchiveClaims>,
    next_pass: Instant,
    /// The last open session looked at (`recorded_at`, rowid): the next
    /// pass goes on after it, so that many long-lived active sessions do
    /// not hide the ones behind them.
    session_cursor: (i64, i64),
    unreported: Expired,
    last_report: Instant,
    /// Where the filesystem's free space comes from; `None`: rotation
    /// looks at the cap only.
    space: Option<Box<dyn FreeSpace>>,
    /// The free space could not be read (said once until it can again).
    space_failed: bool,
    next_size_check: Instant,
    /// Rotation goes on for each reason (so to the low-water mark, or the
    /// thresholds with their margin).
    rotating_cap: bool,
    rotating_disk: bool,
    /// What rotation is doing, for the health entry; `None` when idle.
    rotation: Option<String>,
    /// The database's size at the last rotation, for the report.
    rotated_at: Option<DbSize>,
}

impl Retention {
    /// Retention by `policy`, with the watcher's `claims`; the first pass
    /// is due at once.
    pub fn new(policy: RetentionPolicy, claims: Arc<ArchiveClaims>) -> Self {
        Retention {
            policy,
            claims,
            next_pass: Instant::now(),
            session_cursor: (i64::MIN, i64::MIN),
            unreported: Expired::default(),
            // The first expiry is reported at once, later ones once a
            // minute at most.
            last_report: Instant::now()
                .checked_sub(REPORT_INTERVAL)
                .unwrap_or_else(Instant::now),
            space: None,
            space_failed: false,
            next_size_check: Instant::now(),
            rotating_cap: false,
            rotating_disk: false,
            rotation: None,
            rotated_at: None,
        }
    }

    /// The same retention, reading the filesystem's free space from
    /// `space` for rotation (with a cap set).
    pub fn with_free_space(self, space: Box<dyn FreeSpace>) -> Self {
        Retention {
            space: Some(space),
            ..self
        }
    }

    /// Whether a pass (or, with a cap, a size check) should run now.
    pub fn due(&self) -> bool {
        let now = Instant::now();
        !self.policy.is_off()
            && (now >= self.next_pass || (self.policy.cap.is_some() && now >= self.next_size_check))
    }

    /// What rotation is doing now, if anything (the `storage/rotation`
    /// health reason).
    pub fn rotation(&self) -> Option<&str> {
        self.rotation.as_deref()
    }

    /// Runs one pass bounded by [`PASS_BUDGET`] on `conn` (the merger's
    /// connection), or only rotation's size check if that alone is due;
    /// counts it in `metrics`, and schedules the next one.
    pub fn run(
        &mut self,
        conn: &mut Connection,
        state: &Watermarks,
        metrics: &Metrics,
    ) -> rusqlite::Result<Expired> {
        let now_us = crate::proto::Timestamp::now().as_micros();
        let full = Instant::now() >= self.next_pass;
        let deadline = Instant::now() + PASS_BUDGET;
        let result = if full {
            self.pass(conn, state, now_us, deadline)
        } else {
            self.size_pass(conn, deadline)
        };
        let more = result.as_ref().is_ok_and(|e| e.more);
        let after = |done: Duration| Instant::now() + if more { BACKLOG_INTERVAL } else { done };
        if full {
            self.next_pass = after(PASS_INTERVAL);
        }
        self.next_size_check = after(SIZE_CHECK_INTERVAL);
        let expired = result?;
        metrics.health.set(
            ROTATION_HEALTH,
            self.rotation.clone().map(|r| (Severity::Degraded, r)),
        );
        Metrics::add(&metrics.logs_expired, expired.logs);
        Metrics::add(&metrics.sessions_expired, expired.sessions);
        Metrics::add(&metrics.exports_expired, expired.exports);
        Metrics::add(&metrics.sessions_timed_out, expired.timed_out);
        Metrics::add(&metrics.logs_rotated_cap, expired.rotated_cap);
        Metrics::add(&metrics.logs_rotated_disk, expired.rotated_disk);
        Metrics::add(&metrics.logs_rotated_unshipped, expired.rotated_unshipped);
        self.unreported.add(&expired);
        if self.unreported.any() && self.last_report.elapsed() >= REPORT_INTERVAL {
            self.report();
        }
        Ok(expired)
    }

    fn report(&mut self) {
        let e = std::mem::take(&mut self.unreported);
        self.last_report = Instant::now();
        if e.timed_out > 0 {
            log::info!(
                "ended {} session(s) without activity for general.session_timeout",
                e.timed_out
            );
        }
        if e.logs + e.sessions + e.exports + e.files > 0 {
            log::info!(
                "retention deleted {} log(s), {} ended session(s), {} export row(s) and {} \
                 archive file(s) older than storage.retention_days; {} page(s) given back",
                e.logs,
                e.sessions,
                e.exports,
                e.files,
                e.pages_freed
            );
        }
        if e.rotated_cap + e.rotated_disk > 0 {
            let cap = self.policy.cap.as_ref().map_or(0, |c| c.max_bytes);
            let used = self.rotated_at.map_or(0, |s| s.used);
            log::warn!(
                "rotation deleted the {} oldest log(s), whatever their age: {} for the size cap \
                 (storage.max_db_size_mb = {} MiB), {} for a nearly full filesystem; the \
                 database now uses {}",
                e.rotated_cap + e.rotated_disk,
                e.rotated_cap,
                cap >> 20,
                e.rotated_disk,
                bytes(used)
            );
        }
        if e.rotated_unshipped > 0 {
            log::error!(
                "rotation deleted {} log(s) the hub did not have yet: they will never reach it \
                 (raise storage.max_db_size_mb, or bring the hub back sooner)",
                e.rotated_unshipped
            );
        }
    }

    /// One pass at `now_us` (microseconds since the epoch) that starts no
    /// batch after `deadline`, though each step runs at least one.
    pub fn pass(
        &mut self,
        conn: &mut Connection,
        state: &Watermarks,
        now_us: i64,
        deadline: Instant,
    ) -> rusqlite::Result<Expired> {
        let mut e = Expired::default();
        if let Some(timeout) = self.policy.session_timeout {
            let cutoff = now_us.saturating_sub(micros(timeout));
            let (ended, more) = self.time_out_sessions(conn, state, cutoff, now_us, deadline)?;
            e.timed_out = ended;
            e.more |= more;
        }
        if let Some(keep) = self.policy.keep_for {
            let cutoff = now_us.saturating_sub(micros(keep));
            let keep_from = if self.policy.keep_unshipped {
                crate::hub::sync::shipped_through(conn)?.saturating_add(1)
            } else {
                i64::MAX
            };
            let (logs, more) = expire_logs(conn, cutoff, keep_from, deadline)?;
            e.logs = logs;
            e.more |= more;
            let keep_pending = self.policy.keep_unshipped;
            let (sessions, more) = expire_sessions(conn, cutoff, keep_pending, deadline)?;
            e.sessions = sessions;
            e.more |= more;
            let archive = self.archive_root();
            let (exports, files, more) = expire_exports(
                conn,
                cutoff,
                archive.as_ref(),
                &self.claims,
                keep_pending,
                deadline,
            )?;
            e.exports = exports;
            e.files = files;
            e.more |= more;
        }
        if !self.policy.keep_unshipped {
            e.more |= forget_hub_changes(conn, deadline)?;
        }
        self.rotate(conn, deadline, &mut e)?;
        let (pages, more) = vacuum_steps(conn, deadline)?;
        e.pages_freed = pages;
        e.more |= more;
        Ok(e)
    }

    /// Rotation alone (with the pages it frees given back), between full
    /// passes; nothing without a cap.
    pub fn size_pass(
        &mut self,
        conn: &mut Connection,
        deadline: Instant,
    ) -> rusqlite::Result<Expired> {
        let mut e = Expired::default();
        if self.policy.cap.is_none() {
            return Ok(e);
        }
        self.rotate(conn, deadline, &mut e)?;
        let (pages, more) = vacuum_steps(conn, deadline)?;
        e.pages_freed = pages;
        e.more |= more;
        Ok(e)
    }

    /// Where rotation should take the database now, if anywhere: the
    /// lower of the cap's and the filesystem's targets.
    fn target(&mut self, cap: &SizeCap, size: DbSize) -> Option<Target> {
        let by_cap = if self.rotating_cap {
            size.used > cap.low_water()
        } else {
            size.used > cap.max_bytes
        };
        let by_cap = by_cap.then_some(Target {
            used: cap.low_water(),
            reason: Reason::Cap,
        });
        let by_disk = self
            .space
            .as_ref()
            .and_then(|space| match space.free_and_size() {
                Ok((free, fs_size)) => {
                    self.space_failed = false;
                    // Starts below the thresholds, goes on until they and
                    // the margin are free.
                    let have = free.saturating_add(size.reclaimable());
                    let wanted = cap.disk.free_wanted(fs_size, true);
                    (have < cap.disk.free_wanted(fs_size, self.rotating_disk)).then(|| Target {
                        used: size.used.saturating_sub(wanted - have),
                        reason: Reason::Disk,
                    })
                }
                Err(e) => {
                    if !std::mem::replace(&mut self.space_failed, true) {
                        log::warn!(
                            "rotation cannot read the database filesystem's free space (the \
                         size cap still applies): {e}"
                        );
                    }
                    None
                }
            });
        self.rotating_cap = by_cap.is_some();
        self.rotating_disk = by_disk.is_some();
        match (by_cap, by_disk) {
            (Some(c), Some(d)) => Some(if d.used < c.used { d } else { c }),
            (c, d) => c.or(d),
        }
    }

    /// Deletes the oldest logs, whatever their age, while the database is
    /// above its cap or its filesystem nearly full (see
    /// [Rotation](self#rotation)): [`BATCH_ROWS`] per transaction, one
    /// at least, no new one after `deadline`.
    fn rotate(
        &mut self,
        conn: &mut Connection,
        deadline: Instant,
        e: &mut Expired,
    ) -> rusqlite::Result<()> {
        let Some(cap) = self.policy.cap.clone() else {
            return Ok(());
        };
        let mut size = DbSize::of(conn)?;
        let Some(target) = self.target(&cap, size) else {
            self.rotation = None;
            return Ok(());
        };
        let mut after = 0;
        let mut stuck = false;
        // Rows above hub sync's watermark that rotation deletes never reach
        // the hub: counted apart.
        let shipped = if self.policy.keep_unshipped {
            crate::hub::sync::shipped_through(conn)?
        } else {
            i64::MAX
        };
        loop {
            // Every row in the window is deleted: a cutoff past any
            // `created_at`. Hub sync's watermark does not bound it (see
            // the module's documentation).
            let Some(done) = expire_logs_counting(conn, i64::MAX, after, i64::MAX, shipped)? else {
                stuck = true;
                break;
            };
            let (end, n) = (done.end, done.deleted);
            e.rotated_unshipped += done.deleted_above as u64;
            after = end;
            match target.reason {
                Reason::Cap => e.rotated_cap += n as u64,
                Reason::Disk => e.rotated_disk += n as u64,
            }
            size = DbSize::of(conn)?;
            if size.used <= target.used {
                break;
            }
            if Instant::now() >= deadline {
                e.more = true;
                break;
            }
        }
        self.rotated_at = Some(size);
        if size.used <= target.used {
            // Met, and with it the other reason's (higher) target: the
            // next check starts over, without the margins.
            self.rotating_cap = false;
            self.rotating_disk = false;
        }
        let why = match target.reason {
            Reason::Cap => format!(
                "the database uses {} of storage.max_db_size_mb = {} MiB, so the oldest logs \
                 go down to {}",
                bytes(size.used),
                cap.max_bytes >> 20,
                bytes(target.used)
            ),
            Reason::Disk => format!(
                "the database's filesystem is nearly full (health.disk_min_free_mb = {}, \
                 health.disk_min_free_percent = {}), so the oldest logs go until the database \
                 uses at most {} (now {})",
                cap.disk.min_free_bytes >> 20,
                cap.disk.min_free_percent,
                bytes(target.used),
                bytes(size.used)
            ),
        };
        self.rotation = if stuck {
            Some(format!(
                "rotating: {why}; but no log is left that may go (the newest log and those \
                 still in the ingest file stay)"
            ))
        } else if size.used > target.used {
            Some(format!("rotating: {why}"))
        } else {
            None
        };
        Ok(())
    }

    /// The archive directory, if it is there (see [`ArchiveRoot::open`]).
    fn archive_root(&self) -> Option<ArchiveRoot> {
        ArchiveRoot::open(self.policy.archive_dir.as_ref()?).ok()
    }

    /// Ends, in one transaction, the open sessions recorded before `cutoff`
    /// that have had no activity since, among the next [`SESSION_BATCH`]
    /// after the cursor; goes on while time is left.
    fn time_out_sessions(
        &mut self,
        conn: &mut Connection,
        state: &Watermarks,
        cutoff: i64,
        now_us: i64,
        deadline: Instant,
    ) -> rusqlite::Result<(u64, bool)> {
        // Behind on merging: a session's newest logs may still wait in the
        // ingest file, where no index finds them. Look again later.
        if state.unmerged() >= MERGE_MIN_ROWS {
            return Ok((0, false));
        }
        let mut ended = 0;
        loop {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let (n, cursor) = time_out_batch(&tx, cutoff, now_us, self.session_cursor)?;
            tx.commit()?;
            ended += n;
            match cursor {
                Some(c) => self.session_cursor = c,
                None => {
                    // Every candidate looked at: start again next pass.
                    self.session_cursor = (i64::MIN, i64::MIN);
                    return Ok((ended, false));
                }
            }
            if Instant::now() >= deadline {
                return Ok((ended, true));
            }
        }
    }
}

/// Microseconds in `d`, saturating.
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// One batch of session expiry inside `tx`: ends the sessions without
/// activity since `cutoff` among the next [`SESSION_BATCH`] open sessions
/// recorded before it, after `cursor`. The number ended, and the new cursor
/// (`None` when no candidate was left).
fn time_out_batch(
    tx: &Transaction,
    cutoff: i64,
    now_us: i64,
    cursor: (i64, i64),
) -> rusqlite::Result<(u64, Option<(i64, i64)>)> {
    let candidates: Vec<(i64, String, i64)> = tx
        .prepare_cached(
            "SELECT rowid, id, recorded_at FROM sessions WHERE ended_at IS NULL \
             AND recorded_at < ?1 AND (recorded_at, rowid) > (?2, ?3) \
             ORDER BY recorded_at, rowid LIMIT ?4",
        )?
        .query_map(
            params![cutoff, cursor.0, cursor.1, SESSION_BATCH as i64],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?
        .collect::<Result<_, _>>()?;
    let Some(&(last_rowid, _, last_recorded)) = candidates.last() else {
        return Ok((0, None));
    };
    // Sessions with a log the merge has not moved yet: active just now.
    let waiting: HashSet<String> = tx
        .prepare_cached(
            "SELECT DISTINCT session_id FROM ingest.ingest_logs WHERE session_id IS NOT NULL \
             AND id > (SELECT coalesce(max(id), 0) FROM main.logs)",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut newest_log = tx.prepare_cached(
        "SELECT created_at FROM main.logs WHERE session_id = ?1 \
         ORDER BY timestamp DESC LIMIT 1",
    )?;
    let mut end = tx.prepare_cached(
        "UPDATE sessions SET ended_at = ?2, end_reason = 'timeout' \
         WHERE rowid = ?1 AND ended_at IS NULL",
    )?;
    let mut ended = 0;
    for (rowid, id, _) in &candidates {
        if waiting.contains(id) {
            continue;
        }
        let last_log: Option<i64> = newest_log.query_row([id], |r| r.get(0)).optional()?;
        if last_log.is_some_and(|at| at >= cutoff) {
            continue;
        }
        ended += end.execute(params![rowid, now_us])? as u64;
    }
    Ok((ended, Some((last_recorded, last_rowid))))
}

/// Deletes logs created before `cutoff`, in id order, [`BATCH_ROWS`] per
/// transaction, until a window of rows holds none or `deadline` passes.
/// The rows deleted, and whether it stopped on the deadline.
/// No log at or above `keep_from` (the first id the hub has not
/// acknowledged; `i64::MAX` without hub sync) is deleted.
pub fn expire_logs(
    conn: &mut Connection,
    cutoff: i64,
    keep_from: i64,
    deadline: Instant,
) -> rusqlite::Result<(u64, bool)> {
    // A read, without the write lock: usually there is nothing to do.
    let any: bool = conn
        .prepare_cached(OLD_LOG_AHEAD)?
        .query_row(params![0, cutoff, BATCH_ROWS as i64], |r| r.get(0))?;
    if !any {
        return Ok((0, false));
    }
    let mut deleted = 0;
    let mut after = 0;
    loop {
        match expire_logs_batch_below(conn, cutoff, after, keep_from)? {
            None | Some((_, 0)) => return Ok((deleted, false)),
            Some((end, n)) => {
                deleted += n as u64;
                after = end;
            }
        }
        if Instant::now() >= deadline {
            return Ok((deleted, true));
        }
    }
}

/// Whether the [`BATCH_ROWS`] (`?3`) logs after id `?1` hold one created
/// before `?2`.
const OLD_LOG_AHEAD: &str = "SELECT EXISTS (SELECT 1 FROM \
    (SELECT created_at FROM main.logs WHERE id > ?1 ORDER BY id LIMIT ?3) \
    WHERE created_at < ?2)";

/// The id below which logs may be deleted: the largest id of `logs` (kept)
/// and the smallest still in the ingest file (whose copy stays until the
/// ingest file lets it go).
pub(super) const DELETABLE_BELOW: &str = "SELECT min( \
    coalesce((SELECT max(id) FROM main.logs), 0), \
    coalesce((SELECT min(id) FROM ingest.ingest_logs), 9223372036854775807))";

/// One transaction of [`expire_logs`]: the window of the next
/// [`BATCH_ROWS`] deletable rows after id `after`, and how many of them
/// were old and deleted; `None` when no deletable row is left.
pub fn expire_logs_batch(
    conn: &mut Connection,
    cutoff: i64,
    after: i64,
) -> rusqlite::Result<Option<(i64, usize)>> {
    expire_logs_batch_below(conn, cutoff, after, i64::MAX)
}

/// [`expire_logs_batch`], deleting nothing at or above `keep_from`.
fn expire_logs_batch_below(
    conn: &mut Connection,
    cutoff: i64,
    after: i64,
    keep_from: i64,
) -> rusqlite::Result<Option<(i64, usize)>> {
    Ok(expire_logs_counting(conn, cutoff, after, keep_from, i64::MAX)?.map(|d| (d.end, d.deleted)))
}

/// One batch deleted by [`expire_logs_counting`].
struct Deleted {
    /// The window's last id.
    end: i64,
    /// Rows deleted.
    deleted: usize,
    /// Of them, rows with ids above the `count_above` asked for.
    deleted_above: usize,
}

/// [`expire_logs_batch_below`], also counting the deleted rows with ids
/// above `count_above` (in the same transaction, so exactly).
fn expire_logs_counting(
    conn: &mut Connection,
    cutoff: i64,
    after: i64,
    keep_from: i64,
    count_above: i64,
) -> rusqlite::Result<Option<Deleted>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let below: i64 = tx
        .prepare_cached(DELETABLE_BELOW)?
        .query_row([], |r| r.get::<_, i64>(0))?
        .min(keep_from);
    let end: Option<i64> = tx
        .prepare_cached(
            "SELECT max(id) FROM (SELECT id FROM main.logs WHERE id > ?1 AND id < ?2 \
             ORDER BY id LIMIT ?3)",
        )?
        .query_row(params![after, below, BATCH_ROWS as i64], |r| r.get(0))?;
    let Some(end) = end else {
        return Ok(None);
    };
    let deleted_above = if count_above < end {
        tx.prepare_cached(
            "SELECT count(*) FROM main.logs WHERE id > max(?1, ?4) AND id <= ?2 AND created_at < ?3",
        )?
        .query_row(params![after, end, cutoff, count_above], |r| r.get::<_, i64>(0))?
            as usize
    } else {
        0
    };
    let deleted = tx
        .prepare_cached("DELETE FROM main.logs WHERE id > ?1 AND id <= ?2 AND created_at < ?3")?
        .execute(params![after, end, cutoff])?;
    tx.commit()?;
    Ok(Some(Deleted {
        end,
        deleted,
        deleted_above,
    }))
}

/// An export row with no change waiting in `hub_changes`: one the hub has.
/// With hub sync on, age retention deletes only such rows, as it keeps
/// unshipped logs.
const NOT_PENDING: &str = "AND NOT EXISTS (SELECT 1 FROM hub_changes c \
    WHERE c.kind = 'export_archive' AND c.row_key = CAST(export_archive.id AS TEXT))";

/// Deletes sessions that ended before `cutoff` (with `keep_pending`, only
/// those with no change waiting for the hub in `hub_changes`),
/// [`BATCH_ROWS`] per transaction, until none is left or `deadline`
/// passes.
fn expire_sessions(
    conn: &mut Connection,
    cutoff: i64,
    keep_pending: bool,
    deadline: Instant,
) -> rusqlite::Result<(u64, bool)> {
    let pending = if keep_pending {
        "AND NOT EXISTS (SELECT 1 FROM hub_changes c WHERE c.kind = 'sessions' \
         AND c.row_key = sessions.id)"
    } else {
        ""
    };
    let any: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM sessions WHERE ended_at IS NOT NULL AND ended_at < ?1)",
        )?
        .query_row([cutoff], |r| r.get(0))?;
    if !any {
        return Ok((0, false));
    }
    let mut deleted = 0;
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx
            .prepare_cached(&format!(
                "DELETE FROM sessions WHERE rowid IN (SELECT rowid FROM sessions \
                 WHERE ended_at IS NOT NULL AND ended_at < ?1 {pending} \
                 ORDER BY ended_at LIMIT ?2)"
            ))?
            .execute(params![cutoff, BATCH_ROWS as i64])?;
        tx.commit()?;
        deleted += n as u64;
        if n < BATCH_ROWS {
            return Ok((deleted, false));
        }
        if Instant::now() >= deadline {
            return Ok((deleted, true));
        }
    }
}

/// With hub sync off: deletes what the triggers recorded in
/// `hub_changes` since the start cleared it (nothing would ever ship and
/// delete it; a long run with churning sessions grew it without bound),
/// [`BATCH_ROWS`] per transaction until none is left or `deadline` passes;
/// `true` if some are left. Turned on again, the sync ships every row.
fn forget_hub_changes(conn: &mut Connection, deadline: Instant) -> rusqlite::Result<bool> {
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx
            .prepare_cached(
                "DELETE FROM main.hub_changes WHERE seq IN \
                 (SELECT seq FROM main.hub_changes ORDER BY seq LIMIT ?1)",
            )?
            .execute([BATCH_ROWS as i64])?;
        tx.commit()?;
        if n < BATCH_ROWS {
            return Ok(false);
        }
        if Instant::now() >= deadline {
            return Ok(true);
        }
    }
}

/// When an export row was archived, in microseconds: rows from before
/// schema version 3 have only `processed_at`, in seconds.
const ARCHIVED_AT: &str = "coalesce(archived_at_us, processed_at * 1000000)";

/// The archive directory: its canonical path (the prefix of the recorded
/// paths) and a descriptor of it.
#[derive(Debug)]
pub struct ArchiveRoot {
    path: PathBuf,
    fd: OwnedFd,
}

impl ArchiveRoot {
    /// Opens the archive directory `dir`: canonical, as the watcher records
    /// paths in it, and opened without following a symbolic link.
    pub fn open(dir: &Path) -> io::Result<ArchiveRoot> {
        let path = std::fs::canonicalize(dir)?;
        let fd = walk::open_root(&path)?;
        Ok(ArchiveRoot { path, fd })
    }
}

/// Deletes export rows archived before `cutoff` (with `keep_pending`, only
/// those the hub has: `NOT_PENDING`), in id order, [`BATCH_ROWS`] per
/// transaction, with the archive files no remaining row references
/// (inside `archive` only; none without it). Rows deleted,
/// files deleted, and whether it stopped on `deadline`.
pub fn expire_exports(
    conn: &mut Connection,
    cutoff: i64,
    archive: Option<&ArchiveRoot>,
    claims: &ArchiveClaims,
    keep_pending: bool,
    deadline: Instant,
) -> rusqlite::Result<(u64, u64, bool)> {
    // While a damaged main database's records are being salvaged, a recent
    // record not yet salvaged may share an archived file with an old one
    // already back: no record or file goes until the salvage is done.
    let salvaging: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM recoveries WHERE kind = 'main' \
             AND state IN ('moving', 'pending'))",
        )?
        .query_row([], |r| r.get(0))?;
    if salvaging {
        return Ok((0, 0, false));
    }
    let any: bool = conn
        .prepare_cached(&format!(
            "SELECT EXISTS (SELECT 1 FROM (SELECT {ARCHIVED_AT} AS at FROM export_archive \
             ORDER BY id LIMIT ?2) WHERE at < ?1)"
        ))?
        .query_row(params![cutoff, BATCH_ROWS as i64], |r| r.get(0))?;
    if !any {
        return Ok((0, 0, false));
    }
    let (mut rows, mut files) = (0, 0);
    let mut after = 0;
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let pending = if keep_pending { NOT_PENDING } else { "" };
        let batch = expire_exports_batch(&tx, cutoff, after, archive, claims, pending)?;
        tx.commit()?;
        match batch {
            None | Some((_, 0, _)) => return Ok((rows, files, false)),
            Some((end, n, f)) => {
                rows += n;
                files += f;
                after = end;
            }
        }
        if Instant::now() >= deadline {
            return Ok((rows, files, true));
        }
    }
}

/// One transaction of [`expire_exports`]: the end of the window of
/// [`BATCH_ROWS`] rows after id `after`, the old rows deleted in it and
/// the files deleted with them; `None` when no row is left.
///
/// A file goes before the commit: should the commit then fail, the rows
/// left point at a missing file only until the next pass deletes them,
/// whereas the other order could leave a file no row knows of forever.
fn expire_exports_batch(
    tx: &Transaction,
    cutoff: i64,
    after: i64,
    archive: Option<&ArchiveRoot>,
    claims: &ArchiveClaims,
    pending: &str,
) -> rusqlite::Result<Option<(i64, u64, u64)>> {
    let end: Option<i64> = tx
        .prepare_cached(
            "SELECT max(id) FROM (SELECT id FROM export_archive WHERE id > ?1 \
             ORDER BY id LIMIT ?2)",
        )?
        .query_row(params![after, BATCH_ROWS as i64], |r| r.get(0))?;
    let Some(end) = end else {
        return Ok(None);
    };
    let files: HashSet<(String, Option<String>)> = tx
        .prepare_cached(&format!(
            "SELECT DISTINCT archive_path, content_hash FROM export_archive \
             WHERE id > ?1 AND id <= ?2 AND {ARCHIVED_AT} < ?3 AND archive_path <> '' \
             {pending}"
        ))?
        .query_map(params![after, end, cutoff], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let rows = tx
        .prepare_cached(&format!(
            "DELETE FROM export_archive WHERE id > ?1 AND id <= ?2 AND {ARCHIVED_AT} < ?3 \
             {pending}"
        ))?
        .execute(params![after, end, cutoff])? as u64;
    let mut still_used = tx.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM export_archive WHERE content_hash IS ?2 \
         AND archive_path = ?1)",
    )?;
    let mut orphans = Vec::new();
    for (path, hash) in files {
        if !still_used.query_row(params![path, hash], |r| r.get::<_, bool>(0))? {
            orphans.push(path);
        }
    }
    let mut removed = 0;
    if let Some(root) = archive {
        let held = claims.lock();
        for path in orphans.iter().filter(|p| !held.is_claimed(p)) {
            match remove_archive_file(root, Path::new(path)) {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => log::warn!(
                    "retention cannot delete archive file `{path}` (no row references it \
                     any more): {e}"
                ),
            }
        }
    }
    Ok(Some((end, rows, removed)))
}

/// Deletes the archive file at `path` if it lies inside `root` and is a
/// regular file, reached through directory descriptors that never follow a
/// symbolic link; then removes its directories up to the root while they
/// are empty. `Ok(false)` when there was nothing to delete (gone already,
/// outside the archive, a symbolic link or anything but a regular file).
pub fn remove_archive_file(root: &ArchiveRoot, path: &Path) -> io::Result<bool> {
    let Ok(relative) = path.strip_prefix(&root.path) else {
        log::warn!(
            "retention leaves `{}` alone: it is outside the archive directory `{}`",
            path.display(),
            root.path.display()
        );
        return Ok(false);
    };
    let mut names: Vec<&OsStr> = Vec::new();
    for component in relative.components() {
        match component {
            Component::Normal(name) => names.push(name),
            _ => return Ok(false),
        }
    }
    let Some(file) = names.pop() else {
        return Ok(false);
    };
    // dirs[i] is the directory holding names[i] (dirs[0] the root).
    let mut dirs: Vec<OwnedFd> = vec![root.fd.as_fd().try_clone_to_owned()?];
    for name in &names {
        let parent = dirs.last().expect("the root at least").as_fd();
        match walk::open_dir_at(parent, name) {
            Ok(dir) => dirs.push(dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) if walk::is_not_a_directory(&e) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    let holder = dirs.last().expect("the root at least").as_fd();
    match walk::stat_at(holder, file) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    match rustix::fs::unlinkat(holder, file, AtFlags::empty()) {
        Ok(()) => {}
        Err(rustix::io::Errno::NOENT) => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    // Empty date, session and hash directories go too; the first one
    // still holding anything (or in use again) stops it.
    for (i, name) in names.iter().enumerate().rev() {
        if rustix::fs::unlinkat(dirs[i].as_fd(), *name, AtFlags::REMOVEDIR).is_err() {
            break;
        }
    }
    Ok(true)
}

/// Gives free pages back to the filesystem, [`VACUUM_STEP_PAGES`] per
/// step, while any are free and `deadline` has not passed (one step at
/// least). Only for a database in incremental auto-vacuum mode.
fn vacuum_steps(conn: &Connection, deadline: Instant) -> rusqlite::Result<(u64, bool)> {
    let mode: i64 = conn.pragma_query_value(None, "auto_vacuum", |r| r.get(0))?;
    if mode != 2 {
        return Ok((0, false));
    }
    let free_pages = || -> rusqlite::Result<i64> {
        conn.pragma_query_value(None, "freelist_count", |r| r.get(0))
    };
    let mut freed = 0;
    let mut free = free_pages()?;
    loop {
        if free == 0 {
            return Ok((freed, false));
        }
        // The pragma gives back one page per row it returns: every row is
        // stepped through (in one transaction), or only one page goes.
        let mut step = conn.prepare_cached(&format!(
            "PRAGMA incremental_vacuum({})",
            free.min(VACUUM_STEP_PAGES)
        ))?;
        let mut rows = step.query([])?;
        while rows.next()?.is_some() {}
        let left = free_pages()?;
        freed += u64::try_from(free - left).unwrap_or(0);
        if left >= free || Instant::now() >= deadline {
            return Ok((freed, left > 0 && left < free));
        }
        free = left;
    }
}

/// At start, before any other connection: a database created before
/// incremental auto-vacuum (mode NONE) is converted with one `VACUUM` if
/// it is at most [`VACUUM_AT_START_MAX_BYTES`]; a larger one keeps its
/// mode, and the pages retention frees are reused for new rows but not
/// given back. Either way the log says so. A failure is logged, not fatal.
pub fn convert_auto_vacuum(conn: &Connection, path: &Path) {
    let mode: i64 = match conn.pragma_query_value(None, "auto_vacuum", |r| r.get(0)) {
        Ok(mode) => mode,
        Err(e) => {
            log::warn!(
                "cannot read the auto-vacuum mode of `{}`: {e}",
                path.display()
            );
            return;
        }
    };
    if mode != 0 {
        return;
    }
    let bytes = std::fs::metadata(path).map_or(0, |m| m.len());
    let mib = bytes >> 20;
    if bytes > VACUUM_AT_START_MAX_BYTES {
        log::info!(
            "database `{}` ({mib} MiB) predates incremental auto-vacuum and is larger than the \
             {} MiB converted at start: space retention frees is reused for new logs but not \
             given back to the filesystem (to convert it, stop the daemon and run \
             sqlite3 {} 'PRAGMA auto_vacuum = INCREMENTAL; VACUUM')",
            path.display(),
            VACUUM_AT_START_MAX_BYTES >> 20,
            path.display()
        );
        return;
    }
    log::info!(
        "converting database `{}` ({mib} MiB) to incremental auto-vacuum with a one-time \
         VACUUM, so that retention can give freed space back",
        path.display()
    );
    let started = Instant::now();
    let converted = conn
        .pragma_update(None, "auto_vacuum", "INCREMENTAL")
        .and_then(|()| conn.execute_batch("VACUUM"))
        .and_then(|()| conn.pragma_query_value(None, "auto_vacuum", |r| r.get::<_, i64>(0)));
    match converted {
        Ok(2) => log::info!(
            "database `{}` converted in {} ms",
            path.display(),
            started.elapsed().as_millis()
        ),
        Ok(mode) => log::warn!(
            "database `{}` kept auto-vacuum mode {mode} after VACUUM: space retention frees \
             is reused but not given back",
            path.display()
        ),
        Err(e) => log::warn!(
            "cannot convert database `{}` to incremental auto-vacuum ({e}): space retention \
             frees is reused but not given back",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::schema;
    use std::fs;
    use uuid::Uuid;

    const DAY_US: i64 = 86_400_000_000;
    /// "Now" in these tests: day 100.
    const NOW: i64 = 100 * DAY_US;
    /// Retention of 30 days from [`NOW`].
    const CUTOFF: i64 = NOW - 30 * DAY_US;
    const OLD: i64 = CUTOFF - DAY_US;
    const NEW: i64 = NOW - DAY_US;

    fn store() -> (tempfile::TempDir, PathBuf, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db/codi.db");
        let conn = schema::open_rw(&path, 4).unwrap();
        (dir, path, conn)
    }

    fn insert_log(conn: &Connection, id: i64, session: Option<&str>, at: i64) {
        conn.execute(
            "INSERT INTO main.logs (id, uuid, timestamp, level, component, session_id, message, \
             created_at) VALUES (?1, ?2, ?3, 'Info', 'c', ?4, 'm', ?3)",
            params![id, Uuid::from_u128(id as u128).as_bytes(), at, session],
        )
        .unwrap();
    }

    fn ids(conn: &Connection) -> Vec<i64> {
        let mut stmt = conn
            .prepare("SELECT id FROM main.logs ORDER BY id")
            .unwrap();
        let ids = stmt.query_map([], |r| r.get(0)).unwrap();
        ids.map(Result::unwrap).collect()
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[test]
    fn with_hub_sync_age_retention_keeps_what_the_hub_has_not_acknowledged() {
        let (_dir, _path, mut conn) = store();
        for id in 1..=8 {
            insert_log(&conn, id, None, OLD);
        }
        insert_log(&conn, 9, None, NEW);
        conn.execute(
            "INSERT INTO sync_state (target, last_log_id) VALUES ('logs', 3)",
            [],
        )
        .unwrap();
        let keep_from = crate::hub::sync::shipped_through(&conn).unwrap() + 1;
        assert_eq!(
            expire_logs(&mut conn, CUTOFF, keep_from, later()).unwrap(),
            (3, false)
        );
        assert_eq!(
            ids(&conn),
            [4, 5, 6, 7, 8, 9],
            "4-8 are old but not shipped"
        );
        // Rotation (no age, no watermark) still takes them.
        let (end, n) = expire_logs_batch(&mut conn, i64::MAX, 0).unwrap().unwrap();
        assert_eq!((end, n), (8, 5));
    }

    #[test]
    fn old_logs_go_new_ones_stay_and_the_largest_id_stays_even_if_old() {
        let (_dir, _path, mut conn) = store();
        for id in 1..=5 {
            insert_log(&conn, id, None, OLD);
        }
        for id in 6..=8 {
            insert_log(&conn, id, None, NEW);
        }
        insert_log(&conn, 9, None, OLD);
        assert_eq!(
            expire_logs(&mut conn, CUTOFF, i64::MAX, later()).unwrap(),
            (5, false)
        );
        assert_eq!(
            ids(&conn),
            [6, 7, 8, 9],
            "the largest id is kept though old"
        );
        // Nothing more to do: no write, no deletion.
        assert_eq!(
            expire_logs(&mut conn, CUTOFF, i64::MAX, later()).unwrap(),
            (0, false)
        );
        // A newer row makes the old largest one deletable.
        insert_log(&conn, 10, None, NEW);
        assert_eq!(
            expire_logs(&mut conn, CUTOFF, i64::MAX, later()).unwrap(),
            (1, false)
        );
        assert_eq!(ids(&conn), [6, 7, 8, 10]);
    }

    #[test]
    fn batches_are_bounded_and_a_spent_pass_does_one_each() {
        let (_dir, _path, mut conn) = store();
        let tx = conn.transaction().unwrap();
        for id in 1..=2_500 {
            insert_log(&tx, id, None, OLD);
        }
        insert_log(&tx, 2_501, None, NEW);
        tx.commit().unwrap();
        assert_eq!(
            expire_logs_batch(&mut conn, CUTOFF, 0).unwrap(),
            Some((1_000, BATCH_ROWS))
        );
        assert_eq!(ids(&conn).len(), 1_501);
        // Past its deadline a pass still makes one batch of progress.
        let spent = Instant::now();
        assert_eq!(
            expire_logs(&mut conn, CUTOFF, i64::MAX, spent).unwrap(),
            (1_000, true)
        );
        assert_eq!(ids(&conn).len(), 501);
        assert_eq!(
            expire_logs(&mut conn, CUTOFF, i64::MAX, later()).unwrap(),
            (500, false)
        );
        assert_eq!(ids(&conn), [2_501]);
    }

    /// Copies of logs `ids` (created at `at`) in the ingest file of the
    /// store at `path`, as merged rows wait there until it lets them go;
    /// the ingest file's connection.
    fn still_in_ingest(path: &Path, ids: std::ops::RangeInclusive<i64>, at: i64) -> Connection {
        let ingest = schema::open_ingest_rw(path, 1).unwrap();
        for id in ids {
            ingest
                .execute(
                    "INSERT INTO main.ingest_logs (id, uuid, timestamp, level, component, \
                     message, created_at) VALUES (?1, ?2, 1, 'Info', 'c', 'm', ?3)",
                    params![id, Uuid::from_u128(id as u128).as_bytes(), at],
                )
                .unwrap();
        }
        ingest
    }

    #[test]
    fn a_log_whose_copy_is_still_in_the_ingest_file_stays() {
        let (_dir, path, mut conn) = store();
        for id in 1..=10 {
            insert_log(&conn, id, None, OLD);
        }
        insert_log(&conn, 11, None, NEW);
        // Rows 6.. merged but not yet deleted from the ingest file.
        let ingest = still_in_ingest(&path, 6..=11, OLD);
        assert_eq!(
            expire_logs(&mut conn, CUTOFF, i64::MAX, later()).unwrap(),
            (5, false)
        );
        assert_eq!(ids(&conn), [6, 7, 8, 9, 10, 11]);
        ingest
            .execute("DELETE FROM main.ingest_logs WHERE id <= 10", [])
            .unwrap();
        assert_eq!(
            expire_logs(&mut conn, CUTOFF, i64::MAX, later()).unwrap(),
            (5, false)
        );
        assert_eq!(ids(&conn), [11]);
    }

    fn session(conn: &Connection, id: &str, started: i64, ended: Option<i64>) {
        conn.execute(
            "INSERT INTO sessions (id, identity, started_at, recorded_at, ended_at) \
             VALUES (?1, 'me', 1, ?2, ?3)",
            params![id, started, ended],
        )
        .unwrap();
    }

    fn ended(conn: &Connection, id: &str) -> Option<(Option<i64>, Option<String>)> {
        conn.query_row(
            "SELECT ended_at, end_reason FROM sessions WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .unwrap()
    }

    fn policy(keep_days: Option<u64>, timeout: Option<Duration>) -> RetentionPolicy {
        RetentionPolicy {
            keep_for: keep_days.map(|d| Duration::from_secs(d * 86_400)),
            session_timeout: timeout,
            archive_dir: None,
            cap: None,
            keep_unshipped: false,
        }
    }

    #[test]
    fn idle_open_sessions_time_out_and_old_ended_ones_are_deleted() {
        let (_dir, path, mut conn) = store();
        let hour = Duration::from_secs(3600);
        let hour_us = 3_600_000_000;
        // Open, started long ago: idle; logging still; a log waiting in
        // the ingest file; started just now.
        session(&conn, "idle", NOW - 5 * hour_us, None);
        insert_log(&conn, 1, Some("idle"), NOW - 2 * hour_us);
        session(&conn, "busy", NOW - 5 * hour_us, None);
        insert_log(&conn, 2, Some("busy"), NOW - 60_000_000);
        session(&conn, "waiting", NOW - 5 * hour_us, None);
        session(&conn, "fresh", NOW - 60_000_000, None);
        // Ended: long ago, and recently.
        session(&conn, "gone", OLD - DAY_US, Some(OLD));
        session(&conn, "recent", OLD, Some(NEW));
        insert_log(&conn, 3, None, NEW);
        let ingest = schema::open_ingest_rw(&path, 1).unwrap();
        ingest
            .execute(
                "INSERT INTO main.ingest_logs (id, uuid, timestamp, level, component, \
                 session_id, message, created_at) VALUES (4, x'04', 1, 'Info', 'c', 'waiting', \
                 'm', 1)",
                [],
            )
            .unwrap();
        let state = Watermarks::new(4, 3, Uuid::nil());
        let mut r = Retention::new(
            policy(Some(30), Some(hour)),
            Arc::new(ArchiveClaims::default()),
        );
        let e = r.pass(&mut conn, &state, NOW, later()).unwrap();
        assert_eq!((e.timed_out, e.sessions), (1, 1), "{e:?}");
        assert_eq!(
            ended(&conn, "idle"),
            Some((Some(NOW), Some("timeout".into())))
        );
        for open in ["busy", "waiting", "fresh"] {
            assert_eq!(ended(&conn, open), Some((None, None)), "{open}");
        }
        assert_eq!(
            ended(&conn, "gone"),
            None,
            "ended before the cutoff: deleted"
        );
        assert_eq!(ended(&conn, "recent"), Some((Some(NEW), None)));
        // Once merged, the waiting session's log is its last activity (and
        // its timestamp, the client's clock, is not what counts).
        ingest.execute("DELETE FROM main.ingest_logs", []).unwrap();
        conn.execute(
            "INSERT INTO main.logs (id, uuid, timestamp, level, component, session_id, \
             message, created_at) VALUES (4, x'04', 1, 'Info', 'c', 'waiting', 'm', ?1)",
            [NOW - 60_000_000],
        )
        .unwrap();
        let e = r.pass(&mut conn, &state, NOW, later()).unwrap();
        assert_eq!(e.timed_out, 0, "{e:?}");
        assert_eq!(ended(&conn, "waiting"), Some((None, None)));
    }

    #[test]
    fn with_hub_sync_age_retention_keeps_sessions_and_exports_the_hub_lacks() {
        let (_dir, _path, mut conn) = store();
        session(&conn, "shipped", OLD - DAY_US, Some(OLD));
        session(&conn, "unshipped", OLD - DAY_US, Some(OLD));
        export_row(&conn, "", "aa", OLD);
        export_row(&conn, "", "bb", OLD);
        // The hub has "shipped" and export 1; the rest wait in hub_changes.
        conn.execute(
            "DELETE FROM hub_changes WHERE (kind = 'sessions' AND row_key = 'shipped') \
             OR (kind = 'export_archive' AND row_key = '1')",
            [],
        )
        .unwrap();
        let state = Watermarks::new(0, 0, Uuid::nil());
        let on = RetentionPolicy {
            keep_unshipped: true,
            ..policy(Some(30), None)
        };
        let e = Retention::new(on, Arc::new(ArchiveClaims::default()))
            .pass(&mut conn, &state, NOW, later())
            .unwrap();
        assert_eq!((e.sessions, e.exports), (1, 1), "{e:?}");
        assert!(ended(&conn, "shipped").is_none());
        assert!(ended(&conn, "unshipped").is_some(), "the hub lacks it");
        let left: i64 = conn
            .query_row("SELECT id FROM export_archive", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 2, "the export the hub lacks");
    }

    #[test]
    fn with_hub_sync_off_a_pass_empties_hub_changes_and_on_keeps_them() {
        let (_dir, _path, mut conn) = store();
        let n = BATCH_ROWS as i64 * 2 + 5;
        for i in 0..n {
            session(&conn, &format!("s{i}"), NOW, None);
        }
        let changes = |conn: &Connection| -> i64 {
            conn.query_row("SELECT count(*) FROM hub_changes", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(changes(&conn), n);
        let state = Watermarks::new(0, 0, Uuid::nil());
        let claims = Arc::new(ArchiveClaims::default());
        let on = RetentionPolicy {
            keep_unshipped: true,
            ..policy(None, Some(Duration::from_secs(3600)))
        };
        Retention::new(on, Arc::clone(&claims))
            .pass(&mut conn, &state, NOW, later())
            .unwrap();
        assert_eq!(changes(&conn), n, "the sync has yet to ship them");
        let off = policy(None, Some(Duration::from_secs(3600)));
        let e = Retention::new(off, claims)
            .pass(&mut conn, &state, NOW, later())
            .unwrap();
        assert!(!e.more, "{e:?}");
        assert_eq!(changes(&conn), 0);
    }

    #[test]
    fn session_expiry_goes_on_after_many_active_sessions() {
        let (_dir, _path, mut conn) = store();
        let n = SESSION_BATCH as i64 * 3;
        let tx = conn.transaction().unwrap();
        for i in 0..n {
            let id = format!("active-{i}");
            session(&tx, &id, i, None);
            insert_log(&tx, i + 1, Some(&id), NOW);
        }
        // Started last of all: behind every active one.
        session(&tx, "idle", n, None);
        tx.commit().unwrap();
        let state = Watermarks::new(n, n, Uuid::nil());
        let mut r = Retention::new(
            policy(None, Some(Duration::from_secs(3600))),
            Arc::new(ArchiveClaims::default()),
        );
        // Spent passes: one batch of candidates each, on from the last.
        let mut timed_out = 0;
        for _ in 0..4 {
            timed_out += r
                .pass(&mut conn, &state, NOW, Instant::now())
                .unwrap()
                .timed_out;
        }
        assert_eq!(timed_out, 1);
        assert_eq!(ended(&conn, "idle").unwrap().1.as_deref(), Some("timeout"));
        assert_eq!(ended(&conn, "active-0"), Some((None, None)));
    }

    /// An archive directory with one export row per `(file, archived_at)`.
    struct Archive {
        root: ArchiveRoot,
        dir: PathBuf,
    }

    impl Archive {
        fn new(base: &Path) -> Archive {
            let dir = base.join("archive");
            fs::create_dir_all(&dir).unwrap();
            let dir = fs::canonicalize(dir).unwrap();
            Archive {
                root: ArchiveRoot::open(&dir).unwrap(),
                dir,
            }
        }

        /// Writes the file `rel` (with its directories) and returns its
        /// path as rows record it.
        fn file(&self, rel: &str) -> String {
            let path = self.dir.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, rel).unwrap();
            path.to_string_lossy().into_owned()
        }
    }

    fn export_row(conn: &Connection, path: &str, hash: &str, at: i64) {
        conn.execute(
            "INSERT INTO export_archive (original_path, archive_path, content_hash, \
             archived_at_us) VALUES ('/src', ?1, ?2, ?3)",
            params![path, hash, at],
        )
        .unwrap();
    }

    fn export_rows(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM export_archive", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn orphan_archive_files_go_and_referenced_or_claimed_ones_stay() {
        let (dir, _path, mut conn) = store();
        let archive = Archive::new(dir.path());
        let orphan = archive.file("2020/01/01/s/aa/aaaa-report.md");
        let shared = archive.file("2020/01/01/s/bb/bbbb-notes.md");
        let claimed = archive.file("2020/01/02/s/cc/cccc-plan.md");
        export_row(&conn, &orphan, "aa", OLD);
        export_row(&conn, &shared, "bb", OLD);
        export_row(&conn, &claimed, "cc", OLD);
        // Identical content archived again later shares the file.
        export_row(&conn, &shared, "bb", NEW);
        // An error row has no file.
        conn.execute(
            "INSERT INTO export_archive (original_path, archive_path, archived_at_us, error) \
             VALUES ('/src', '', ?1, 'the file vanished')",
            [OLD],
        )
        .unwrap();
        let claims = ArchiveClaims::default();
        claims.lock().claim(&claimed);
        let (rows, files, more) = expire_exports(
            &mut conn,
            CUTOFF,
            Some(&archive.root),
            &claims,
            false,
            later(),
        )
        .unwrap();
        assert_eq!((rows, files, more), (4, 1, false));
        assert_eq!(export_rows(&conn), 1);
        assert!(!Path::new(&orphan).exists());
        assert!(
            !archive.dir.join("2020/01/01/s/aa").exists(),
            "its emptied directory goes too"
        );
        assert!(Path::new(&shared).is_file(), "still referenced");
        assert!(Path::new(&claimed).is_file(), "claimed by the watcher");
        assert!(archive.dir.join("2020/01/01/s/bb").is_dir());
        // A claim is counted: released as often as taken.
        claims.lock().claim(&claimed);
        claims.release(&claimed);
        assert!(claims.lock().is_claimed(&claimed));
        claims.release(&claimed);
        assert!(!claims.lock().is_claimed(&claimed));
    }

    #[test]
    fn symbolic_links_in_the_archive_are_never_followed() {
        let (dir, _path, mut conn) = store();
        let archive = Archive::new(dir.path());
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let precious = outside.join("precious.md");
        fs::write(&precious, b"keep me").unwrap();
        // A link as the file, a link as one of its directories, and a path
        // outside the archive altogether.
        fs::create_dir_all(archive.dir.join("2020/01/01/s/aa")).unwrap();
        let file_link = archive.dir.join("2020/01/01/s/aa/aaaa-link.md");
        std::os::unix::fs::symlink(&precious, &file_link).unwrap();
        std::os::unix::fs::symlink(&outside, archive.dir.join("2020/01/01/s/bb")).unwrap();
        let via_dir_link = archive.dir.join("2020/01/01/s/bb/precious.md");
        export_row(&conn, &file_link.to_string_lossy(), "aa", OLD);
        export_row(&conn, &via_dir_link.to_string_lossy(), "bb", OLD);
        export_row(&conn, &precious.to_string_lossy(), "cc", OLD);
        insert_log(&conn, 1, None, NEW);
        let claims = ArchiveClaims::default();
        let (rows, files, _) = expire_exports(
            &mut conn,
            CUTOFF,
            Some(&archive.root),
            &claims,
            false,
            later(),
        )
        .unwrap();
        assert_eq!((rows, files), (3, 0));
        assert_eq!(fs::read(&precious).unwrap(), b"keep me");
        assert!(fs::symlink_metadata(&file_link).unwrap().is_symlink());
        assert!(!remove_archive_file(
            &archive.root,
            &archive.dir.join("2020/../../outside/precious.md")
        )
        .unwrap());
        assert!(precious.exists());
    }

    #[test]
    fn a_pass_gives_the_freed_pages_back() {
        let (_dir, path, mut conn) = store();
        let mode: i64 = conn
            .pragma_query_value(None, "auto_vacuum", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, 2, "new databases are incremental");
        fill_sized(&mut conn, 1, 3_000, 500, OLD);
        insert_log(&conn, 3_001, None, NEW);
        let pages = |c: &Connection| -> i64 {
            c.pragma_query_value(None, "page_count", |r| r.get(0))
                .unwrap()
        };
        let before = pages(&conn);
        let state = Watermarks::new(3_001, 3_001, Uuid::nil());
        let mut r = Retention::new(policy(Some(30), None), Arc::new(ArchiveClaims::default()));
        let mut e = Expired::default();
        while {
            let pass = r.pass(&mut conn, &state, NOW, later()).unwrap();
            e.add(&pass);
            pass.more
        } {}
        assert_eq!(e.logs, 3_000);
        assert!(e.pages_freed > 300, "{e:?}");
        let free: i64 = conn
            .pragma_query_value(None, "freelist_count", |r| r.get(0))
            .unwrap();
        assert_eq!(free, 0);
        assert!(pages(&conn) < before / 2, "{} of {before}", pages(&conn));
        drop(conn);
        assert!(schema::open_ro(&path).is_ok());
    }

    #[test]
    fn an_old_database_without_auto_vacuum_is_converted_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codi.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE unrelated (x)")
            .unwrap();
        let conn = schema::open_rw(&path, 4).unwrap();
        let mode = |c: &Connection| -> i64 {
            c.pragma_query_value(None, "auto_vacuum", |r| r.get(0))
                .unwrap()
        };
        assert_eq!(
            mode(&conn),
            0,
            "an existing database keeps its mode on open"
        );
        insert_log(&conn, 1, None, NEW);
        convert_auto_vacuum(&conn, &path);
        assert_eq!(mode(&conn), 2);
        assert_eq!(ids(&conn), [1], "rows kept");
    }

    #[test]
    fn metrics_count_what_a_run_expired_and_an_off_policy_never_runs() {
        let (_dir, _path, mut conn) = store();
        let old = crate::proto::Timestamp::now().as_micros() - 31 * DAY_US;
        for id in 1..=3 {
            insert_log(&conn, id, None, old);
        }
        let state = Watermarks::new(3, 3, Uuid::nil());
        let metrics = Metrics::default();
        let mut r = Retention::new(policy(Some(30), None), Arc::new(ArchiveClaims::default()));
        assert!(r.due());
        r.run(&mut conn, &state, &metrics).unwrap();
        assert_eq!(Metrics::get(&metrics.logs_expired), 2);
        assert!(!r.due(), "the next pass waits");
        let off = Retention::new(
            RetentionPolicy::default(),
            Arc::new(ArchiveClaims::default()),
        );
        assert!(!off.due());
    }

    /// A filesystem of 1 TiB holding the database at `db` (and its WAL)
    /// and nothing else, with `capacity` bytes free were they empty (the
    /// test sets it): what they give back is free again.
    #[derive(Debug, Clone)]
    struct Space {
        db: PathBuf,
        capacity: Arc<Mutex<u64>>,
    }

    impl Space {
        fn new(db: &Path, capacity: u64) -> Space {
            Space {
                db: db.to_owned(),
                capacity: Arc::new(Mutex::new(capacity)),
            }
        }
    }

    impl FreeSpace for Space {
        fn free_and_size(&self) -> io::Result<(u64, u64)> {
            let len = |p: &Path| fs::metadata(p).map_or(0, |m| m.len());
            let files = len(&self.db) + len(&self.db.with_extension("db-wal"));
            Ok((self.capacity.lock().saturating_sub(files), 1 << 40))
        }
    }

    /// Nearly full below 64 MiB free; no percentage.
    const DISK: DiskThresholds = DiskThresholds {
        min_free_bytes: 64 << 20,
        min_free_percent: 0,
    };

    fn capped(max_bytes: u64) -> Retention {
        let cap = SizeCap {
            max_bytes,
            disk: DISK,
        };
        Retention::new(
            policy(None, None).with_cap(Some(cap)),
            Arc::new(ArchiveClaims::default()),
        )
    }

    /// Logs `from..=to` of about 500 bytes each, all new.
    fn fill(conn: &mut Connection, from: i64, to: i64) {
        fill_sized(conn, from, to, 500, NEW);
    }

    /// Logs `from..=to` with messages of `len` bytes, created at `at`.
    fn fill_sized(conn: &mut Connection, from: i64, to: i64, len: usize, at: i64) {
        let tx = conn.transaction().unwrap();
        for id in from..=to {
            tx.execute(
                "INSERT INTO main.logs (id, uuid, timestamp, level, component, message, \
                 created_at) VALUES (?1, ?2, 1, 'Info', 'c', ?3, ?4)",
                params![
                    id,
                    Uuid::from_u128(id as u128).as_bytes(),
                    "x".repeat(len),
                    at
                ],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }

    /// Size passes until one leaves nothing to do; what they did. Each
    /// starts with the WAL copied back and emptied, so that each sees the
    /// space the last one gave back.
    fn rotate_all(r: &mut Retention, conn: &mut Connection) -> Expired {
        let mut e = Expired::default();
        for _ in 0..1_000 {
            conn.execute_batch("PRAGMA main.wal_checkpoint(TRUNCATE)")
                .unwrap();
            let pass = r.size_pass(conn, later()).unwrap();
            e.add(&pass);
            if !pass.more {
                return e;
            }
        }
        panic!("rotation does not finish: {e:?}");
    }

    /// The ids are `first..=last` without a gap: the oldest went first.
    fn assert_a_suffix(conn: &Connection, last: i64) -> i64 {
        let ids = ids(conn);
        let first = ids[0];
        assert_eq!(ids, (first..=last).collect::<Vec<_>>());
        first
    }

    #[test]
    fn rotation_counts_the_logs_the_hub_did_not_have() {
        let (_dir, _path, mut conn) = store();
        fill(&mut conn, 1, 6_000);
        conn.execute(
            "INSERT OR REPLACE INTO sync_state (target, last_log_id) VALUES ('logs', 1000)",
            [],
        )
        .unwrap();
        let cap = DbSize::of(&conn).unwrap().used / 2;
        let mut r = Retention::new(
            policy(None, None)
                .with_hub_sync(true)
                .with_cap(Some(SizeCap {
                    max_bytes: cap,
                    disk: DISK,
                })),
            Arc::new(ArchiveClaims::default()),
        );
        let e = rotate_all(&mut r, &mut conn);
        let first = assert_a_suffix(&conn, 6_000);
        assert_eq!(e.rotated_cap, first as u64 - 1);
        assert_eq!(
            e.rotated_unshipped,
            first as u64 - 1 - 1000,
            "every rotated id above the watermark: {e:?}"
        );
    }

    #[test]
    fn above_the_cap_the_oldest_logs_go_down_to_the_low_water_mark() {
        let (_dir, _path, mut conn) = store();
        fill(&mut conn, 1, 6_000);
        let full = DbSize::of(&conn).unwrap().used;
        let cap = full / 2;
        let mut r = capped(cap);
        let e = rotate_all(&mut r, &mut conn);
        let used = DbSize::of(&conn).unwrap().used;
        assert!(used <= cap / 10 * 9, "{used} of {cap}");
        assert_eq!(e.rotated_disk, 0, "{e:?}");
        assert_eq!(e.logs, 0, "nothing is old");
        let first = assert_a_suffix(&conn, 6_000);
        assert_eq!(e.rotated_cap, first as u64 - 1);
        // 55 % of the rows, and at most one batch more (the size is
        // looked at after each).
        assert!(
            (3_300..=3_300 + BATCH_ROWS as u64).contains(&e.rotated_cap),
            "{e:?}"
        );
        assert!(e.pages_freed > 0, "{e:?}");
        assert_eq!(r.rotation(), None, "done");

        // Between the low-water mark and the cap: nothing goes.
        let mut next = 6_001;
        while DbSize::of(&conn).unwrap().used <= cap - 50_000 {
            fill(&mut conn, next, next + 9);
            next += 10;
        }
        assert!(DbSize::of(&conn).unwrap().used <= cap);
        let e = rotate_all(&mut r, &mut conn);
        assert_eq!(e.rotated_cap, 0, "below the cap: {e:?}");
        assert_eq!(ids(&conn)[0], first);
        // Past it: down to the low-water mark again.
        fill(&mut conn, next, next + 499);
        assert!(DbSize::of(&conn).unwrap().used > cap);
        let e = rotate_all(&mut r, &mut conn);
        assert!(e.rotated_cap > 500, "{e:?}");
        assert!(DbSize::of(&conn).unwrap().used <= cap / 10 * 9);
        assert_a_suffix(&conn, next + 499);
    }

    #[test]
    fn under_the_cap_nothing_goes() {
        let (_dir, path, mut conn) = store();
        fill(&mut conn, 1, 2_000);
        let used = DbSize::of(&conn).unwrap().used;
        let mut r = capped(used + 1).with_free_space(Box::new(Space::new(&path, 1 << 30)));
        let state = Watermarks::new(2_000, 2_000, Uuid::nil());
        let e = r.pass(&mut conn, &state, NOW, later()).unwrap();
        assert_eq!(e, Expired::default());
        assert_eq!(ids(&conn).len(), 2_000);
        assert_eq!(r.rotation(), None);
    }

    #[test]
    fn rotation_keeps_the_largest_id_and_what_the_ingest_file_holds() {
        let (_dir, path, mut conn) = store();
        fill(&mut conn, 1, 3_000);
        // Rows 2_501.. merged but still in the ingest file.
        let ingest = still_in_ingest(&path, 2_501..=3_000, NEW);
        // A cap nothing fits under: everything that may go goes.
        let mut r = capped(1);
        let e = rotate_all(&mut r, &mut conn);
        assert_eq!(e.rotated_cap, 2_500, "{e:?}");
        assert_eq!(assert_a_suffix(&conn, 3_000), 2_501);
        let why = r.rotation().expect("still above the cap");
        assert!(
            why.starts_with("rotating: the database uses") && why.contains("no log is left"),
            "{why}"
        );
        // Once the ingest file lets them go, only the largest id stays.
        ingest.execute("DELETE FROM main.ingest_logs", []).unwrap();
        let e = rotate_all(&mut r, &mut conn);
        assert_eq!(e.rotated_cap, 499, "{e:?}");
        assert_eq!(ids(&conn), [3_000]);
    }

    #[test]
    fn a_nearly_full_filesystem_rotates_only_with_a_cap_and_until_enough_is_free() {
        let (_dir, path, mut conn) = store();
        // About 12 MiB of logs.
        fill_sized(&mut conn, 1, 6_000, 2_000, NEW);
        let used = DbSize::of(&conn).unwrap().used;
        // Nearly full below 32 MiB free, 34 MiB once rotating.
        let disk = DiskThresholds {
            min_free_bytes: 32 << 20,
            min_free_percent: 0,
        };
        let (wanted, with_margin) = (
            disk.free_wanted(1 << 40, false),
            disk.free_wanted(1 << 40, true),
        );
        assert_eq!(with_margin - wanted, 2 << 20);
        // A quarter of the database's pages short of the threshold.
        let space = Space::new(&path, wanted + used - used / 4);
        let policy = |max_bytes| policy(None, None).with_cap(Some(SizeCap { max_bytes, disk }));
        // Without a cap: nothing, however full.
        let claims = Arc::new(ArchiveClaims::default());
        let mut uncapped = Retention::new(policy(1).with_cap(None), Arc::clone(&claims))
            .with_free_space(Box::new(space.clone()));
        assert_eq!(
            uncapped.size_pass(&mut conn, later()).unwrap(),
            Expired::default()
        );
        assert!(!uncapped.due(), "no cap, no age, no timeout: never due");
        // With a cap far above the database: rotated for the disk.
        let mut r =
            Retention::new(policy(1 << 40), claims).with_free_space(Box::new(space.clone()));
        let e = rotate_all(&mut r, &mut conn);
        assert_eq!(e.rotated_cap, 0, "{e:?}");
        let first = assert_a_suffix(&conn, 6_000);
        assert_eq!(e.rotated_disk, first as u64 - 1);
        conn.execute_batch("PRAGMA main.wal_checkpoint(TRUNCATE)")
            .unwrap();
        let now = DbSize::of(&conn).unwrap();
        let (free, _) = space.free_and_size().unwrap();
        assert!(
            free + now.reclaimable() >= with_margin,
            "the thresholds and the margin free: {free} + {}",
            now.reclaimable()
        );
        // A quarter and 2 MiB of the rows, at most one batch more.
        let least = 6_000 * (used / 4 + (2 << 20)) / used;
        assert!(
            (least..=least + BATCH_ROWS as u64).contains(&e.rotated_disk),
            "{least}: {e:?}"
        );
        assert!(e.pages_freed > 0);
        // Plenty free: nothing more.
        *space.capacity.lock() = 1 << 39;
        let e = rotate_all(&mut r, &mut conn);
        assert_eq!(e.rotated_disk, 0, "{e:?}");
        assert_eq!(ids(&conn)[0], first);
    }

    #[test]
    fn a_run_counts_rotation_and_says_so_in_the_health() {
        let (_dir, _path, mut conn) = store();
        fill(&mut conn, 1, 3_000);
        let state = Watermarks::new(3_000, 3_000, Uuid::nil());
        let metrics = Metrics::default();
        let mut r = capped(1);
        assert!(r.due());
        r.run(&mut conn, &state, &metrics).unwrap();
        let rotated = Metrics::get(&metrics.logs_rotated_cap);
        assert!(rotated >= BATCH_ROWS as u64, "{rotated}");
        assert_eq!(Metrics::get(&metrics.logs_rotated_disk), 0);
        assert_eq!(ids(&conn).len() as u64, 3_000 - rotated);
        let t = metrics.health.get(ROTATION_HEALTH).expect("rotating");
        assert_eq!(t.severity, Severity::Degraded);
        assert!(t.reason.starts_with("rotating: "), "{}", t.reason);
        // The size is looked at again within a second.
        assert!(r.next_size_check <= Instant::now() + SIZE_CHECK_INTERVAL);
        // A cap now far above: the entry clears.
        r.policy.cap = Some(SizeCap {
            max_bytes: 1 << 40,
            disk: DISK,
        });
        r.next_size_check = Instant::now();
        assert!(r.due());
        r.run(&mut conn, &state, &metrics).unwrap();
        assert_eq!(metrics.health.get(ROTATION_HEALTH), None);
    }
}
