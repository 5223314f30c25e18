//! Direct, read-only inspection of a daemon's SQLite database.

use codi_monitor::store::{ingest, schema, StoreError};
use rusqlite::{Connection, OptionalExtension, Transaction};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use uuid::Uuid;

use super::*;

/// One row of the `logs` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Row id.
    pub id: i64,
    /// Message id.
    pub uuid: Uuid,
    /// Sender's timestamp, micros.
    pub timestamp: i64,
    /// Level name.
    pub level: String,
    /// Component.
    pub component: String,
    /// Session.
    pub session_id: Option<String>,
    /// Text.
    pub message: String,
    /// Metadata JSON text.
    pub metadata: Option<String>,
    /// Daemon's storage time, micros.
    pub created_at: i64,
}

/// One row of the `sessions` table.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRow {
    /// Identity.
    pub identity: String,
    /// Agent type.
    pub agent_type: Option<String>,
    /// Start, micros.
    pub started_at: i64,
    /// End, micros.
    pub ended_at: Option<i64>,
    /// Workspace.
    pub workspace: Option<String>,
}

/// A direct connection to the daemon's database, for inspection only.
pub struct Db {
    conn: Connection,
}

impl Db {
    /// Opens an existing database and its ingest file read-only (never
    /// creates one), as the daemon's readers do.
    pub fn open(path: &Path) -> Db {
        let conn = match schema::open_ro(path) {
            Ok(conn) => conn,
            // An older daemon under test (`$CODI_TEST_DAEMON`, a build from
            // before a fix) keeps an older schema: read its tables as they
            // are, without the `all_logs` view.
            Err(StoreError::SchemaMismatch { found, .. })
                if found < schema::SCHEMA_VERSION
                    && std::env::var_os("CODI_TEST_DAEMON").is_some() =>
            {
                open_older(path)
            }
            Err(e) => panic!("open {}: {e}", path.display()),
        };
        Db { conn }
    }

    /// A read transaction that sees every stored log once, in the view
    /// `all_logs` (indexed table and ingest file together).
    pub fn snapshot(&self) -> Transaction<'_> {
        ingest::begin_read(&self.conn).unwrap()
    }

    /// Stored logs.
    pub fn count_logs(&self) -> i64 {
        self.snapshot()
            .query_row("SELECT COUNT(*) FROM all_logs", [], |r| r.get(0))
            .unwrap()
    }

    /// Stored logs with this uuid.
    pub fn count_uuid(&self, id: Uuid) -> i64 {
        self.snapshot()
            .query_row(
                "SELECT COUNT(*) FROM all_logs WHERE uuid = ?",
                [id.as_bytes().as_slice()],
                |r| r.get(0),
            )
            .unwrap()
    }

    /// Every stored uuid.
    pub fn uuids(&self) -> HashSet<Uuid> {
        let tx = self.snapshot();
        let mut stmt = tx.prepare("SELECT uuid FROM all_logs").unwrap();
        let rows = stmt
            .query_map([], |r| r.get::<_, Vec<u8>>(0))
            .unwrap()
            .map(|b| Uuid::from_slice(&b.unwrap()).expect("16-byte uuid"));
        rows.collect()
    }

    /// The row with this uuid, if stored.
    pub fn row(&self, id: Uuid) -> Option<Row> {
        self.snapshot()
            .query_row(
                "SELECT id, uuid, timestamp, level, component, session_id, message, metadata, \
                 created_at FROM all_logs WHERE uuid = ?",
                [id.as_bytes().as_slice()],
                |r| {
                    Ok(Row {
                        id: r.get(0)?,
                        uuid: Uuid::from_slice(&r.get::<_, Vec<u8>>(1)?).unwrap(),
                        timestamp: r.get(2)?,
                        level: r.get(3)?,
                        component: r.get(4)?,
                        session_id: r.get(5)?,
                        message: r.get(6)?,
                        metadata: r.get(7)?,
                        created_at: r.get(8)?,
                    })
                },
            )
            .optional()
            .unwrap()
    }

    /// The session row, if stored.
    pub fn session(&self, id: &str) -> Option<SessionRow> {
        self.conn
            .query_row(
                "SELECT identity, agent_type, started_at, ended_at, workspace \
                 FROM sessions WHERE id = ?",
                [id],
                |r| {
                    Ok(SessionRow {
                        identity: r.get(0)?,
                        agent_type: r.get(1)?,
                        started_at: r.get(2)?,
                        ended_at: r.get(3)?,
                        workspace: r.get(4)?,
                    })
                },
            )
            .optional()
            .unwrap()
    }

    /// Rows in the indexed `logs` table and in the ingest file's table
    /// (merged or not).
    pub fn table_counts(&self) -> (i64, i64) {
        let tx = self.snapshot();
        let count = |table: &str| -> i64 {
            tx.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        };
        (count("main.logs"), count("ingest.ingest_logs"))
    }

    /// `PRAGMA integrity_check`'s answer (every attached file).
    pub fn integrity_check(&self) -> String {
        self.conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap()
    }

    /// How often each stored uuid is seen (through `all_logs`).
    pub fn uuid_counts(&self) -> HashMap<Uuid, u32> {
        let tx = self.snapshot();
        let mut stmt = tx.prepare("SELECT uuid FROM all_logs").unwrap();
        let mut counts = HashMap::new();
        for uuid in stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap() {
            let uuid = Uuid::from_slice(&uuid.unwrap()).expect("16-byte uuid");
            *counts.entry(uuid).or_insert(0) += 1;
        }
        counts
    }
}

/// Copies the database `db` and its ingest file into the directory `to` as
/// a power cut could leave them ([`power_cut::copy_cut`]) and returns the
/// copy's database path.
pub fn copy_as_after_power_cut(db: &Path, to: &Path) -> PathBuf {
    power_cut::copy_cut(&[db, &schema::ingest_path(db)], to);
    to.join(db.file_name().unwrap())
}

/// A database (and its ingest file) an older daemon wrote, read-only.
fn open_older(path: &Path) -> Connection {
    use rusqlite::OpenFlags;
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    conn.busy_timeout(schema::BUSY_TIMEOUT).unwrap();
    let ingest = schema::ingest_path(path);
    conn.execute(
        "ATTACH DATABASE ?1 AS ingest",
        [format!("file:{}?mode=ro", ingest.display())],
    )
    .unwrap_or_else(|e| panic!("attach {}: {e}", ingest.display()));
    conn
}
