//! `storage.retention_days` and `general.session_timeout` on the real
//! daemon: a store filled with rows from days ago (written straight into
//! the file before the daemon starts) loses them, its idle open session is
//! ended, while every log a client sends meanwhile stays queryable; and a
//! size cap rotates the oldest logs out of a store a client fills past it.

#[allow(dead_code)]
mod common;

use codi_monitor::proto::{LogFilter, LogLevel, Message, Payload, Timestamp};
use codi_monitor::store::schema;
use common::*;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::collections::HashSet;
use std::fs::{self, DirBuilder};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

const HOUR_US: i64 = 3_600_000_000;
const DAY_US: i64 = 24 * HOUR_US;
/// Rows written before the daemon starts, all three days old.
const OLD_LOGS: i64 = 2_500;

/// A main database without auto-vacuum (as every store made before it
/// was set), migrated, with [`OLD_LOGS`] old logs, an old ended session,
/// two open sessions started two hours ago (one with a log just now), and
/// an old export row with its archive file; the archive file's path.
fn fill_old_store(db: &Path) -> PathBuf {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(db.parent().unwrap())
        .unwrap();
    // WAL mode writes the first page: the file keeps auto_vacuum NONE.
    Connection::open(db)
        .unwrap()
        .pragma_update(None, "journal_mode", "WAL")
        .unwrap();
    drop(schema::open_rw(db, 4).unwrap());
    let mut conn = Connection::open(db).unwrap();
    let now = Timestamp::now().as_micros();
    let old = now - 3 * DAY_US;
    let tx = conn.transaction().unwrap();
    for id in 1..=OLD_LOGS {
        tx.execute(
            "INSERT INTO logs (id, uuid, timestamp, level, component, session_id, message, \
             created_at) VALUES (?1, ?2, ?3, 'Info', 'old', 'gone', ?4, ?3)",
            params![
                id,
                Uuid::from_u128(id as u128).as_bytes(),
                old,
                format!("old {id} {}", "x".repeat(300))
            ],
        )
        .unwrap();
    }
    let sessions: [(&str, i64, Option<i64>); 3] = [
        ("gone", old - DAY_US, Some(old)),
        ("idle", now - 2 * HOUR_US, None),
        ("live", now - 2 * HOUR_US, None),
    ];
    for (id, started, ended) in sessions {
        tx.execute(
            "INSERT INTO sessions (id, identity, started_at, recorded_at, ended_at) \
             VALUES (?1, 'me', ?2, ?2, ?3)",
            params![id, started, ended],
        )
        .unwrap();
    }
    tx.execute(
        "INSERT INTO logs (id, uuid, timestamp, level, component, session_id, message, \
         created_at) VALUES (?1, ?2, ?3, 'Info', 'live', 'live', 'still here', ?3)",
        params![OLD_LOGS + 1, Uuid::from_u128(u128::MAX).as_bytes(), now],
    )
    .unwrap();
    let archive = db.parent().unwrap().join("archive");
    let file = archive.join("2020/01/01/no-session/aa/aaaaaaaaaaaaaaaa-old.md");
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(file.parent().unwrap())
        .unwrap();
    fs::write(&file, b"# old export\n").unwrap();
    let file = fs::canonicalize(file).unwrap();
    tx.execute(
        "INSERT INTO export_archive (original_path, archive_path, content_hash, file_size, \
         archived_at_us) VALUES ('/src/old.md', ?1, 'aaaa', 13, ?2)",
        params![file.to_string_lossy(), old],
    )
    .unwrap();
    tx.commit().unwrap();
    file
}

/// A read-only look at the main database.
fn main_db(db: &Path) -> Connection {
    Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
}

fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// `ended_at IS NOT NULL` and `end_reason` of session `id`, if it exists.
fn session_end(conn: &Connection, id: &str) -> Option<(bool, Option<String>)> {
    conn.query_row(
        "SELECT ended_at IS NOT NULL, end_reason FROM sessions WHERE id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
    .unwrap()
}

#[test]
fn old_rows_expire_idle_sessions_end_and_every_new_log_stays() {
    let sandbox = Sandbox::new();
    let archived = fill_old_store(&sandbox.db());
    sandbox.write_config("[general]\nsession_timeout = \"1h\"\n[storage]\nretention_days = 1\n");
    let d = Daemon::start(sandbox.clone(), Opts::default().with_config());
    let mut c = d.unix();
    c.expect_accepted(&Message::new(Payload::SessionStart {
        session_id: "fresh".into(),
        identity: "me".into(),
        agent_type: None,
        workspace: None,
    }));
    let mut sent = HashSet::new();
    for i in 0..600 {
        let mut fields = fields(LogLevel::Info, "new", &format!("new {i}"));
        fields.session_id = Some(if i % 2 == 0 { "live" } else { "fresh" }.into());
        let msg = Message::new(Payload::LogEntry(fields));
        c.expect_accepted(&msg);
        sent.insert(msg.id);
    }

    let db = sandbox.db();
    let gone = wait_until(Duration::from_secs(60), || {
        let conn = main_db(&db);
        count(&conn, "SELECT count(*) FROM logs WHERE component = 'old'") == 0
            && count(&conn, "SELECT count(*) FROM export_archive") == 0
            && session_end(&conn, "idle").is_some_and(|(ended, _)| ended)
    });
    assert!(gone, "old rows still there:\n{}", d.stderr());
    let conn = main_db(&db);
    assert_eq!(
        session_end(&conn, "gone"),
        None,
        "old ended session deleted"
    );
    assert_eq!(
        session_end(&conn, "idle"),
        Some((true, Some("timeout".into())))
    );
    assert_eq!(session_end(&conn, "live"), Some((false, None)), "active");
    assert_eq!(session_end(&conn, "fresh"), Some((false, None)));
    assert!(!archived.exists(), "the archive file no row references");
    assert!(
        !archived.parent().unwrap().exists(),
        "and its emptied directory"
    );

    // Every acknowledged log is still there, and queryable.
    let answer = c.request(&Message::new(Payload::QueryLogs {
        filter: LogFilter {
            component: Some("new".into()),
            ..LogFilter::default()
        },
        limit: 10_000,
    }));
    let Payload::LogResults { entries, .. } = &answer.payload else {
        panic!("expected LogResults, got {answer:?}");
    };
    let found: HashSet<Uuid> = entries.iter().map(|e| e.uuid).collect();
    assert_eq!(found, sent);
    assert_eq!(
        d.db().count_logs(),
        600 + 1,
        "the new logs and the live one"
    );

    let metrics = d.http_get("/metrics").text();
    assert_eq!(series(&metrics, "codi_logs_expired_total"), OLD_LOGS as f64);
    assert_eq!(series(&metrics, "codi_sessions_expired_total"), 1.0);
    assert_eq!(series(&metrics, "codi_exports_expired_total"), 1.0);
    assert_eq!(series(&metrics, "codi_sessions_timed_out_total"), 1.0);
    let log = d.stderr();
    assert!(
        log.contains("to incremental auto-vacuum with a one-time VACUUM"),
        "{log}"
    );
    assert!(log.contains("retention deleted "), "{log}");
    assert!(log.contains("ended 1 session(s) without activity"), "{log}");
    let mode: i64 = conn
        .pragma_query_value(None, "auto_vacuum", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, 2, "converted at start");
}

#[test]
fn without_retention_old_rows_stay_but_idle_sessions_still_end() {
    let sandbox = Sandbox::new();
    let archived = fill_old_store(&sandbox.db());
    sandbox.write_config("[general]\nsession_timeout = \"1h\"\n");
    let d = Daemon::start(sandbox.clone(), Opts::default().with_config());
    let db = sandbox.db();
    let ended = wait_until(Duration::from_secs(60), || {
        session_end(&main_db(&db), "idle").is_some_and(|(ended, _)| ended)
    });
    assert!(ended, "idle session still open:\n{}", d.stderr());
    // Nothing is deleted by age without storage.retention_days.
    let conn = main_db(&db);
    assert_eq!(
        count(&conn, "SELECT count(*) FROM logs WHERE component = 'old'"),
        OLD_LOGS
    );
    assert!(session_end(&conn, "gone").is_some());
    assert!(archived.is_file());
    let mode: i64 = conn
        .pragma_query_value(None, "auto_vacuum", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, 0, "no VACUUM without retention");
}

/// The main database's used bytes (`(page_count - freelist_count) *
/// page_size`) and its pages' bytes.
fn db_size(db: &Path) -> (i64, i64) {
    let conn = main_db(db);
    let pragma = |name: &str| -> i64 { conn.pragma_query_value(None, name, |r| r.get(0)).unwrap() };
    let (page, pages) = (pragma("page_size"), pragma("page_count"));
    ((pages - pragma("freelist_count")) * page, pages * page)
}

#[test]
fn a_size_cap_rotates_the_oldest_logs_out_and_keeps_every_other() {
    const CAP: i64 = 2 << 20;
    const BATCHES: usize = 40;
    const PER_BATCH: usize = 500;
    let sandbox = Sandbox::new();
    // The host's disk plays no part: no free-space threshold.
    sandbox.write_config(
        "[storage]\nmax_db_size_mb = 2\n[health]\ndisk_min_free_mb = 0\n\
         disk_min_free_percent = 0\n",
    );
    let d = Daemon::start(sandbox.clone(), Opts::default().with_config());
    let mut c = d.unix();
    // About 9 MiB of logs, four times the cap and more.
    let mut sent = Vec::new();
    for b in 0..BATCHES {
        let entries: Vec<_> = (0..PER_BATCH)
            .map(|i| {
                let text = format!("cap {b}-{i} {}", "x".repeat(400));
                sent.push(text.clone());
                fields(LogLevel::Info, "cap", &text)
            })
            .collect();
        c.expect_accepted(&Message::new(Payload::LogBatch { entries }));
    }

    // Once the merger has caught up, rotation brings the database under
    // the cap and gives the pages back.
    let db = sandbox.db();
    let bounded = wait_until(Duration::from_secs(120), || {
        let (used, pages) = db_size(&db);
        d.db().count_logs() < sent.len() as i64 && used <= CAP && pages <= CAP
    });
    assert!(bounded, "still {:?}:\n{}", db_size(&db), d.stderr());
    let metrics = d.http_get("/metrics").text();
    let rotated = series(&metrics, "codi_logs_rotated_total{reason=\"cap\"}") as usize;
    assert!(rotated > sent.len() / 2, "{rotated} of {}", sent.len());

    // What is left is exactly the newest logs, every one queryable.
    let mut found = Vec::new();
    let mut after = 0;
    loop {
        let answer = c.request(&Message::new(Payload::QueryLogs {
            filter: LogFilter {
                component: Some("cap".into()),
                after_id: Some(after),
                ..LogFilter::default()
            },
            limit: 500,
        }));
        let Payload::LogResults { entries, .. } = answer.payload else {
            panic!("expected LogResults, got {answer:?}");
        };
        let Some(last) = entries.last() else { break };
        after = last.id;
        found.extend(entries.into_iter().map(|e| e.message));
    }
    assert_eq!(
        found.len() + rotated,
        sent.len(),
        "each log rotated or kept"
    );
    assert_eq!(found, sent[rotated..], "the oldest went, in order");
    assert_eq!(d.db().count_logs(), found.len() as i64);

    let log = d.stderr();
    assert!(log.contains("rotation deleted the "), "{log}");
    assert!(
        log.contains("for the size cap (storage.max_db_size_mb = 2 MiB)"),
        "{log}"
    );
}
