//! Hub sync against a real ClickHouse (the test hub of `scripts/hub`:
//! clickhouse-server and ZooKeeper on loopback, 2 shards x 2 replicas,
//! installed by `scripts/hub` itself when missing): every log reaches the
//! hub exactly once across a daemon killed with -9 and a hub stopped and
//! started again while logs stream.

#[allow(dead_code)]
mod common;

use codi_monitor::proto::{LogLevel, Message, Payload};
use common::hub::Hub;
use common::*;
use std::sync::Arc;
use std::time::Duration;

/// Sends `n` logs in acknowledged batches of 100; how many were accepted.
fn stream(d: &Daemon, n: usize, tag: &str) -> usize {
    let mut c = d.unix();
    for chunk in 0..n / 100 {
        let batch = Message::new(Payload::LogBatch {
            entries: (0..100)
                .map(|i| fields(LogLevel::Info, "hub", &format!("{tag} {chunk} {i}")))
                .collect(),
        });
        c.expect_accepted(&batch);
    }
    n / 100 * 100
}

#[test]
fn every_log_reaches_the_hub_once_across_a_killed_daemon_and_a_restarted_hub() {
    let sandbox = Sandbox::new();
    // Its own directory (scripts/hub hands it to the clickhouse user when
    // run as root, which could not enter the sandbox's).
    let hub_dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(hub_dir.path());
    let host = format!("test-{}", std::process::id());
    sandbox.write_config(&format!(
        "[server_hub]\nenabled = true\nurl = \"{}\"\nhost_id = \"{host}\"\nsync_interval = \
         \"100ms\"\nbatch_size = 700\nbackoff_min = \"100ms\"\nbackoff_max = \"1s\"\n",
        hub.url
    ));
    let opts = Opts::default().with_config();
    let mut d = Daemon::start(Arc::clone(&sandbox), opts.clone());
    let mut sent = stream(&d, 3000, "first");
    assert!(
        wait_until(Duration::from_secs(60), || hub
            .counts(&host, true)
            .is_some_and(|(n, _)| n > 0)),
        "nothing reached the hub:\n{}",
        d.stderr()
    );
    // Killed while it ships: a batch may be in flight, sent or not.
    sent += stream(&d, 2000, "before the kill");
    d.kill9();
    drop(d);
    let d = Daemon::start(Arc::clone(&sandbox), opts.clone());
    sent += stream(&d, 2000, "after the kill");
    // The hub goes away while logs keep coming, and comes back.
    hub.stop();
    sent += stream(&d, 2000, "hub down");
    std::thread::sleep(Duration::from_millis(1500));
    hub.restart();
    sent += stream(&d, 1000, "hub back");

    let local = d.db().count_logs() as u64;
    assert_eq!(local, sent as u64, "stored = acknowledged");
    let mut counts = None;
    let caught_up = wait_until(Duration::from_secs(120), || {
        counts = hub.counts(&host, true);
        counts.is_some_and(|(n, _)| n >= local)
    });
    assert!(
        caught_up,
        "the hub has {counts:?} of {local}:\n{}",
        d.stderr()
    );
    assert_eq!(counts, Some((local, local)), "each log once on the hub");
    assert_eq!(
        hub.counts(&host, false),
        Some((local, local)),
        "no batch stored twice, even before ClickHouse merges: every re-send was dropped"
    );
    let metrics = d.http_get("/metrics").text();
    assert!(series(&metrics, "codi_sync_rows_total") >= 1.0, "{metrics}");
    assert!(
        series(&metrics, "codi_sync_failures_total") >= 1.0,
        "the hub was down"
    );
}
