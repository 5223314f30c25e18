//! Binding the Unix and TCP listeners safely, and the stream type both
//! produce.
//!
//! The Unix socket is created under a restrictive umask (never briefly
//! world-connectable), in a directory only its owner can write, guarded by a
//! lock file so that a second daemon refuses to start instead of stealing a
//! live socket. A stale socket file (nobody answers) is replaced.

use crate::access::PeerCred;
use crate::fsperm::{self, check_private_dir, check_socket_path, TrustedUsers, Untrusted};
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why a listener could not be set up.
#[derive(Debug, Error)]
pub enum ListenError {
    /// Another daemon holds the socket's lock or answers on it.
    #[error("another codi-monitor is already running on {0} (stop it first, or choose another --socket)")]
    AlreadyRunning(PathBuf),
    /// The path exists and is something other than a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Another user owns the socket's directory or may write to it.
    #[error("socket directory {dir} {problem}")]
    UnsafeDirectory {
        /// The directory.
        dir: PathBuf,
        /// What is wrong with it.
        problem: Untrusted,
    },
    /// The way to the socket fails the rule clients apply before they
    /// connect (a symlinked socket directory, an ancestor others may
    /// write): they would refuse it, and someone could swap it.
    #[error("socket {0}: clients would not trust it; choose a path whose directories only root or this user can change")]
    UntrustedPath(String),
    /// The configured group does not exist.
    #[error("socket group `{0}` does not exist")]
    UnknownGroup(String),
    /// An operating-system error, with what was being done.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path or address.
        path: String,
        /// The error.
        source: io::Error,
    },
}

fn io_err(
    what: &'static str,
    path: impl std::fmt::Display,
) -> impl FnOnce(io::Error) -> ListenError {
    let path = path.to_string();
    move |source| ListenError::Io { what, path, source }
}

/// A bound Unix listener with its lock; dropping it removes the socket file.
#[derive(Debug)]
pub struct UnixEndpoint {
    /// The listener itself.
    pub listener: UnixListener,
    /// The socket path.
    pub path: PathBuf,
    _lock: File,
    lock_path: PathBuf,
}

impl Drop for UnixEndpoint {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        let _ = fs::remove_file(&self.lock_path);
    }
}

/// Binds the Unix socket at `path` with mode 0600, or 0660 owned by `group`.
pub fn bind_unix(path: &Path, group: Option<&str>) -> Result<UnixEndpoint, ListenError> {
    let gid = group.map(lookup_group).transpose()?;
    let dir = path.parent().unwrap_or(Path::new("/"));
    prepare_socket_dir(dir, gid)?;

    let lock_path = with_suffix(path, ".lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_err("cannot open lock file", lock_path.display()))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(ListenError::AlreadyRunning(path.to_owned()));
    }

    match fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(ListenError::NotASocket(path.to_owned()));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ListenError::AlreadyRunning(path.to_owned()));
            }
            log::warn!("replacing stale socket {}", path.display());
            fs::remove_file(path).map_err(io_err("cannot remove stale socket", path.display()))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot inspect", path.display())(e)),
    }

    // SAFETY: umask only changes this process's file-creation mask; it is
    // restored right after bind; a stricter mask meanwhile only makes files
    // that other threads create more private.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let listener = bound.map_err(io_err("cannot bind", path.display()))?;

    let endpoint = UnixEndpoint {
        listener,
        path: path.to_owned(),
        _lock: lock,
        lock_path,
    };
    if let Some(gid) = gid {
        chown_group(path, gid)?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o660))
            .map_err(io_err("cannot chmod", path.display()))?;
    }
    // The very rule codi2 applies before connecting: no symlinked socket
    // directory, no ancestor another user may change. Dropping the endpoint
    // on failure removes the socket again.
    if let Err(e) = check_socket_path(path, &TrustedUsers::current(None)) {
        return Err(ListenError::UntrustedPath(e.to_string()));
    }
    Ok(endpoint)
}

/// Binds the TCP listener (the caller has checked the address is allowed).
pub fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    TcpListener::bind(addr).map_err(io_err("cannot listen on", addr))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Creates the socket directory (0700, or 0750 for a group) or checks that an
/// existing one is writable only by its owner, and lets the socket's group
/// through it (see [`open_dir_to_group`]).
fn prepare_socket_dir(dir: &Path, gid: Option<libc::gid_t>) -> Result<(), ListenError> {
    match fs::metadata(dir) {
        Ok(meta) => {
            check_private_dir(&meta).map_err(|problem| ListenError::UnsafeDirectory {
                dir: dir.to_owned(),
                problem,
            })?;
            match gid {
                Some(gid) => open_dir_to_group(dir, &meta, gid),
                None => Ok(()),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mode = if gid.is_some() { 0o750 } else { 0o700 };
            fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(dir)
                .map_err(io_err("cannot create directory", dir.display()))?;
            if let Some(gid) = gid {
                chown_group(dir, gid)?;
            }
            Ok(())
        }
        Err(e) => Err(io_err("cannot inspect", dir.display())(e)),
    }
}

/// A group-accessible socket is no use in a directory the group cannot
/// pass through: systemd's `RuntimeDirectory=` makes `/run/codi` owned by
/// the service's own user and group, for one. When members of `gid` could
/// not search the existing directory `dir`, and it belongs to this process's
/// user, it is given to `gid` with group search permission added (nothing
/// else changes: never group write, never others). A directory that the
/// group can already pass, or that is not ours (such as `/run` itself), is
/// left alone.
fn open_dir_to_group(dir: &Path, meta: &fs::Metadata, gid: libc::gid_t) -> Result<(), ListenError> {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode() & 0o7777;
    let searchable = if meta.gid() == gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    };
    // SAFETY: geteuid cannot fail.
    if searchable || meta.uid() != unsafe { libc::geteuid() } {
        return Ok(());
    }
    chown_group(dir, gid)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o010))
        .map_err(io_err("cannot chmod", dir.display()))?;
    log::info!(
        "socket directory {} opened to the socket group (gid {gid}, mode {:o})",
        dir.display(),
        mode | 0o010
    );
    Ok(())
}

fn lookup_group(name: &str) -> Result<libc::gid_t, ListenError> {
    fsperm::lookup_group_members(name)
        .map(|(gid, _)| gid)
        .ok_or_else(|| ListenError::UnknownGroup(name.to_owned()))
}

fn chown_group(path: &Path, gid: libc::gid_t) -> Result<(), ListenError> {
    std::os::unix::fs::chown(path, None, Some(gid)).map_err(io_err("cannot chown", path.display()))
}

/// Which listener a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The Unix socket (authenticated by file permissions).
    Unix,
    /// TCP (authenticated by token when one is configured).
    Tcp,
}

/// An accepted connection of either kind.
#[derive(Debug)]
pub enum Stream {
    /// Over the Unix socket.
    Unix(UnixStream),
    /// Over TCP.
    Tcp(TcpStream),
}

impl Stream {
    /// The transport it arrived on.
    pub fn transport(&self) -> Transport {
        match self {
            Stream::Unix(_) => Transport::Unix,
            Stream::Tcp(_) => Transport::Tcp,
        }
    }

    /// Shuts down our sending side: the client sees end of stream after the
    /// bytes already sent.
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        }
    }

    /// The uid, gid and pid of the peer process of a Unix stream, from
    /// `SO_PEERCRED` (taken by the kernel at `connect`, so it cannot be
    /// forged); `None` over TCP.
    pub fn peer_cred(&self) -> Option<PeerCred> {
        match self {
            Stream::Unix(s) => rustix::net::sockopt::socket_peercred(s)
                .ok()
                .map(|c| PeerCred {
                    uid: c.uid.as_raw(),
                    gid: c.gid.as_raw(),
                    pid: c.pid.as_raw_nonzero().get(),
                }),
            Stream::Tcp(_) => None,
        }
    }

    /// The address of a TCP peer.
    pub fn peer_ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Stream::Unix(_) => None,
            Stream::Tcp(s) => s.peer_addr().ok().map(|a| a.ip()),
        }
    }

    /// The mio event source to register.
    pub fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Stream::Unix(s) => s,
            Stream::Tcp(s) => s,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn socket_is_private_and_a_second_bind_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/m.sock");
        let first = bind_unix(&path, None).unwrap();
        let mode = fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        assert!(matches!(
            bind_unix(&path, None),
            Err(ListenError::AlreadyRunning(_))
        ));
        drop(first);
        assert!(!path.exists(), "socket removed on drop");
    }

    #[test]
    fn stale_socket_is_replaced_and_other_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "stale socket file left behind");
        let _ok = bind_unix(&path, None).unwrap();

        let file = dir.path().join("plain");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            bind_unix(&file, None),
            Err(ListenError::NotASocket(_))
        ));
    }

    #[test]
    fn world_writable_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            bind_unix(&open.join("m.sock"), None),
            Err(ListenError::UnsafeDirectory { .. })
        ));
    }

    #[test]
    fn directory_owned_by_another_user_is_refused() {
        if unsafe { libc::geteuid() } != 0 {
            return; // only root can give a directory away
        }
        let dir = tempfile::tempdir().unwrap();
        let theirs = dir.path().join("theirs");
        fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
        assert!(matches!(
            bind_unix(&theirs.join("m.sock"), None),
            Err(ListenError::UnsafeDirectory {
                problem: Untrusted::ForeignOwner(65534),
                ..
            })
        ));
    }

    #[test]
    fn a_symlinked_socket_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        fs::create_dir(&real).unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = bind_unix(&link.join("m.sock"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("clients would not trust it"), "{e}");
        assert!(!real.join("m.sock").exists(), "the socket was left behind");
    }

    /// A group this process may give files to: `nogroup` as root (so that
    /// the group really changes), else this process's own group.
    fn a_group_of_ours() -> (String, libc::gid_t) {
        // SAFETY: geteuid, getegid and getgrgid have no preconditions; the
        // name is copied before any other call could overwrite it.
        unsafe {
            if libc::geteuid() == 0 {
                if let Ok(gid) = lookup_group("nogroup") {
                    return ("nogroup".to_owned(), gid);
                }
            }
            let gid = libc::getegid();
            let grp = libc::getgrgid(gid);
            assert!(!grp.is_null(), "this process's group has no name");
            let name = std::ffi::CStr::from_ptr((*grp).gr_name);
            (name.to_string_lossy().into_owned(), gid)
        }
    }

    #[test]
    fn a_group_socket_in_an_existing_private_directory_is_reachable_by_the_group() {
        let (group, gid) = a_group_of_ours();
        let base = tempfile::tempdir().unwrap();
        // As systemd's RuntimeDirectory= leaves it: ours, 0750, our group.
        let dir = base.path().join("run");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.join("m.sock");
        let endpoint = bind_unix(&path, Some(&group)).unwrap();
        let meta = fs::metadata(&dir).unwrap();
        assert_eq!((meta.gid(), meta.mode() & 0o7777), (gid, 0o710));
        let sock = fs::symlink_metadata(&path).unwrap();
        assert_eq!((sock.gid(), sock.mode() & 0o777), (gid, 0o660));
        drop(endpoint);

        // A directory the group can already pass keeps its group and mode.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let _again = bind_unix(&path, Some(&group)).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o7777, 0o755);
    }

    #[test]
    fn without_a_group_an_existing_directory_is_left_as_it_is() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("run");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let _endpoint = bind_unix(&dir.join("m.sock"), None).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o7777, 0o700);
    }

    #[test]
    fn unknown_group_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            bind_unix(&dir.path().join("m.sock"), Some("no-such-group-codi")),
            Err(ListenError::UnknownGroup(_))
        ));
    }
}
