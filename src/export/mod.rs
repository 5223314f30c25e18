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
//!
//! One `Watcher` owns all of this; its methods are grouped by step:
//! `state` (opening, what earlier runs recorded), `event_loop`, `scan`,
//! `control` (requests), `detect` (is this file due?), `ingest` (copy and
//! queue its row), `session`, `commit` and `removal` (move mode).
//!
//! Its database connection only reads: its writes (archive rows, saved
//! watches) go to the merger, the main database's one read-write owner,
//! and the watcher waits for each (`commit`).

pub mod archive;
mod commit;
mod control;
mod detect;
mod event_loop;
mod ingest;
mod removal;
mod roots;
mod scan;
mod session;
mod state;
#[cfg(test)]
mod test_store;
pub mod walk;

use crate::metrics::Metrics;
use crate::reply::{Replies, ReplyTo};
use crate::store::merger::MainWriteLink;
use crate::store::retention::ArchiveClaims;
use crate::store::StoreError;
use crossbeam_channel::{Sender, TrySendError};
use inotify::{Inotify, WatchDescriptor};
use mio::{Poll, Token, Waker};
use roots::Root;
use rusqlite::Connection;
use session::Workspace;
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use uuid::Uuid;
use walk::{Identity, Meta};

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
    /// Stops the watcher (after the batch it is archiving, whose rows it
    /// commits through the merger first) and waits.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if self.thread.join().is_err() {
            log::error!("the export watcher panicked");
        }
    }
}

/// Opens its read-only database connection, loads the saved watches and
/// starts the watcher thread `codi-exports`, which first catches up on
/// exports that appeared while the daemon was down. Its writes go to the
/// merger through `writes` (so start it after the writer and stop it
/// before); the archive files its rows will reference are claimed in
/// `claims` until they are committed.
pub fn spawn_watcher(
    db_path: &Path,
    writes: MainWriteLink,
    claims: Arc<ArchiveClaims>,
    settings: ExportSettings,
    replies: Replies,
    metrics: Arc<Metrics>,
) -> Result<(ControlSender, WatcherHandle), StoreError> {
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = Watcher::open(
        db_path,
        writes,
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
    /// Read-only: every write goes through `writes`.
    conn: Connection,
    /// Where the writes go: the merger, the main database's one read-write
    /// owner.
    writes: MainWriteLink,
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
    /// [`content_key`](state::content_key) of every content archived (or
    /// about to be): content whose key is not here is new, and the
    /// database is not asked (8 bytes per distinct content, beside
    /// `known`'s path per export).
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
