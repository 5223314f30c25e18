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

pub mod archive;
mod roots;

use crate::metrics::Metrics;
use crate::proto::{AckStatus, ErrorCode, Message, MonitoredPath, Payload};
use crate::reply::{Replies, ReplyTo};
use crate::store::wal::WalState;
use crate::store::{schema, StoreError};
use archive::CopyError;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use roots::Root;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use uuid::Uuid;

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

/// What the archive does with the source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveMode {
    /// Keep the source.
    Copy,
    /// Delete the source once its archive row is committed.
    Move,
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
    },
    /// `ListMonitoring`.
    List,
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
/// the main database's WAL state.
pub fn spawn_watcher(
    db_path: &Path,
    wal: Arc<WalState>,
    settings: ExportSettings,
    replies: Replies,
    metrics: Arc<Metrics>,
) -> Result<(ControlSender, WatcherHandle), StoreError> {
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
    let inotify = Inotify::init().map_err(io_err("start inotify for", &archive_dir))?;
    // A writer opening a file while the watcher holds its read lease (see
    // `archive::open_for_writing`) makes the kernel send SIGIO, which would
    // otherwise end the process.
    // SAFETY: installing SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) };
    let poll = Poll::new().map_err(io_err("create a poll for", &archive_dir))?;
    let (tx, rx) = crossbeam_channel::bounded(CONTROL_QUEUE);
    let stop = Arc::new(AtomicBool::new(false));
    poll.registry()
        .register(
            &mut SourceFd(&inotify.as_raw_fd()),
            INOTIFY,
            Interest::READABLE,
        )
        .map_err(io_err("register inotify for", &archive_dir))?;
    let waker = Arc::new(
        Waker::new(poll.registry(), WAKE).map_err(io_err("create a waker for", &archive_dir))?,
    );
    let mut watcher = Watcher {
        known: load_known(&conn)?,
        contents: load_contents(&conn)?,
        failed: HashMap::new(),
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
        settling: HashMap::new(),
        closed: VecDeque::new(),
        closed_set: HashSet::new(),
        closed_overflowed: false,
        batch: Vec::new(),
        replies,
        metrics,
        wal,
        stop: Arc::clone(&stop),
        next_scan: Instant::now(),
        limit_warned: false,
        made_dirs: HashSet::new(),
        free: (0, Instant::now() - REFRESH),
        workspaces: (Vec::new(), Instant::now() - REFRESH),
    };
    watcher.load_roots()?;
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

/// What a move must find at the source path before it deletes it: the
/// same file (device, inode), size and modification time as was copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Copied {
    identity: (u64, u64),
    size: u64,
    mtime_ns: i64,
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
    /// Set when the source must be deleted after the commit (move mode),
    /// if it is still the file that was copied.
    remove_source: Option<Copied>,
}

struct Watcher {
    conn: Connection,
    settings: ExportSettings,
    inotify: Inotify,
    poll: Poll,
    /// Watched directory of each watch descriptor.
    dirs: HashMap<WatchDescriptor, PathBuf>,
    /// Watch descriptor of each watched directory.
    watched: HashMap<PathBuf, WatchDescriptor>,
    roots: Vec<Root>,
    /// Source path ([`key`]) to (size, mtime) of its last archive row.
    known: HashMap<String, (u64, i64)>,
    /// [`content_key`] of every content archived (or about to be): content
    /// whose key is not here is new, and the database is not asked (8
    /// bytes per distinct content, beside `known`'s path per export).
    contents: HashSet<u64>,
    /// Versions that failed to archive (no space, I/O); tried again at the
    /// next full scan, or when they change.
    failed: HashMap<String, (u64, i64)>,
    /// Files a scan found still changing, and when to look again.
    settling: HashMap<PathBuf, Instant>,
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
    /// id), deepest first, and when they were read.
    workspaces: (Vec<(String, String)>, Instant),
}

impl Watcher {
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

    // ----- control -----

    fn control(&mut self, job: ControlJob) {
        let answer = match job.op {
            ControlOp::Start {
                path,
                recursive,
                patterns,
                session_id,
            } => match self.start(&path, recursive, patterns, session_id) {
                Ok(dir) => {
                    // Answer once the watch is saved and its root watched;
                    // the scan of a large tree can take longer than a
                    // client waits.
                    let ack = Message::ack(job.request_id, AckStatus::Accepted);
                    self.replies.send(job.reply, ack);
                    self.scan_dir(&dir);
                    return;
                }
                Err(reason) => Message::error(ErrorCode::InvalidRequest, reason),
            },
            ControlOp::Stop { path } => match self.stop_root(&path) {
                Ok(()) => Message::ack(job.request_id, AckStatus::Accepted),
                Err(reason) => Message::error(ErrorCode::InvalidRequest, reason),
            },
            ControlOp::List => {
                let mut paths: Vec<MonitoredPath> = self.roots.iter().map(Root::describe).collect();
                paths.sort_by(|a, b| a.path.cmp(&b.path));
                Message::answer(Payload::Monitoring { paths })
            }
        };
        self.replies.send(job.reply, answer);
    }

    /// Saves and installs a watch; returns its directory, still to scan.
    fn start(
        &mut self,
        given: &str,
        recursive: bool,
        patterns: Vec<String>,
        session_id: Option<String>,
    ) -> Result<PathBuf, String> {
        let path = canonical_dir(given)?;
        if path.starts_with(&self.settings.archive_dir) {
            return Err(format!(
                "`{}` is inside the export archive `{}`, which is never watched",
                path.display(),
                self.settings.archive_dir.display()
            ));
        }
        let patterns = if patterns.is_empty() {
            self.settings.default_patterns.clone()
        } else {
            patterns
        };
        let root = Root::new(path, recursive, patterns, session_id)?;
        let saved = self.conn.execute(
            "INSERT INTO monitored_paths (path, recursive, patterns, active, session_id) \
             VALUES (?1, ?2, ?3, 1, ?4) ON CONFLICT(path) DO UPDATE SET \
             recursive = excluded.recursive, patterns = excluded.patterns, active = 1, \
             session_id = excluded.session_id",
            params![
                root.path_str(),
                root.recursive,
                root.patterns_json(),
                root.session_id
            ],
        );
        if let Err(e) = saved {
            return Err(format!("cannot save the watch: {e}"));
        }
        log::info!(
            "watching `{}` for exports ({}, patterns {:?})",
            root.path.display(),
            if root.recursive {
                "recursive"
            } else {
                "this directory only"
            },
            root.patterns
        );
        let dir = root.path.clone();
        self.roots.retain(|r| r.path != dir);
        self.roots.push(root);
        self.watch(&dir);
        Ok(dir)
    }

    fn stop_root(&mut self, given: &str) -> Result<(), String> {
        let path = fs::canonicalize(given).unwrap_or_else(|_| PathBuf::from(given));
        let Some(index) = self.roots.iter().position(|r| r.path == path) else {
            return Err(format!("`{}` is not watched", path.display()));
        };
        if let Err(e) = self.conn.execute(
            "DELETE FROM monitored_paths WHERE path = ?1",
            [self.roots[index].path_str()],
        ) {
            return Err(format!("cannot remove the watch: {e}"));
        }
        let root = self.roots.remove(index);
        log::info!("stopped watching `{}`", root.path.display());
        let orphans: Vec<PathBuf> = self
            .watched
            .keys()
            .filter(|d| !self.roots.iter().any(|r| r.covers_dir(d)))
            .cloned()
            .collect();
        for dir in orphans {
            if let Some(wd) = self.watched.remove(&dir) {
                self.dirs.remove(&wd);
                // Fails only if the directory is already gone.
                let _ = self.inotify.watches().remove(wd);
            }
        }
        self.settling
            .retain(|p, _| self.roots.iter().any(|r| r.matches(p)));
        Ok(())
    }

    fn load_roots(&mut self) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT path, recursive, patterns, session_id FROM monitored_paths ORDER BY path",
        )?;
        let rows: Vec<(String, bool, Option<String>, Option<String>)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<_, _>>()?;
        drop(stmt);
        for (path, recursive, patterns, session_id) in rows {
            let patterns: Vec<String> = patterns
                .and_then(|p| serde_json::from_str(&p).ok())
                .unwrap_or_else(|| self.settings.default_patterns.clone());
            match Root::new(PathBuf::from(&path), recursive, patterns, session_id) {
                Ok(root) => self.roots.push(root),
                Err(e) => log::error!("ignoring saved watch `{path}`: {e}"),
            }
        }
        if !self.roots.is_empty() {
            log::info!("restored {} export watch(es)", self.roots.len());
        }
        Ok(())
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

    // ----- watching and scanning -----

    /// Watches `dir` unless it is already watched; false if it could not be.
    fn watch(&mut self, dir: &Path) -> bool {
        if self.watched.contains_key(dir) {
            return true;
        }
        let mask = WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::CREATE
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF
            | WatchMask::ONLYDIR
            | WatchMask::DONT_FOLLOW;
        match self.inotify.watches().add(dir, mask) {
            Ok(wd) => {
                // The same directory under a new name (moved within the
                // tree) gets the same descriptor: drop the old name.
                if let Some(old) = self.dirs.insert(wd.clone(), dir.to_owned()) {
                    if old != dir {
                        self.watched.remove(&old);
                    }
                }
                self.watched.insert(dir.to_owned(), wd);
                true
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                Metrics::add(&self.metrics.watch_limit_errors, 1);
                if !self.limit_warned {
                    self.limit_warned = true;
                    log::error!(
                        "inotify watch limit reached (raise fs.inotify.max_user_watches, now {}): \
                         `{}` and further directories are covered only by the scan every {:?}",
                        fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
                            .map(|s| s.trim().to_owned())
                            .unwrap_or_else(|_| "unknown".into()),
                        dir.display(),
                        self.settings.scan_interval
                    );
                }
                false
            }
            Err(e) => {
                log::warn!("cannot watch `{}`: {e}", dir.display());
                false
            }
        }
    }

    fn full_scan(&mut self) {
        self.next_scan = Instant::now() + self.settings.scan_interval;
        self.limit_warned = false;
        self.failed.clear();
        Metrics::add(&self.metrics.export_scans, 1);
        let dirs: Vec<PathBuf> = self.roots.iter().map(|r| r.path.clone()).collect();
        for dir in dirs {
            self.scan_dir(&dir);
        }
    }

    /// Watches `dir` (and, under a recursive root, every directory below
    /// it) first, then looks at the files already there.
    fn scan_dir(&mut self, start: &Path) {
        let mut stack = vec![start.to_owned()];
        while let Some(dir) = stack.pop() {
            if self.stop.load(Ordering::Relaxed) {
                // Shutting down: the next start scans everything anyway.
                return;
            }
            if dir.starts_with(&self.settings.archive_dir) {
                continue;
            }
            let is_root = self.roots.iter().any(|r| r.path == dir);
            if is_root {
                self.mark_root(&dir, dir.is_dir());
            }
            self.watch(&dir);
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) => {
                    if e.kind() != ErrorKind::NotFound {
                        log::warn!("cannot scan `{}`: {e}", dir.display());
                    }
                    continue;
                }
            };
            for entry in entries.flatten() {
                let Ok(kind) = entry.file_type() else {
                    continue;
                };
                let path = entry.path();
                if kind.is_dir() {
                    if self.roots.iter().any(|r| r.covers_dir(&path)) {
                        stack.push(path);
                    }
                } else if kind.is_file() && self.roots.iter().any(|r| r.matches(&path)) {
                    self.consider(&path, true);
                }
            }
        }
    }

    /// Records whether a root directory is present, and says so when that
    /// changes.
    fn mark_root(&mut self, dir: &Path, present: bool) {
        let Some(root) = self.roots.iter_mut().find(|r| r.path == dir) else {
            return;
        };
        if root.active == present {
            return;
        }
        root.active = present;
        if present {
            log::info!("watched directory `{}` is back; scanning it", dir.display());
        } else {
            Metrics::add(&self.metrics.watched_dirs_lost, 1);
            log::warn!(
                "watched directory `{}` was deleted or moved away; it is watched again \
                 when it reappears (checked every {:?})",
                dir.display(),
                self.settings.scan_interval
            );
        }
        let _ = self.conn.execute(
            "UPDATE monitored_paths SET active = ?2 WHERE path = ?1",
            params![dir.to_string_lossy(), present],
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
                let Some(dir) = self.dirs.get(&event.wd).cloned() else {
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
                self.consider(&path, false);
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

    /// A watch went away, or its directory was deleted or moved: forget it
    /// and every watch below it (their paths are stale now), then look at
    /// the path again if it is still (or again) a watched directory. A
    /// directory moved within the tree is watched anew under its new name
    /// through its parent's `IN_MOVED_TO`.
    fn forget(&mut self, wd: WatchDescriptor, dir: &Path, ignored_only: bool) {
        if self.dirs.get(&wd).map(PathBuf::as_path) != Some(dir) {
            return;
        }
        if ignored_only {
            self.dirs.remove(&wd);
            self.watched.remove(dir);
        } else {
            let stale: Vec<PathBuf> = self
                .watched
                .keys()
                .filter(|p| p.starts_with(dir))
                .cloned()
                .collect();
            for path in stale {
                if let Some(old) = self.watched.remove(&path) {
                    self.dirs.remove(&old);
                    // Fails for a watch the kernel already dropped.
                    let _ = self.inotify.watches().remove(old);
                }
            }
        }
        let present = dir.is_dir();
        if self.roots.iter().any(|r| r.path == dir) {
            self.mark_root(dir, present);
        }
        if present && self.roots.iter().any(|r| r.covers_dir(dir)) {
            // Something else has this name now: look at it.
            self.scan_dir(dir);
        }
    }

    // ----- archiving -----

    /// A matching file: archive it unless this version already is. A file
    /// found by a scan that changed within [`SETTLE`] waits for its close
    /// event or a later look.
    fn consider(&mut self, path: &Path, scanned: bool) {
        let source = match archive::open_source(path, scanned) {
            Ok(Some(source)) => source,
            Ok(None) => return,
            Err(CopyError::Vanished) => {
                self.settling.remove(path);
                if !scanned {
                    self.record_error(path, 0, 0, &CopyError::Vanished);
                }
                return;
            }
            Err(e) => {
                log::warn!("cannot open export `{}`: {e}", path.display());
                return;
            }
        };
        let version = (source.size, source.mtime_ns);
        let name = key(path);
        if self.known.get(&name) == Some(&version) || self.failed.get(&name) == Some(&version) {
            self.settling.remove(path);
            return;
        }
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
        // second would otherwise lose the rest of its file.
        let movable = !scanned || age >= MOVE_AFTER_IDLE;
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
            self.consider(&path, true);
        }
    }

    fn archive(&mut self, source: &Path, opened: archive::Source, movable: bool) {
        let version = (opened.size, opened.mtime_ns);
        let copied_file = Copied {
            identity: opened.identity,
            size: opened.size,
            mtime_ns: opened.mtime_ns,
        };
        let moving = movable && self.settings.mode == ArchiveMode::Move;
        let session = self.session_for(source);
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
                let placed =
                    archive::install(copied.temp, &target, &mut self.made_dirs).and_then(|()| {
                        if moving {
                            archive::sync(&target)
                        } else {
                            Ok(())
                        }
                    });
                if let Err(e) = placed {
                    let e = CopyError::Io(format!("cannot place the archive copy: {e}"));
                    self.record_error(source, version.0, version.1, &e);
                    return;
                }
                target.to_string_lossy().into_owned()
            }
        };
        self.known.insert(key(source), version);
        self.contents.extend(content_key(&copied.content_hash));
        self.batch.push(Record {
            source: source.to_owned(),
            archive_path,
            session_id: session,
            size: copied.size,
            mtime_ns: version.1,
            content_hash: Some(copied.content_hash),
            error: None,
            remove_source: moving.then_some(copied_file),
        });
        if self.batch.len() >= self.settings.batch_size {
            self.flush();
        }
    }

    fn record_error(&mut self, source: &Path, size: u64, mtime_ns: i64, error: &CopyError) {
        Metrics::add(&self.metrics.export_errors, 1);
        if *error != CopyError::Vanished {
            self.metrics.health.fail(
                "exports/archive",
                format!("exports cannot be archived: {error}"),
            );
        }
        log::warn!("cannot archive export `{}`: {error}", source.display());
        if *error != CopyError::Vanished {
            self.failed.insert(key(source), (size, mtime_ns));
        }
        self.batch.push(Record {
            source: source.to_owned(),
            archive_path: String::new(),
            session_id: None,
            size,
            mtime_ns,
            content_hash: None,
            error: Some(error.to_string()),
            remove_source: None,
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
    /// or one in the current batch.
    fn archived_content(&self, hash: &str) -> Option<String> {
        if content_key(hash).is_some_and(|k| !self.contents.contains(&k)) {
            return None;
        }
        if let Some(r) = self
            .batch
            .iter()
            .find(|r| r.content_hash.as_deref() == Some(hash))
        {
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
        path.filter(|p| Path::new(p).is_file())
    }

    /// The watch's session; else the active session whose workspace holds
    /// `source` (the deepest workspace, then the latest start); else none.
    /// Workspaces are compared as the sessions gave them, so `codi2`
    /// sends absolute ones.
    fn session_for(&mut self, source: &Path) -> Option<String> {
        if let Some(s) = self
            .roots
            .iter()
            .filter(|r| r.matches(source))
            .max_by_key(|r| r.path.as_os_str().len())
            .and_then(|r| r.session_id.clone())
        {
            return Some(s);
        }
        if self.workspaces.1.elapsed() >= REFRESH {
            match self.load_workspaces() {
                Ok(list) => self.workspaces = (list, Instant::now()),
                Err(e) => log::warn!("cannot read the sessions' workspaces: {e}"),
            }
        }
        let source = source.to_string_lossy();
        self.workspaces
            .0
            .iter()
            .find(|(workspace, _)| {
                source
                    .strip_prefix(workspace.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
            })
            .map(|(_, id)| id.clone())
    }

    fn load_workspaces(&self) -> rusqlite::Result<Vec<(String, String)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT rtrim(workspace, '/'), id FROM sessions \
             WHERE ended_at IS NULL AND workspace IS NOT NULL AND workspace <> '/' \
             AND workspace <> '' ORDER BY length(rtrim(workspace, '/')) DESC, started_at DESC",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
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
        match result {
            Ok(()) => {
                self.wal.note_commit();
                let archived = self.batch.iter().filter(|r| r.error.is_none()).count();
                Metrics::add(&self.metrics.exports_archived, archived as u64);
                if archived > 0 {
                    self.metrics.health.recover("exports/archive");
                }
                for r in self.batch.drain(..) {
                    if let Some(copied) = r.remove_source {
                        remove_if_unchanged(&r.source, copied);
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
                }
            }
        }
    }
}

/// Move mode: deletes `path` if it is still the file that was copied;
/// otherwise it changed since, its new version is archived on its own, and
/// it is kept.
fn remove_if_unchanged(path: &Path, copied: Copied) {
    use std::os::unix::fs::MetadataExt;
    let same = fs::symlink_metadata(path).is_ok_and(|m| {
        m.is_file()
            && (m.dev(), m.ino()) == copied.identity
            && m.len() == copied.size
            && m.mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(m.mtime_nsec())
                == copied.mtime_ns
    });
    if !same {
        log::info!(
            "`{}` changed after it was archived; keeping it (move mode)",
            path.display()
        );
        return;
    }
    if let Err(e) = fs::remove_file(path) {
        log::warn!("archived `{}` but cannot remove it: {e}", path.display());
    }
}

/// Canonicalises a requested watch path and checks it is a readable
/// directory, with a sentence for each way it is not.
fn canonical_dir(given: &str) -> Result<PathBuf, String> {
    if given.is_empty() {
        return Err("the path is empty".into());
    }
    let path = fs::canonicalize(given).map_err(|e| match e.kind() {
        ErrorKind::NotFound => format!("`{given}` does not exist"),
        ErrorKind::PermissionDenied => format!("`{given}` is not accessible to the daemon"),
        _ => format!("cannot resolve `{given}`: {e}"),
    })?;
    let meta = fs::metadata(&path).map_err(|e| format!("cannot inspect `{given}`: {e}"))?;
    if !meta.is_dir() {
        return Err(format!("`{}` is not a directory", path.display()));
    }
    fs::read_dir(&path).map_err(|e| match e.kind() {
        ErrorKind::PermissionDenied => format!(
            "`{}` is not readable by the daemon (uid {})",
            path.display(),
            // SAFETY: getuid cannot fail.
            unsafe { libc::getuid() }
        ),
        _ => format!("cannot read `{}`: {e}", path.display()),
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_content_key_is_the_hash_prefix_and_short_hashes_have_none() {
        let hash = format!("{:016x}{}", 0x0123_4567_89ab_cdefu64, "0".repeat(48));
        assert_eq!(content_key(&hash), Some(0x0123_4567_89ab_cdef));
        assert_eq!(content_key("abc"), None);
        assert_eq!(content_key("zzzzzzzzzzzzzzzz"), None);
    }

    #[test]
    fn a_move_keeps_a_source_that_changed_after_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.md");
        fs::write(&path, b"v1").unwrap();
        let copied = |p: &Path| {
            let s = archive::open_source(p, false).unwrap().unwrap();
            Copied {
                identity: s.identity,
                size: s.size,
                mtime_ns: s.mtime_ns,
            }
        };
        let v1 = copied(&path);
        // Replaced by a new file (an editor's save): kept.
        let staged = dir.path().join("r.md.new");
        fs::write(&staged, b"v2, longer").unwrap();
        fs::rename(&staged, &path).unwrap();
        remove_if_unchanged(&path, v1);
        assert!(path.exists());
        // Unchanged since the copy: deleted.
        remove_if_unchanged(&path, copied(&path));
        assert!(!path.exists());
    }
}
