//! Test support: what a power cut can leave of an SQLite file in WAL mode
//! at `synchronous=NORMAL`, emulated on a copy. A commit at NORMAL syncs
//! nothing; a checkpoint syncs the WAL before it copies frames into the
//! database file and records how far it got (`nBackfill`), so of each WAL
//! only the frames up to that are sure to be on disk, and those up to the
//! last commit some connection made with `synchronous=FULL` (which syncs
//! the whole WAL, every earlier connection's frames with its own: hub
//! sync's). The copy keeps exactly those, followed by a torn frame of
//! garbage, and leaves the `-shm` file behind, as a reboot loses it.
//!
//! Shared by the store's model test and the integration tests (which
//! include this file by path), so it uses only `std` and `libc`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

/// The parts of an SQLite file's WAL index (its `-shm` file) that say how
/// far the WAL's checkpoints got. The layout is SQLite's (`wal.c`): two
/// copies of the 48-byte `WalIndexHdr`, then `WalCkptInfo`, in the host's
/// byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalIndex {
    /// `mxFrame`: the last committed frame.
    pub max_frame: u32,
    /// `aSalt`: changes whenever the WAL starts over from its first frame.
    pub salt: [u32; 2],
    /// `szPage`: the database's page size.
    pub page_size: u32,
    /// `nBackfill`: frames a checkpoint copied into the database file, after
    /// syncing the WAL.
    pub backfilled: u32,
    /// `nBackfillAttempted`: above `backfilled` while a checkpoint copies,
    /// and after SQLite rebuilt the index from the WAL (it cannot tell
    /// then what the database file holds).
    pub backfill_attempted: u32,
}

/// The WAL-index byte SQLite locks while a checkpoint runs (its lock bytes
/// start at 120; `WAL_CKPT_LOCK` is the second).
const WAL_CHECKPOINT_LOCK_BYTE: i64 = 121;

impl WalIndex {
    /// Reads the WAL index of the SQLite file `file`; `None` if it has none
    /// yet or the two header copies differ (caught mid-update).
    pub fn read(file: &Path) -> Option<WalIndex> {
        let bytes = fs::read(with_suffix(file, "-shm")).ok()?;
        if bytes.len() < 136 || bytes[..48] != bytes[48..96] || bytes[12] == 0 {
            return None;
        }
        let u32_at = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap());
        let page_size = u32::from(u16::from_ne_bytes([bytes[14], bytes[15]]));
        Some(WalIndex {
            max_frame: u32_at(16),
            salt: [u32_at(32), u32_at(36)],
            page_size: if page_size == 1 { 65536 } else { page_size },
            backfilled: u32_at(96),
            backfill_attempted: u32_at(128),
        })
    }

    /// Whether every frame committed when `earlier` was read has been
    /// copied into the database file by a checkpoint: the checkpoints got
    /// past the frame that was then the last, or the WAL has started over
    /// since, which SQLite does only once everything was copied and the
    /// database file synced.
    pub fn backfilled_past(&self, earlier: &WalIndex) -> bool {
        self.salt != earlier.salt || self.backfilled >= earlier.max_frame
    }

    /// Whether another process is checkpointing the SQLite file `file`: it
    /// holds the checkpoint lock (for the whole checkpoint). A lock held by
    /// this process's own connections does not show.
    pub fn checkpoint_running(file: &Path) -> bool {
        let shm = File::open(with_suffix(file, "-shm")).expect("open the -shm file");
        // SAFETY: F_GETLK fills in the local struct; the descriptor is open.
        let lock = unsafe {
            let mut lock: libc::flock = std::mem::zeroed();
            lock.l_type = libc::F_WRLCK as libc::c_short;
            lock.l_whence = libc::SEEK_SET as libc::c_short;
            lock.l_start = WAL_CHECKPOINT_LOCK_BYTE;
            lock.l_len = 1;
            use std::os::fd::AsRawFd;
            assert_eq!(libc::fcntl(shm.as_raw_fd(), libc::F_GETLK, &mut lock), 0);
            lock
        };
        lock.l_type != libc::F_UNLCK as libc::c_short
    }
}

/// `file` with `suffix` appended to its name (`-wal`, `-shm`).
fn with_suffix(file: &Path, suffix: &str) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Copies each SQLite file of `files` into the directory `to` as a power
/// cut could leave it: of its WAL only the frames its checkpoints copied
/// back (`nBackfill`), then a torn frame; no `-shm`. Call while nobody
/// writes or checkpoints them (a checkpoint half-way leaves pages in the
/// database file of frames the cut WAL lacks).
pub fn copy_cut(files: &[&Path], to: &Path) {
    let unsynced: Vec<(&Path, Option<WalIndex>)> = files.iter().map(|&f| (f, None)).collect();
    copy_cut_synced(&unsynced, to);
}

/// [`copy_cut`], where each file may come with the WAL index read right
/// after its last `synchronous=FULL` commit: the frames up to that commit
/// are kept too, if the WAL has not started over since (if it has, a
/// complete checkpoint copied them into the database file first).
pub fn copy_cut_synced(files: &[(&Path, Option<WalIndex>)], to: &Path) {
    const WAL_HEADER: u64 = 32;
    const FRAME_HEADER: u64 = 24;
    fs::create_dir_all(to).unwrap();
    for &(file, synced) in files {
        let index = WalIndex::read(file);
        let name = file.file_name().unwrap();
        fs::copy(file, to.join(name)).unwrap();
        let wal = with_suffix(file, "-wal");
        if !wal.exists() {
            continue;
        }
        let copy = with_suffix(&to.join(name), "-wal");
        fs::copy(&wal, &copy).unwrap();
        let len = fs::metadata(&copy).unwrap().len();
        let Some(index) = index.filter(|_| len >= WAL_HEADER) else {
            continue;
        };
        let frame = FRAME_HEADER + u64::from(index.page_size);
        let synced_frames = synced
            .filter(|s| s.salt == index.salt)
            .map_or(0, |s| s.max_frame);
        let frames = index.backfilled.max(synced_frames);
        let kept = (WAL_HEADER + u64::from(frames) * frame).min(len);
        let out = fs::OpenOptions::new().write(true).open(&copy).unwrap();
        out.set_len(kept).unwrap();
        // Half a frame of pseudo-random bytes: the frame the cut tore.
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ len;
        let torn: Vec<u8> = (0..frame / 2)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        use std::os::unix::fs::FileExt;
        out.write_all_at(&torn, kept).unwrap();
    }
}
