//! The one rule for directories that hold the socket or the database: only
//! their owner may write them, and the owner must be this process's user or
//! root. Otherwise another local user could swap the socket (and impersonate
//! the daemon) or the database files.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;

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
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(Untrusted::ForeignOwner(meta.uid()));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(Untrusted::Writable(mode));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn own_private_directory_is_trusted_and_open_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let meta = fs::metadata(dir.path()).unwrap();
        assert_eq!(check_private_dir(&meta), Ok(()));
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o770)).unwrap();
        let meta = fs::metadata(dir.path()).unwrap();
        assert_eq!(check_private_dir(&meta), Err(Untrusted::Writable(0o770)));
    }

    #[test]
    fn another_users_directory_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        // Only root can hand a directory to another user; elsewhere the
        // ownership branch is exercised by the integration tests' users.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        std::os::unix::fs::chown(dir.path(), Some(65534), None).unwrap();
        let meta = fs::metadata(dir.path()).unwrap();
        assert_eq!(
            check_private_dir(&meta),
            Err(Untrusted::ForeignOwner(65534))
        );
    }
}
