//! Who may write a database, kept with `flock`s that the kernel lets go
//! of when a process ends (even on `kill -9`):
//!
//! - `<db>.lock`: one daemon per database, held exclusively for the
//!   daemon's lifetime ([`DatabaseLock`]). A lock beside the socket would
//!   not do: two daemons on different sockets could still share one
//!   database and fight over its ids and merge marks.
//! - `<db>.writers-lock`: the right to write the files. The daemon holds
//!   it exclusively for its lifetime, taken after `<db>.lock` and once the
//!   `codi2` writes under way have finished; a `codi2` without a daemon
//!   holds it shared for each write ([`StandaloneWrite`]), and only while
//!   no daemon holds `<db>.lock` (one starting waits for the writes under
//!   way, and no new one begins).
//!
//! So a daemon and a `codi2` never write the files at the same time: while
//! a daemon holds the database, its writer is the only writer of the
//! ingest file and its merger the only one of the main database (but for
//! an operator's `codi-monitor recover --acknowledge`, which takes no lock:
//! docs/ARCHITECTURE.md, "One owner per file").

use super::schema::{prepare_directory, with_suffix};
use super::StoreError;
use rustix::fs::{flock, FlockOperation};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a starting daemon retries `<db>.lock`: a `codi2` looking
/// whether a daemon holds it holds it shared for a moment.
const DAEMON_LOCK_RETRY: Duration = Duration::from_millis(250);

/// How long a starting daemon waits for the `codi2` writes under way (each
/// one transaction) before it gives up.
pub const STANDALONE_WRITES_WAIT: Duration = Duration::from_secs(10);

/// Between two tries of a lock that is held.
const LOCK_POLL: Duration = Duration::from_millis(2);

/// The lock file of the database at `db`.
pub fn lock_path(db: &Path) -> PathBuf {
    with_suffix(db, ".lock")
}

/// The file whose lock gives the right to write the database at `db`.
pub fn writers_lock_path(db: &Path) -> PathBuf {
    with_suffix(db, ".writers-lock")
}

/// The daemon's hold on its database; dropping it (or exiting) lets go.
/// Proof for the work only the sole writer may do (such as moving damaged
/// files aside).
#[derive(Debug)]
pub struct DatabaseLock {
    _daemon: File,
    _writers: File,
}

impl DatabaseLock {
    /// Takes the lock of the database at `db`, creating its private
    /// directory if needed, and writes this process's id into the file;
    /// then waits (at most [`STANDALONE_WRITES_WAIT`]) for the `codi2`
    /// writes under way. Fails with [`StoreError::DatabaseInUse`] if
    /// another daemon holds the database, [`StoreError::StandaloneWriteStuck`]
    /// if a `codi2` write does not end.
    pub fn acquire(db: &Path) -> Result<DatabaseLock, StoreError> {
        Self::acquire_waiting(db, STANDALONE_WRITES_WAIT)
    }

    /// [`DatabaseLock::acquire`], waiting at most `writes_wait` for the
    /// `codi2` writes under way.
    pub fn acquire_waiting(db: &Path, writes_wait: Duration) -> Result<DatabaseLock, StoreError> {
        prepare_directory(db)?;
        let path = lock_path(db);
        let mut daemon = open_lock_file(&path, true)?;
        if !lock_within(
            &daemon,
            FlockOperation::NonBlockingLockExclusive,
            DAEMON_LOCK_RETRY,
        )
        .map_err(io_err("lock", &path))?
        {
            return Err(StoreError::DatabaseInUse {
                path: db.to_owned(),
                lock: path,
                holder: holder(&mut daemon),
            });
        }
        daemon
            .set_len(0)
            .map_err(io_err("truncate the lock file", &path))?;
        daemon
            .seek(SeekFrom::Start(0))
            .and_then(|_| writeln!(daemon, "{}", std::process::id()))
            .map_err(io_err("write the lock file", &path))?;
        let writers_path = writers_lock_path(db);
        let writers = open_lock_file(&writers_path, true)?;
        if !lock_within(
            &writers,
            FlockOperation::NonBlockingLockExclusive,
            writes_wait,
        )
        .map_err(io_err("lock", &writers_path))?
        {
            return Err(StoreError::StandaloneWriteStuck {
                path: db.to_owned(),
                lock: writers_path,
                waited: writes_wait,
            });
        }
        Ok(DatabaseLock {
            _daemon: daemon,
            _writers: writers,
        })
    }
}

/// A `codi2`'s right to write the database without a daemon, for one
/// write (one transaction); dropping it lets go.
#[derive(Debug)]
pub struct StandaloneWrite {
    _writers: File,
}

impl StandaloneWrite {
    /// Takes the right to write the database at `db`, unless a daemon (or
    /// `codi-monitor recover`) holds it: then [`StoreError::HeldByDaemon`],
    /// at once, and nothing may be written.
    pub fn take(db: &Path) -> Result<StandaloneWrite, StoreError> {
        prepare_directory(db)?;
        let writers_path = writers_lock_path(db);
        let writers = open_lock_file(&writers_path, true)?;
        let held = || {
            let lock = lock_path(db);
            StoreError::HeldByDaemon {
                path: db.to_owned(),
                holder: open_lock_file(&lock, false)
                    .map(|mut f| holder(&mut f))
                    .unwrap_or_else(|_| "another process".into()),
            }
        };
        if !try_lock(&writers, FlockOperation::NonBlockingLockShared)
            .map_err(io_err("lock", &writers_path))?
        {
            return Err(held());
        }
        // A daemon that holds `<db>.lock` and waits for the writes under
        // way: no new one may start.
        let path = lock_path(db);
        match open_lock_file(&path, false) {
            Ok(daemon) => {
                if !try_lock(&daemon, FlockOperation::NonBlockingLockShared)
                    .map_err(io_err("lock", &path))?
                {
                    return Err(held());
                }
            }
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            }
            Err(e) => return Err(e),
        }
        Ok(StandaloneWrite { _writers: writers })
    }
}

/// Opens a lock file (creating it, mode 0600, if `create`), refusing a
/// symlink in its place.
fn open_lock_file(path: &Path, create: bool) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(create)
        .create(create)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("open the lock file", path))
}

fn io_err(action: &'static str, path: &Path) -> impl Fn(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io {
        action,
        path: path.clone(),
        source,
    }
}

/// Who holds a lock file, as far as it says.
fn holder(file: &mut File) -> String {
    let mut holder = String::new();
    let _ = file.read_to_string(&mut holder);
    match holder.trim() {
        "" => "another process".into(),
        pid => format!("process {pid}"),
    }
}

/// Tries `how` (a non-blocking lock) once: whether it was taken.
fn try_lock(file: &File, how: FlockOperation) -> std::io::Result<bool> {
    match flock(file, how) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Tries `how` (a non-blocking lock) until it is taken or `wait` is over.
fn lock_within(file: &File, how: FlockOperation, wait: Duration) -> std::io::Result<bool> {
    let until = Instant::now() + wait;
    loop {
        if try_lock(file, how)? {
            return Ok(true);
        }
        if Instant::now() >= until {
            return Ok(false);
        }
        std::thread::sleep(LOCK_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daemon_holder(e: &StoreError) -> String {
        match e {
            StoreError::HeldByDaemon { holder, .. } => holder.clone(),
            other => panic!("not held by a daemon: {other}"),
        }
    }

    #[test]
    fn a_second_lock_on_the_same_database_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("codi.db");
        let first = DatabaseLock::acquire(&db).unwrap();
        let e = DatabaseLock::acquire(&db).unwrap_err().to_string();
        let me = std::process::id();
        assert!(e.contains(&format!("process {me}")), "{e}");
        assert!(e.contains("codi.db.lock"), "{e}");
        drop(first);
        DatabaseLock::acquire(&db).unwrap();
    }

    #[test]
    fn no_codi2_writes_while_a_daemon_holds_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("codi.db");
        let daemon = DatabaseLock::acquire(&db).unwrap();
        let refused = StandaloneWrite::take(&db).unwrap_err();
        let me = std::process::id();
        assert_eq!(daemon_holder(&refused), format!("process {me}"));
        drop(daemon);
        let first = StandaloneWrite::take(&db).unwrap();
        let second = StandaloneWrite::take(&db).expect("codi2s write side by side");
        drop((first, second));
    }

    #[test]
    fn a_starting_daemon_waits_for_the_write_under_way_and_no_new_one_begins() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("codi.db");
        let under_way = StandaloneWrite::take(&db).unwrap();
        let starting = {
            let db = db.clone();
            std::thread::spawn(move || DatabaseLock::acquire_waiting(&db, Duration::from_secs(60)))
        };
        // Once the daemon holds `<db>.lock`, no new write begins, although
        // the right to write is still shared with the one under way.
        let refused = loop {
            match StandaloneWrite::take(&db) {
                Ok(write) => drop(write),
                Err(e) => break e,
            }
            assert!(!starting.is_finished(), "the daemon gave up waiting");
            std::thread::yield_now();
        };
        daemon_holder(&refused);
        assert!(!starting.is_finished(), "the daemon waits for the write");
        drop(under_way);
        let daemon = starting.join().unwrap().expect("the daemon starts");
        assert!(StandaloneWrite::take(&db).is_err());
        drop(daemon);
    }

    #[test]
    fn a_codi2_write_that_does_not_end_keeps_the_daemon_out_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("codi.db");
        let stuck = StandaloneWrite::take(&db).unwrap();
        let e = DatabaseLock::acquire_waiting(&db, Duration::from_millis(50))
            .unwrap_err()
            .to_string();
        assert!(e.contains("codi2") && e.contains("writers-lock"), "{e}");
        drop(stuck);
        // It let go of `<db>.lock` as it gave up.
        DatabaseLock::acquire_waiting(&db, Duration::from_millis(50)).unwrap();
    }

    #[test]
    fn a_codi2_looking_for_a_daemon_does_not_turn_one_away() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("codi.db");
        drop(DatabaseLock::acquire(&db).unwrap());
        // A look held far longer than a real one (a `flock` and its undo).
        let look = open_lock_file(&lock_path(&db), false).unwrap();
        assert!(try_lock(&look, FlockOperation::NonBlockingLockShared).unwrap());
        let looking = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(look);
        });
        DatabaseLock::acquire(&db).expect("the daemon retries past the look");
        looking.join().unwrap();
    }
}
