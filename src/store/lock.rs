//! One daemon per database: an exclusive `flock` on `<db>.lock` beside the
//! database, held for the daemon's lifetime and released by the kernel when
//! the process ends (even on `kill -9`). A lock beside the socket would not
//! do: two daemons on different sockets could still share one database and
//! fight over its ids and merge marks.

use super::schema::prepare_directory;
use super::StoreError;
use rustix::fs::{flock, FlockOperation};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The lock file of the database at `db`.
pub fn lock_path(db: &Path) -> PathBuf {
    super::schema::with_suffix(db, ".lock")
}

/// The held lock; dropping it (or exiting) releases it.
#[derive(Debug)]
pub struct DatabaseLock {
    _file: File,
}

impl DatabaseLock {
    /// Takes the lock of the database at `db`, creating its private
    /// directory if needed, and writes this process's id into the file.
    /// Fails with [`StoreError::DatabaseInUse`] if another process holds it.
    pub fn acquire(db: &Path) -> Result<DatabaseLock, StoreError> {
        prepare_directory(db)?;
        let path = lock_path(db);
        let io_err = |action| {
            let path = path.clone();
            move |source| StoreError::Io {
                action,
                path,
                source,
            }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err("open the lock file"))?;
        if let Err(e) = flock(&file, FlockOperation::NonBlockingLockExclusive) {
            if e == rustix::io::Errno::WOULDBLOCK {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(StoreError::DatabaseInUse {
                    path: db.to_owned(),
                    lock: path,
                    holder: if holder.is_empty() {
                        "another process".into()
                    } else {
                        format!("process {holder}")
                    },
                });
            }
            return Err(io_err("lock")(e.into()));
        }
        file.set_len(0).map_err(io_err("truncate the lock file"))?;
        file.seek(SeekFrom::Start(0))
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .map_err(io_err("write the lock file"))?;
        Ok(DatabaseLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
