//! Helpers shared by the unit tests of several modules.

use crossbeam_channel::Receiver;
use proptest::test_runner::Config;
use std::time::Duration;

/// How long a unit test waits for one message on a channel: far beyond any
/// healthy answer, so that a bug fails the test instead of hanging
/// `cargo test`.
pub(crate) const CHANNEL_WAIT: Duration = Duration::from_secs(30);

/// The next message on `rx`, or a panic naming `what` when none comes within
/// [`CHANNEL_WAIT`] or every sender is gone.
#[track_caller]
pub(crate) fn recv<T>(rx: &Receiver<T>, what: &str) -> T {
    match rx.recv_timeout(CHANNEL_WAIT) {
        Ok(msg) => msg,
        Err(e) => panic!("no {what} within {} s: {e}", CHANNEL_WAIT.as_secs()),
    }
}

/// A property-test configuration running `cases` cases, which keeps each
/// property well under two seconds in a debug build; `PROPTEST_CASES=100000`
/// runs longer on demand. Failures are not persisted to files: whatever a
/// property finds becomes a named regression test instead.
pub(crate) fn proptest_config(cases: u32) -> Config {
    let default = Config::default();
    Config {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            default.cases
        } else {
            cases
        },
        failure_persistence: None,
        ..default
    }
}

/// Pre-order walks of MessagePack values.
pub(crate) mod value_nodes;
