//! Integration tests of `codi-loadgen`: the real binary against a real
//! daemon for about a second, checking that it exits 0 and that its JSON
//! says every acknowledged log is stored. No assertion depends on timing.

#[allow(dead_code)]
mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn loadgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_codi-loadgen"))
        .env("CODI_MONITOR_TOKEN", TEST_TOKEN)
        .args(args)
        .output()
        .expect("run codi-loadgen")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("json written")).expect("json")
}

fn assert_stored_equals_acked(out: &Output, json: &Value) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "codi-loadgen failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("STORED == ACKED"), "{stdout}");
    let acked = json["counts"]["entries_accepted"].as_u64().unwrap();
    assert!(acked > 0, "nothing acknowledged: {json}");
    assert_eq!(json["stored"].as_u64(), Some(acked), "{json}");
    assert_eq!(json["stored_equals_acked"], Value::Bool(true));
    assert_eq!(json["counts"]["protocol_errors"], 0);
}

#[test]
fn open_loop_over_unix_with_batches_pings_and_queries_stores_what_it_acks() {
    let daemon = Daemon::start_default();
    let dir = daemon.sandbox.path();
    let json_path = dir.join("result.json");
    let hist_dir = dir.join("hist");
    let socket = daemon.socket().to_str().unwrap().to_owned();
    let db = daemon.db_path().to_str().unwrap().to_owned();
    let pid = daemon.pid().to_string();
    let out = loadgen(&[
        "run",
        "--socket",
        &socket,
        "--db",
        &db,
        "--clients",
        "8",
        "--rate",
        "400",
        "--batch",
        "4",
        "--duration",
        "1",
        "--ping-rate",
        "20",
        "--query-interval",
        "250",
        "--idle",
        "3",
        "--daemon-pid",
        &pid,
        "--json",
        json_path.to_str().unwrap(),
        "--hist-dir",
        hist_dir.to_str().unwrap(),
        "--quiet",
    ]);
    let json = read_json(&json_path);
    assert_stored_equals_acked(&out, &json);
    assert_eq!(
        json["counts"]["entries_accepted"].as_u64().unwrap() % 4,
        0,
        "whole batches"
    );
    assert!(json["counts"]["pings_answered"].as_u64().unwrap() > 0);
    assert!(json["counts"]["queries_answered"].as_u64().unwrap() > 0);
    assert!(json["daemon"]["peak_rss_kib"].as_u64().unwrap() > 0);
    for name in ["ack", "service", "ping", "query"] {
        assert!(hist_dir.join(format!("{name}.hgrm")).exists());
        assert!(hist_dir.join(format!("{name}.hlog")).exists());
    }
}

#[test]
fn closed_loop_over_tcp_then_ceiling_beside_the_database() {
    let daemon = Daemon::start_default();
    let json_path = daemon.sandbox.path().join("result.json");
    let tcp = daemon.tcp_addr().to_string();
    let db = daemon.db_path().to_str().unwrap().to_owned();
    let out = loadgen(&[
        "run",
        "--tcp",
        &tcp,
        "--db",
        &db,
        "--clients",
        "4",
        "--rate",
        "0",
        "--window",
        "2",
        "--duration",
        "0.5",
        "--ceiling-rows",
        "2000",
        "--ceiling-batch",
        "500",
        "--json",
        json_path.to_str().unwrap(),
        "--quiet",
    ]);
    let json = read_json(&json_path);
    assert_stored_equals_acked(&out, &json);
    assert_eq!(json["config"]["transport"], "tcp");
    assert_eq!(json["ceiling"]["rows"], 2000);
    assert!(json["daemon_over_ceiling"].as_f64().unwrap() > 0.0);
    // The ceiling's temporary database is gone.
    let leftovers: Vec<_> = std::fs::read_dir(daemon.db_path().parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("ceiling"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn refuses_a_non_loopback_address_and_bad_bounds() {
    let out = loadgen(&["run", "--tcp", "192.0.2.1:9847"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
    let out = loadgen(&["run", "--socket", "/nonexistent", "--clients", "20000"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn files_mode_finds_every_export_archived_once_and_measures_the_ceiling() {
    let daemon = Daemon::start_default();
    let dir = daemon.sandbox.path();
    let tree = dir.join("trees");
    std::fs::create_dir(&tree).unwrap();
    let json_path = dir.join("files.json");
    let out = loadgen(&[
        "files",
        "--socket",
        daemon.socket().to_str().unwrap(),
        "--db",
        daemon.db_path().to_str().unwrap(),
        "--dir",
        tree.to_str().unwrap(),
        "--rate",
        "200",
        "--duration",
        "1",
        "--subdirs",
        "3",
        "--ceiling",
        "--daemon-pid",
        &daemon.pid().to_string(),
        "--json",
        json_path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "codi-loadgen files failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ALL ONCE"), "{stdout}");
    let json = read_json(&json_path);
    assert_eq!(json["exports"], 200, "{json}");
    assert_eq!(json["archived"], 200, "{json}");
    assert_eq!(json["duplicates"], 0, "{json}");
    assert_eq!(json["unexpected"], 0, "{json}");
    assert!(json["ceiling_per_sec"].as_f64().unwrap() > 0.0, "{json}");
    assert!(json["daemon_cpu_s"].as_f64().is_some(), "{json}");
    // Without --keep, both trees are gone and the watch is stopped.
    assert_eq!(std::fs::read_dir(&tree).unwrap().count(), 0);
    let db = rusqlite::Connection::open(daemon.db_path()).unwrap();
    let watches: i64 = db
        .query_row("SELECT count(*) FROM monitored_paths", [], |r| r.get(0))
        .unwrap();
    assert_eq!(watches, 0);
}
