//! The test ClickHouse hub of `scripts/hub` (docs/HUB.md): clickhouse-server
//! and ZooKeeper on loopback, 2 shards x 2 replicas, installed by the
//! script itself when missing. Not every test binary that includes `common`
//! uses it.
#![allow(dead_code)]

use super::{wait_until, Daemon};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A test hub in its own directory; stopped when dropped.
pub struct Hub {
    dir: PathBuf,
    /// Its HTTP interface, `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Hub {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/hub")
    }

    fn run(args: &[&str]) {
        let out = Command::new("bash")
            .arg(Self::script())
            .args(args)
            .output()
            .expect("run scripts/hub");
        assert!(
            out.status.success(),
            "scripts/hub {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts a hub with its schema in `dir` (its own directory: as root,
    /// scripts/hub hands it to the clickhouse user).
    pub fn start(dir: &Path) -> Hub {
        let d = dir.to_str().unwrap();
        Self::run(&["start", d]);
        Self::run(&["schema", d]);
        let url = std::fs::read_to_string(dir.join("url"))
            .unwrap()
            .trim()
            .to_owned();
        Hub {
            dir: dir.to_owned(),
            url,
        }
    }

    /// Stops both servers.
    pub fn stop(&self) {
        Self::run(&["stop", self.dir.to_str().unwrap()]);
    }

    /// Starts both servers again, on the same ports and data.
    pub fn restart(&self) {
        Self::run(&["start", self.dir.to_str().unwrap()]);
    }

    /// The answer to `sql` (a read-only query, sent as a GET), or the
    /// hub's error.
    pub fn query(&self, sql: &str) -> Result<String, String> {
        let answer = agent()
            .get(&format!("{}/", self.url))
            .query("query", sql)
            .call();
        match answer {
            Ok(r) => r.into_string().map_err(|e| e.to_string()),
            Err(ureq::Error::Status(code, r)) => Err(format!(
                "HTTP {code}: {}",
                r.into_string().unwrap_or_default()
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Inserts `rows` (one JSON object each) into the Distributed table
    /// `codi.<table>` as one block, answered once the shards have it.
    pub fn insert(&self, table: &str, rows: &[serde_json::Value]) {
        let body: String = rows.iter().map(|r| format!("{r}\n")).collect();
        let query = format!("INSERT INTO codi.{table} FORMAT JSONEachRow");
        let answer = agent()
            .post(&format!("{}/", self.url))
            .query("insert_distributed_sync", "1")
            .query("query", &query)
            .send_string(&body);
        if let Err(e) = answer {
            let text = match e {
                ureq::Error::Status(code, r) => {
                    format!("HTTP {code}: {}", r.into_string().unwrap_or_default())
                }
                e => e.to_string(),
            };
            panic!("insert into codi.{table}: {text}");
        }
    }

    /// Stops background merges of `table` on every replica, so that rows
    /// stored twice stay stored twice.
    pub fn stop_merges(&self, table: &str) {
        for replica in ["s1r1", "s1r2", "s2r1", "s2r2"] {
            let sql = format!("SYSTEM STOP MERGES codi_{replica}.{table}");
            let answer = agent().post(&format!("{}/", self.url)).send_string(&sql);
            assert!(answer.is_ok(), "{sql}: {answer:?}");
        }
    }

    /// `SELECT count(), uniqExact(host_id, id)` of `host`'s rows of
    /// `table` through the Distributed table, with `FINAL` (duplicates by
    /// key merged away) or without (every row stored: a re-sent batch the
    /// hub did not drop shows here).
    pub fn counts(&self, table: &str, host: &str, fin: bool) -> Option<(u64, u64)> {
        let fin = if fin { " FINAL" } else { "" };
        assert!(!host.contains(['\'', '\\']), "a plain host name");
        let sql = format!(
            "SELECT count(), uniqExact(host_id, id) FROM codi.{table}{fin} \
             WHERE host_id = '{host}' FORMAT TSV"
        );
        let text = match self.query(&sql) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("hub query: {e}");
                return None;
            }
        };
        let mut it = text.split_whitespace().map(|n| n.parse().ok());
        Some((it.next()??, it.next()??))
    }

    /// Waits until the hub holds `want` of `host`'s rows of `table`
    /// (`FINAL`); then checks that it holds each once, also without
    /// `FINAL` for a table whose rows never change (for sessions, a start
    /// and its end sent in two batches are two rows until a merge).
    pub fn expect_once(&self, table: &str, host: &str, want: u64, d: &Daemon) {
        let mut counts = None;
        let caught_up = wait_until(Duration::from_secs(120), || {
            counts = self.counts(table, host, true);
            counts.is_some_and(|(n, _)| n >= want)
        });
        assert!(
            caught_up,
            "the hub has {counts:?} of {want} {table}:\n{}",
            d.stderr()
        );
        assert_eq!(
            counts,
            Some((want, want)),
            "each of {table} once on the hub"
        );
        if table == "sessions" {
            return;
        }
        let unmerged = self.counts(table, host, false);
        if unmerged != Some((want, want)) {
            let twice = self.query(&format!(
                "SELECT id, count() AS n, groupArray(_part) FROM codi.{table} \
                 WHERE host_id = '{host}' GROUP BY id HAVING n > 1 ORDER BY id LIMIT 20 FORMAT TSV"
            ));
            panic!(
                "no batch of {table} stored twice, even before ClickHouse merges (every re-send \
                 dropped): {unmerged:?} of {want}; ids stored twice: {twice:?}\n{}",
                d.stderr()
            );
        }
    }

    /// Waits until the hub's last state of `host`'s sessions has `want`
    /// ended ones.
    pub fn expect_ended(&self, host: &str, want: u64, d: &Daemon) {
        let ended = || {
            self.query(&format!(
                "SELECT countIf(ended_at IS NOT NULL) FROM codi.sessions FINAL \
                 WHERE host_id = '{host}' FORMAT TSV"
            ))
            .ok()
        };
        let want_text = format!("{want}\n");
        assert!(
            wait_until(Duration::from_secs(30), || ended().as_deref()
                == Some(want_text.as_str())),
            "the hub has {:?} ended sessions, not {want}, the later state of each:\n{}",
            ended(),
            d.stderr()
        );
    }
}

/// An HTTP client that gives up after 30 s, so that a stuck hub fails a
/// test instead of hanging it.
fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build()
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(Self::script())
            .args(["stop", self.dir.to_str().unwrap()])
            .output();
    }
}
