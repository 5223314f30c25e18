//! Walking watched trees through directory descriptors, never through path
//! strings.
//!
//! The users who ask for a watch may be hostile, and the daemon reads (and
//! in move mode deletes) with its own rights. A path is looked up again at
//! every use, so a directory swapped for a symbolic link between two uses
//! would lead the daemon out of the watched tree. Here every directory is
//! opened relative to its parent's descriptor with `O_NOFOLLOW |
//! O_DIRECTORY`, starting from the root's descriptor (itself opened one
//! component at a time from `/`, none of them a symbolic link), so whatever
//! is reached lies inside the tree as it is now. Entries are inspected with
//! `fstatat(AT_SYMLINK_NOFOLLOW)`, only regular files are ever opened, and
//! a move deletes with `unlinkat` in the directory the file was found in,
//! after checking that the name still is the file that was copied and,
//! holding a read lease on it, that no process has it open for writing.

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Device and inode: which file or directory this is.
pub type Identity = (u64, u64);

/// Flags of every directory the watcher opens: never a symbolic link,
/// never anything but a directory, never inherited by a child process.
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Flags of an export opened for copying: no symbolic link followed, no
/// wait on a FIFO swapped in after it was inspected, no controlling
/// terminal taken.
const FILE_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);

/// What a directory entry is, from `fstat` or `fstatat` (never following a
/// symbolic link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Directory, regular file, symbolic link, FIFO, ...
    pub kind: FileType,
    /// Device and inode.
    pub identity: Identity,
    /// The owner's uid.
    pub uid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
}

impl Meta {
    // The field types of `struct stat` differ by platform.
    #[allow(clippy::unnecessary_cast)]
    fn from_stat(st: &rustix::fs::Stat) -> Meta {
        Meta {
            kind: FileType::from_raw_mode(st.st_mode as _),
            identity: (st.st_dev as u64, st.st_ino as u64),
            uid: st.st_uid as u32,
            size: (st.st_size as i64).max(0) as u64,
            mtime_ns: (st.st_mtime as i64)
                .saturating_mul(1_000_000_000)
                .saturating_add(st.st_mtime_nsec as i64),
        }
    }

    /// True for a regular file.
    pub fn is_file(&self) -> bool {
        self.kind == FileType::RegularFile
    }

    /// True for a directory.
    pub fn is_dir(&self) -> bool {
        self.kind == FileType::Directory
    }
}

/// True if `e` says the name is a symbolic link or not a directory (what
/// `O_NOFOLLOW | O_DIRECTORY` answers for a swapped entry).
pub fn is_not_a_directory(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR))
}

/// Opens the absolute, canonical directory `path` one component at a time
/// from `/`, refusing a symbolic link at every step (`ELOOP` or `ENOTDIR`,
/// see [`is_not_a_directory`]): the path was canonical when the watch was
/// made, so a link in it now was put there since.
pub fn open_root(path: &Path) -> io::Result<OwnedFd> {
    let mut components = path.components();
    if components.next() != Some(Component::RootDir) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a watched directory must be an absolute path",
        ));
    }
    let mut dir = rustix::fs::openat(rustix::fs::CWD, "/", DIR_FLAGS, Mode::empty())?;
    for component in components {
        let Component::Normal(name) = component else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a watched directory must be a canonical path",
            ));
        };
        dir = open_dir_at(dir.as_fd(), name)?;
    }
    Ok(dir)
}

/// Opens the directory `name` inside `parent`, never following a symbolic
/// link.
pub fn open_dir_at(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(parent, name, DIR_FLAGS, Mode::empty())?)
}

/// Opens the directory `relative` (plain names only) below `base`, one
/// component at a time; an empty `relative` opens `base` itself anew (its
/// own read position, unlike a `dup`).
pub fn open_below(base: BorrowedFd<'_>, relative: &Path) -> io::Result<OwnedFd> {
    let mut dir = rustix::fs::openat(base, ".", DIR_FLAGS, Mode::empty())?;
    for component in relative.components() {
        let Component::Normal(name) = component else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a plain relative path",
            ));
        };
        dir = open_dir_at(dir.as_fd(), name)?;
    }
    Ok(dir)
}

/// What the open descriptor `fd` is.
pub fn stat_fd(fd: BorrowedFd<'_>) -> io::Result<Meta> {
    Ok(Meta::from_stat(&rustix::fs::fstat(fd)?))
}

/// What the entry `name` of `dir` is, without following a symbolic link.
pub fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Meta> {
    Ok(Meta::from_stat(&rustix::fs::statat(
        dir,
        name,
        AtFlags::SYMLINK_NOFOLLOW,
    )?))
}

/// Opens the entry `name` of `dir` for reading if it still is the regular
/// file `expected` (same device and inode, as `fstatat` just found it);
/// `Ok(None)` if it is anything else now. Nothing but a regular file is
/// opened: `expected` is checked to be one first, and a FIFO or device
/// swapped in since is neither waited on (`O_NONBLOCK`) nor read.
pub fn open_file_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    expected: &Meta,
) -> io::Result<Option<(File, Meta)>> {
    if !expected.is_file() {
        return Ok(None);
    }
    let fd = match rustix::fs::openat(dir, name, FILE_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::LOOP) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let meta = stat_fd(fd.as_fd())?;
    if !meta.is_file() || meta.identity != expected.identity {
        return Ok(None);
    }
    Ok(Some((File::from(fd), meta)))
}

/// True if `now` is the regular file `expected` was, unchanged: same
/// device and inode, size and modification time.
pub fn same_file_version(expected: &Meta, now: &Meta) -> bool {
    now.is_file()
        && now.identity == expected.identity
        && now.size == expected.size
        && now.mtime_ns == expected.mtime_ns
}

/// What [`unlink_if_same`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unlinked {
    /// The file is deleted.
    Removed,
    /// The name is another file, or the file changed: nothing deleted.
    Changed,
    /// A process has the file open for writing: nothing deleted.
    OpenForWriting,
}

/// Deletes the entry `name` of `dir` if it still is `expected` (see
/// [`same_file_version`]) and no process has it open for writing. The check
/// and the `unlinkat` happen under a read lease where the kernel grants one
/// (see [`take_read_lease`]): a writer opening the file meanwhile waits for
/// the lease's release and then finds the name gone, so it never writes
/// into the deleted file. Where no lease can be had, the name is deleted
/// without that check.
pub fn unlink_if_same(dir: BorrowedFd<'_>, name: &OsStr, expected: &Meta) -> io::Result<Unlinked> {
    let Some((file, opened)) = open_file_at(dir, name, expected)? else {
        return Ok(Unlinked::Changed);
    };
    if !same_file_version(expected, &opened) {
        return Ok(Unlinked::Changed);
    }
    let lease = take_read_lease(file.as_fd());
    if lease == Lease::Busy {
        return Ok(Unlinked::OpenForWriting);
    }
    // The name may be another file's by now, or the file written to just
    // before the lease.
    let result = match stat_at(dir, name) {
        Ok(now) if same_file_version(expected, &now) => {
            rustix::fs::unlinkat(dir, name, AtFlags::empty())
                .map(|()| Unlinked::Removed)
                .map_err(io::Error::from)
        }
        Ok(_) => Ok(Unlinked::Changed),
        Err(e) => Err(e),
    };
    if lease == Lease::Held {
        release_lease(file.as_fd());
    }
    result
}

/// What [`take_read_lease`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// A read lease is held: nobody had the file open for writing, and a
    /// process opening it for writing now waits until [`release_lease`].
    Held,
    /// Some process has the file open for writing.
    Busy,
    /// The kernel cannot tell: not the daemon's file and no `CAP_LEASE`,
    /// leases disabled, a filesystem without them.
    Unsupported,
}

/// Takes a read lease (`F_SETLEASE`, `F_RDLCK`) on `fd`, a file opened
/// read-only; the kernel grants one only when no process has the file open
/// for writing. A writer that opens the file while it is held makes the
/// kernel send `SIGIO`, which the watcher ignores; hold it for microseconds.
pub fn take_read_lease(fd: BorrowedFd<'_>) -> Lease {
    // SAFETY: fcntl on a descriptor the caller keeps open.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) } == 0 {
        return Lease::Held;
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => Lease::Busy,
        _ => Lease::Unsupported,
    }
}

/// Releases the lease [`take_read_lease`] took (cannot fail for a lease
/// that is held).
pub fn release_lease(fd: BorrowedFd<'_>) {
    // SAFETY: as in `take_read_lease`.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
}

/// The `/proc` name of an open descriptor: a watch added through it is on
/// exactly the inode that was opened, whatever its path names now.
pub fn proc_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// One entry of a directory being listed.
#[derive(Debug)]
pub struct Entry {
    /// Its name (never `.` or `..`).
    pub name: std::ffi::OsString,
    /// Its type as the directory says; `Unknown` on filesystems that do
    /// not say (then [`stat_at`] tells).
    pub kind: FileType,
}

/// A directory being listed; its descriptor serves the `*_at` calls on its
/// entries meanwhile (they do not move the read position).
pub struct Listing {
    dir: Dir,
}

impl std::fmt::Debug for Listing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listing").finish_non_exhaustive()
    }
}

impl Listing {
    /// Lists the directory `fd` (opened by this module, so its read
    /// position is its own).
    pub fn new(fd: OwnedFd) -> io::Result<Listing> {
        Ok(Listing { dir: Dir::new(fd)? })
    }

    /// The directory's descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        // `Dir::fd` cannot fail on Linux.
        self.dir.fd().expect("a directory stream has a descriptor")
    }

    /// The next entry; `None` at the end.
    pub fn next_entry(&mut self) -> Option<io::Result<Entry>> {
        loop {
            let entry = match self.dir.read()? {
                Ok(entry) => entry,
                Err(e) => return Some(Err(e.into())),
            };
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            return Some(Ok(Entry {
                name: OsStr::from_bytes(name).to_owned(),
                kind: entry.file_type(),
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_root_or_directory_behind_a_symlink_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(tmp.path()).unwrap();
        fs::create_dir_all(base.join("real/sub")).unwrap();
        symlink(base.join("real"), base.join("link")).unwrap();
        let real = open_root(&base.join("real")).unwrap();
        assert!(stat_fd(real.as_fd()).unwrap().is_dir());
        let err = open_root(&base.join("link")).unwrap_err();
        assert!(is_not_a_directory(&err), "{err}");
        let err = open_root(&base.join("link/sub")).unwrap_err();
        assert!(
            is_not_a_directory(&err),
            "a link anywhere in the path: {err}"
        );
        let top = open_root(&base).unwrap();
        let err = open_below(top.as_fd(), Path::new("link/sub")).unwrap_err();
        assert!(is_not_a_directory(&err), "{err}");
        assert!(open_below(top.as_fd(), Path::new("real/sub")).is_ok());
        assert!(open_below(top.as_fd(), Path::new("../x")).is_err());
    }

    #[test]
    fn only_regular_files_are_opened_and_a_move_deletes_only_the_same_file() {
        let tmp = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(tmp.path()).unwrap();
        fs::write(base.join("a.md"), b"a").unwrap();
        symlink(base.join("a.md"), base.join("link.md")).unwrap();
        let dir = open_root(&base).unwrap();
        let name = OsStr::new("a.md");
        let meta = stat_at(dir.as_fd(), name).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.size, 1);
        let link = stat_at(dir.as_fd(), OsStr::new("link.md")).unwrap();
        assert_eq!(link.kind, FileType::Symlink, "not followed");
        assert!(open_file_at(dir.as_fd(), OsStr::new("link.md"), &link)
            .unwrap()
            .is_none());
        // Told it is the file it was: opened; the link in its place: not.
        assert!(open_file_at(dir.as_fd(), OsStr::new("link.md"), &meta)
            .unwrap()
            .is_none());
        let (_, opened) = open_file_at(dir.as_fd(), name, &meta).unwrap().unwrap();
        assert_eq!(opened, meta);
        // Replaced by another file: kept.
        fs::write(base.join("new"), b"other").unwrap();
        fs::rename(base.join("new"), base.join("a.md")).unwrap();
        assert_eq!(
            unlink_if_same(dir.as_fd(), name, &meta).unwrap(),
            Unlinked::Changed
        );
        assert!(base.join("a.md").exists());
        let now = stat_at(dir.as_fd(), name).unwrap();
        // Open for writing (leases work here): kept.
        let writer = fs::OpenOptions::new()
            .append(true)
            .open(base.join("a.md"))
            .unwrap();
        let file = File::open(base.join("a.md")).unwrap();
        if take_read_lease(file.as_fd()) != Lease::Unsupported {
            assert_eq!(
                unlink_if_same(dir.as_fd(), name, &now).unwrap(),
                Unlinked::OpenForWriting
            );
            assert!(base.join("a.md").exists());
        }
        drop(writer);
        assert_eq!(
            unlink_if_same(dir.as_fd(), name, &now).unwrap(),
            Unlinked::Removed
        );
        assert!(!base.join("a.md").exists());
        let mut listing = Listing::new(open_below(dir.as_fd(), Path::new("")).unwrap()).unwrap();
        let mut names = Vec::new();
        while let Some(entry) = listing.next_entry() {
            names.push(entry.unwrap().name);
        }
        assert_eq!(names, ["link.md"]);
    }
}
