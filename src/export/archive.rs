//! Copying one export into the archive: hashed while it is copied to an
//! unnamed temporary file (`O_TMPFILE`, or a named temp file where the
//! filesystem lacks it), then linked or renamed into place, so there is
//! never a partial archive file; mode 0600, laid out by date and session.

use super::walk::{self, Meta};
use rustix::fs::AtFlags;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Free space the archive leaves in its filesystem beyond the file
/// itself (the database and its WAL live there too); named in the
/// [`CopyError::NoSpace`] sentence.
pub const FREE_SPACE_MARGIN: u64 = 16 * 1024 * 1024;
/// Read and write unit while copying.
const COPY_CHUNK: usize = 64 * 1024;
/// Longest source file name kept in an archive file name, in bytes.
const MAX_NAME_BYTES: usize = 200;
/// Folder of the archive for exports no session could be found for.
pub const NO_SESSION: &str = "no-session";

/// An opened export and what it was when opened.
#[derive(Debug)]
pub struct Source {
    file: File,
    /// What it was when opened: identity (checked again before a move
    /// deletes it), owner, size, modification time.
    pub meta: Meta,
    /// Whether another process has it open for writing; `None` when not
    /// asked or the kernel would not say (see [`open_for_writing`]).
    pub being_written: Option<bool>,
}

impl Source {
    /// How long ago the file was last modified. A modification time in the
    /// future (a skewed clock, `touch -d`) counts as long ago, so that such
    /// a file is not waited on forever.
    pub fn age(&self) -> std::time::Duration {
        age_of(self.meta.mtime_ns)
    }
}

/// How long ago `mtime_ns` (nanoseconds since the epoch) was; a time in the
/// future counts as long ago (see [`Source::age`]).
pub fn age_of(mtime_ns: i64) -> std::time::Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    if mtime_ns > now {
        return std::time::Duration::MAX;
    }
    std::time::Duration::from_nanos((now - mtime_ns) as u64)
}

/// Opens the entry `name` of `dir` for copying if it still is the regular
/// file `found` (what `fstatat` said of it): no symbolic link followed, no
/// FIFO or device ever opened (see [`walk::open_file_at`]). `Ok(None)` if
/// it is something else now. With `check_writers`, also asks whether it is
/// still open for writing (for files a scan found; a close event already
/// says the writer is done).
pub fn open_source(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    found: &Meta,
    check_writers: bool,
) -> Result<Option<Source>, CopyError> {
    let (file, meta) = match walk::open_file_at(dir, name, found) {
        Ok(Some(opened)) => opened,
        Ok(None) => return Ok(None),
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(CopyError::Vanished),
        Err(e) => return Err(CopyError::Io(format!("cannot open: {e}"))),
    };
    Ok(Some(Source {
        being_written: if check_writers {
            open_for_writing(&file)
        } else {
            None
        },
        file,
        meta,
    }))
}

/// Whether any process has `file` open for writing, from whether the kernel
/// grants a read lease ([`walk::take_read_lease`], dropped at once). `None`
/// when it cannot tell: not our file and no `CAP_LEASE`, leases disabled, a
/// filesystem without them.
pub fn open_for_writing(file: &File) -> Option<bool> {
    match walk::take_read_lease(file.as_fd()) {
        walk::Lease::Held => {
            walk::release_lease(file.as_fd());
            Some(false)
        }
        walk::Lease::Busy => Some(true),
        walk::Lease::Unsupported => None,
    }
}

/// A finished copy not yet in its place.
#[derive(Debug)]
pub enum Temp {
    /// An `O_TMPFILE` file: no name until it is linked into place, gone if
    /// dropped.
    Unnamed(File),
    /// A named temporary file in the archive directory (filesystems without
    /// `O_TMPFILE`).
    Named(PathBuf),
}

impl Temp {
    /// Throws the copy away.
    pub fn discard(self) {
        self.discard_ref();
    }

    fn discard_ref(&self) {
        if let Temp::Named(path) = self {
            let _ = fs::remove_file(path);
        }
    }
}

/// One export, copied.
#[derive(Debug)]
pub struct Copied {
    /// SHA-256 of the content, lowercase hex.
    pub content_hash: String,
    /// Bytes copied.
    pub size: u64,
    /// The copy, inside the archive directory.
    pub temp: Temp,
}

/// Why an export could not be archived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyError {
    /// The file was gone (or replaced by a non-file) before it was copied.
    Vanished,
    /// The archive's filesystem has not enough free space for it plus
    /// [`FREE_SPACE_MARGIN`].
    NoSpace {
        /// The file's size.
        needed: u64,
        /// Bytes free for this user; `None` when the filesystem itself
        /// refused the copy (`ENOSPC`, `EDQUOT`).
        free: Option<u64>,
        /// The archive directory.
        archive: PathBuf,
    },
    /// The file is not owned by the user who asked for the watch, so it is
    /// not theirs to export.
    Untrusted {
        /// The file's owner.
        owner: u32,
        /// The watch's owner (`None` for a watch saved before owners were
        /// recorded, whose directory could not be inspected yet).
        watcher: Option<u32>,
    },
    /// Any other failure, as a sentence.
    Io(String),
}

/// How every [`CopyError::NoSpace`] sentence starts; with it
/// [`error_class`] tells two such errors apart from their free-space
/// figures.
const NO_SPACE: &str = "not enough free space in the archive";

/// The part of a recorded error sentence that says what went wrong, without
/// the figures that change from one attempt to the next (the free space): a
/// file version that fails again for the same reason is not recorded again.
pub fn error_class(sentence: &str) -> &str {
    if sentence.starts_with(NO_SPACE) {
        NO_SPACE
    } else {
        sentence
    }
}

impl std::fmt::Display for CopyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyError::Vanished => f.write_str("the file vanished before it was copied"),
            CopyError::NoSpace {
                needed,
                free: Some(free),
                archive,
            } => write!(
                f,
                "{NO_SPACE}: {needed} bytes needed plus the {} MiB the archive keeps free; \
                 {free} free on {}",
                FREE_SPACE_MARGIN >> 20,
                archive.display()
            ),
            CopyError::NoSpace {
                needed,
                free: None,
                archive,
            } => write!(
                f,
                "{NO_SPACE}: the filesystem of {} is full or over quota ({needed} bytes to copy)",
                archive.display()
            ),
            CopyError::Untrusted { owner, watcher } => match watcher {
                Some(w) => write!(
                    f,
                    "not archived: the file is owned by uid {owner}, not by uid {w} who asked \
                     for the watch"
                ),
                None => write!(
                    f,
                    "not archived: the file is owned by uid {owner} and the watch's owner is \
                     not known yet"
                ),
            },
            CopyError::Io(e) => f.write_str(e),
        }
    }
}

/// Creates the temporary copy: unnamed (`O_TMPFILE`) where the filesystem
/// allows, else a named file.
fn create_temp(archive_dir: &Path) -> io::Result<(File, Temp)> {
    let unnamed = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(archive_dir);
    match unnamed {
        Ok(f) => {
            let handle = f.try_clone()?;
            Ok((handle, Temp::Unnamed(f)))
        }
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
            ) =>
        {
            let path = archive_dir.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            Ok((f, Temp::Named(path)))
        }
        Err(e) => Err(e),
    }
}

/// Copies `source` into a new temporary copy in `archive_dir`, hashing it
/// on the way, if it fits in `free` bytes (see [`free_bytes`]). Nothing is
/// left behind on failure.
pub fn copy_to_temp(source: Source, archive_dir: &Path, free: u64) -> Result<Copied, CopyError> {
    let Source { file, meta, .. } = source;
    let size = meta.size;
    // A file that grows while it is copied is copied as it was when opened;
    // its next close event brings the rest.
    let mut file = file.take(size);
    let full = || CopyError::NoSpace {
        needed: size,
        free: None,
        archive: archive_dir.to_owned(),
    };
    if size.saturating_add(FREE_SPACE_MARGIN) > free {
        return Err(CopyError::NoSpace {
            needed: size,
            free: Some(free),
            archive: archive_dir.to_owned(),
        });
    }
    let (mut output, temp) = create_temp(archive_dir).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => full(),
        _ => CopyError::Io(format!("cannot create the archive copy: {e}")),
    })?;
    let result = (|| {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; COPY_CHUNK.min(size as usize + 1).max(1)];
        let mut copied = 0u64;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            output.write_all(&buf[..n])?;
            copied += n as u64;
        }
        Ok::<_, io::Error>((hex(&hasher.finalize()), copied))
    })();
    match result {
        Ok((content_hash, size)) => Ok(Copied {
            content_hash,
            size,
            temp,
        }),
        Err(e) => {
            temp.discard();
            Err(match e.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => full(),
                _ => CopyError::Io(format!("cannot copy: {e}")),
            })
        }
    }
}

/// Where an export's content goes: `<archive>/<YYYY>/<MM>/<DD>/<session>/
/// <first 2 hex digits of the hash>/<first 16 hex digits>-<file name>`. The
/// two-digit level keeps directories small (ext4 renames into a directory of
/// 100,000 entries cost a third of the watcher's time). A session id that
/// is not a plain file name is replaced by its hash.
pub fn archive_path(
    archive_dir: &Path,
    date: (i32, u32, u32),
    session: Option<&str>,
    content_hash: &str,
    source: &Path,
) -> PathBuf {
    let session_dir = match session {
        None => NO_SESSION.to_owned(),
        Some(s) if is_plain_name(s) => s.to_owned(),
        Some(s) => format!("session-{}", &hex(&Sha256::digest(s.as_bytes()))[..16]),
    };
    let mut name = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // 17 bytes of hash prefix plus the name must fit a 255-byte file name.
    if name.len() > MAX_NAME_BYTES {
        let mut end = MAX_NAME_BYTES;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    archive_dir
        .join(format!("{:04}", date.0))
        .join(format!("{:02}", date.1))
        .join(format!("{:02}", date.2))
        .join(session_dir)
        .join(&content_hash[..2])
        .join(format!("{}-{name}", &content_hash[..16]))
}

/// Puts a finished copy at `target`, creating its directory (mode 0700)
/// unless `made` says it exists already. An unnamed copy is linked into
/// place; a target that already exists has the same content (its name
/// holds the content hash) and is kept.
pub fn install(temp: Temp, target: &Path, made: &mut HashSet<PathBuf>) -> io::Result<()> {
    let parent = target.parent().unwrap_or(Path::new("."));
    if !made.contains(parent) {
        make_dir(parent)?;
        made.insert(parent.to_owned());
    }
    match place(&temp, target) {
        // The directory was deleted since it was made: make it again.
        Err(e) if e.kind() == ErrorKind::NotFound => {
            make_dir(parent)?;
            place(&temp, target)
        }
        other => other,
    }
    .inspect_err(|_| temp.discard_ref())
}

fn make_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Links or renames the copy to `target`.
fn place(temp: &Temp, target: &Path) -> io::Result<()> {
    match temp {
        Temp::Named(path) => fs::rename(path, target),
        Temp::Unnamed(file) => match link_unnamed(file, target) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            Err(e)
                if e.kind() == ErrorKind::NotFound
                    && target.parent().is_some_and(|p| !p.exists()) =>
            {
                Err(e)
            }
            // No /proc: copy the unnamed file to a named one, then rename.
            Err(_) => {
                let mut file = file;
                file.seek(SeekFrom::Start(0))?;
                let parent = target.parent().unwrap_or(Path::new("."));
                let path = parent.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
                let mut out = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)?;
                let copied = io::copy(&mut file, &mut out).and_then(|_| fs::rename(&path, target));
                if copied.is_err() {
                    let _ = fs::remove_file(&path);
                }
                copied
            }
        },
    }
}

/// Makes the copy at `target` and its directory entry durable (a move
/// deletes the source afterwards).
pub fn sync(target: &Path) -> io::Result<()> {
    File::open(target)?.sync_all()?;
    File::open(target.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// Gives an `O_TMPFILE` file the name `target` (`linkat` through
/// `/proc/self/fd`, which needs no privilege).
fn link_unnamed(file: &File, target: &Path) -> io::Result<()> {
    rustix::fs::linkat(
        rustix::fs::CWD,
        walk::proc_path(file.as_fd()),
        rustix::fs::CWD,
        target,
        AtFlags::SYMLINK_FOLLOW,
    )?;
    Ok(())
}

fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes available to this user in the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use std::os::unix::fs::PermissionsExt;

    /// Opens `path` as the watcher does: its directory's descriptor, then
    /// the entry.
    fn open(path: &Path, check_writers: bool) -> Result<Option<Source>, CopyError> {
        let dir: OwnedFd = walk::open_root(&fs::canonicalize(path.parent().unwrap()).unwrap())
            .expect("open the directory");
        let name = path.file_name().unwrap();
        let found = match walk::stat_at(dir.as_fd(), name) {
            Ok(found) => found,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(CopyError::Vanished),
            Err(e) => panic!("{e}"),
        };
        open_source(dir.as_fd(), name, &found, check_writers)
    }

    #[test]
    fn copies_hashes_and_installs_privately() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("archive");
        fs::create_dir(&archive).unwrap();
        let source = dir.path().join("report.md");
        fs::write(&source, b"hello").unwrap();
        let opened = open(&source, true).unwrap().unwrap();
        assert_eq!(opened.meta.size, 5);
        let copied = copy_to_temp(opened, &archive, u64::MAX).unwrap();
        assert_eq!(
            copied.content_hash,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(copied.size, 5);
        let target = archive_path(
            &archive,
            (2026, 1, 2),
            Some("s-1"),
            &copied.content_hash,
            &source,
        );
        assert_eq!(
            target,
            archive.join("2026/01/02/s-1/2c/2cf24dba5fb0a30e-report.md")
        );
        let hash = copied.content_hash.clone();
        install(copied.temp, &target, &mut HashSet::new()).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"hello");
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(&archive)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["2026"], "no temporary file left behind");
        // The same content again: the existing copy is kept.
        let again =
            copy_to_temp(open(&source, true).unwrap().unwrap(), &archive, u64::MAX).unwrap();
        install(again.temp, &target, &mut HashSet::new()).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"hello");
        let odd = archive_path(&archive, (2026, 1, 2), Some("../x"), &hash, &source);
        let session_dir = odd.strip_prefix(archive.join("2026/01/02")).unwrap();
        assert!(
            session_dir.to_string_lossy().starts_with("session-"),
            "{odd:?}"
        );
    }

    #[test]
    fn a_vanished_file_is_an_error_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let err = open(&dir.path().join("gone.md"), true).unwrap_err();
        assert_eq!(err, CopyError::Vanished);
        let big = dir.path().join("big.md");
        fs::write(&big, vec![0u8; 1000]).unwrap();
        let err = copy_to_temp(open(&big, true).unwrap().unwrap(), dir.path(), 500).unwrap_err();
        assert!(
            matches!(err, CopyError::NoSpace { needed: 1000, .. }),
            "{err}"
        );
        fs::remove_file(&big).unwrap();
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no temporary file"
        );
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link.md")).unwrap();
        assert!(
            open(&dir.path().join("link.md"), true).unwrap().is_none(),
            "not followed"
        );
        fs::create_dir(dir.path().join("sub.md")).unwrap();
        assert!(
            open(&dir.path().join("sub.md"), true).unwrap().is_none(),
            "not a file"
        );
        let open_file = dir.path().join("open.md");
        let writer = File::create(&open_file).unwrap();
        let source = open(&open_file, true).unwrap().unwrap();
        if let Some(busy) = source.being_written {
            assert!(busy, "a file open for writing is seen as such");
            drop(writer);
            assert_eq!(
                open(&open_file, true).unwrap().unwrap().being_written,
                Some(false)
            );
        }
    }

    #[test]
    fn the_no_space_sentence_names_the_reserve_and_the_archive() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.md");
        fs::write(&big, vec![0u8; 1_048_576]).unwrap();
        let err =
            copy_to_temp(open(&big, false).unwrap().unwrap(), dir.path(), 5_240_832).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "not enough free space in the archive: 1048576 bytes needed plus the 16 MiB \
                 the archive keeps free; 5240832 free on {}",
                dir.path().display()
            )
        );
        // The same failure with other free-space figures is the same error.
        let again = CopyError::NoSpace {
            needed: 1_048_576,
            free: Some(1),
            archive: dir.path().to_owned(),
        };
        assert_eq!(
            error_class(&err.to_string()),
            error_class(&again.to_string())
        );
        assert_ne!(
            error_class("cannot copy: EIO"),
            error_class(&err.to_string())
        );
    }
}
