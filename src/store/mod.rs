//! Storage: the one writer thread that owns the read-write SQLite connection,
//! the read-only query pool, the schema and its migrations.

use crate::proto::{LogFilter, LogLevel};
use crate::reply::ReplyTo;
use uuid::Uuid;

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
