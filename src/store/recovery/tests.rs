//! The set-aside and salvage under attack: crashes at each step of
//! [`set_aside`]/[`finish_set_aside`] (rebuilt on disk from a completed
//! set-aside, which is what a `kill -9` between two steps leaves), paths
//! the code does not expect, and pages damaged where the scan does not
//! look.

use super::*;
use std::os::unix::fs::FileExt;

/// `n` log rows with ids `first..first + n` into `table` on `conn`, each
/// with a message of `len` bytes.
fn insert(conn: &Connection, table: &str, first: i64, n: i64, len: usize) {
    let message = "m".repeat(len);
    for id in first..first + n {
        conn.execute(
            &format!(
                "INSERT INTO {table} (id, uuid, timestamp, level, component, session_id, \
                 message, metadata, created_at, uid) VALUES (?1, ?2, 1, 'info', 'c', NULL, \
                 ?3, NULL, 1, NULL)"
            ),
            rusqlite::params![id, uuid::Uuid::now_v7().as_bytes().to_vec(), message],
        )
        .unwrap();
    }
}

/// A stopped store at `<dir>/<sub>/codi.db` with `merged` logs in `logs`
/// (ids from `first`) and `unmerged` more in the ingest file above them.
fn store(dir: &Path, sub: &str, first: i64, merged: i64, unmerged: i64) -> PathBuf {
    let db = dir.join(sub).join("codi.db");
    let conn = schema::open_rw(&db, 1).unwrap();
    insert(&conn, "main.logs", first, merged, 200);
    drop(conn);
    let ingest = Connection::open(ingest_path(&db)).unwrap();
    insert(&ingest, "ingest_logs", first + merged, unmerged, 200);
    ingest
        .pragma_update(None, "wal_checkpoint", "TRUNCATE")
        .unwrap();
    db
}

/// Logs in the store at `db`: `logs` plus the ingest rows above it.
fn stored_logs(db: &Path) -> i64 {
    let conn = schema::open_ro(db).unwrap();
    conn.query_row("SELECT count(*) FROM all_logs", [], |r| r.get(0))
        .unwrap()
}

/// Sets `db` aside as damaged (the file itself reads fine, so every row is
/// salvageable) and completes it.
fn full_set_aside(db: &Path) {
    let damage = [Damage {
        path: db.to_owned(),
        kind: FileKind::Main,
        reason: "attack".into(),
    }];
    let lock = DatabaseLock::acquire(db).unwrap();
    assert!(set_aside(db, &lock, &damage).unwrap().len() >= 2);
}

/// A restart after the crash: what the daemon does before serving, then
/// the salvage `codi-monitor recover` runs; the stamps of file names are
/// in seconds, so the restart is in a later one (as any real restart).
fn restart_and_salvage(db: &Path) {
    std::thread::sleep(Duration::from_millis(1100));
    recover_offline(db, false).unwrap();
}

#[test]
fn a_complete_set_aside_then_salvage_keeps_every_log() {
    // The control: without a crash, all 110 logs come back.
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path(), "data", 1, 100, 10);
    full_set_aside(&db);
    restart_and_salvage(&db);
    assert_eq!(stored_logs(&db), 110);
}

/// Turns the finished set-aside of `db` back to its record saying
/// `moving`, as a crash before the last step of `finish_set_aside` leaves
/// it.
fn record_back_to_moving(db: &Path) {
    let conn = Connection::open(db).unwrap();
    conn.execute("UPDATE recoveries SET state = 'moving'", [])
        .unwrap();
}

#[test]
fn a_crash_between_the_two_renames_of_finish_set_aside_keeps_every_log() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path(), "data", 1, 100, 10);
    full_set_aside(&db);
    // Both files moved aside, the fresh ingest file in place but not the
    // fresh main database (the order of the renames before the fix), the
    // record (still `moving`) in `codi.db.new`, the suspect marker not yet
    // removed.
    record_back_to_moving(&db);
    fs::rename(&db, with_suffix(&db, ".new")).unwrap();
    mark_suspect(&db, "attack").unwrap();
    restart_and_salvage(&db);
    assert_eq!(stored_logs(&db), 110, "logs lost across the crash");
}

#[test]
fn a_crash_after_the_renames_before_the_record_says_pending_keeps_every_log() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path(), "data", 1, 100, 10);
    full_set_aside(&db);
    // Back to the moment after both renames and the marker's removal, and
    // before `UPDATE recoveries SET state = 'pending'`.
    record_back_to_moving(&db);
    restart_and_salvage(&db);
    assert_eq!(stored_logs(&db), 110, "logs never salvaged");
}

#[test]
fn a_database_under_a_directory_named_ingest_can_be_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path(), "my-ingest-host", 1, 100, 10);
    full_set_aside(&db);
    restart_and_salvage(&db);
    assert_eq!(stored_logs(&db), 110);
}

/// Garbage over page `page` of the file at `path`.
fn overwrite_page(path: &Path, page: i64) {
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&[0xa5; 4096], (page as u64 - 1) * 4096)
        .unwrap();
    file.sync_all().unwrap();
}

/// Pages of `name` in the file at `path` of `pagetype`, in page order.
fn pages(path: &Path, name: &str, pagetype: &str) -> Vec<i64> {
    let conn = Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT pageno FROM dbstat WHERE name = ?1 AND pagetype = ?2 ORDER BY pageno")
        .unwrap();
    let found = stmt
        .query_map([name, pagetype], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    found
}

#[test]
fn a_damaged_overflow_page_does_not_stop_the_scan() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path(), "data", 1, 50, 0);
    {
        let conn = Connection::open(&db).unwrap();
        insert(&conn, "logs", 51, 1, 40_000);
        insert(&conn, "logs", 52, 50, 200);
        conn.pragma_update(None, "wal_checkpoint", "TRUNCATE")
            .unwrap();
    }
    let overflow = pages(&db, "logs", "overflow");
    assert!(overflow.len() > 2, "{overflow:?}");
    overwrite_page(&db, overflow[0]);
    let (done, finished) = crossbeam_channel::bounded(1);
    let path = db.clone();
    std::thread::spawn(move || {
        let conn = schema::open_file(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let columns = vec!["id".to_owned(), "message".to_owned()];
        let mut read = 0;
        let scan = scan_table(&conn, "logs", &columns, &mut |rows| {
            read += rows.len();
            true
        });
        let _ = done.send((scan, read));
    });
    // A liveness bound, not a speed one: the scan of 101 rows either ends
    // or never does.
    let outcome = finished.recv_timeout(Duration::from_secs(60));
    let (scan, read) = outcome.expect("scan_table never returned");
    assert_eq!(read, 100, "{scan:?}");
}

#[test]
fn new_ids_start_above_every_salvaged_id_when_both_files_are_damaged() {
    // A store that has been through one recovery already: ids above 2^32.
    let dir = tempfile::tempdir().unwrap();
    let first = ID_MARGIN + 1_000;
    let db = store(dir.path(), "data", first, 3_000, 100);
    // Its newest leaf of `logs` and the ingest file's first page damaged.
    let leaves = pages(&db, "logs", "leaf");
    overwrite_page(&db, *leaves.last().unwrap());
    overwrite_page(&ingest_path(&db), 1);
    let damage = inspect(&db, Duration::MAX, true).unwrap().damage;
    assert_eq!(damage.len(), 2, "{damage:?}");
    std::thread::sleep(Duration::from_millis(1100));
    recover_offline(&db, false).unwrap();
    let conn = schema::open_ro(&db).unwrap();
    let salvaged: i64 = conn
        .query_row("SELECT max(id) FROM main.logs", [], |r| r.get(0))
        .unwrap();
    let floor: i64 = conn
        .query_row("SELECT merged_floor FROM ingest.ingest_meta", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(salvaged > first, "salvaged up to {salvaged}");
    assert!(
        floor >= salvaged,
        "new ids start at {} although id {salvaged} was salvaged",
        floor + 1
    );
}

#[test]
fn a_file_the_daemon_may_not_read_is_not_damage() {
    // Meaningful only without root's override of permissions: run this
    // test's binary as another user (see the report).
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path(), "data", 1, 100, 10);
    fs::set_permissions(
        ingest_path(&db),
        std::os::unix::fs::PermissionsExt::from_mode(0o000),
    )
    .unwrap();
    if let Ok(found) = inspect(&db, Duration::MAX, false) {
        assert!(found.damage.is_empty(), "{:?}", found.damage);
    }
}

#[test]
fn an_ingest_file_the_daemon_may_not_read_keeps_its_acknowledged_logs() {
    // As the test above (run it as another user): what start-up then does.
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path(), "data", 1, 100, 10);
    let ingest = ingest_path(&db);
    fs::set_permissions(&ingest, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    if let Ok(found) = inspect(&db, CHECK_DEADLINE, false) {
        let lock = DatabaseLock::acquire(&db).unwrap();
        let _ = set_aside(&db, &lock, &found.damage);
    }
    let _ = recover_offline(&db, false);
    for entry in fs::read_dir(db.parent().unwrap()).unwrap() {
        let path = entry.unwrap().path();
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    assert_eq!(stored_logs(&db), 110, "acknowledged logs set aside unread");
}

#[test]
fn a_standalone_writer_open_across_a_set_aside_stores_nothing_unseen() {
    use crate::proto::LogLevel;
    use crate::store::standalone::StandaloneStore;
    use crate::store::{LogRow, WriteOp};
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path(), "data", 1, 100, 10);
    // codi2 without a daemon opens the store; the daemon starts and sets
    // the files aside (and salvages them) before codi2 writes.
    let mut standalone = StandaloneStore::open(&db).unwrap();
    full_set_aside(&db);
    std::thread::sleep(Duration::from_millis(1100));
    recover_offline(&db, false).unwrap();
    let row = LogRow {
        uuid: uuid::Uuid::now_v7(),
        timestamp_us: 1,
        level: LogLevel::Info,
        component: "c".into(),
        session_id: None,
        message: "written across the set-aside".into(),
        metadata_json: None,
        uid: None,
    };
    let outcome = standalone.apply(&WriteOp::Logs(vec![row]));
    drop(standalone);
    if outcome.is_ok() {
        assert_eq!(
            stored_logs(&db),
            111,
            "an acknowledged log went to a moved file"
        );
    }
}

#[test]
fn a_second_set_aside_in_the_same_second_moves_the_file_it_replaces() {
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path(), "data", 1, 100, 10);
    // At the start of a second, so both set-asides fall within it.
    let into_second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    std::thread::sleep(Duration::from_nanos(1_000_000_000 - u64::from(into_second)));
    full_set_aside(&db);
    // Five logs acknowledged into the fresh files (as codi2 writes them),
    // then the same file set aside again within the same second.
    let floor: i64 = Connection::open(ingest_path(&db))
        .unwrap()
        .query_row("SELECT merged_floor FROM ingest_meta", [], |r| r.get(0))
        .unwrap();
    insert(
        &Connection::open(ingest_path(&db)).unwrap(),
        "ingest_logs",
        floor + 1,
        5,
        200,
    );
    full_set_aside(&db);
    std::thread::sleep(Duration::from_millis(1100));
    recover_offline(&db, false).unwrap();
    assert_eq!(stored_logs(&db), 115, "a file replaced without being moved");
}

#[test]
fn acknowledging_a_store_from_before_recoveries_acknowledges_none() {
    let conn = Connection::open_in_memory().unwrap();
    conn.execute_batch("CREATE TABLE logs (id INTEGER PRIMARY KEY)")
        .unwrap();
    assert_eq!(acknowledge(&conn).unwrap(), 0);
}

#[test]
fn changes_after_a_recovery_are_above_the_carried_hub_watermark() {
    // The hub has every session change up to seq 30 (and a batch of 31..=35
    // in flight); the main database is damaged and replaced. The salvaged
    // sessions, and any recorded later, must get seqs above both, or the
    // sync skips them for good.
    let dir = tempfile::tempdir().unwrap();
    let db = store(dir.path(), "data", 1, 10, 0);
    {
        let conn = schema::open_rw(&db, 1).unwrap();
        for n in 0..5 {
            conn.execute(
                "INSERT INTO sessions (id, identity, started_at, recorded_at) \
                 VALUES (?1, 'me', 1, 1)",
                [format!("s{n}")],
            )
            .unwrap();
            for end in 0..6 {
                conn.execute(
                    "UPDATE sessions SET ended_at = ?2 WHERE id = ?1",
                    rusqlite::params![format!("s{n}"), end],
                )
                .unwrap();
            }
        }
        conn.execute("DELETE FROM hub_changes WHERE seq <= 30", [])
            .unwrap();
        conn.execute(
            "INSERT INTO sync_state (target, last_log_id, inflight_first, inflight_last, \
             inflight_digest, inflight_body) VALUES ('sessions', 30, 31, 35, 'd', x'7b7d0a')",
            [],
        )
        .unwrap();
    }
    full_set_aside(&db);
    restart_and_salvage(&db);
    let conn = schema::open_rw(&db, 1).unwrap();
    conn.execute(
        "INSERT INTO sessions (id, identity, started_at, recorded_at) VALUES ('new', 'me', 1, 1)",
        [],
    )
    .unwrap();
    let keys: Vec<String> = conn
        .prepare(
            "SELECT row_key FROM hub_changes WHERE kind = 'sessions' AND seq > 35 ORDER BY seq",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(
        keys,
        ["s0", "s1", "s2", "s3", "s4", "new"],
        "changes at or below the watermark"
    );
    let below: i64 = conn
        .query_row(
            "SELECT count(*) FROM hub_changes WHERE seq <= 35",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(below, 0);
}
