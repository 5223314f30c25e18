//! Copying one export into the archive: hashed while it is copied to a
//! temporary file, then renamed into place (never a partial archive file),
//! mode 0600, laid out by date and session; identical content is kept once.

use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Free space kept in the archive's filesystem beyond the file itself.
const FREE_SPACE_MARGIN: u64 = 16 * 1024 * 1024;
/// Read and write unit while copying.
const COPY_CHUNK: usize = 64 * 1024;
/// Folder of the archive for exports no session could be found for.
pub const NO_SESSION: &str = "no-session";

/// One export, copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    /// SHA-256 of the content, lowercase hex.
    pub content_hash: String,
    /// Bytes copied.
    pub size: u64,
    /// The temporary file holding the copy, inside the archive directory.
    pub temp: PathBuf,
}

/// Why an export could not be archived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyError {
    /// The file was gone (or replaced by a non-file) before it was copied.
    Vanished,
    /// The archive's filesystem has not enough free space for it.
    NoSpace {
        /// The file's size.
        needed: u64,
        /// Bytes free for this user.
        free: u64,
    },
    /// Any other failure, as a sentence.
    Io(String),
}

impl std::fmt::Display for CopyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyError::Vanished => f.write_str("the file vanished before it was copied"),
            CopyError::NoSpace { needed, free } => write!(
                f,
                "not enough free space in the archive: {needed} bytes needed, {free} free"
            ),
            CopyError::Io(e) => f.write_str(e),
        }
    }
}

/// Copies `source` to a new temporary file in `archive_dir`, hashing it on
/// the way, if it fits in `free` bytes (see [`free_bytes`]). The temporary
/// file is removed again on any failure.
pub fn copy_to_temp(source: &Path, archive_dir: &Path, free: u64) -> Result<Copied, CopyError> {
    let mut input = match File::open(source) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(CopyError::Vanished),
        Err(e) => return Err(CopyError::Io(format!("cannot open: {e}"))),
    };
    let meta = input
        .metadata()
        .map_err(|e| CopyError::Io(format!("cannot inspect: {e}")))?;
    if !meta.is_file() {
        return Err(CopyError::Vanished);
    }
    if meta.len().saturating_add(FREE_SPACE_MARGIN) > free {
        return Err(CopyError::NoSpace {
            needed: meta.len(),
            free,
        });
    }
    let temp = archive_dir.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let mut output = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; COPY_CHUNK];
        let mut size = 0u64;
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            output.write_all(&buf[..n])?;
            size += n as u64;
        }
        output.flush()?;
        Ok::<_, io::Error>((hex(&hasher.finalize()), size))
    })();
    match result {
        Ok((content_hash, size)) => Ok(Copied {
            content_hash,
            size,
            temp,
        }),
        Err(e) => {
            let _ = fs::remove_file(&temp);
            Err(match e.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => CopyError::NoSpace {
                    needed: meta.len(),
                    free: 0,
                },
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
    let name = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    archive_dir
        .join(format!("{:04}", date.0))
        .join(format!("{:02}", date.1))
        .join(format!("{:02}", date.2))
        .join(session_dir)
        .join(&content_hash[..2])
        .join(format!("{}-{name}", &content_hash[..16]))
}

/// Moves a finished temporary copy to `target`, creating its directory
/// (mode 0700) unless `made` says it exists already.
pub fn install(temp: &Path, target: &Path, made: &mut HashSet<PathBuf>) -> io::Result<()> {
    if let Some(parent) = target.parent() {
        if !made.contains(parent) {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)?;
            made.insert(parent.to_owned());
        }
    }
    fs::rename(temp, target)
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
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)] // the field types differ by platform
    let (avail, unit) = (u64::from(stat.f_bavail), u64::from(stat.f_frsize));
    Ok(avail.saturating_mul(unit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn copies_hashes_and_installs_privately() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("archive");
        fs::create_dir(&archive).unwrap();
        let source = dir.path().join("report.md");
        fs::write(&source, b"hello").unwrap();
        let copied = copy_to_temp(&source, &archive, u64::MAX).unwrap();
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
        install(&copied.temp, &target, &mut HashSet::new()).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"hello");
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!copied.temp.exists());
        let odd = archive_path(
            &archive,
            (2026, 1, 2),
            Some("../x"),
            &copied.content_hash,
            &source,
        );
        let session_dir = odd.strip_prefix(archive.join("2026/01/02")).unwrap();
        assert!(
            session_dir.to_string_lossy().starts_with("session-"),
            "{odd:?}"
        );
    }

    #[test]
    fn a_vanished_file_is_an_error_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let err = copy_to_temp(&dir.path().join("gone.md"), dir.path(), u64::MAX).unwrap_err();
        assert_eq!(err, CopyError::Vanished);
        let big = dir.path().join("big.md");
        fs::write(&big, vec![0u8; 1000]).unwrap();
        let err = copy_to_temp(&big, dir.path(), 500).unwrap_err();
        assert!(
            matches!(err, CopyError::NoSpace { needed: 1000, .. }),
            "{err}"
        );
        fs::remove_file(&big).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
