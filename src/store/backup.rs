//! `codi-monitor backup DIR`: a consistent copy of both database files,
//! taken with SQLite's online backup API while the daemon keeps ingesting.
//!
//! The ingest file is copied first, then the main database: a log the
//! merger moves in between is then in both copies, and after a restore the
//! copy in the ingest file sits at or below `logs`' largest id, so it is
//! read once and deleted by the next merge; the other order could miss it
//! in both. Each file is copied in one backup step, inside one read
//! transaction: in WAL mode that never blocks the daemon's writers, while a
//! copy in several steps starts over whenever another connection writes
//! between two steps, so on a busy daemon it might never finish.
//!
//! Each copy is written to a temporary name in `DIR` at mode 0600, turned
//! into a self-contained rollback-journal file (the daemon switches it back
//! to WAL when it opens it), synced, and renamed into place.

use super::schema::{self, ingest_path};
use super::StoreError;
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long to wait before retrying a step the source's lock refused.
const RETRY: Duration = Duration::from_millis(20);

/// One file written by [`backup`].
#[derive(Debug, Clone)]
pub struct Copied {
    /// Where the copy is.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// How long it took.
    pub took: Duration,
}

/// Copies the database at `db` and its ingest file into the directory
/// `dest` (created at mode 0700 if missing) under their own file names,
/// the ingest file first. Refuses to replace an existing copy unless
/// `force`.
pub fn backup(db: &Path, dest: &Path, force: bool) -> Result<Vec<Copied>, StoreError> {
    let io = |action, path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Io {
            action,
            path,
            source,
        }
    };
    let ingest = ingest_path(db);
    let name = db
        .file_name()
        .ok_or_else(|| StoreError::NotADirectory(db.to_owned()))?;
    let targets = [
        (ingest.clone(), ingest_path(&dest.join(name))),
        (db.to_owned(), dest.join(name)),
    ];
    for (source, _) in &targets {
        fs::metadata(source).map_err(io("open", source))?;
    }
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dest)
        .map_err(io("create backup directory", dest))?;
    if !force {
        for (_, target) in &targets {
            if target.exists() {
                return Err(StoreError::Io {
                    action: "write backup (it exists; --force replaces it)",
                    path: target.clone(),
                    source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
                });
            }
        }
    }
    let mut written = Vec::new();
    for (source, target) in &targets {
        written.push(copy_one(source, target)?);
    }
    File::open(dest)
        .and_then(|d| d.sync_all())
        .map_err(io("sync backup directory", dest))?;
    Ok(written)
}

/// Copies one SQLite file to `target` through a temporary file beside it.
fn copy_one(source: &Path, target: &Path) -> Result<Copied, StoreError> {
    let started = Instant::now();
    let mut temp_name = target.as_os_str().to_owned();
    temp_name.push(format!(".tmp-{}", std::process::id()));
    let temp = PathBuf::from(temp_name);
    let io = |action, path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Io {
            action,
            path,
            source,
        }
    };
    let _ = fs::remove_file(&temp);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io("create", &temp))?;
    let result = (|| {
        let src = schema::open_file(source, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let mut dst = Connection::open(&temp).map_err(|e| StoreError::Open {
            path: temp.clone(),
            source: e,
        })?;
        {
            let copy = Backup::new(&src, &mut dst)?;
            loop {
                match copy.step(-1)? {
                    StepResult::Done => break,
                    StepResult::More => {}
                    _ => std::thread::sleep(RETRY),
                }
            }
        }
        drop(src);
        let mode: String =
            dst.pragma_update_and_check(None, "journal_mode", "DELETE", |r| r.get(0))?;
        debug_assert_eq!(mode.to_ascii_lowercase(), "delete");
        dst.close().map_err(|(_, e)| StoreError::from(e))?;
        let file = File::open(&temp).map_err(io("open", &temp))?;
        file.sync_all().map_err(io("sync", &temp))?;
        let bytes = file.metadata().map_err(io("inspect", &temp))?.len();
        fs::rename(&temp, target).map_err(io("rename into place", target))?;
        Ok(bytes)
    })();
    match result {
        Ok(bytes) => Ok(Copied {
            path: target.to_owned(),
            bytes,
            took: started.elapsed(),
        }),
        Err(e) => {
            let _ = fs::remove_file(&temp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_both_files_refuses_to_overwrite_and_the_copy_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db/codi.db");
        let conn = schema::open_rw(&db, 4).unwrap();
        conn.execute(
            "INSERT INTO logs (id, uuid, timestamp, level, component, message, created_at) \
             VALUES (1, x'01', 1, 'Info', 'c', 'kept', 1)",
            [],
        )
        .unwrap();
        let dest = dir.path().join("backup");
        let written = backup(&db, &dest, false).unwrap();
        assert_eq!(written.len(), 2);
        assert_eq!(written[0].path, dest.join("codi.db-ingest"));
        assert_eq!(written[1].path, dest.join("codi.db"));
        let copy = dest.join("codi.db");
        assert!(super::super::verify::verify(&copy, false).unwrap().ok());
        let ro = schema::open_ro(&copy).unwrap();
        let n: i64 = ro
            .query_row("SELECT count(*) FROM all_logs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        let err = backup(&db, &dest, false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        backup(&db, &dest, true).unwrap();
        let leftovers: Vec<_> = fs::read_dir(&dest)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "{leftovers:?}");
    }
}
