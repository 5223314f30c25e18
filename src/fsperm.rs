//! Who may own the files that decide where logs go.
//!
//! Two rules live here. The daemon's: a directory that holds its socket or
//! its database may be written only by its owner, and the owner must be
//! this process's user or root; otherwise another local user could swap the
//! socket (and impersonate the daemon) or the database files. And the
//! client's, which is the same rule seen from the other side: before
//! `codi2` connects to a Unix socket it checks every directory on the way
//! to it, so that a socket another user planted (say in a `/tmp` directory
//! they created first) is never mistaken for the daemon.

use std::ffi::{CString, OsString};
use std::fmt;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use thiserror::Error;

/// Why a directory cannot be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Untrusted {
    /// Group or others may write it; the permission bits.
    Writable(u32),
    /// Another user owns it; that user's id.
    ForeignOwner(u32),
}

impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Untrusted::Writable(mode) => write!(
                f,
                "is writable by group or others (mode {mode:o}); it must be writable only by its owner"
            ),
            Untrusted::ForeignOwner(uid) => write!(
                f,
                "is owned by uid {uid}, neither this user nor root; remove it or choose another path"
            ),
        }
    }
}

/// Checks an existing directory's owner and mode.
pub fn check_private_dir(meta: &Metadata) -> Result<(), Untrusted> {
    check_owner_and_mode(meta, &TrustedUsers::current(None), false)
}

/// The one owner-and-mode rule behind both checks: owned by a trusted user
/// and writable by nobody else, except that a sticky directory (like
/// `/tmp`, mode 1777) may be writable by all when `sticky_ok`, since there
/// nobody may remove or rename what another user created.
fn check_owner_and_mode(
    meta: &Metadata,
    trusted: &TrustedUsers,
    sticky_ok: bool,
) -> Result<(), Untrusted> {
    if !trusted.contains(meta.uid()) {
        return Err(Untrusted::ForeignOwner(meta.uid()));
    }
    let mode = meta.mode() & 0o7777;
    let sticky = mode & libc::S_ISVTX != 0;
    if mode & 0o022 != 0 && !(sticky_ok && sticky) {
        return Err(Untrusted::Writable(mode));
    }
    Ok(())
}

/// The users a client trusts to run its daemon and to own the way to its
/// socket: itself, root, and the system daemon's service user
/// (`monitor.service_user`) when one is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustedUsers {
    /// This process's effective user id.
    pub euid: u32,
    /// The service user's id, if one is configured and exists.
    pub service: Option<u32>,
}

impl TrustedUsers {
    /// This process's user, root, and `service` if given.
    pub fn current(service: Option<u32>) -> TrustedUsers {
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        TrustedUsers { euid, service }
    }

    /// True if `uid` is one of them.
    pub fn contains(&self, uid: u32) -> bool {
        uid == 0 || uid == self.euid || Some(uid) == self.service
    }
}

/// The user id of `user`: a number is taken as the uid itself, anything
/// else is looked up as a user name (`getpwnam_r`). `None` if there is no
/// such user.
pub fn lookup_user(user: &str) -> Option<u32> {
    if !user.is_empty() && user.bytes().all(|b| b.is_ascii_digit()) {
        return user.parse().ok();
    }
    let name = CString::new(user).ok()?;
    // SAFETY: every pointer is valid for the call (see `query_user_db`).
    let (pwd, _buf) = query_user_db(|pwd, buf, result| unsafe {
        libc::getpwnam_r(name.as_ptr(), pwd, buf.as_mut_ptr(), buf.len(), result)
    })?;
    Some(pwd.pw_uid)
}

/// Runs a reentrant `getpw*_r` call, growing its buffer on `ERANGE`; the
/// entry found and the buffer its strings point into.
fn query_user_db(
    mut call: impl FnMut(&mut libc::passwd, &mut [libc::c_char], &mut *mut libc::passwd) -> libc::c_int,
) -> Option<(libc::passwd, Vec<libc::c_char>)> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    loop {
        // SAFETY: passwd is plain old data; zeroed is a valid value.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = call(&mut pwd, &mut buf, &mut result);
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return (rc == 0 && !result.is_null()).then_some((pwd, buf));
    }
}

/// How messages name the users a client trusts, after an untrusted uid.
pub const NOT_TRUSTED: &str = "not this user, root or monitor.service_user";

/// What is wrong with a path on the way to a daemon's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketProblem {
    /// Owned by a user that is not trusted; that user's id.
    ForeignOwner(u32),
    /// Writable by group or others (and, for a directory above the
    /// socket's, not sticky); the permission bits.
    Writable(u32),
    /// The socket's directory is a symbolic link.
    Symlink,
    /// A directory on the way is something else.
    NotADirectory,
    /// The socket path is something else.
    NotASocket,
    /// More symbolic links than the kernel would follow.
    TooManyLinks,
}

impl fmt::Display for SocketProblem {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            SocketProblem::ForeignOwner(uid) => write!(f, "is owned by uid {uid}, {NOT_TRUSTED}"),
            SocketProblem::Writable(mode) => {
                write!(f, "is writable by group or others (mode {mode:o})")
            }
            SocketProblem::Symlink => f.write_str("is a symbolic link"),
            SocketProblem::NotADirectory => f.write_str("is not a directory"),
            SocketProblem::NotASocket => f.write_str("is not a socket"),
            SocketProblem::TooManyLinks => f.write_str("goes through too many symbolic links"),
        }
    }
}

impl From<Untrusted> for SocketProblem {
    fn from(u: Untrusted) -> SocketProblem {
        match u {
            Untrusted::Writable(mode) => SocketProblem::Writable(mode),
            Untrusted::ForeignOwner(uid) => SocketProblem::ForeignOwner(uid),
        }
    }
}

/// A socket path that is not to be trusted: which path, and why.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{} {problem}", path.display())]
pub struct UntrustedSocket {
    /// The offending path (a directory on the way, or the socket).
    pub path: PathBuf,
    /// What is wrong with it.
    pub problem: SocketProblem,
}

/// Why [`check_socket_path`] refused.
#[derive(Debug, Error)]
pub enum SocketPathError {
    /// A path on the way cannot be inspected: usually it does not exist
    /// (no daemon), or this user may not search a directory.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The path exists but is not trusted.
    #[error(transparent)]
    Untrusted(#[from] UntrustedSocket),
}

/// Symbolic links followed at most, as Linux's own limit.
const MAX_SYMLINKS: usize = 40;

/// The gid of group `group` (a name or a gid) and the names of its listed
/// members, if the group database knows it.
pub fn lookup_group_members(group: &str) -> Option<(u32, Vec<String>)> {
    let by_gid = group.parse::<u32>().ok();
    let name = CString::new(group).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    loop {
        // SAFETY: group is plain old data; zeroed is a valid value.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and buf outlives it.
        let rc = unsafe {
            match by_gid {
                Some(gid) => {
                    libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut result)
                }
                None => libc::getgrnam_r(
                    name.as_ptr(),
                    &mut grp,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut result,
                ),
            }
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 || result.is_null() {
            return None;
        }
        let mut members = Vec::new();
        let mut at = grp.gr_mem;
        // SAFETY: gr_mem is a NULL-terminated array of NUL-terminated
        // strings in buf, valid while buf lives.
        unsafe {
            while !at.is_null() && !(*at).is_null() {
                members.push(std::ffi::CStr::from_ptr(*at).to_string_lossy().into_owned());
                at = at.add(1);
            }
        }
        return Some((grp.gr_gid, members));
    }
}

/// The name of the user with `uid`, if the user database knows it.
pub fn user_name(uid: u32) -> Option<String> {
    // SAFETY: every pointer is valid for the call (see `query_user_db`).
    let (pwd, _buf) = query_user_db(|pwd, buf, result| unsafe {
        libc::getpwuid_r(uid, pwd, buf.as_mut_ptr(), buf.len(), result)
    })?;
    // SAFETY: on success pw_name points at a NUL-terminated string in the
    // buffer, which `_buf` keeps alive.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

/// Checks the way to a daemon's Unix socket before connecting to it, and
/// returns the socket's real path (every symbolic link resolved) to connect
/// to, so that the path checked is the path used.
///
/// - Every directory above the socket's own is owned by a trusted user and
///   writable by nobody else unless it is sticky (like `/tmp`).
/// - The socket's directory is no symbolic link (it is not followed), is
///   owned by a trusted user, and is writable by nobody else.
/// - The socket is a socket owned by a trusted user.
///
/// Nothing else can then replace the socket between this check and the
/// connection. The process that listens on it is a separate question: see
/// `SO_PEERCRED` in the client.
pub fn check_socket_path(
    socket: &Path,
    trusted: &TrustedUsers,
) -> Result<PathBuf, SocketPathError> {
    let socket = std::path::absolute(socket)?;
    let untrusted = |path: &Path, problem| UntrustedSocket {
        path: path.to_owned(),
        problem,
    };
    let (Some(dir), Some(name)) = (socket.parent(), socket.file_name()) else {
        return Err(untrusted(&socket, SocketProblem::NotASocket).into());
    };
    let dir = resolve_dir(dir, trusted)?;
    let meta = fs::symlink_metadata(&dir)?;
    check_owner_and_mode(&meta, trusted, false).map_err(|p| untrusted(&dir, p.into()))?;
    let real = dir.join(name);
    let meta = fs::symlink_metadata(&real)?;
    if !meta.file_type().is_socket() {
        return Err(untrusted(&real, SocketProblem::NotASocket).into());
    }
    if !trusted.contains(meta.uid()) {
        return Err(untrusted(&real, SocketProblem::ForeignOwner(meta.uid())).into());
    }
    Ok(real)
}

/// The real path of the absolute directory `dir`, walking it one component
/// at a time from `/` and following symbolic links as the kernel would,
/// with every directory entered checked as an ancestor (sticky allowed).
/// The last component must not be a symbolic link.
fn resolve_dir(dir: &Path, trusted: &TrustedUsers) -> Result<PathBuf, SocketPathError> {
    let mut todo: Vec<OsString> = Vec::new();
    push_components(&mut todo, dir);
    let mut real = PathBuf::from("/");
    let mut links = 0;
    check_ancestor(&real, trusted)?;
    while let Some(part) = todo.pop() {
        if part == ".." {
            real.pop();
            continue;
        }
        let next = real.join(&part);
        let meta = fs::symlink_metadata(&next)?;
        if meta.file_type().is_symlink() {
            let problem = if todo.is_empty() {
                Some(SocketProblem::Symlink)
            } else if links >= MAX_SYMLINKS {
                Some(SocketProblem::TooManyLinks)
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(UntrustedSocket {
                    path: next,
                    problem,
                }
                .into());
            }
            links += 1;
            let target = fs::read_link(&next)?;
            if target.is_absolute() {
                real = PathBuf::from("/");
            }
            push_components(&mut todo, &target);
            continue;
        }
        if !meta.is_dir() {
            return Err(UntrustedSocket {
                path: next,
                problem: SocketProblem::NotADirectory,
            }
            .into());
        }
        check_ancestor(&next, trusted)?;
        real = next;
    }
    Ok(real)
}

/// Pushes `path`'s names and `..`s onto the stack `todo` so that the first
/// one is popped first.
fn push_components(todo: &mut Vec<OsString>, path: &Path) {
    let parts: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_owned()),
            Component::ParentDir => Some("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    todo.extend(parts.into_iter().rev());
}

fn check_ancestor(dir: &Path, trusted: &TrustedUsers) -> Result<(), SocketPathError> {
    let meta = fs::symlink_metadata(dir)?;
    check_owner_and_mode(&meta, trusted, true).map_err(|p| {
        UntrustedSocket {
            path: dir.to_owned(),
            problem: p.into(),
        }
        .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixListener;

    fn is_root() -> bool {
        // SAFETY: geteuid cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// `<tmp>/<sub>/m.sock` with a listening socket; returns the socket path
    /// and the listener (keep it alive).
    fn socket_in(base: &Path, sub: &str) -> (PathBuf, UnixListener) {
        let dir = base.join(sub);
        fs::create_dir_all(&dir).unwrap();
        chmod(&dir, 0o700);
        let path = dir.join("m.sock");
        let listener = UnixListener::bind(&path).unwrap();
        (path, listener)
    }

    fn me() -> TrustedUsers {
        TrustedUsers::current(None)
    }

    fn refusal(path: &Path, trusted: &TrustedUsers) -> UntrustedSocket {
        match check_socket_path(path, trusted) {
            Err(SocketPathError::Untrusted(u)) => u,
            other => panic!("expected a refusal for {}, got {other:?}", path.display()),
        }
    }

    #[test]
    fn own_private_directory_is_trusted_and_open_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let meta = fs::metadata(dir.path()).unwrap();
        assert_eq!(check_private_dir(&meta), Ok(()));
        chmod(dir.path(), 0o770);
        let meta = fs::metadata(dir.path()).unwrap();
        assert_eq!(check_private_dir(&meta), Err(Untrusted::Writable(0o770)));
    }

    #[test]
    fn another_users_directory_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        // Only root can hand a directory to another user; elsewhere the
        // ownership branch is exercised by the integration tests' users.
        if !is_root() {
            return;
        }
        std::os::unix::fs::chown(dir.path(), Some(65534), None).unwrap();
        let meta = fs::metadata(dir.path()).unwrap();
        assert_eq!(
            check_private_dir(&meta),
            Err(Untrusted::ForeignOwner(65534))
        );
    }

    #[test]
    fn socket_in_own_private_directory_below_sticky_tmp_is_trusted() {
        // The temporary directory lives in /tmp (1777, root) or the like.
        let base = tempfile::tempdir().unwrap();
        let (path, _l) = socket_in(base.path(), "run");
        let real = check_socket_path(&path, &me()).unwrap();
        assert_eq!(real, fs::canonicalize(&path).unwrap());
        // A sticky world-writable directory on the way is fine too.
        let sticky = base.path().join("sticky");
        fs::create_dir(&sticky).unwrap();
        chmod(&sticky, 0o1777);
        let (path, _l2) = socket_in(&sticky, "run");
        check_socket_path(&path, &me()).unwrap();
    }

    #[test]
    fn group_writable_socket_directory_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let (path, _l) = socket_in(base.path(), "run");
        let dir = path.parent().unwrap();
        chmod(dir, 0o770);
        let u = refusal(&path, &me());
        assert_eq!(u.problem, SocketProblem::Writable(0o770));
        assert_eq!(u.path, fs::canonicalize(dir).unwrap());
        // Sticky does not save the socket's own directory.
        chmod(dir, 0o1777);
        assert_eq!(
            refusal(&path, &me()).problem,
            SocketProblem::Writable(0o1777)
        );
    }

    #[test]
    fn world_writable_ancestor_without_sticky_bit_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let open = base.path().join("open");
        fs::create_dir(&open).unwrap();
        chmod(&open, 0o777);
        let (path, _l) = socket_in(&open, "run");
        let u = refusal(&path, &me());
        assert_eq!(u.problem, SocketProblem::Writable(0o777));
        assert_eq!(u.path, fs::canonicalize(&open).unwrap());
        let msg = u.to_string();
        assert!(msg.contains("open is writable by group or others"), "{msg}");
    }

    #[test]
    fn directories_and_sockets_of_other_users_are_refused_unless_theirs_is_the_service_user() {
        if !is_root() {
            return; // only root can give files away
        }
        let base = tempfile::tempdir().unwrap();
        let (path, _l) = socket_in(base.path(), "run");
        let dir = path.parent().unwrap();
        std::os::unix::fs::chown(dir, Some(65534), Some(65534)).unwrap();
        let u = refusal(&path, &me());
        assert_eq!(u.problem, SocketProblem::ForeignOwner(65534));
        assert_eq!(u.path, fs::canonicalize(dir).unwrap());
        assert!(u.to_string().contains("owned by uid 65534"), "{u}");
        let service = TrustedUsers::current(Some(65534));
        check_socket_path(&path, &service).unwrap();

        // A trusted directory above an untrusted one does not help.
        let (deeper, _l2) = socket_in(dir, "inner");
        assert_eq!(
            refusal(&deeper, &me()).problem,
            SocketProblem::ForeignOwner(65534)
        );

        // The socket itself.
        std::os::unix::fs::chown(dir, Some(0), Some(0)).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let u = refusal(&path, &me());
        assert_eq!(u.problem, SocketProblem::ForeignOwner(65534));
        assert_eq!(u.path, fs::canonicalize(&path).unwrap());
    }

    #[test]
    fn socket_directory_may_not_be_a_symlink_but_links_above_it_are_followed() {
        let base = tempfile::tempdir().unwrap();
        let (path, _l) = socket_in(base.path(), "real/run");
        // The socket's own directory as a link: refused, not followed.
        let link = base.path().join("linked-run");
        std::os::unix::fs::symlink(path.parent().unwrap(), &link).unwrap();
        let u = refusal(&link.join("m.sock"), &me());
        assert_eq!(u.problem, SocketProblem::Symlink);
        assert_eq!(
            u.path,
            fs::canonicalize(base.path()).unwrap().join("linked-run")
        );
        // A link further up (like /var/run -> /run) is resolved, and the
        // real path is what the caller connects to.
        std::os::unix::fs::symlink("real", base.path().join("alias")).unwrap();
        let via = base.path().join("alias/run/m.sock");
        let real = check_socket_path(&via, &me()).unwrap();
        assert_eq!(real, fs::canonicalize(&path).unwrap());
        // So are `..` components, against the real directory.
        let dotted = base.path().join("alias/run/../run/m.sock");
        assert_eq!(check_socket_path(&dotted, &me()).unwrap(), real);
    }

    #[test]
    fn symlink_loops_end() {
        let base = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("b", base.path().join("a")).unwrap();
        std::os::unix::fs::symlink("a", base.path().join("b")).unwrap();
        let u = refusal(&base.path().join("a/run/m.sock"), &me());
        assert_eq!(u.problem, SocketProblem::TooManyLinks);
    }

    #[test]
    fn other_files_are_not_sockets_and_missing_ones_are_missing() {
        let base = tempfile::tempdir().unwrap();
        let (path, _l) = socket_in(base.path(), "run");
        let plain = path.with_file_name("plain");
        fs::write(&plain, b"x").unwrap();
        assert_eq!(refusal(&plain, &me()).problem, SocketProblem::NotASocket);
        let through_file = plain.join("m.sock");
        assert_eq!(
            refusal(&through_file, &me()).problem,
            SocketProblem::NotADirectory
        );
        for missing in [
            path.with_file_name("none.sock"),
            base.path().join("nodir/m.sock"),
        ] {
            match check_socket_path(&missing, &me()) {
                Err(SocketPathError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::NotFound),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn users_are_found_by_name_or_number() {
        assert_eq!(lookup_user("root"), Some(0));
        assert_eq!(lookup_user("0"), Some(0));
        assert_eq!(lookup_user("4242"), Some(4242));
        assert_eq!(lookup_user("no-such-user-codi"), None);
        assert_eq!(lookup_user(""), None);
        assert_eq!(user_name(0).as_deref(), Some("root"));
        assert_eq!(user_name(4_000_000_000), None);
        assert_eq!(lookup_group_members("root").map(|(gid, _)| gid), Some(0));
        assert_eq!(lookup_group_members("0").map(|(gid, _)| gid), Some(0));
        assert_eq!(lookup_group_members("no-such-group-codi"), None);
        assert!(TrustedUsers::current(Some(7)).contains(7));
        assert!(TrustedUsers::current(None).contains(0));
        assert!(!TrustedUsers {
            euid: 1000,
            service: None
        }
        .contains(65534));
    }
}
