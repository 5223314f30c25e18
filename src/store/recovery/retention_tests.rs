//! The salvage against the other new storage features (from a review):
//! rows the export watcher or retention write or delete while a salvage
//! is under way, and a store salvaged from an older schema. Each test
//! states what it expects of a correct salvage.

use super::*;
use crate::store::retention::{self, ArchiveClaims, ArchiveRoot, Retention, RetentionPolicy};
use crate::store::watermarks::Watermarks;
use std::sync::Arc;
use std::time::Instant;

const DAY_US: i64 = 86_400_000_000;

/// A stopped store at `<dir>/data/codi.db` (both files, version 7).
fn empty_store(dir: &Path) -> PathBuf {
    let db = dir.join("data").join("codi.db");
    drop(schema::open_rw(&db, 1).unwrap());
    db
}

/// Sets the main database at `db` aside as damaged (it reads fine, so
/// every row is salvageable).
fn set_main_aside(db: &Path) -> Vec<Recovery> {
    let damage = [Damage {
        path: db.to_owned(),
        kind: FileKind::Main,
        reason: "review".into(),
    }];
    let lock = DatabaseLock::acquire(db).unwrap();
    set_aside(db, &lock, &damage).unwrap()
}

/// Salvages every pending recovery of `db` into it, running `between` on
/// the main database after each step (what the merger may do between two
/// salvage steps).
fn salvage_with(db: &Path, between: &mut dyn FnMut(&mut Connection)) {
    let mut conn = schema::open_rw(db, 1).unwrap();
    let columns_conn = schema::open_file(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let pending = recoveries(&conn, "state = 'pending'").unwrap();
    for r in pending {
        let mut apply = |step: SalvageStep| {
            let n = apply_step(&mut conn, &step).map_err(|e| e.to_string())?;
            between(&mut conn);
            Ok(n)
        };
        let columns = |table: &str| target_columns(&columns_conn, table);
        Salvage {
            apply: &mut apply,
            target_columns: &columns,
        }
        .run(&r)
        .unwrap();
    }
}

fn count(db: &Path, sql: &str) -> i64 {
    let conn = schema::open_file(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[test]
fn export_rows_recorded_during_a_salvage_do_not_push_salvaged_ones_out() {
    // Export rows have AUTOINCREMENT ids starting at 1 in the fresh main
    // database; the salvaged ones keep theirs. An export the watcher
    // records before the salvage reaches `export_archive` (a watch a
    // client adds again meanwhile) takes id 1, and `INSERT OR IGNORE`
    // then drops the salvaged row 1: an export record lost for good.
    let dir = tempfile::tempdir().unwrap();
    let db = empty_store(dir.path());
    {
        let conn = schema::open_rw(&db, 1).unwrap();
        for i in 1..=3 {
            conn.execute(
                "INSERT INTO export_archive (original_path, archive_path, archived_at_us) \
                 VALUES (?1, ?2, 1)",
                [format!("/src/old{i}"), format!("/archive/old{i}")],
            )
            .unwrap();
        }
    }
    set_main_aside(&db);
    {
        // The watcher, in the fresh main database, before the salvage.
        let conn = schema::open_rw(&db, 1).unwrap();
        conn.execute(
            "INSERT INTO export_archive (original_path, archive_path, archived_at_us) \
             VALUES ('/src/new', '/archive/new', 2)",
            [],
        )
        .unwrap();
    }
    salvage_with(&db, &mut |_| {});
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM export_archive WHERE original_path LIKE '/src/old%'"
        ),
        3,
        "every salvaged export row is kept"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM export_archive"), 4);
}

#[test]
fn retention_between_salvage_steps_keeps_an_archive_file_a_later_row_shares() {
    // Identical content is archived once: a recent export row may point at
    // the file an old row created. Salvaged in rowid order, the old row can
    // arrive one step before the recent one; a retention pass in between
    // sees no row left referencing the file and deletes it.
    let dir = tempfile::tempdir().unwrap();
    let db = empty_store(dir.path());
    let archive = dir.path().join("archive");
    fs::create_dir_all(archive.join("d")).unwrap();
    let archive = fs::canonicalize(&archive).unwrap();
    let shared = archive.join("d").join("content");
    fs::write(&shared, b"the export").unwrap();
    let shared_s = shared.to_string_lossy().into_owned();
    let now = Timestamp::now().as_micros();
    {
        let conn = schema::open_rw(&db, 1).unwrap();
        let add = |path: &str, hash: Option<&str>, at: i64| {
            conn.execute(
                "INSERT INTO export_archive (original_path, archive_path, content_hash, \
                 archived_at_us) VALUES ('/src/f', ?1, ?2, ?3)",
                rusqlite::params![path, hash, at],
            )
            .unwrap();
        };
        add(&shared_s, Some("h"), now - 10 * DAY_US);
        for _ in 0..STEP_ROWS {
            add("", None, now);
        }
        add(&shared_s, Some("h"), now);
    }
    set_main_aside(&db);
    let root = ArchiveRoot::open(&archive).unwrap();
    let claims = ArchiveClaims::default();
    salvage_with(&db, &mut |conn| {
        let far = Instant::now() + Duration::from_secs(60);
        retention::expire_exports(conn, now - DAY_US, Some(&root), &claims, false, far).unwrap();
    });
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM export_archive WHERE archive_path = '{shared_s}'")
        ),
        1,
        "the recent row is kept"
    );
    assert!(
        shared.is_file(),
        "the file the recent export row points at was deleted"
    );
}

#[test]
fn sessions_salvaged_from_a_version_5_store_still_time_out() {
    // A version 5 main database has no `sessions.recorded_at`; the
    // migration to 7 backfills it, but a salvage of a moved version 5
    // file copies only the columns it has, leaving it NULL, and session
    // expiry (`recorded_at < cutoff`) never ends such a session.
    let dir = tempfile::tempdir().unwrap();
    let db = empty_store(dir.path());
    {
        // Back to version 5: what a store written by the last release is.
        let conn = Connection::open(&db).unwrap();
        conn.execute_batch(
            "DROP INDEX idx_sessions_ended; ALTER TABLE sessions DROP COLUMN recorded_at; \
             ALTER TABLE sessions DROP COLUMN end_reason; DROP TABLE recoveries; \
             PRAGMA user_version = 5;",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO sessions (id, identity, started_at) VALUES ('old', 'me', ?1)",
            [Timestamp::now().as_micros() - 10 * DAY_US],
        )
        .unwrap();
    }
    // `codi-monitor recover --force` on it (or damage found at start-up).
    recover_offline(&db, true).unwrap();
    let mut conn = schema::open_rw(&db, 1).unwrap();
    let policy = RetentionPolicy {
        session_timeout: Some(Duration::from_secs(3600)),
        ..RetentionPolicy::default()
    };
    let mut retention = Retention::new(policy, Arc::new(ArchiveClaims::default()));
    let state = Watermarks::new(0, 0, uuid::Uuid::nil());
    let far = Instant::now() + Duration::from_secs(60);
    let e = retention
        .pass(&mut conn, &state, Timestamp::now().as_micros(), far)
        .unwrap();
    assert_eq!(
        e.timed_out,
        1,
        "the salvaged session, idle for 10 days, is ended (recorded_at: {:?})",
        conn.query_row("SELECT recorded_at FROM sessions", [], |r| r
            .get::<_, Option<i64>>(0))
            .unwrap()
    );
}
