//! Storage: the ingest writer thread that commits and acknowledges new logs,
//! the merger thread that moves them into the indexed table and owns the
//! main database's read-write connection, the read-only query pool, the
//! schema and its migrations.
//!
//! Every SQL statement that changes the database lives in [`ops`], so the
//! daemon's writer and `codi2`'s standalone fallback cannot drift apart.

pub mod backup;
mod direct;
pub mod ingest;
pub mod lock;
pub mod merger;
pub mod metadata;
pub mod ops;
pub mod query;
pub mod reader;
pub mod recovery;
pub mod retention;
pub mod salvager;
pub mod schema;
pub mod standalone;
mod tx;
pub mod verify;
pub mod wal;
pub mod watermarks;
pub mod writer;

#[cfg(test)]
mod model_tests;
// Also included by the integration tests, which use all of it.
#[cfg(test)]
#[allow(dead_code)]
mod power_cut;

use crate::budget::Reservation;
use crate::proto::{LogFields, LogFilter, LogLevel, Timestamp};
use crate::reply::ReplyTo;
use metadata::MetadataError;
use rusqlite::ToSql;
use std::path::PathBuf;
use thiserror::Error;
use uuid::Uuid;

/// Why the storage layer could not do what was asked.
#[derive(Debug, Error)]
pub enum StoreError {
    /// A filesystem operation on the database or its directory failed.
    #[error("cannot {action} `{path}`: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The database directory may be written by other users.
    #[error("refusing to use database directory `{path}`: it {problem}")]
    InsecureDirectory {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        problem: crate::fsperm::Untrusted,
    },
    /// A standalone writer would write another user's database (or create
    /// one in their directory): SQLite's `-wal`, `-shm` and ingest files
    /// would then belong to the wrong user, and that user's daemon could
    /// not open them.
    #[error(
        "`{path}` belongs to {owner}, not to this user: writing it directly would leave files \
         its daemon cannot open; start the daemon (systemctl start codi-monitor) or run \
         codi2 as that user"
    )]
    NotOwner {
        /// The database file, or its directory when the file does not exist.
        path: PathBuf,
        /// Who owns it (a user name, else the uid).
        owner: String,
    },
    /// The database's parent path exists but is not a directory.
    #[error("database directory `{0}` exists but is not a directory")]
    NotADirectory(PathBuf),
    /// SQLite could not open the database.
    #[error("cannot open database `{path}`: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// The underlying error.
        source: rusqlite::Error,
    },
    /// WAL journaling could not be enabled (e.g. on a network filesystem).
    #[error("cannot enable WAL journal mode on `{path}` (SQLite reports `{mode}`)")]
    WalUnavailable {
        /// The database file.
        path: PathBuf,
        /// The journal mode SQLite kept.
        mode: String,
    },
    /// The database was written by a newer version of this program.
    #[error(
        "database `{path}` has schema version {found}, but this program only knows \
         versions up to {supported}; upgrade codi-monitor or use another database"
    )]
    SchemaTooNew {
        /// The database file.
        path: PathBuf,
        /// Its `user_version`.
        found: i64,
        /// The newest version this binary knows.
        supported: i64,
    },
    /// A read-only connection found a schema it cannot read.
    #[error("database `{path}` has schema version {found}, expected {expected}")]
    SchemaMismatch {
        /// The database file.
        path: PathBuf,
        /// Its `user_version`.
        found: i64,
        /// The version this binary reads.
        expected: i64,
    },
    /// A query filter that cannot be run.
    #[error("invalid filter: {0}")]
    InvalidFilter(String),
    /// The hub sync cannot be set up (`server_hub.ca_file` unreadable).
    #[error("{0}")]
    HubSetup(String),
    /// A storage thread could not be started.
    #[error("cannot start thread `{name}`: {source}")]
    Spawn {
        /// The thread's name.
        name: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Another process (a second daemon) holds the database's lock.
    #[error(
        "database `{path}` is in use by {holder} (lock `{lock}`): another codi-monitor \
         serves it; stop that one or give this one another --db"
    )]
    DatabaseInUse {
        /// The database file.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// Who holds it, as far as the lock file says.
        holder: String,
    },
    /// A `codi2` writing without the daemon kept the right to write for
    /// longer than a starting daemon waits.
    #[error(
        "database `{path}`: a `codi2` writing it without the daemon still holds `{lock}` after \
         {}s (stopped or stuck?); find it with `fuser {lock}`, end it, and start the daemon \
         again",
        waited.as_secs_f32(),
        path = path.display(),
        lock = lock.display()
    )]
    StandaloneWriteStuck {
        /// The database file.
        path: PathBuf,
        /// The writers' lock file.
        lock: PathBuf,
        /// How long the daemon waited.
        waited: std::time::Duration,
    },
    /// A daemon (or `codi-monitor recover`) holds the database: a `codi2`
    /// must not write it directly ([`lock::StandaloneWrite`]).
    #[error(
        "database `{path}` is held by {holder} (a codi-monitor daemon, or `codi-monitor \
         recover`); nothing was written to it directly",
        path = path.display()
    )]
    HeldByDaemon {
        /// The database file.
        path: PathBuf,
        /// Who holds it, as far as its lock file says.
        holder: String,
    },
    /// A file of the database is damaged, or a recovery of it is under
    /// way: a standalone write would go where nothing reads it.
    #[error(
        "database `{path}` is damaged ({detail}); nothing was stored. Start the daemon \
         (systemctl start codi-monitor), which salvages it at start-up, or run \
         `codi-monitor recover --db {path}`",
        path = path.display()
    )]
    Damaged {
        /// The database file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Any other SQLite failure.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl StoreError {
    /// This error, as [`StoreError::Damaged`] when SQLite called a file of
    /// the database at `db` corrupt.
    pub fn or_damaged(self, db: &std::path::Path) -> StoreError {
        let corrupt = match &self {
            StoreError::Open { source, .. } | StoreError::Sqlite(source) => {
                recovery::is_corruption(source).then(|| source.to_string())
            }
            _ => None,
        };
        match corrupt {
            Some(detail) => StoreError::Damaged {
                path: db.to_owned(),
                detail,
            },
            None => self,
        }
    }
}

/// Longest component, session id or identity accepted, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// Most bytes one log may take once stored ([`LogRow::stored_len`]: its
/// component, session id, message and metadata as JSON, plus a few dozen
/// for the other columns). A `LogResults` answer carries whole rows in one
/// 1 MiB frame; half of it leaves room for the envelope and for a row's
/// answer being larger than its stored JSON (a float stored as `1.5` is 9
/// bytes of MessagePack). Checked when the row is built, by the daemon and
/// by `codi2` writing without one, so a log over it is `Rejected` with the
/// reason and never stored.
pub const MAX_ROW_BYTES: usize = 512 * 1024;

/// A log ready to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRow {
    /// The carrying message's id (unique: a resend is stored once).
    pub uuid: Uuid,
    /// The sender's timestamp, microseconds since the Unix epoch.
    pub timestamp_us: i64,
    /// Severity.
    pub level: LogLevel,
    /// Which part of the caller wrote it.
    pub component: String,
    /// The log's session, if any.
    pub session_id: Option<String>,
    /// The text.
    pub message: String,
    /// Metadata as JSON text, if any.
    pub metadata_json: Option<String>,
    /// Who wrote it: the Unix client's uid (`SO_PEERCRED`), or a
    /// standalone writer's own; `None` over TCP.
    pub uid: Option<u32>,
}

impl LogRow {
    /// Bytes [`LogRow::stored_len`] counts for the uuid, the integer
    /// columns and the level.
    pub const FIXED_LEN: usize = 16 + 3 * 8 + 5;

    /// About how many bytes the row takes in a table: its texts plus the
    /// uuid and the integer columns.
    pub fn stored_len(&self) -> usize {
        Self::FIXED_LEN
            + self.component.len()
            + self.session_id.as_ref().map_or(0, String::len)
            + self.message.len()
            + self.metadata_json.as_ref().map_or(0, String::len)
    }

    /// The row's values in the column order every log insert uses (`uuid`,
    /// `timestamp`, `level`, `component`, `session_id`, `message`,
    /// `metadata`, `uid`, `created_at`), `created_at_us` last.
    pub fn values<'a>(&'a self, created_at_us: &'a i64) -> [&'a dyn ToSql; 9] {
        [
            self.uuid.as_bytes(),
            &self.timestamp_us,
            level_text(self.level),
            &self.component,
            &self.session_id,
            &self.message,
            &self.metadata_json,
            &self.uid,
            created_at_us,
        ]
    }

    /// Builds the row for one `LogEntry` (or one `LogBatch` entry) carried
    /// by the message `uuid` stamped `timestamp`, written by `uid`.
    ///
    /// Nil or absent metadata is stored as NULL; otherwise it is converted
    /// to JSON. The log's own `session_id` wins over the connection's.
    ///
    /// Fails with a readable reason (for a `Rejected` answer) when the
    /// component or session id is longer than [`MAX_NAME_LEN`], the
    /// metadata nests too deeply, or the row would take more than
    /// [`MAX_ROW_BYTES`] once stored; the JSON conversion stops as soon as
    /// it passes that bound.
    pub fn from_fields(
        uuid: Uuid,
        timestamp: Timestamp,
        fields: LogFields,
        connection_session: Option<&str>,
        uid: Option<u32>,
    ) -> Result<LogRow, String> {
        let session_id = fields
            .session_id
            .or_else(|| connection_session.map(str::to_owned));
        check_name_len("component", &fields.component)?;
        if let Some(session) = &session_id {
            check_name_len("session_id", session)?;
        }
        let mut row = LogRow {
            uuid,
            timestamp_us: timestamp.as_micros(),
            level: fields.level,
            component: fields.component,
            session_id,
            message: fields.message,
            metadata_json: None,
            uid,
        };
        let without_metadata = row.stored_len();
        let too_large = |metadata: &str| {
            format!(
                "log too large: at most {MAX_ROW_BYTES} bytes are stored per log \
                 (MAX_ROW_BYTES), and its message and names take {without_metadata}{metadata}"
            )
        };
        let Some(room) = MAX_ROW_BYTES.checked_sub(without_metadata) else {
            return Err(too_large(""));
        };
        row.metadata_json = match &fields.metadata {
            None | Some(rmpv::Value::Nil) => None,
            Some(value) => Some(metadata::to_json_within(value, room).map_err(|e| match e {
                MetadataError::TooLarge(_) => too_large(&format!(
                    ", leaving {room} for the metadata, which needs more as JSON \
                     (binary is stored as base64, 4/3 of its size)"
                )),
                MetadataError::TooDeep => e.to_string(),
            })?),
        };
        Ok(row)
    }
}

/// Refuses a name longer than [`MAX_NAME_LEN`] bytes, with the reason.
fn check_name_len(what: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_NAME_LEN {
        Err(format!(
            "{what} is {} bytes, longer than the limit of {MAX_NAME_LEN} bytes",
            value.len()
        ))
    } else {
        Ok(())
    }
}

/// A level's stored text, as a `'static` value a parameter list can borrow.
fn level_text(level: LogLevel) -> &'static &'static str {
    match level {
        LogLevel::Trace => &"Trace",
        LogLevel::Debug => &"Debug",
        LogLevel::Info => &"Info",
        LogLevel::Warn => &"Warn",
        LogLevel::Error => &"Error",
    }
}

/// The row uuid of entry `index` of the `LogBatch` whose message id is
/// `batch_id`: the id plus `index`, wrapping. Entry 0 keeps the batch id, and
/// a resent batch maps to the same uuids, so it is stored once.
pub fn batch_entry_id(batch_id: Uuid, index: usize) -> Uuid {
    Uuid::from_u128(batch_id.as_u128().wrapping_add(index as u128))
}

/// One change to the database, answered by one acknowledgment.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOp {
    /// A `LogEntry` (one row) or a `LogBatch` (many).
    Logs(Vec<LogRow>),
    /// Record a session's start.
    SessionStart {
        /// Session id.
        session_id: String,
        /// Who runs it.
        identity: String,
        /// Kind of agent.
        agent_type: Option<String>,
        /// Workspace directory.
        workspace: Option<String>,
        /// Start time, microseconds since the epoch.
        started_at_us: i64,
        /// Who starts it (the Unix client's uid; `None` over TCP).
        uid: Option<u32>,
        /// Set when the starter may not take over a session id another
        /// uid started: its own uid (`None` for a client with no uid, who
        /// may start again only a session with none).
        restricted_to: Option<Option<u32>>,
    },
    /// Record a session's end.
    SessionEnd {
        /// Session id.
        session_id: String,
        /// End time, microseconds since the epoch.
        ended_at_us: i64,
        /// Set when the caller may end only sessions its own uid started:
        /// that uid (`None` for a client with no uid, who may end only
        /// sessions with none).
        restricted_to: Option<Option<u32>>,
    },
}

impl WriteOp {
    /// How many log rows the operation carries (0 for session changes).
    pub fn row_count(&self) -> usize {
        match self {
            WriteOp::Logs(rows) => rows.len(),
            WriteOp::SessionStart { .. } | WriteOp::SessionEnd { .. } => 0,
        }
    }
}

/// A write on its way to the writer thread.
#[derive(Debug)]
pub struct WriteJob {
    /// Where the acknowledgment goes.
    pub reply: ReplyTo,
    /// The request's id, echoed as `request_id`.
    pub request_id: Uuid,
    /// What to write.
    pub op: WriteOp,
    /// Bytes taken from the in-flight budget, released once answered.
    pub cost: usize,
}

/// A query on its way to the reader pool.
#[derive(Debug)]
pub struct QueryJob {
    /// Where the `LogResults` (or `Error`) goes.
    pub reply: ReplyTo,
    /// Which logs.
    pub filter: LogFilter,
    /// Whose logs besides (the requester's right to see).
    pub writers: query::Writers,
    /// How many at most.
    pub limit: u64,
    /// Room for the answer in the answer pool, taken before the query was
    /// queued: one whole frame, shrunk to the answer's size once it is
    /// built, and held until it has been written out.
    pub room: Reservation,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(metadata: Option<rmpv::Value>, session_id: Option<&str>) -> LogFields {
        LogFields {
            level: LogLevel::Debug,
            component: "c".into(),
            message: "m".into(),
            metadata,
            session_id: session_id.map(str::to_owned),
        }
    }

    #[test]
    fn stored_level_text_is_the_wire_name() {
        for level in LogLevel::ALL {
            assert_eq!(*level_text(level), level.as_str());
        }
    }

    #[test]
    fn batch_entry_ids_offset_the_batch_id_and_wrap() {
        let batch = Uuid::from_u128(0x10);
        assert_eq!(batch_entry_id(batch, 0), batch);
        assert_eq!(batch_entry_id(batch, 5), Uuid::from_u128(0x15));
        assert_eq!(
            batch_entry_id(Uuid::from_u128(u128::MAX), 2),
            Uuid::from_u128(1)
        );
    }

    #[test]
    fn row_from_fields() {
        let id = Uuid::now_v7();
        let ts = Timestamp::from_micros(77);
        let row = LogRow::from_fields(id, ts, fields(None, None), Some("conn"), None).unwrap();
        assert_eq!(
            row,
            LogRow {
                uuid: id,
                timestamp_us: 77,
                level: LogLevel::Debug,
                component: "c".into(),
                session_id: Some("conn".into()),
                message: "m".into(),
                metadata_json: None,
                uid: None,
            }
        );
        let own = fields(Some(rmpv::Value::Nil), Some("own"));
        let row = LogRow::from_fields(id, ts, own.clone(), Some("conn"), None).unwrap();
        assert_eq!(row.session_id.as_deref(), Some("own"));
        assert_eq!(row.metadata_json, None, "nil metadata is NULL");
        let row = LogRow::from_fields(id, ts, fields(None, None), None, None).unwrap();
        assert_eq!(row.session_id, None);

        let meta = rmpv::Value::Map(vec![("k".into(), rmpv::Value::Binary(vec![1, 2]))]);
        let row = LogRow::from_fields(id, ts, fields(Some(meta), None), None, None).unwrap();
        assert_eq!(
            row.metadata_json.as_deref(),
            Some(r#"{"k":{"$bin":"AQI="}}"#)
        );

        let deep = (0..100).fold(rmpv::Value::Nil, |v, _| rmpv::Value::Array(vec![v]));
        let err = LogRow::from_fields(id, ts, fields(Some(deep), None), None, None).unwrap_err();
        assert!(err.contains("nested"), "{err}");
    }

    #[test]
    fn names_and_stored_size_are_bounded() {
        let id = Uuid::now_v7();
        let ts = Timestamp::from_micros(1);
        let build = |f: LogFields| LogRow::from_fields(id, ts, f, None, None);
        let mut f = fields(None, None);
        f.component = "c".repeat(MAX_NAME_LEN);
        assert!(build(f.clone()).is_ok(), "exactly the limit is fine");
        f.component.push('c');
        let err = build(f).unwrap_err();
        assert!(
            err.contains("component is 257 bytes") && err.contains("256"),
            "{err}"
        );
        let err = build(fields(None, Some(&"s".repeat(300)))).unwrap_err();
        assert!(err.contains("session_id is 300 bytes"), "{err}");
        // The connection's session counts too (it is stored with the row).
        let long = "s".repeat(MAX_NAME_LEN + 1);
        assert!(LogRow::from_fields(id, ts, fields(None, None), Some(&long), None).is_err());

        // A row of exactly MAX_ROW_BYTES is stored, one byte more is not.
        let exact = |extra: usize| {
            let mut f = fields(None, None);
            f.message = "m".repeat(MAX_ROW_BYTES - LogRow::FIXED_LEN - 1 + extra);
            build(f)
        };
        assert_eq!(exact(0).unwrap().stored_len(), MAX_ROW_BYTES);
        let err = exact(1).unwrap_err();
        assert!(
            err.contains("524288") && err.contains("MAX_ROW_BYTES"),
            "{err}"
        );

        // Binary metadata counts as base64: 393,000 bytes fit, 394,000 do not.
        let blob = |n: usize| fields(Some(rmpv::Value::Binary(vec![0xab; n])), None);
        let row = build(blob(393_000)).unwrap();
        assert!(row.stored_len() <= MAX_ROW_BYTES);
        let err = build(blob(394_000)).unwrap_err();
        assert!(err.contains("base64") && err.contains("524288"), "{err}");
        // Metadata that escapes into a larger text (6 bytes per NUL).
        let nuls = fields(Some(rmpv::Value::from("\0".repeat(100_000))), None);
        assert!(build(nuls).unwrap_err().contains("log too large"));
    }
}
