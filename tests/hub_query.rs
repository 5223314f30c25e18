//! `codi2 logs --hub` against a real ClickHouse (the test hub of
//! `scripts/hub`): rows of two hosts inserted straight into the hub, then
//! the real `codi2` binary asked with each filter, in table and JSON form;
//! text that tries to break out of its SQL literal matches only itself;
//! a row stored twice shows once.

#[allow(dead_code)]
mod common;

use codi_monitor::client::output;
use codi_monitor::proto::{LogLevel, StoredLog, Timestamp};
use common::hub::Hub;
use common::*;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use uuid::Uuid;

/// 2026-01-01T00:00:00Z in microseconds.
const T0: i64 = 1_767_225_600_000_000;

/// One hub row: `host`, `id`, stamped `second`s after [`T0`].
#[allow(clippy::too_many_arguments)]
fn row(
    host: &str,
    id: i64,
    second: i64,
    level: &str,
    component: &str,
    session: Option<&str>,
    message: &str,
    metadata: Option<&str>,
) -> Value {
    json!({
        "host_id": host,
        "id": id,
        "uuid": Uuid::from_u128((second as u128) << 8 | id as u128).to_string(),
        "timestamp": T0 + second * 1_000_000,
        "level": level,
        "component": component,
        "session_id": session,
        "message": message,
        "metadata": metadata,
        "created_at": T0 + second * 1_000_000 + 5,
        "uid": if id % 2 == 1 { Some(1000) } else { None },
    })
}

/// Runs `codi2 --config <sandbox config> ARGS`.
fn codi2(sandbox: &Sandbox, args: &[&str]) -> Output {
    sandbox
        .codi2()
        .arg("--config")
        .arg(sandbox.config())
        .args(args)
        .output()
        .expect("run codi2")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("UTF-8 output")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The JSON lines of a successful `codi2 logs --hub --json ARGS`.
fn json_rows(sandbox: &Sandbox, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["logs", "--hub", "--json"];
    all.extend_from_slice(args);
    let o = codi2(sandbox, &all);
    assert!(o.status.success(), "codi2 {all:?}: {}", stderr(&o));
    stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `(host, id)` of each JSON row, in output order.
fn keys(rows: &[Value]) -> Vec<(String, i64)> {
    rows.iter()
        .map(|r| {
            (
                r["host"].as_str().unwrap().to_owned(),
                r["id"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// What the filter `args` should show, as `(host, id)` in output order.
fn expect(sandbox: &Sandbox, args: &[&str], want: &[(&str, i64)]) {
    let want: Vec<(String, i64)> = want.iter().map(|(h, i)| (h.to_string(), *i)).collect();
    assert_eq!(
        keys(&json_rows(sandbox, args)),
        want,
        "codi2 logs --hub {args:?}"
    );
}

#[test]
fn codi2_logs_hub_filters_every_hosts_logs_like_a_local_query() {
    let sandbox = Sandbox::new();
    let hub_dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(hub_dir.path());
    let pid = std::process::id();
    let (a, b) = (format!("qa-{pid}"), format!("qb-{pid}"));
    let (a, b) = (a.as_str(), b.as_str());
    let attack = "x' OR 1=1 --";
    hub.insert(
        "logs",
        &[
            row(
                a,
                1,
                1,
                "Info",
                "build",
                Some("s1"),
                "compiling crate",
                Some("{\"n\":1}"),
            ),
            row(
                a,
                2,
                2,
                "Warn",
                "build",
                Some("s1"),
                &format!("slow: {attack}"),
                None,
            ),
            row(
                a,
                3,
                3,
                "Error",
                "test",
                Some("s2"),
                "back\\slash and 'quote'",
                None,
            ),
        ],
    );
    hub.insert(
        "logs",
        &[
            row(b, 1, 4, "Debug", "build", None, "compiling crate", None),
            row(
                b,
                2,
                5,
                "Error",
                "deploy",
                Some("s1"),
                "héllo ✓\nFORGED row",
                None,
            ),
            row(
                b,
                3,
                6,
                "Trace",
                "deploy",
                None,
                "nul\0inside",
                Some("[1,\"x\"]"),
            ),
        ],
    );
    sandbox.write_config(&format!("[server_hub]\nurl = \"{}\"\n", hub.url));

    // Every host, oldest first, the JSON of a local query plus "host".
    let all = json_rows(&sandbox, &[]);
    assert_eq!(
        keys(&all),
        [(a, 1), (a, 2), (a, 3), (b, 1), (b, 2), (b, 3)]
            .map(|(h, i)| (h.to_owned(), i))
            .to_vec()
    );
    let first = all[0].as_object().unwrap();
    let mut fields: Vec<&str> = first.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "component",
            "host",
            "id",
            "level",
            "message",
            "metadata",
            "session_id",
            "timestamp",
            "uid",
            "uuid"
        ]
    );
    assert_eq!(all[0]["timestamp"], "2026-01-01T00:00:01.000000Z");
    assert_eq!(all[0]["level"], "Info");
    assert_eq!(all[0]["metadata"], json!({"n": 1}));
    assert_eq!(all[0]["uid"], 1000);
    assert_eq!(all[1]["uid"], Value::Null);
    assert_eq!(all[4]["message"], "héllo ✓\nFORGED row");
    assert_eq!(all[5]["message"], "nul\0inside");
    assert_eq!(all[5]["metadata"], json!([1, "x"]));

    // Each filter, alone and together.
    expect(&sandbox, &["--host", a], &[(a, 1), (a, 2), (a, 3)]);
    expect(&sandbox, &["--level", "warn"], &[(a, 2), (a, 3), (b, 2)]);
    expect(
        &sandbox,
        &["--level", "debug", "--host", b],
        &[(b, 1), (b, 2)],
    );
    expect(&sandbox, &["--component", "deploy"], &[(b, 2), (b, 3)]);
    expect(&sandbox, &["--session", "s1"], &[(a, 1), (a, 2), (b, 2)]);
    expect(
        &sandbox,
        &[
            "--since",
            "2026-01-01T00:00:03Z",
            "--until",
            "2026-01-01T00:00:05Z",
        ],
        &[(a, 3), (b, 1)],
    );
    expect(&sandbox, &["--since", "1h"], &[]);
    expect(&sandbox, &["--contains", "compiling"], &[(a, 1), (b, 1)]);
    expect(&sandbox, &["--contains", "Compiling"], &[]);
    expect(
        &sandbox,
        &["--contains", "crate", "--host", b, "--component", "build"],
        &[(b, 1)],
    );
    expect(&sandbox, &["--contains", "✓"], &[(b, 2)]);

    // Text that would break out of its literal matches only itself.
    expect(&sandbox, &["--contains", attack], &[(a, 2)]);
    expect(&sandbox, &["--contains", "\\slash and 'quote'"], &[(a, 3)]);
    expect(&sandbox, &["--contains", "back\\"], &[(a, 3)]);
    expect(&sandbox, &["--contains", "\\"], &[(a, 3)]);
    expect(&sandbox, &["--component", attack], &[]);
    expect(&sandbox, &["--session", "s1' OR '1'='1"], &[]);
    expect(&sandbox, &["--host", &format!("{a}' OR host_id != '")], &[]);
    expect(&sandbox, &["--session", "s2\\' OR 1=1 --"], &[]);
    expect(
        &sandbox,
        &["--contains", "'; DROP TABLE codi.logs; --"],
        &[],
    );
    assert_eq!(
        hub.counts("logs", a, true),
        Some((3, 3)),
        "nothing was dropped"
    );

    // --limit: the newest N, oldest first, and stderr says how many match.
    let o = codi2(&sandbox, &["logs", "--hub", "--json", "--limit", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 2);
    assert_eq!(
        keys(&json_rows(&sandbox, &["--limit", "2"])),
        [(b.to_owned(), 2), (b.to_owned(), 3)]
    );
    assert!(
        stderr(&o).contains("showing the newest 2 of 6 matching logs (see --limit)"),
        "{}",
        stderr(&o)
    );
    let o = codi2(
        &sandbox,
        &["logs", "--hub", "--limit", "0", "--level", "error"],
    );
    assert_eq!(stdout(&o), "2 matching logs\n", "{}", stderr(&o));

    // The table: a local row with the host after the time (no header in
    // a pipe), one line per log whatever its message holds.
    let o = codi2(&sandbox, &["logs", "--hub", "--host", b]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = stdout(&o);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    let b2 = StoredLog {
        id: 2,
        uuid: Uuid::from_u128(5 << 8 | 2),
        timestamp: Timestamp::from_micros(T0 + 5_000_000),
        level: LogLevel::Error,
        component: "deploy".into(),
        session_id: Some("s1".into()),
        message: "héllo ✓\nFORGED row".into(),
        metadata: None,
        uid: None,
    };
    assert_eq!(lines[1], output::hub_table_row(&b2, b, "-", false));
    assert!(
        lines[1].starts_with(&format!("2026-01-01T00:00:05.000Z  {b:<12}  ERROR  -  ")),
        "{}",
        lines[1]
    );
    assert!(lines[1].ends_with("héllo ✓\\nFORGED row"), "{}", lines[1]);
    assert!(
        lines[2].contains("nul\\x00inside  [1,\"x\"]"),
        "{}",
        lines[2]
    );
    let o = codi2(&sandbox, &["logs", "--hub", "--session", "s2"]);
    assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));
    assert!(
        stdout(&o).contains(&format!("{a:<12}  ERROR  1000  ")),
        "the uid as a number: {}",
        stdout(&o)
    );
}

#[test]
fn where_the_hub_is_and_who_asks_come_from_flags_environment_or_config() {
    let sandbox = Sandbox::new();
    let hub_dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(hub_dir.path());
    let host = format!("qc-{}", std::process::id());
    hub.insert(
        "logs",
        &[row(&host, 1, 1, "Info", "c", None, "hello", None)],
    );
    let count = |o: &Output| {
        assert!(o.status.success(), "{}", stderr(o));
        stdout(o)
    };
    // No hub anywhere: a usage error saying where to set one.
    sandbox.write_config("");
    let o = codi2(&sandbox, &["logs", "--hub"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no hub to ask"), "{}", stderr(&o));
    // The flag, then the environment.
    let o = codi2(
        &sandbox,
        &["logs", "--hub", "--hub-url", &hub.url, "--limit", "0"],
    );
    assert_eq!(count(&o), "1 matching logs\n");
    let o = sandbox
        .codi2()
        .args(["--config", sandbox.config().to_str().unwrap()])
        .args(["logs", "--hub", "--limit", "0"])
        .env("CODI_HUB_URL", &hub.url)
        .output()
        .unwrap();
    assert_eq!(count(&o), "1 matching logs\n");
    // The flag wins over the config.
    sandbox.write_config("[server_hub]\nurl = \"http://127.0.0.1:1\"\n");
    let o = codi2(
        &sandbox,
        &["logs", "--hub", "--hub-url", &hub.url, "--limit", "0"],
    );
    assert_eq!(count(&o), "1 matching logs\n");
    // Nothing listening: exit 3.
    let o = codi2(&sandbox, &["logs", "--hub"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot reach the hub at http://127.0.0.1:1"));

    // A password is sent (the test hub's `default` has none, so any
    // password is refused), and never shown.
    sandbox.write_config(&format!("[server_hub]\nurl = \"{}\"\n", hub.url));
    let secret = sandbox.path().join("hub-password");
    std::fs::write(&secret, "not-the-password\n").unwrap();
    std::fs::set_permissions(&secret, PermissionsExt::from_mode(0o644)).unwrap();
    let pw = secret.to_str().unwrap();
    let o = codi2(&sandbox, &["logs", "--hub", "--hub-password-file", pw]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("may be read by others"),
        "{}",
        stderr(&o)
    );
    std::fs::set_permissions(&secret, PermissionsExt::from_mode(0o600)).unwrap();
    let o = codi2(&sandbox, &["logs", "--hub", "--hub-password-file", pw]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the hub answered HTTP"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("not-the-password"), "{}", stderr(&o));
    let o = codi2(
        &sandbox,
        &["logs", "--hub", "--hub-user", "default", "--limit", "0"],
    );
    assert_eq!(
        count(&o),
        "1 matching logs\n",
        "the user alone, no password"
    );

    // Options that make no sense with or without --hub.
    for (args, why) in [
        (&["logs", "--host", "x"][..], "--host needs --hub"),
        (
            &["logs", "--hub-url", "http://h"][..],
            "--hub-url needs --hub",
        ),
        (
            &["logs", "--hub", "--follow"][..],
            "--follow does not work with --hub",
        ),
        (
            &["logs", "--hub", "--user", "root"][..],
            "--user does not work with --hub",
        ),
        (
            &["logs", "--hub", "--hub-url", "http://u:p@h/"][..],
            "must not hold a user",
        ),
    ] {
        let o = codi2(&sandbox, args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(why), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn a_row_stored_twice_on_the_hub_shows_once() {
    let sandbox = Sandbox::new();
    let hub_dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(hub_dir.path());
    let host = format!("qd-{}", std::process::id());
    let one = row(&host, 1, 1, "Info", "c", None, "first", None);
    let two = row(&host, 2, 2, "Info", "c", None, "second", None);
    // Two different blocks holding (host, 1): block deduplication keeps
    // both, so the hub stores the row twice until a merge (stopped here,
    // so that the copy is sure to be there).
    hub.stop_merges("logs");
    hub.insert("logs", std::slice::from_ref(&one));
    hub.insert("logs", &[one, two]);
    assert_eq!(
        hub.counts("logs", &host, false),
        Some((3, 2)),
        "the copy is stored (or this test proves nothing)"
    );
    sandbox.write_config(&format!("[server_hub]\nurl = \"{}\"\n", hub.url));
    let rows = json_rows(&sandbox, &[]);
    assert_eq!(keys(&rows), [(host.clone(), 1), (host.clone(), 2)]);
    let o = codi2(&sandbox, &["logs", "--hub", "--limit", "0"]);
    assert_eq!(stdout(&o), "2 matching logs\n", "{}", stderr(&o));
}
