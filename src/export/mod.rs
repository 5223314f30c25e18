//! Export detection: the watcher thread (`codi-exports`). It watches
//! directories with inotify, notices every export file once it is
//! completely written, archives it ([`archive`]), attributes it to a session
//! and records it in `export_archive`.
//!
//! One mio `Poll` waits for the inotify descriptor and a `Waker` (control
//! requests from the event loops, and stop); its timeout drives the settle
//! re-checks and the periodic scan.
//!
//! What counts as an export: a regular file whose path relative to its
//! watched root matches one of the root's glob patterns (`*` also crosses
//! `/`, so `*.md` matches at any depth), seen through `IN_CLOSE_WRITE` or
//! `IN_MOVED_TO`, never while it is open for writing. Scans (at start-up, for
//! a new watch, for a new subdirectory, after a queue overflow and every
//! `scan_interval`) find files inotify did not report. Before copying a file
//! a scan found, the watcher asks the kernel whether any process still has
//! it open for writing (a read lease is granted only if none does) and
//! leaves such a file to its close event; where the kernel cannot tell, a
//! file that changed within the last second is checked again a second
//! later. A file is archived again only when its size or
//! modification time changed since its last archive row.
//!
//! In move mode a file is deleted once its row is committed, but only when
//! it is known to be complete: after its close event, or once a scan finds
//! it unchanged for a minute. A file a scan archived earlier is remembered
//! as the very file copied (device, inode, size, modification time) and
//! deleted on its next close event or a later scan, whichever shows it
//! done first; so is a file whose deletion failed.
//!
//! The users who ask for watches may be hostile: trees are walked through
//! directory descriptors, never following a symbolic link ([`walk`],
//! `scan`), only regular files are ever opened, and a watch archives only
//! files its owner owns unless that is root or the daemon's user
//! (`control`).

pub mod archive;
mod control;
mod roots;
mod scan;
pub mod walk;

use crate::metrics::Metrics;
use crate::reply::{Replies, ReplyTo};
use crate::store::retention::ArchiveClaims;
use crate::store::wal::WalState;
use crate::store::{schema, StoreError};
use archive::CopyError;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use inotify::{EventMask, Inotify, WatchDescriptor};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use roots::Root;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use uuid::Uuid;
use walk::{Identity, Meta, Unlinked};

const INOTIFY: Token = Token(0);
const WAKE: Token = Token(1);
/// A scanned file modified this recently may still be written: look again
/// after this long (its close event usually comes first).
const SETTLE: Duration = Duration::from_secs(1);
/// Control requests waiting for the watcher; beyond it a client gets
/// `Unavailable`.
const CONTROL_QUEUE: usize = 256;
/// How long a file found by a scan must be unchanged before move mode may
/// delete it (files seen closed by inotify are moved at once).
const MOVE_AFTER_IDLE: Duration = Duration::from_secs(60);
/// Most closed files waiting to be archived (about 100 bytes each).
const MAX_CLOSED_QUEUE: usize = 1 << 20;
/// Most closed files archived before the loop looks at control requests.
const CLOSED_PER_TURN: usize = 4096;
/// Events buffer for one `read` of the inotify descriptor.
const EVENT_BUFFER: usize = 64 * 1024;
/// How long the archive's free space and the sessions' workspaces are
/// trusted before they are read again.
const REFRESH: Duration = Duration::from_millis(250);
/// Most files whose last recorded error is remembered (so that a full scan
/// does not record the same error again); beyond it the memory is cleared
/// and each such file may get one more row.
const MAX_REMEMBERED_ERRORS: usize = 100_000;

/// What the archive does with the source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveMode {
    /// Keep the source.
    Copy,
    /// Delete the source once its archive row is committed.
    Move,
}

/// An active session's workspace, as the watcher attributes exports.
#[derive(Debug, Clone)]
struct Workspace {
    /// The directory, without a trailing `/`.
    dir: String,
    /// The session.
    session_id: String,
    /// The uid that started it; `None` over TCP or before uids were stored.
    uid: Option<u32>,
}

/// True if a session `session_uid` started may have a file `owner` owns
/// counted as its export: its own, or root's, the daemon's or one with no
/// uid (the operator's, over TCP).
fn may_claim(session_uid: Option<u32>, owner: u32, daemon_uid: u32) -> bool {
    match session_uid {
        None => true,
        Some(uid) => uid == owner || roots::is_privileged(uid, daemon_uid),
    }
}

/// How the watcher works.
#[derive(Debug, Clone)]
pub struct ExportSettings {
    /// Patterns of a watch that names none.
    pub default_patterns: Vec<String>,
    /// Time between full rescans.
    pub scan_interval: Duration,
    /// Export files archived per database transaction.
    pub batch_size: usize,
    /// Where archived files go; never watched itself.
    pub archive_dir: PathBuf,
    /// Copy or move.
    pub mode: ArchiveMode,
    /// Most inotify watches one watched tree may use; its further
    /// directories are found by the full scan only.
    pub max_watches_per_root: usize,
}

/// A monitoring request from a client.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlOp {
    /// `StartMonitoring`.
    Start {
        /// The directory, as the client gave it.
        path: String,
        /// Watch subdirectories too.
        recursive: bool,
        /// Glob patterns; empty for the defaults.
        patterns: Vec<String>,
        /// The session every export here belongs to.
        session_id: Option<String>,
    },
    /// `StopMonitoring`.
    Stop {
        /// The directory, as the client gave it.
        path: String,
        /// Set for a requester who may see only its own watches: its uid.
        /// Another user's watch is then answered as if it did not exist.
        only_owner: Option<u32>,
    },
    /// `ListMonitoring`.
    List {
        /// Set for a requester who may see only its own watches: its uid.
        only_owner: Option<u32>,
    },
}

/// A monitoring request on its way to the watcher.
#[derive(Debug)]
pub struct ControlJob {
    /// Where the answer goes.
    pub reply: ReplyTo,
    /// The request's id, for the acknowledgment.
    pub request_id: Uuid,
    /// What to do.
    pub op: ControlOp,
    /// The uid of the local user who asked (`SO_PEERCRED`); `None` when it
    /// could not be read.
    pub requester_uid: Option<u32>,
}

/// The event loops' handle on the watcher: a bounded queue plus the waker.
#[derive(Debug, Clone)]
pub struct ControlSender {
    tx: Sender<ControlJob>,
    waker: Arc<Waker>,
}

impl ControlSender {
    /// Queues `job` and wakes the watcher; `Full` when too many wait.
    pub fn try_send(&self, job: ControlJob) -> Result<(), TrySendError<()>> {
        self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => TrySendError::Full(()),
            TrySendError::Disconnected(_) => TrySendError::Disconnected(()),
        })?;
        if let Err(e) = self.waker.wake() {
            log::error!("cannot wake the export watcher: {e}");
        }
        Ok(())
    }
}

/// The running watcher thread.
#[derive(Debug)]
pub struct WatcherHandle {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: JoinHandle<()>,
}

impl WatcherHandle {
    /// Stops the watcher (after the batch it is archiving) and waits.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if self.thread.join().is_err() {
            log::error!("the export watcher panicked");
        }
    }
}

/// Opens its database connection, loads the saved watches and starts the
/// watcher thread `codi-exports`, which first catches up on exports that
/// appeared while the daemon was down. Its commits are reported to `wal`,
/// the main database's WAL state; the archive files its rows will
/// reference are claimed in `claims` until they are committed.
pub fn spawn_watcher(
    db_path: &Path,
    wal: Arc<WalState>,
    claims: Arc<ArchiveClaims>,
    settings: ExportSettings,
    replies: Replies,
    metrics: Arc<Metrics>,
) -> Result<(ControlSender, WatcherHandle), StoreError> {
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = Watcher::open(
        db_path,
        wal,
        claims,
        settings,
        replies,
        metrics,
        Arc::clone(&stop),
    )?;
    let waker =
        Arc::new(
            Waker::new(watcher.poll.registry(), WAKE).map_err(|source| StoreError::Io {
                action: "create a waker for",
                path: watcher.settings.archive_dir.clone(),
                source,
            })?,
        );
    let (tx, rx) = crossbeam_channel::bounded(CONTROL_QUEUE);
    let thread_stop = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("codi-exports".into())
        .spawn(move || watcher.run(&rx, &thread_stop))
        .map_err(|source| StoreError::Spawn {
            name: "codi-exports".into(),
            source,
        })?;
    Ok((
        ControlSender {
            tx,
            waker: Arc::clone(&waker),
        },
        WatcherHandle {
            stop,
            waker,
            thread,
        },
    ))
}

/// Size and modification time (ns) of each source's last successful
/// archive row, keyed by the path as stored (see [`key`]).
fn load_known(conn: &Connection) -> Result<HashMap<String, (u64, i64)>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT original_path, file_size, source_mtime_ns FROM export_archive \
         WHERE id IN (SELECT max(id) FROM export_archive WHERE error IS NULL \
         GROUP BY original_path)",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            (
                r.get::<_, Option<i64>>(1)?.unwrap_or(-1) as u64,
                r.get::<_, Option<i64>>(2)?.unwrap_or(-1),
            ),
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The last error recorded for each source whose last row is an error
/// (other than a vanished file): its version and [`archive::error_class`].
fn load_errors(conn: &Connection) -> Result<HashMap<String, (u64, i64, String)>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT original_path, file_size, source_mtime_ns, error FROM export_archive \
         WHERE id IN (SELECT max(id) FROM export_archive GROUP BY original_path) \
         AND error IS NOT NULL",
    )?;
    let vanished = CopyError::Vanished.to_string();
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<i64>>(1)?.unwrap_or(-1) as u64,
            r.get::<_, Option<i64>>(2)?.unwrap_or(-1),
            r.get::<_, String>(3)?,
        ))
    })?;
    let mut errors = HashMap::new();
    for row in rows {
        let (path, size, mtime_ns, error) = row?;
        if error != vanished && errors.len() < MAX_REMEMBERED_ERRORS {
            let class = archive::error_class(&error).to_owned();
            errors.insert(path, (size, mtime_ns, class));
        }
    }
    Ok(errors)
}

/// [`content_key`] of every content in the archive.
fn load_contents(conn: &Connection) -> Result<HashSet<u64>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT DISTINCT content_hash FROM export_archive \
         WHERE error IS NULL AND content_hash IS NOT NULL",
    )?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut keys = HashSet::new();
    for hash in rows {
        keys.extend(content_key(&hash?));
    }
    Ok(keys)
}

/// The first 64 bits of a SHA-256 in hex, for [`Watcher::contents`].
fn content_key(hash: &str) -> Option<u64> {
    hash.get(..16).and_then(|h| u64::from_str_radix(h, 16).ok())
}

/// A source path as `export_archive` stores it (lossy for names that are
/// not UTF-8, so the same key comes back after a restart).
fn key(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// A watched directory: its path, which directory it was when watched,
/// and the root its watch counts against.
#[derive(Debug)]
struct Watched {
    path: PathBuf,
    identity: Identity,
    root: PathBuf,
}

/// One archive row waiting for its transaction.
struct Record {
    source: PathBuf,
    archive_path: String,
    session_id: Option<String>,
    size: u64,
    mtime_ns: i64,
    content_hash: Option<String>,
    error: Option<String>,
    /// What becomes of the source once the row is committed.
    fate: SourceFate,
}

/// What becomes of an archived source once its row is committed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum SourceFate {
    /// Kept: copy mode, or an error row.
    Keep,
    /// Move mode, the file is complete: deleted if it still is this file
    /// (device, inode, size, modification time).
    Remove(Meta),
    /// Move mode, but a scan found it and it may still be written: kept,
    /// and remembered as this file until it is known to be done (see
    /// [`Watcher::move_archived`]).
    Later(Meta),
}

struct Watcher {
    conn: Connection,
    settings: ExportSettings,
    inotify: Inotify,
    poll: Poll,
    /// Watched directory of each watch descriptor.
    dirs: HashMap<WatchDescriptor, Watched>,
    /// Watch descriptor of each watched directory.
    watched: HashMap<PathBuf, WatchDescriptor>,
    roots: Vec<Root>,
    /// This process's effective uid: like root, it may watch anything.
    daemon_uid: u32,
    /// Device and inode of the archive directory, never scanned.
    archive_identity: Option<Identity>,
    /// The last few directories opened for files reported in them.
    dir_cache: Vec<(PathBuf, Arc<OwnedFd>)>,
    /// A directory too deep to scan was reported in this full scan.
    depth_warned: bool,
    /// Source path ([`key`]) to (size, mtime) of its last archive row.
    known: HashMap<String, (u64, i64)>,
    /// [`content_key`] of every content archived (or about to be): content
    /// whose key is not here is new, and the database is not asked (8
    /// bytes per distinct content, beside `known`'s path per export).
    contents: HashSet<u64>,
    /// Versions that failed to archive (no space, I/O); tried again at the
    /// next full scan, or when they change.
    failed: HashMap<String, (u64, i64)>,
    /// Source ([`key`]) to the version and [`archive::error_class`] of its
    /// last error row: the same error for the same version is recorded
    /// once, however many scans try again.
    errors: HashMap<String, (u64, i64, String)>,
    /// Files a scan found still changing, and when to look again.
    settling: HashMap<PathBuf, Instant>,
    /// Move mode: archived files not deleted yet (found by a scan while
    /// they might still have been written, or their deletion failed), as
    /// the file that was copied; removed from here once deleted or changed.
    kept: HashMap<PathBuf, Meta>,
    /// How long a file found by a scan must be unchanged before move mode
    /// deletes it ([`MOVE_AFTER_IDLE`]; tests shorten it).
    move_after_idle: Duration,
    /// Files reported closed (or moved in), oldest first, not yet archived.
    closed: VecDeque<PathBuf>,
    /// The same files, so that a file closed twice waits once.
    closed_set: HashSet<PathBuf>,
    /// [`MAX_CLOSED_QUEUE`] was reached: a full scan replaces the queue.
    closed_overflowed: bool,
    batch: Vec<Record>,
    replies: Replies,
    metrics: Arc<Metrics>,
    wal: Arc<WalState>,
    /// Archive files the rows of `batch` will reference: retention
    /// (`store::retention`) does not delete them meanwhile.
    claims: Arc<ArchiveClaims>,
    /// Set when the daemon stops; long scans give up early.
    stop: Arc<AtomicBool>,
    next_scan: Instant,
    /// The watch limit was reported since the last full scan.
    limit_warned: bool,
    /// Archive directories known to exist.
    made_dirs: HashSet<PathBuf>,
    /// Free bytes in the archive's filesystem (minus what was copied since)
    /// and when they were read.
    free: (u64, Instant),
    /// Active sessions with a workspace: (workspace without a trailing `/`,
    /// id, the uid that started it), deepest first, and when they were read.
    workspaces: (Vec<Workspace>, Instant),
}

impl Watcher {
    /// Opens its database connection, the archive directory, inotify and
    /// the poll, and loads the saved watches; [`spawn_watcher`] runs it.
    fn open(
        db_path: &Path,
        wal: Arc<WalState>,
        claims: Arc<ArchiveClaims>,
        settings: ExportSettings,
        replies: Replies,
        metrics: Arc<Metrics>,
        stop: Arc<AtomicBool>,
    ) -> Result<Watcher, StoreError> {
        let conn = schema::open_rw(db_path, 8)?;
        // The merger's checkpointer keeps the main database's WAL in check; a
        // checkpoint inside this thread's commits would only slow detection.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let io_err = |action, path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io {
                action,
                path,
                source,
            }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&settings.archive_dir)
            .map_err(io_err("create archive directory", &settings.archive_dir))?;
        let archive_dir = fs::canonicalize(&settings.archive_dir)
            .map_err(io_err("resolve archive directory", &settings.archive_dir))?;
        let archive_identity = walk::open_root(&archive_dir)
            .and_then(|fd| walk::stat_fd(fd.as_fd()))
            .map(|m| m.identity)
            .ok();
        let inotify = Inotify::init().map_err(io_err("start inotify for", &archive_dir))?;
        // A writer opening a file while the watcher holds its read lease (see
        // `archive::open_for_writing`) makes the kernel send SIGIO, which would
        // otherwise end the process.
        // SAFETY: installing SIG_IGN has no preconditions.
        unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) };
        let poll = Poll::new().map_err(io_err("create a poll for", &archive_dir))?;
        poll.registry()
            .register(
                &mut SourceFd(&inotify.as_raw_fd()),
                INOTIFY,
                Interest::READABLE,
            )
            .map_err(io_err("register inotify for", &archive_dir))?;
        let mut watcher = Watcher {
            known: load_known(&conn)?,
            contents: load_contents(&conn)?,
            failed: HashMap::new(),
            errors: load_errors(&conn)?,
            conn,
            settings: ExportSettings {
                archive_dir,
                ..settings
            },
            inotify,
            poll,
            dirs: HashMap::new(),
            watched: HashMap::new(),
            roots: Vec::new(),
            daemon_uid: rustix::process::geteuid().as_raw(),
            archive_identity,
            dir_cache: Vec::new(),
            depth_warned: false,
            settling: HashMap::new(),
            kept: HashMap::new(),
            move_after_idle: MOVE_AFTER_IDLE,
            closed: VecDeque::new(),
            closed_set: HashSet::new(),
            closed_overflowed: false,
            batch: Vec::new(),
            replies,
            metrics,
            wal,
            claims,
            stop,
            next_scan: Instant::now(),
            limit_warned: false,
            made_dirs: HashSet::new(),
            free: (0, Instant::now() - REFRESH),
            workspaces: (Vec::new(), Instant::now() - REFRESH),
        };
        watcher.load_roots()?;
        Ok(watcher)
    }

    fn run(mut self, control: &Receiver<ControlJob>, stop: &AtomicBool) {
        let mut events = Events::with_capacity(8);
        let mut buffer = vec![0u8; EVENT_BUFFER];
        // Catch up on what appeared while the daemon was down.
        self.full_scan();
        loop {
            self.archive_closed(&mut buffer);
            self.flush();
            let timeout = if self.closed.is_empty() {
                self.next_deadline()
                    .saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != ErrorKind::Interrupted {
                    log::error!("export watcher poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            if stop.load(Ordering::SeqCst) {
                break;
            }
            while let Ok(job) = control.try_recv() {
                self.control(job);
            }
            self.read_events(&mut buffer);
            self.recheck_settled();
            if Instant::now() >= self.next_scan {
                self.full_scan();
            }
            self.publish_state();
        }
        self.flush();
    }

    fn next_deadline(&self) -> Instant {
        let settle = self.settling.values().min().copied();
        match settle {
            Some(t) if t < self.next_scan => t,
            _ => self.next_scan,
        }
    }

    /// Publishes the watch gauges, and whether watching falls short: the
    /// inotify watch limit reached since the last full scan, or watched
    /// directories missing.
    fn publish_state(&self) {
        let m = &*self.metrics;
        let missing = self.roots.iter().filter(|r| !r.active).count();
        Metrics::set(&m.watched_roots, self.roots.len() as u64);
        Metrics::set(&m.watched_roots_missing, missing as u64);
        Metrics::set(&m.inotify_watches, self.watched.len() as u64);
        let condition = if self.limit_warned {
            Some(format!(
                "the inotify watch limit was reached (fs.inotify.max_user_watches): some \
                 directories are covered only by the scan every {}",
                humantime::format_duration(self.settings.scan_interval)
            ))
        } else if missing > 0 {
            Some(format!(
                "{missing} of {} watched directories are missing (deleted or moved away)",
                self.roots.len()
            ))
        } else {
            None
        };
        m.health.set(
            "exports/watches",
            condition.map(|reason| (crate::health::Severity::Degraded, reason)),
        );
    }

    fn read_events(&mut self, buffer: &mut [u8]) {
        loop {
            let events = match self.inotify.read_events(buffer) {
                Ok(events) => events,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("reading inotify events failed: {e}");
                    return;
                }
            };
            let mut found: Vec<PathBuf> = Vec::new();
            let mut new_dirs = Vec::new();
            let mut gone = Vec::new();
            let mut overflow = false;
            for event in events {
                if event.mask.contains(EventMask::Q_OVERFLOW) {
                    overflow = true;
                    continue;
                }
                let Some(dir) = self.dirs.get(&event.wd).map(|w| w.path.clone()) else {
                    continue;
                };
                if event.mask.contains(EventMask::IGNORED) {
                    gone.push((event.wd.clone(), dir, true));
                    continue;
                }
                if event
                    .mask
                    .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF)
                {
                    gone.push((event.wd.clone(), dir, false));
                    continue;
                }
                let Some(name) = event.name else { continue };
                let path = dir.join(name);
                if event.mask.contains(EventMask::ISDIR) {
                    if event
                        .mask
                        .intersects(EventMask::CREATE | EventMask::MOVED_TO)
                    {
                        new_dirs.push(path);
                    }
                } else if event
                    .mask
                    .intersects(EventMask::CLOSE_WRITE | EventMask::MOVED_TO)
                {
                    found.push(path);
                }
            }
            for (wd, dir, ignored_only) in gone {
                self.forget(wd, &dir, ignored_only);
            }
            if overflow {
                Metrics::add(&self.metrics.inotify_overflows, 1);
                log::warn!("inotify event queue overflowed; rescanning every watched directory");
                self.full_scan();
            }
            for dir in new_dirs {
                if self.roots.iter().any(|r| r.covers_dir(&dir)) {
                    self.scan_dir(&dir);
                }
            }
            for path in found {
                if self.closed.len() >= MAX_CLOSED_QUEUE {
                    self.closed_overflowed = true;
                } else if self.roots.iter().any(|r| r.matches(&path))
                    && self.closed_set.insert(path.clone())
                {
                    self.closed.push_back(path);
                }
            }
        }
    }

    /// Archives the files whose close events were read, a batch at a time,
    /// reading the kernel's queue again between batches: the kernel holds
    /// only `max_queued_events` (16,384 by default), so events wait here
    /// instead, and a burst longer than the kernel's queue does not cost a
    /// full rescan. Beyond [`MAX_CLOSED_QUEUE`] files the queue is dropped
    /// and one full scan finds them instead.
    fn archive_closed(&mut self, buffer: &mut [u8]) {
        let mut done = 0;
        while let Some(path) = self.closed.pop_front() {
            self.closed_set.remove(&path);
            if self.roots.iter().any(|r| r.matches(&path)) {
                self.consider_path(&path, false);
            }
            done += 1;
            if done % self.settings.batch_size.max(1) == 0 {
                self.read_events(buffer);
            }
            if done >= CLOSED_PER_TURN {
                // Let control requests and deadlines in.
                break;
            }
        }
        if self.closed_overflowed {
            self.closed_overflowed = false;
            self.closed.clear();
            self.closed_set.clear();
            Metrics::add(&self.metrics.inotify_overflows, 1);
            log::warn!(
                "more than {MAX_CLOSED_QUEUE} exports waiting; rescanning every watched directory"
            );
            self.full_scan();
        }
    }

    // ----- archiving -----

    /// A file inotify reported (or one settling): opened again through
    /// its directory's descriptor, from its root's, never through `path`.
    fn consider_path(&mut self, path: &Path, scanned: bool) {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return;
        };
        match self.resolve_dir(parent) {
            Ok(dir) => self.consider_at(dir.as_fd(), path, name, scanned),
            Err(e) if e.kind() == ErrorKind::NotFound => self.vanished(path, scanned),
            Err(e) => {
                // A link (never followed) or a file where a directory was.
                self.settling.remove(path);
                log::debug!(
                    "not looking at `{}`: its directory cannot be opened ({e})",
                    path.display()
                );
            }
        }
    }

    fn vanished(&mut self, path: &Path, scanned: bool) {
        self.settling.remove(path);
        self.kept.remove(path);
        if !scanned {
            self.record_error(path, 0, 0, &CopyError::Vanished);
        }
    }

    /// The matching entry `name` of `dir`, named `path`: archive it unless
    /// this version already is, or it is not a regular file (then it is
    /// never opened), or not its watch's owner's. A file found by a scan
    /// that changed within [`SETTLE`] waits for its close event or a later
    /// look.
    fn consider_at(&mut self, dir: BorrowedFd<'_>, path: &Path, name: &OsStr, scanned: bool) {
        let found = match walk::stat_at(dir, name) {
            Ok(found) => found,
            Err(e) if e.kind() == ErrorKind::NotFound => return self.vanished(path, scanned),
            Err(e) => {
                log::warn!("cannot inspect export `{}`: {e}", path.display());
                return;
            }
        };
        if !found.is_file() {
            self.settling.remove(path);
            self.kept.remove(path);
            return;
        }
        let name_key = key(path);
        let version = (found.size, found.mtime_ns);
        if self.known.get(&name_key) == Some(&version) {
            self.settling.remove(path);
            if self.settings.mode == ArchiveMode::Move {
                self.move_archived(dir, path, name, &found, !scanned);
            }
            return;
        }
        if self.failed.get(&name_key) == Some(&version) {
            self.settling.remove(path);
            return;
        }
        if !self
            .roots
            .iter()
            .any(|r| r.matches(path) && r.trusts(found.uid))
        {
            self.settling.remove(path);
            let watcher = self
                .roots
                .iter()
                .filter(|r| r.matches(path))
                .max_by_key(|r| r.path.as_os_str().len())
                .and_then(|r| r.owner_uid);
            let error = CopyError::Untrusted {
                owner: found.uid,
                watcher,
            };
            self.record_error(path, version.0, version.1, &error);
            return;
        }
        let source = match archive::open_source(dir, name, &found, scanned) {
            Ok(Some(source)) => source,
            // Replaced since it was inspected; its own event brings it.
            Ok(None) => {
                self.settling.remove(path);
                return;
            }
            Err(CopyError::Vanished) => return self.vanished(path, scanned),
            Err(e) => {
                log::warn!("cannot open export `{}`: {e}", path.display());
                return;
            }
        };
        let age = source.age();
        if source.being_written == Some(true) {
            // Its close event (the directory is watched) brings it; failing
            // that, it is looked at again a second from now.
            self.settling
                .insert(path.to_owned(), Instant::now() + SETTLE);
            return;
        }
        // Where the kernel could not tell whether it is still being
        // written, a file a scan found waits until it has been unchanged
        // for a moment.
        if scanned && source.being_written.is_none() && age < SETTLE {
            self.settling
                .insert(path.to_owned(), Instant::now() + (SETTLE - age));
            return;
        }
        self.settling.remove(path);
        // A move deletes the source, so only after its close event or once
        // a scan found it unchanged for long: a writer that paused for a
        // second would otherwise lose the rest of its file. One found
        // sooner is kept until then (`move_archived`).
        let movable = !scanned || age >= self.move_after_idle;
        self.archive(path, source, movable);
    }

    fn recheck_settled(&mut self) {
        let now = Instant::now();
        let due: Vec<PathBuf> = self
            .settling
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(p, _)| p.clone())
            .collect();
        for path in due {
            self.settling.remove(&path);
            self.consider_path(&path, true);
        }
    }

    fn archive(&mut self, source: &Path, opened: archive::Source, movable: bool) {
        let version = (opened.meta.size, opened.meta.mtime_ns);
        let fate = match (self.settings.mode, movable) {
            (ArchiveMode::Copy, _) => SourceFate::Keep,
            (ArchiveMode::Move, true) => SourceFate::Remove(opened.meta),
            (ArchiveMode::Move, false) => SourceFate::Later(opened.meta),
        };
        // The copy must be durable before the source goes, now or later.
        let may_delete = fate != SourceFate::Keep;
        let session = self.session_for(source, opened.meta.uid);
        let free = self.free_space();
        let copied = match archive::copy_to_temp(opened, &self.settings.archive_dir, free) {
            Ok(c) => {
                self.free.0 = self.free.0.saturating_sub(c.size);
                c
            }
            Err(e) => {
                self.record_error(source, version.0, version.1, &e);
                return;
            }
        };
        let existing = self.archived_content(&copied.content_hash);
        let archive_path = match existing {
            Some(path) => {
                copied.temp.discard();
                Metrics::add(&self.metrics.exports_deduplicated, 1);
                path
            }
            None => {
                let date = chrono::Utc::now().date_naive();
                let target = archive::archive_path(
                    &self.settings.archive_dir,
                    (
                        chrono::Datelike::year(&date),
                        chrono::Datelike::month(&date),
                        chrono::Datelike::day(&date),
                    ),
                    session.as_deref(),
                    &copied.content_hash,
                    source,
                );
                let target_name = target.to_string_lossy().into_owned();
                self.claims.lock().claim(&target_name);
                let placed =
                    archive::install(copied.temp, &target, &mut self.made_dirs).and_then(|()| {
                        if may_delete {
                            archive::sync(&target)
                        } else {
                            Ok(())
                        }
                    });
                if let Err(e) = placed {
                    self.claims.release(&target_name);
                    let e = CopyError::Io(format!("cannot place the archive copy: {e}"));
                    self.record_error(source, version.0, version.1, &e);
                    return;
                }
                target_name
            }
        };
        self.known.insert(key(source), version);
        self.errors.remove(&key(source));
        // An older version kept for deletion is not this name's file now.
        self.kept.remove(source);
        self.contents.extend(content_key(&copied.content_hash));
        self.batch.push(Record {
            source: source.to_owned(),
            archive_path,
            session_id: session,
            size: copied.size,
            mtime_ns: version.1,
            content_hash: Some(copied.content_hash),
            error: None,
            fate,
        });
        if self.batch.len() >= self.settings.batch_size {
            self.flush();
        }
    }

    /// Records that `source` (this version) could not be archived: once
    /// per version and kind of error (a full scan tries failed versions
    /// again, and a file that still does not fit or is still not the
    /// watch owner's is not recorded again). Every vanished file is.
    fn record_error(&mut self, source: &Path, size: u64, mtime_ns: i64, error: &CopyError) {
        let name = key(source);
        let sentence = error.to_string();
        if *error != CopyError::Vanished {
            self.metrics.health.fail(
                "exports/archive",
                format!("exports cannot be archived: {error}"),
            );
        }
        if *error != CopyError::Vanished {
            self.failed.insert(name.clone(), (size, mtime_ns));
            let class = archive::error_class(&sentence);
            if self
                .errors
                .get(&name)
                .is_some_and(|(s, m, c)| (*s, *m, c.as_str()) == (size, mtime_ns, class))
            {
                log::debug!(
                    "still cannot archive export `{}`: {sentence}",
                    source.display()
                );
                return;
            }
            if self.errors.len() >= MAX_REMEMBERED_ERRORS {
                self.errors.clear();
            }
            self.errors.insert(name, (size, mtime_ns, class.to_owned()));
        }
        Metrics::add(&self.metrics.export_errors, 1);
        log::warn!("cannot archive export `{}`: {sentence}", source.display());
        self.batch.push(Record {
            source: source.to_owned(),
            archive_path: String::new(),
            session_id: None,
            size,
            mtime_ns,
            content_hash: None,
            error: Some(sentence),
            fate: SourceFate::Keep,
        });
    }

    /// Free bytes in the archive's filesystem, read again every [`REFRESH`].
    fn free_space(&mut self) -> u64 {
        if self.free.1.elapsed() >= REFRESH {
            match archive::free_bytes(&self.settings.archive_dir) {
                Ok(bytes) => self.free = (bytes, Instant::now()),
                Err(e) => log::warn!("cannot read the archive's free space: {e}"),
            }
        }
        self.free.0
    }

    /// The archive file already holding this content, from a committed row
    /// or one in the current batch, claimed for the row about to reference
    /// it: found and claimed under the claims' lock, so that retention
    /// cannot delete it in between (nor once claimed).
    fn archived_content(&self, hash: &str) -> Option<String> {
        if content_key(hash).is_some_and(|k| !self.contents.contains(&k)) {
            return None;
        }
        let mut claims = self.claims.lock();
        if let Some(r) = self
            .batch
            .iter()
            .find(|r| r.content_hash.as_deref() == Some(hash))
        {
            claims.claim(&r.archive_path);
            return Some(r.archive_path.clone());
        }
        let path: Option<String> = self
            .conn
            .prepare_cached(
                "SELECT archive_path FROM export_archive WHERE content_hash = ?1 \
                 AND error IS NULL ORDER BY id LIMIT 1",
            )
            .and_then(|mut stmt| stmt.query_row([hash], |r| r.get(0)).optional())
            .unwrap_or_else(|e| {
                log::warn!("cannot look up archived content: {e}");
                None
            });
        let path = path.filter(|p| Path::new(p).is_file());
        if let Some(p) = &path {
            claims.claim(p);
        }
        path
    }

    /// The watch's session; else the active session whose workspace holds
    /// `source` (the deepest workspace, then the latest start); else none.
    /// Either only if it may claim a file `owner` owns ([`may_claim`]):
    /// no user's session takes another user's exports. Workspaces are
    /// compared as the sessions gave them, so `codi2` sends absolute ones.
    fn session_for(&mut self, source: &Path, owner: u32) -> Option<String> {
        if let Some(s) = self
            .roots
            .iter()
            .filter(|r| r.matches(source))
            .max_by_key(|r| r.path.as_os_str().len())
            .and_then(|r| r.session_id.clone())
        {
            let started_by = self
                .conn
                .prepare_cached("SELECT uid FROM sessions WHERE id = ?1")
                .and_then(|mut stmt| stmt.query_row([&s], |r| r.get(0)).optional());
            match started_by {
                // Not started yet: the watch's owner named it first.
                Ok(None) => return Some(s),
                Ok(Some(uid)) if may_claim(uid, owner, self.daemon_uid) => return Some(s),
                Ok(Some(_)) => {}
                Err(e) => log::warn!("cannot look up session `{s}`: {e}"),
            }
        }
        if self.workspaces.1.elapsed() >= REFRESH {
            match self.load_workspaces() {
                Ok(list) => self.workspaces = (list, Instant::now()),
                Err(e) => log::warn!("cannot read the sessions' workspaces: {e}"),
            }
        }
        let source = source.to_string_lossy();
        let daemon_uid = self.daemon_uid;
        self.workspaces
            .0
            .iter()
            .find(|w| {
                may_claim(w.uid, owner, daemon_uid)
                    && source
                        .strip_prefix(w.dir.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            })
            .map(|w| w.session_id.clone())
    }

    fn load_workspaces(&self) -> rusqlite::Result<Vec<Workspace>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT rtrim(workspace, '/'), id, uid FROM sessions \
             WHERE ended_at IS NULL AND workspace IS NOT NULL AND workspace <> '/' \
             AND workspace <> '' ORDER BY length(rtrim(workspace, '/')) DESC, started_at DESC",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Workspace {
                dir: r.get(0)?,
                session_id: r.get(1)?,
                uid: r.get(2)?,
            })
        })?;
        rows.collect()
    }

    /// Commits the waiting archive rows in one transaction, then (move
    /// mode) deletes their sources.
    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let now_us = crate::proto::Timestamp::now().as_micros();
        let result = (|| {
            let tx = self.conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO export_archive (original_path, archive_path, session_id, \
                     file_size, content_hash, source_mtime_ns, archived_at_us, error) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?;
                for r in &self.batch {
                    insert.execute(params![
                        r.source.to_string_lossy(),
                        r.archive_path,
                        r.session_id,
                        r.size as i64,
                        r.content_hash,
                        r.mtime_ns,
                        now_us,
                        r.error,
                    ])?;
                }
            }
            tx.commit()
        })();
        // Committed (or never to be): their files are the rows' to keep now.
        for r in self.batch.iter().filter(|r| !r.archive_path.is_empty()) {
            self.claims.release(&r.archive_path);
        }
        match result {
            Ok(()) => {
                self.wal.note_commit();
                let archived = self.batch.iter().filter(|r| r.error.is_none()).count();
                Metrics::add(&self.metrics.exports_archived, archived as u64);
                if archived > 0 {
                    self.metrics.health.recover("exports/archive");
                }
                for r in std::mem::take(&mut self.batch) {
                    match r.fate {
                        SourceFate::Keep => {}
                        SourceFate::Remove(copied) => self.remove_committed(r.source, copied),
                        SourceFate::Later(copied) => {
                            self.kept.insert(r.source, copied);
                        }
                    }
                }
            }
            Err(e) => {
                // Forget these versions so that the next scan tries again.
                log::error!("cannot record {} archived export(s): {e}", self.batch.len());
                self.metrics.health.fail(
                    "exports/archive",
                    format!("archived exports cannot be recorded: {e}"),
                );
                Metrics::add(&self.metrics.export_errors, self.batch.len() as u64);
                for r in self.batch.drain(..) {
                    self.known.remove(&key(&r.source));
                    self.errors.remove(&key(&r.source));
                }
            }
        }
    }

    /// Move mode, after the commit: deletes `path`, through its directory's
    /// descriptor, if the name still is the file that was copied. If the
    /// deletion fails it is tried again later (see [`Self::move_archived`]).
    fn remove_committed(&mut self, path: PathBuf, copied: Meta) {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return;
        };
        let done = match self.resolve_dir(parent) {
            Ok(dir) => remove_archived(dir.as_fd(), &path, name, &copied, false),
            Err(e) if e.kind() == ErrorKind::NotFound => true,
            Err(e) => {
                log::warn!(
                    "archived `{}` but cannot remove it: {e}; trying again later",
                    path.display()
                );
                false
            }
        };
        if !done {
            self.kept.insert(path, copied);
        }
    }

    /// Move mode: `found`, the entry `name` of `dir` (named `path`), is a
    /// version already archived. If it was kept (a scan found it while it
    /// might still have been written, or its deletion failed), it is deleted
    /// now, provided it still is the very file that was copied (device,
    /// inode, size, modification time), it is done (its close event came,
    /// `closed`, or it has been unchanged for [`MOVE_AFTER_IDLE`]), it is
    /// its watch's owner's, and no process has it open for writing (see
    /// [`walk::unlink_if_same`]). A version whose row is not committed yet
    /// is deleted after the commit.
    fn move_archived(
        &mut self,
        dir: BorrowedFd<'_>,
        path: &Path,
        name: &OsStr,
        found: &Meta,
        closed: bool,
    ) {
        if !closed && archive::age_of(found.mtime_ns) < self.move_after_idle {
            return;
        }
        let in_batch = self
            .batch
            .iter()
            .rposition(|r| r.source == path && r.error.is_none());
        let copied = match in_batch {
            Some(i) => match self.batch[i].fate {
                SourceFate::Later(copied) => copied,
                // Deleted after the commit, or kept for good (copy mode).
                SourceFate::Remove(_) | SourceFate::Keep => return,
            },
            None => match self.kept.get(path) {
                Some(copied) => *copied,
                None => return,
            },
        };
        if !walk::same_file_version(&copied, found)
            || !self
                .roots
                .iter()
                .any(|r| r.matches(path) && r.trusts(found.uid))
        {
            return;
        }
        // Whether a writer has it open again is checked as it is deleted.
        match in_batch {
            Some(i) => self.batch[i].fate = SourceFate::Remove(copied),
            None => {
                if remove_archived(dir, path, name, &copied, true) {
                    self.kept.remove(path);
                }
            }
        }
    }
}

/// Deletes the entry `name` of `dir` (named `path`) if it still is
/// `copied` and no process has it open for writing
/// ([`walk::unlink_if_same`]). True when done with it: deleted, gone, or
/// changed since (its new version is archived on its own); false when it is
/// to be tried again: still open for writing (its close event brings it
/// back), or the deletion failed (a `retry` failing again is not logged as
/// a warning again).
fn remove_archived(
    dir: BorrowedFd<'_>,
    path: &Path,
    name: &OsStr,
    copied: &Meta,
    retry: bool,
) -> bool {
    match walk::unlink_if_same(dir, name, copied) {
        Ok(Unlinked::Removed) => true,
        Ok(Unlinked::OpenForWriting) => {
            log::debug!(
                "archived `{}` is open for writing; deleting it once it is closed (move mode)",
                path.display()
            );
            false
        }
        Ok(Unlinked::Changed) => {
            log::info!(
                "`{}` changed after it was archived; keeping it (move mode)",
                path.display()
            );
            true
        }
        Err(e) if e.kind() == ErrorKind::NotFound => true,
        Err(e) if retry => {
            log::debug!("still cannot remove archived `{}`: {e}", path.display());
            false
        }
        Err(e) => {
            log::warn!(
                "archived `{}` but cannot remove it: {e}; trying again later",
                path.display()
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};

    /// A watcher in move mode on a fresh database under `base`, not
    /// running: the test drives its steps.
    fn move_watcher(base: &Path) -> Watcher {
        let settings = ExportSettings {
            default_patterns: vec!["*.md".into()],
            scan_interval: Duration::from_secs(3600),
            batch_size: 100,
            archive_dir: base.join("archive"),
            mode: ArchiveMode::Move,
            max_watches_per_root: 1000,
        };
        Watcher::open(
            &base.join("data/codi.db"),
            Arc::new(WalState::default()),
            Arc::new(ArchiveClaims::default()),
            settings,
            Replies::new(Vec::new()),
            Arc::new(Metrics::default()),
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap()
    }

    /// What the loop does after a wakeup: reads inotify's events, archives
    /// the files they report closed, and commits.
    fn handle_events(w: &mut Watcher) {
        let mut buffer = vec![0u8; EVENT_BUFFER];
        w.read_events(&mut buffer);
        w.archive_closed(&mut buffer);
        w.flush();
    }

    fn archived(w: &Watcher, path: &Path) -> i64 {
        w.conn
            .query_row(
                "SELECT count(*) FROM export_archive WHERE original_path = ?1 \
                 AND error IS NULL",
                [key(path)],
                |r| r.get(0),
            )
            .unwrap()
    }

    #[test]
    fn move_mode_deletes_a_file_a_scan_archived_before_its_close_event() {
        let tmp = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(tmp.path()).unwrap();
        let work = base.join("work");
        fs::create_dir(&work).unwrap();
        let mut w = move_watcher(&base);
        let uid = w.daemon_uid;
        let dir = w
            .start(&key(&work), true, Vec::new(), None, Some(uid))
            .unwrap();
        w.scan_dir(&dir);

        // Written and closed, and a scan gets to it before the watcher reads
        // its close event: archived, but kept (a scan cannot tell that the
        // writer is done) until that close event is read.
        let first = work.join("first.md");
        fs::write(&first, b"first").unwrap();
        w.full_scan();
        w.flush();
        assert_eq!(archived(&w, &first), 1);
        assert!(first.exists(), "a young file a scan found is kept for now");
        handle_events(&mut w);
        assert!(!first.exists(), "its close event deletes it");

        // The same, with the close event read before the row is committed.
        let second = work.join("second.md");
        fs::write(&second, b"second").unwrap();
        w.full_scan();
        handle_events(&mut w);
        assert_eq!(archived(&w, &second), 1);
        assert!(!second.exists(), "deleted once its row is committed");
        assert_eq!(archived(&w, &first), 1, "not archived again");
    }

    #[test]
    fn a_kept_file_is_deleted_by_a_later_scan_only_if_idle_unchanged_and_not_open() {
        let tmp = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(tmp.path()).unwrap();
        let work = base.join("work");
        fs::create_dir(&work).unwrap();
        // There before the watch, so no close event ever comes for them.
        let idle = work.join("idle.md");
        let open = work.join("open.md");
        let replaced = work.join("replaced.md");
        let linked = work.join("linked.md");
        for p in [&idle, &open, &replaced, &linked] {
            fs::write(p, b"same size").unwrap();
        }
        let mut w = move_watcher(&base);
        let uid = w.daemon_uid;
        let dir = w
            .start(&key(&work), true, Vec::new(), None, Some(uid))
            .unwrap();
        w.scan_dir(&dir);
        w.flush();
        for p in [&idle, &open, &replaced, &linked] {
            assert_eq!(archived(&w, p), 1, "{}", p.display());
            assert!(p.exists(), "modified just now: kept for now");
        }
        w.full_scan();
        w.flush();
        assert!(idle.exists(), "not idle long enough yet");

        // Open for writing again, unchanged; the name given to another file
        // of the same size and modification time; a symbolic link to the
        // archived file put in its place.
        let writer = OpenOptions::new().append(true).open(&open).unwrap();
        let other = work.join("other");
        fs::write(&other, b"same size").unwrap();
        let mtime = fs::metadata(&replaced).unwrap().modified().unwrap();
        File::options()
            .write(true)
            .open(&other)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        fs::rename(&other, &replaced).unwrap();
        let outside = base.join("outside.md");
        fs::rename(&linked, &outside).unwrap();
        std::os::unix::fs::symlink(&outside, &linked).unwrap();
        let lease_works = archive::open_for_writing(&File::open(&open).unwrap()).is_some();

        // Time passes: long enough unchanged.
        w.move_after_idle = Duration::ZERO;
        w.full_scan();
        w.flush();
        assert!(!idle.exists(), "unchanged for long: deleted by the scan");
        assert!(replaced.exists(), "another inode is never deleted");
        assert!(
            outside.exists() && linked.exists(),
            "a link is never followed"
        );
        if lease_works {
            assert!(open.exists(), "not deleted while open for writing");
        }
        drop(writer);
        handle_events(&mut w);
        assert!(!open.exists(), "deleted after its writer closed it");
        assert!(replaced.exists() && outside.exists());
    }

    #[test]
    fn a_content_key_is_the_hash_prefix_and_short_hashes_have_none() {
        let hash = format!("{:016x}{}", 0x0123_4567_89ab_cdefu64, "0".repeat(48));
        assert_eq!(content_key(&hash), Some(0x0123_4567_89ab_cdef));
        assert_eq!(content_key("abc"), None);
        assert_eq!(content_key("zzzzzzzzzzzzzzzz"), None);
    }
}
