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

/// Starts sessions `{tag}-0` .. `{tag}-{n-1}` and ends every other one.
fn sessions(d: &Daemon, n: usize, tag: &str) {
    let mut c = d.unix();
    for i in 0..n {
        let session_id = format!("{tag}-{i}");
        c.expect_accepted(&Message::new(Payload::SessionStart {
            session_id: session_id.clone(),
            identity: "hub-test".into(),
            agent_type: Some("test".into()),
            workspace: None,
        }));
        if i % 2 == 0 {
            c.expect_accepted(&Message::new(Payload::SessionEnd { session_id }));
        }
    }
}

/// The local count of `table` and of its ended sessions (for `sessions`).
fn local_count(d: &Daemon, sql: &str) -> u64 {
    d.db()
        .snapshot()
        .query_row(sql, [], |r| r.get::<_, i64>(0))
        .unwrap() as u64
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
    // Export records: files in a watched directory, archived.
    let work = sandbox.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let work = std::fs::canonicalize(work).unwrap();
    d.unix()
        .expect_accepted(&Message::new(Payload::StartMonitoring {
            path: work.display().to_string(),
            recursive: true,
            patterns: vec!["*.md".into()],
            session_id: None,
        }));
    for i in 0..10 {
        std::fs::write(work.join(format!("export-{i}.md")), format!("export {i}\n")).unwrap();
    }
    sessions(&d, 20, "before");
    let mut sent = stream(&d, 3000, "first");
    assert!(
        wait_until(Duration::from_secs(60), || hub
            .counts("logs", &host, true)
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
    sessions(&d, 20, "hub down");
    // While it is away: the hub is degraded with the reason, and the lag
    // grows.
    let mut doc = serde_json::Value::Null;
    let degraded = wait_until(Duration::from_secs(30), || {
        doc = serde_json::from_slice(&d.http_get("/health").body).unwrap_or_default();
        let lag = series(&d.http_get("/metrics").text(), "codi_sync_lag_seconds");
        doc["components"]["hub"]["status"] == "degraded" && lag >= 2.0
    });
    assert!(degraded, "{doc}\n{}", d.stderr());
    let reason = doc["components"]["hub"]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.starts_with("batches to the hub fail: "), "{reason}");
    hub.restart();
    sent += stream(&d, 1000, "hub back");

    let local = d.db().count_logs() as u64;
    assert_eq!(local, sent as u64, "stored = acknowledged");
    hub.expect_once("logs", &host, local, &d);
    let archived = wait_until(Duration::from_secs(30), || {
        local_count(&d, "SELECT count() FROM export_archive") >= 10
    });
    assert!(archived, "the exports were not archived:\n{}", d.stderr());
    hub.expect_once("export_archive", &host, 10, &d);
    hub.expect_once("sessions", &host, 40, &d);
    assert_eq!(local_count(&d, "SELECT count() FROM sessions"), 40);
    hub.expect_ended(&host, 20, &d);
    let metrics = d.http_get("/metrics").text();
    assert!(series(&metrics, "codi_sync_rows_total") >= 1.0, "{metrics}");
    assert!(
        series(&metrics, "codi_sync_latency_seconds_count") >= local as f64 - 5000.0,
        "every log shipped since the kill has its latency: {metrics}"
    );
    let healthy = wait_until(Duration::from_secs(10), || {
        let doc: serde_json::Value =
            serde_json::from_slice(&d.http_get("/health").body).unwrap_or_default();
        doc["components"]["hub"]["status"] != "degraded"
            && series(&d.http_get("/metrics").text(), "codi_sync_lag_seconds") == 0.0
    });
    assert!(healthy, "caught up: the hub is well again and the lag is 0");
    assert!(
        series(&metrics, "codi_sync_failures_total") >= 1.0,
        "the hub was down"
    );
}

/// A daemon that dies between a batch's send and its watermark commit (the
/// fault point `hub-after-send`, an abort as a `kill -9` there would be),
/// again and again while logs and sessions stream and the hub restarts:
/// every re-sent batch is the same block, which the hub drops, so the hub
/// holds each row once even without `FINAL`.
#[test]
fn deaths_between_the_send_and_the_watermark_commit_store_nothing_twice() {
    let sandbox = Sandbox::new();
    let hub_dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(hub_dir.path());
    let host = format!("fault-{}", std::process::id());
    sandbox.write_config(&format!(
        "[server_hub]\nenabled = true\nurl = \"{}\"\nhost_id = \"{host}\"\nsync_interval = \
         \"100ms\"\nbatch_size = 300\nbackoff_min = \"100ms\"\nbackoff_max = \"1s\"\n",
        hub.url
    ));
    let mut sent = 0;
    for round in 0..4 {
        // Dies at the send of its second batch (of any target).
        let opts = Opts::default()
            .with_config()
            .env("CODI_FAULT", "hub-after-send:2");
        let mut d = Daemon::start(Arc::clone(&sandbox), opts);
        // Sessions and logs until the daemon dies by its fault point.
        let mut c = d.unix();
        let mut step = 0;
        let died = wait_until(Duration::from_secs(60), || {
            step += 1;
            let session_id = format!("round{round}-{step}");
            let mut messages = vec![Message::new(Payload::SessionStart {
                session_id: session_id.clone(),
                identity: "hub-test".into(),
                agent_type: None,
                workspace: None,
            })];
            if step % 2 == 0 {
                messages.push(Message::new(Payload::SessionEnd { session_id }));
            }
            messages.push(Message::new(Payload::LogBatch {
                entries: (0..100)
                    .map(|i| fields(LogLevel::Info, "hub", &format!("round {round} {i}")))
                    .collect(),
            }));
            for m in &messages {
                if c.send(m).is_err() {
                    return true;
                }
                match c.try_recv() {
                    Ok(Some(a)) => assert!(is_accepted(&a, m.id), "not accepted: {a:?}"),
                    _ => return true,
                }
                if matches!(m.payload, Payload::LogBatch { .. }) {
                    sent += 100;
                }
            }
            false
        });
        assert!(died, "round {round}: the fault point was not reached");
        let status = d.wait_exit();
        assert!(!status.success(), "round {round}: aborted, not {status:?}");
        assert!(
            d.stderr().contains("fault point hub-after-send"),
            "round {round}:\n{}",
            d.stderr()
        );
        if round % 2 == 1 {
            hub.stop();
            hub.restart();
        }
    }
    let d = Daemon::start(Arc::clone(&sandbox), Opts::default().with_config());
    let local = d.db().count_logs() as u64;
    assert!(local >= sent as u64, "stored {local} < acknowledged {sent}");
    hub.expect_once("logs", &host, local, &d);
    let local_sessions = local_count(&d, "SELECT count() FROM sessions");
    assert!(local_sessions >= 4, "{local_sessions} sessions");
    hub.expect_once("sessions", &host, local_sessions, &d);
    let local_ended = local_count(
        &d,
        "SELECT count() FROM sessions WHERE ended_at IS NOT NULL",
    );
    hub.expect_ended(&host, local_ended, &d);
}
