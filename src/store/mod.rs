//! Storage: the ingest writer thread that commits and acknowledges new logs,
//! the merger thread that moves them into the indexed table and owns the
//! main database's read-write connection, the read-only query pool, the
//! schema and its migrations.
//!
//! Every SQL statement that changes the database lives in [`ops`], so the
//! daemon's writer and `codi2`'s standalone fallback cannot drift apart.

pub mod ingest;
pub mod merger;
pub mod metadata;
pub mod ops;
pub mod query;
pub mod reader;
pub mod schema;
pub mod standalone;
pub mod wal;
pub mod writer;

use crate::proto::{LogFields, LogFilter, LogLevel, Timestamp};
use crate::reply::ReplyTo;
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
    /// A storage thread could not be started.
    #[error("cannot start thread `{name}`: {source}")]
    Spawn {
        /// The thread's name.
        name: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Any other SQLite failure.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

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
}

impl LogRow {
    /// About how many bytes the row takes in a table: its texts plus the
    /// uuid and the integer columns.
    pub fn stored_len(&self) -> usize {
        const FIXED: usize = 16 + 3 * 8 + 5;
        FIXED
            + self.component.len()
            + self.session_id.as_ref().map_or(0, String::len)
            + self.message.len()
            + self.metadata_json.as_ref().map_or(0, String::len)
    }

    /// The row's values in the column order every log insert uses (`uuid`,
    /// `timestamp`, `level`, `component`, `session_id`, `message`,
    /// `metadata`, `created_at`), `created_at_us` last.
    pub fn values<'a>(&'a self, created_at_us: &'a i64) -> [&'a dyn ToSql; 8] {
        [
            self.uuid.as_bytes(),
            &self.timestamp_us,
            level_text(self.level),
            &self.component,
            &self.session_id,
            &self.message,
            &self.metadata_json,
            created_at_us,
        ]
    }

    /// Builds the row for one `LogEntry` (or one `LogBatch` entry) carried
    /// by the message `uuid` stamped `timestamp`.
    ///
    /// Nil or absent metadata is stored as NULL; otherwise it is converted
    /// to JSON, which fails (with a readable reason) only when it is nested
    /// too deeply. The log's own `session_id` wins over the connection's.
    pub fn from_fields(
        uuid: Uuid,
        timestamp: Timestamp,
        fields: LogFields,
        connection_session: Option<&str>,
    ) -> Result<LogRow, String> {
        let metadata_json = match &fields.metadata {
            None | Some(rmpv::Value::Nil) => None,
            Some(value) => Some(metadata::to_json(value)?),
        };
        Ok(LogRow {
            uuid,
            timestamp_us: timestamp.as_micros(),
            level: fields.level,
            component: fields.component,
            session_id: fields
                .session_id
                .or_else(|| connection_session.map(str::to_owned)),
            message: fields.message,
            metadata_json,
        })
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
    },
    /// Record a session's end.
    SessionEnd {
        /// Session id.
        session_id: String,
        /// End time, microseconds since the epoch.
        ended_at_us: i64,
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
    /// How many at most.
    pub limit: u64,
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
        let row = LogRow::from_fields(id, ts, fields(None, None), Some("conn")).unwrap();
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
            }
        );
        let own = fields(Some(rmpv::Value::Nil), Some("own"));
        let row = LogRow::from_fields(id, ts, own.clone(), Some("conn")).unwrap();
        assert_eq!(row.session_id.as_deref(), Some("own"));
        assert_eq!(row.metadata_json, None, "nil metadata is NULL");
        let row = LogRow::from_fields(id, ts, fields(None, None), None).unwrap();
        assert_eq!(row.session_id, None);

        let meta = rmpv::Value::Map(vec![("k".into(), rmpv::Value::Binary(vec![1, 2]))]);
        let row = LogRow::from_fields(id, ts, fields(Some(meta), None), None).unwrap();
        assert_eq!(
            row.metadata_json.as_deref(),
            Some(r#"{"k":{"$bin":"AQI="}}"#)
        );

        let deep = (0..100).fold(rmpv::Value::Nil, |v, _| rmpv::Value::Array(vec![v]));
        let err = LogRow::from_fields(id, ts, fields(Some(deep), None), None).unwrap_err();
        assert!(err.contains("nested"), "{err}");
    }
}
