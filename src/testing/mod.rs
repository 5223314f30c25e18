//! Helpers shared by the unit tests of several modules.

use proptest::test_runner::Config;

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
