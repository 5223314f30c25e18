//! `codi-monitor verify` and `codi-monitor backup` on real files written by
//! the real daemon: a good store, a damaged one, a tampered archive, and a
//! backup taken while a client keeps logging, restored into a new daemon.

#[allow(dead_code)]
mod common;

use codi_monitor::proto::{LogFilter, LogLevel, Message, Payload};
use common::*;
use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// `codi-monitor` with `args`, run to completion.
fn monitor(args: &[&std::ffi::OsStr]) -> Output {
    let mut cmd = Command::new(daemon_binary());
    cmd.args(args);
    run(cmd)
}

/// `codi-monitor verify --db <db>`: exit code and stdout.
fn verify(db: &Path) -> (i32, String) {
    let out = monitor(&["verify".as_ref(), "--db".as_ref(), db.as_os_str()]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().expect("exited"), text)
}

/// Logs `n` entries on `c`, each acknowledged; their ids.
fn log_many(c: &mut Client, n: usize, tag: &str) -> Vec<Uuid> {
    (0..n)
        .map(|i| {
            let msg = log(
                LogLevel::Info,
                "recovery",
                &format!("{tag} {i} {}", "x".repeat(200)),
            );
            c.expect_accepted(&msg);
            msg.id
        })
        .collect()
}

/// Watches a fresh directory, writes one export into it and waits until it
/// is archived; the archived copy's path.
fn archive_one(d: &Daemon) -> PathBuf {
    let work = fs::canonicalize({
        let dir = d.sandbox.path().join("work");
        fs::create_dir_all(&dir).unwrap();
        dir
    })
    .unwrap();
    let msg = Message::new(Payload::StartMonitoring {
        path: work.display().to_string(),
        recursive: true,
        patterns: vec!["*.md".into()],
        session_id: None,
    });
    d.unix().expect_accepted(&msg);
    fs::write(work.join("report.md"), b"# the report\n").unwrap();
    let db = d.db();
    let mut archived = None;
    let found = wait_until(Duration::from_secs(20), || {
        archived = db
            .snapshot()
            .query_row(
                "SELECT archive_path FROM export_archive WHERE error IS NULL",
                [],
                |r| r.get::<_, String>(0),
            )
            .ok();
        archived.is_some()
    });
    assert!(found, "export not archived:\n{}", d.stderr());
    PathBuf::from(archived.unwrap())
}

/// Stops `d` cleanly (SIGTERM, drained).
fn stop(mut d: Daemon) -> Arc<Sandbox> {
    d.terminate();
    assert!(d.wait_exit().success(), "{}", d.stderr());
    d.sandbox.clone()
}

/// Pages of `db`'s `logs` table that hold rows.
fn log_leaf_pages(db: &Path) -> Vec<i64> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT pageno FROM dbstat WHERE name = 'logs' AND pagetype = 'leaf'")
        .unwrap();
    let pages = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    pages
}

#[test]
fn verify_passes_a_used_store_and_names_a_tampered_archive_and_a_damaged_file() {
    let d = Daemon::start_default();
    let mut c = d.unix();
    log_many(&mut c, 1500, "kept");
    let archived = archive_one(&d);
    let db = d.db_path().to_owned();
    let (code, text) = verify(&db);
    assert_eq!(code, 0, "while the daemon runs:\n{text}");
    drop(c);
    let sandbox = stop(d);
    let (code, text) = verify(&db);
    assert_eq!(code, 0, "after a clean stop:\n{text}");
    assert!(text.contains("OK   archived exports: 1 files"), "{text}");
    assert!(text.contains("all 10 checks passed"), "{text}");

    // A tampered archive: same size, one byte changed.
    let original = fs::read(&archived).unwrap();
    fs::set_permissions(&archived, fs::Permissions::from_mode(0o600)).unwrap();
    let mut tampered = original.clone();
    tampered[2] ^= 0x20;
    fs::write(&archived, &tampered).unwrap();
    let (code, text) = verify(&db);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("FAIL archived exports: 1 of 1 files"),
        "{text}"
    );
    assert!(text.contains("SHA-256"), "{text}");
    fs::write(&archived, &original).unwrap();
    assert_eq!(verify(&db).0, 0);

    // Garbage over some of the pages holding logs.
    let pages = log_leaf_pages(&db);
    assert!(pages.len() > 20, "{} leaf pages", pages.len());
    let file = fs::OpenOptions::new().write(true).open(&db).unwrap();
    for &page in &pages[pages.len() / 2..pages.len() / 2 + 3] {
        file.write_all_at(&[0xa5; 4096], (page as u64 - 1) * 4096)
            .unwrap();
    }
    file.sync_all().unwrap();
    let (code, text) = verify(&db);
    assert_eq!(code, 1, "{text}");
    eprintln!("{text}");
    assert!(
        text.contains(&format!("FAIL {} quick_check", db.display())),
        "{text}"
    );
    drop(sandbox);
}

#[test]
fn verify_cannot_open_a_missing_database() {
    let sandbox = Sandbox::new();
    let (code, text) = verify(&sandbox.db());
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("No such file"), "{text}");
}

#[test]
fn a_backup_under_load_verifies_holds_every_earlier_log_and_restores() {
    let d = Daemon::start_default();
    let mut c = d.unix();
    let before = log_many(&mut c, 3000, "before");

    let stop_logging = Arc::new(AtomicBool::new(false));
    let mut busy = d.unix();
    let flag = stop_logging.clone();
    let logger = thread::spawn(move || {
        let mut n = 0;
        while !flag.load(Ordering::Relaxed) {
            log_many(&mut busy, 50, "during");
            n += 50;
        }
        n
    });
    thread::sleep(Duration::from_millis(300));
    let dest = d.sandbox.path().join("backup");
    let started = Instant::now();
    let out = monitor(&[
        "backup".as_ref(),
        dest.as_os_str(),
        "--db".as_ref(),
        d.db_path().as_os_str(),
    ]);
    let took = started.elapsed();
    stop_logging.store(true, Ordering::Relaxed);
    let during = logger.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "backup of {} logs (+{during} logged meanwhile) took {took:?}:\n{stdout}",
        before.len()
    );
    assert!(during > 0, "the client kept logging");
    let copy = dest.join("codi.db");
    assert!(
        stdout.contains(&format!("wrote {}", copy.display())),
        "{stdout}"
    );

    // A second backup into the same place is refused.
    let again = monitor(&[
        "backup".as_ref(),
        dest.as_os_str(),
        "--db".as_ref(),
        d.db_path().as_os_str(),
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let (code, text) = verify(&copy);
    assert_eq!(code, 0, "{text}");
    let counts = Db::open(&copy).uuid_counts();
    for id in &before {
        assert_eq!(counts.get(id), Some(&1), "{id} in the backup once");
    }
    drop(c);
    let old = stop(d);

    // Restore into a fresh state directory: the new daemon serves them.
    let fresh = Sandbox::new();
    let data = fresh.db().parent().unwrap().to_owned();
    fs::create_dir_all(&data).unwrap();
    fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).unwrap();
    for name in ["codi.db", "codi.db-ingest"] {
        fs::copy(dest.join(name), data.join(name)).unwrap();
    }
    let restored = Daemon::start(fresh, Opts::default());
    let answer = restored.unix().call(Payload::QueryLogs {
        filter: LogFilter::default(),
        limit: 1,
    });
    let Payload::LogResults { total_count, .. } = answer.payload else {
        panic!("expected LogResults, got {answer:?}");
    };
    assert!(
        total_count >= before.len() as u64,
        "{total_count} logs served"
    );
    assert_eq!(total_count as usize, counts.len(), "each once");
    let served = restored.db().uuids();
    assert!(before.iter().all(|id| served.contains(id)));
    drop(old);
}

/// A stopped store with `merged` logs in `logs` (sent to a daemon, which
/// merged them before it stopped) and `unmerged` more in the ingest file
/// only (as `codi2` writes them with no daemon): their uuids.
fn used_store(merged: usize, unmerged: usize) -> (Arc<Sandbox>, Vec<Uuid>, Vec<Uuid>) {
    let d = Daemon::start_default();
    let mut c = d.unix();
    let merged = log_many(&mut c, merged, "merged");
    drop(c);
    let sandbox = stop(d);
    let db = sandbox.db();
    let conn = rusqlite::Connection::open(codi_monitor::store::schema::ingest_path(&db)).unwrap();
    conn.execute("ATTACH DATABASE ?1 AS store", [db.to_str().unwrap()])
        .unwrap();
    let top: i64 = conn
        .query_row("SELECT max(id) FROM store.logs", [], |r| r.get(0))
        .unwrap();
    let mut added = Vec::new();
    for i in 0..unmerged {
        let id = Uuid::now_v7();
        conn.execute(
            "INSERT INTO ingest_logs (id, uuid, timestamp, level, component, session_id, \
             message, metadata, created_at, uid) SELECT ?1, ?2, timestamp, level, component, \
             session_id, 'unmerged ' || ?3 || ' ' || message, metadata, created_at, uid \
             FROM store.logs LIMIT 1",
            rusqlite::params![top + 1 + i as i64, id.as_bytes().to_vec(), i as i64],
        )
        .unwrap();
        added.push(id);
    }
    (sandbox, merged, added)
}

/// Pages of table or index `name` of the SQLite file at `path`, of
/// `pagetype` (`leaf`, `internal`).
fn pages_of(path: &Path, name: &str, pagetype: &str) -> Vec<i64> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT pageno FROM dbstat WHERE name = ?1 AND pagetype = ?2 ORDER BY pageno")
        .unwrap();
    let pages = stmt
        .query_map([name, pagetype], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    pages
}

/// Garbage over `count` pages of `pages` from its middle on, in `path`.
fn overwrite_pages(path: &Path, pages: &[i64], count: usize) {
    assert!(pages.len() > count, "{} pages", pages.len());
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    for &page in &pages[pages.len() / 2..pages.len() / 2 + count] {
        file.write_all_at(&[0xa5; 4096], (page as u64 - 1) * 4096)
            .unwrap();
    }
    file.sync_all().unwrap();
}

/// The storage component's message in `d`'s status.
fn storage_message(d: &Daemon) -> String {
    d.codi2_status_json().1["components"]["storage"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Starts a daemon on `sandbox`'s damaged store and waits until its
/// status says the salvage is done.
fn start_and_await_salvage(sandbox: Arc<Sandbox>) -> Daemon {
    let d = Daemon::start(sandbox, Opts::default());
    let mut message = String::new();
    let done = wait_until(Duration::from_secs(60), || {
        message = storage_message(&d);
        message.contains(" salvaged, up to ")
    });
    assert!(
        done,
        "no finished salvage in the status: {message}\n{}",
        d.stderr()
    );
    d
}

/// What a recovery test checks after the salvage: every uuid of `kept` is
/// stored once, at most `max_lost` of `maybe_lost` are missing, nothing is
/// stored twice, a new log is accepted with an id above every old one, the
/// log names the damaged file, and acknowledging clears the status.
fn check_recovered(
    d: &Daemon,
    kept: &[Uuid],
    maybe_lost: &[Uuid],
    max_lost: usize,
    in_place: usize,
) -> usize {
    let counts = d.db().uuid_counts();
    assert!(counts.values().all(|&n| n == 1), "a log stored twice");
    for id in kept {
        assert_eq!(counts.get(id), Some(&1), "{id} lost:\n{}", d.stderr());
    }
    let lost = maybe_lost
        .iter()
        .filter(|id| !counts.contains_key(id))
        .count();
    assert!(
        lost <= max_lost,
        "{lost} logs lost (at most {max_lost} expected)"
    );
    let message = storage_message(d);
    let reported: usize = message
        .split(" logs (")
        .filter_map(|before| before.rsplit(' ').next()?.parse::<usize>().ok())
        .sum();
    assert_eq!(
        reported,
        counts.len() - in_place,
        "the status counts the salvaged logs: {message}"
    );
    let stderr = d.stderr();
    assert!(
        stderr.contains("is damaged (") && stderr.contains("recovery finished: "),
        "{stderr}"
    );
    let old_max: i64 = d
        .db()
        .snapshot()
        .query_row("SELECT max(id) FROM all_logs", [], |r| r.get(0))
        .unwrap();
    let mut c = d.unix();
    let new = log_many(&mut c, 1, "after")[0];
    let new_id: i64 = d
        .db()
        .snapshot()
        .query_row(
            "SELECT id FROM all_logs WHERE uuid = ?1",
            [new.as_bytes().to_vec()],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        new_id > old_max + (1 << 31),
        "new id {new_id} after {old_max}"
    );

    let out = monitor(&[
        "recover".as_ref(),
        "--acknowledge".as_ref(),
        "--db".as_ref(),
        d.db_path().as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut message = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            message = storage_message(d);
            !message.contains("salvaged")
        }),
        "still reported after the acknowledgment: {message}"
    );
    lost
}

#[test]
fn overwritten_pages_of_logs_are_moved_aside_and_the_rest_salvaged() {
    let (sandbox, merged, unmerged) = used_store(3000, 500);
    let db = sandbox.db();
    overwrite_pages(&db, &pages_of(&db, "logs", "leaf"), 3);
    let d = start_and_await_salvage(sandbox);
    // A 4 KiB leaf holds about a dozen of these rows.
    let lost = check_recovered(&d, &unmerged, &merged, 3 * 20, 0);
    eprintln!("lost {lost} of {} merged logs", merged.len());
    let moved: Vec<String> = fs::read_dir(db.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        moved.iter().any(|n| n.starts_with("codi.db.corrupt.")),
        "{moved:?}"
    );
    assert!(
        moved
            .iter()
            .any(|n| n.starts_with("codi.db-ingest.salvage.")),
        "{moved:?}"
    );
}

#[test]
fn an_overwritten_page_of_the_uuid_index_loses_nothing() {
    let (sandbox, merged, unmerged) = used_store(3000, 100);
    let db = sandbox.db();
    overwrite_pages(&db, &pages_of(&db, "idx_logs_uuid", "leaf"), 1);
    let d = start_and_await_salvage(sandbox);
    let all: Vec<Uuid> = merged.iter().chain(&unmerged).copied().collect();
    check_recovered(&d, &all, &[], 0, 0);
}

#[test]
fn overwritten_pages_of_the_ingest_file_keep_the_main_database() {
    let (sandbox, merged, unmerged) = used_store(200, 5000);
    let ingest = codi_monitor::store::schema::ingest_path(&sandbox.db());
    overwrite_pages(&ingest, &pages_of(&ingest, "ingest_logs", "leaf"), 3);
    let d = start_and_await_salvage(sandbox);
    let lost = check_recovered(&d, &merged, &unmerged, 3 * 20, merged.len());
    eprintln!("lost {lost} of {} unmerged logs", unmerged.len());
}

#[test]
fn a_file_that_is_not_sqlite_or_is_empty_is_replaced_and_the_ingest_rows_salvaged() {
    for damage in ["not sqlite", "empty"] {
        let (sandbox, merged, unmerged) = used_store(300, 300);
        let db = sandbox.db();
        let text: &[u8] = if damage == "empty" {
            b""
        } else {
            b"this is not a database\n"
        };
        fs::write(&db, text).unwrap();
        let d = start_and_await_salvage(sandbox);
        // The merged rows went with the file (the ingest file had let
        // them go once they were durable in it).
        check_recovered(&d, &unmerged, &merged, merged.len(), 0);
    }
    // An emptied ingest file: its unmerged rows are gone, the main
    // database stays in place, and new ids start above the lost ones.
    let (sandbox, merged, unmerged) = used_store(300, 300);
    fs::write(codi_monitor::store::schema::ingest_path(&sandbox.db()), b"").unwrap();
    let d = start_and_await_salvage(sandbox);
    check_recovered(&d, &merged, &unmerged, unmerged.len(), merged.len());
}

#[test]
fn a_truncated_wal_or_a_deleted_shm_is_no_damage_and_loses_no_acknowledged_log() {
    let d = Daemon::start_default();
    let mut c = d.unix();
    let acked = log_many(&mut c, 2000, "acked");
    drop(c);
    let mut d = d;
    d.kill9();
    let sandbox = d.sandbox.clone();
    drop(d);
    let db = sandbox.db();
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    if let Ok(meta) = fs::metadata(&wal) {
        let f = fs::OpenOptions::new().write(true).open(&wal).unwrap();
        f.set_len(meta.len() / 2).unwrap();
    }
    let _ = fs::remove_file(format!("{}-shm", db.display()));
    let d = Daemon::start(sandbox, Opts::default());
    let counts = d.db().uuid_counts();
    for id in &acked {
        assert_eq!(counts.get(id), Some(&1), "{id}:\n{}", d.stderr());
    }
    assert!(!d.stderr().contains("is damaged"), "{}", d.stderr());
    assert!(!storage_message(&d).contains("damaged"));
}

#[test]
fn standalone_codi2_refuses_a_damaged_database_with_exit_code_5() {
    let (sandbox, _, _) = used_store(50, 0);
    let db = sandbox.db();
    fs::write(&db, b"this is not a database\n").unwrap();
    let out = run({
        let mut cmd = sandbox.codi2();
        cmd.arg("--db")
            .arg(&db)
            .arg("--socket")
            .arg(sandbox.socket())
            .args(["log", "-c", "t", "where does this go?"]);
        cmd
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("is damaged") && stderr.contains("nothing was stored"),
        "{stderr}"
    );
}

#[test]
fn recover_by_hand_salvages_offline_and_refuses_while_the_daemon_runs() {
    let (sandbox, merged, unmerged) = used_store(1000, 200);
    let db = sandbox.db();
    overwrite_pages(&db, &pages_of(&db, "logs", "leaf"), 2);
    let out = monitor(&["recover".as_ref(), "--db".as_ref(), db.as_os_str()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("was replaced") && stdout.contains(" salvaged, up to "),
        "{stdout}"
    );
    let (code, text) = verify(&db);
    assert_eq!(code, 0, "the recovered store verifies:\n{text}");
    let counts = Db::open(&db).uuid_counts();
    assert!(unmerged.iter().all(|id| counts.contains_key(id)));
    assert!(merged.len() - merged.iter().filter(|id| counts.contains_key(id)).count() <= 40);

    let d = Daemon::start(sandbox, Opts::default());
    let out = monitor(&["recover".as_ref(), "--db".as_ref(), db.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{:?}",
        out
    );
    drop(d);
}

#[test]
fn corruption_met_while_running_stops_the_daemon_and_the_next_start_salvages() {
    let (sandbox, merged, unmerged) = used_store(3000, 0);
    let mut d = Daemon::start(Arc::clone(&sandbox), Opts::default());
    let db = sandbox.db();
    overwrite_pages(&db, &pages_of(&db, "logs", "leaf"), 3);
    let answer = d.unix().call(Payload::QueryLogs {
        filter: LogFilter::default(),
        limit: 10_000,
    });
    assert!(
        matches!(answer.payload, Payload::Error { .. }),
        "a query over the damaged pages fails: {answer:?}"
    );
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(3), "{}", d.stderr());
    let stderr = d.stderr();
    assert!(
        stderr.contains("corrupt") && stderr.contains("next start moves the damaged file aside"),
        "{stderr}"
    );
    drop(d);
    let d = start_and_await_salvage(sandbox);
    let lost = check_recovered(&d, &unmerged, &merged, 3 * 20, 0);
    eprintln!("lost {lost} of {} logs", merged.len());
}
