//! Harness for the integration tests: runs the real `codi-monitor` binary in
//! a fresh temporary directory, talks to it with a blocking client over the
//! real sockets, and inspects its SQLite database directly.
//!
//! Every wait has a deadline that only protects against hangs; no test
//! asserts on how long something took.
//!
//! `sandbox` (directories, options), `daemon` (the process), `client` (the
//! protocol client and message helpers), `http` (the admin endpoint), `db`
//! (the database), `process` (short commands), `squatter` (another user's
//! listener); all re-exported here, so `use common::*;` reaches them.

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

mod client;
mod daemon;
mod db;
mod http;
pub mod hub;
#[path = "../../src/store/power_cut.rs"]
pub mod power_cut;
mod process;
mod sandbox;
mod squatter;

// Each test binary uses only part of the harness (hence also the
// `#[allow(dead_code)]` on its `mod common;`).
#[allow(unused_imports)]
pub use self::{client::*, daemon::*, db::*, http::*, process::*, sandbox::*, squatter::*};

/// Hang protection for a daemon to print its READY line.
pub const START_DEADLINE: Duration = Duration::from_secs(30);
/// Hang protection for one answer on a client connection.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// Hang protection for a daemon to exit after a signal.
pub const EXIT_DEADLINE: Duration = Duration::from_secs(10);

/// The token test daemons get (through `$CODI_MONITOR_TOKEN`) unless a
/// test says otherwise: every TCP listener needs one.
pub const TEST_TOKEN: &str = "test-token-0123456789abcdef";

/// The daemon binary under test: `$CODI_TEST_DAEMON` when set (to run the
/// suite against another build, e.g. the one before a fix), else this
/// crate's own.
pub fn daemon_binary() -> PathBuf {
    std::env::var_os("CODI_TEST_DAEMON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_codi-monitor")))
}

/// The `codi2` binary under test: `$CODI_TEST_CODI2` when set (to run the
/// CLI tests against another build, e.g. the one before a fix), else this
/// crate's own.
pub fn codi2_binary() -> PathBuf {
    std::env::var_os("CODI_TEST_CODI2")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_codi2")))
}

/// Polls `cond` until it holds or `deadline` passes; true if it held.
pub fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Raises this process's soft descriptor limit to the hard limit (children
/// inherit it) and returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    lim.rlim_cur
}
