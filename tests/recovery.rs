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
