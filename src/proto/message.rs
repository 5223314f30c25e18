//! Message types of protocol v1, requests and answers alike.
//!
//! One `Payload` enum carries both directions, as in the seed design; the
//! daemon answers an answer-only variant sent to it with `InvalidMessage`.

use super::wire::uuid_bin;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;
use uuid::Uuid;

/// One frame's content: an id, a timestamp and a payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The request's id (time-ordered UUIDv7 recommended); also the log's
    /// deduplication key.
    #[serde(with = "uuid_bin")]
    pub id: Uuid,
    /// When the sender created the message.
    pub timestamp: Timestamp,
    /// What the message says.
    pub payload: Payload,
}

impl Message {
    /// A message with a fresh UUIDv7 id stamped now.
    pub fn new(payload: Payload) -> Self {
        Message {
            id: Uuid::now_v7(),
            timestamp: Timestamp::now(),
            payload,
        }
    }

    /// A daemon answer with its own fresh id (answers name the request they
    /// answer inside the payload, as `Acknowledgment::request_id` does).
    pub fn answer(payload: Payload) -> Self {
        Message::new(payload)
    }

    /// An `Acknowledgment` answer.
    pub fn ack(request_id: Uuid, status: AckStatus) -> Self {
        Message::answer(Payload::Acknowledgment { request_id, status })
    }

    /// An `Error` answer.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Message::answer(Payload::Error {
            code,
            message: message.into(),
            details: None,
        })
    }
}

/// Every variant of the protocol, externally tagged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Payload {
    /// One structured log.
    LogEntry(LogFields),
    /// Start watching a directory for exports.
    StartMonitoring {
        /// Directory to watch.
        path: String,
        /// Whether subdirectories are watched too.
        recursive: bool,
        /// Glob patterns of export files; empty: the configured defaults.
        patterns: Vec<String>,
        /// Extension: the session every export found here belongs to
        /// (absent: attributed by session workspace).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session_id: Option<String>,
    },
    /// Stop watching a directory.
    StopMonitoring {
        /// Directory to stop watching.
        path: String,
    },
    /// An agent session begins; logs on this connection default to it.
    SessionStart {
        /// Caller-chosen session id.
        session_id: String,
        /// Who runs the session (user, agent identity).
        identity: String,
        /// Kind of agent, if known.
        #[serde(default)]
        agent_type: Option<String>,
        /// Extension: the session's workspace directory, used to attribute
        /// exports found below it.
        #[serde(default)]
        workspace: Option<String>,
    },
    /// An agent session ends.
    SessionEnd {
        /// The session that ends.
        session_id: String,
    },
    /// Ask for stored logs.
    QueryLogs {
        /// Which logs match.
        filter: LogFilter,
        /// At most this many entries in the answer.
        limit: u64,
    },
    /// Extension: many logs, one answer.
    LogBatch {
        /// The logs, each a `LogEntry` field map.
        entries: Vec<LogFields>,
    },
    /// Extension: the shared token, first on a TCP connection when one is
    /// configured.
    Authenticate {
        /// The shared secret.
        token: String,
    },
    /// Extension: ask for the daemon's status.
    GetStatus,
    /// Extension: round-trip probe, answered with `Accepted`.
    Ping,
    /// Extension: ask for the watched directories, answered by `Monitoring`.
    ListMonitoring,
    /// Answer to log, batch, session, monitoring, authenticate and ping
    /// requests.
    Acknowledgment {
        /// The id of the request answered.
        #[serde(with = "uuid_bin")]
        request_id: Uuid,
        /// What became of it.
        status: AckStatus,
    },
    /// Answer to `QueryLogs`.
    LogResults {
        /// The newest matches, oldest first.
        entries: Vec<StoredLog>,
        /// How many logs matched in all.
        total_count: u64,
    },
    /// Answer to anything that failed.
    Error {
        /// The class of failure.
        code: ErrorCode,
        /// A readable sentence.
        message: String,
        /// Optional structured details.
        #[serde(default)]
        details: Option<rmpv::Value>,
    },
    /// Answer to `GetStatus`.
    Status {
        /// Each component's health.
        components: Vec<ComponentStatus>,
        /// Time since the daemon started.
        uptime: Duration,
        /// Extension: the daemon's version (absent from older daemons).
        #[serde(default)]
        version: Option<String>,
    },
    /// Extension: answer to `ListMonitoring`.
    Monitoring {
        /// Every watched directory.
        paths: Vec<MonitoredPath>,
    },
}

/// One watched directory in a `Monitoring` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitoredPath {
    /// The canonical directory.
    pub path: String,
    /// Whether subdirectories are watched too.
    pub recursive: bool,
    /// Glob patterns of export files.
    pub patterns: Vec<String>,
    /// The session its exports belong to, if one was named.
    pub session_id: Option<String>,
    /// False while the directory is missing (it is watched again once it
    /// is back).
    pub active: bool,
    /// Extension, sent only when true: the tree has more directories than
    /// the daemon's `monitor.max_watches_per_root`; those beyond it are
    /// found by the periodic scan only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub watch_cap_reached: bool,
}

/// For `skip_serializing_if`: a flag sent only when set.
fn is_false(b: &bool) -> bool {
    !*b
}

impl Payload {
    /// The variant's name as it appears on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Payload::LogEntry(_) => "LogEntry",
            Payload::StartMonitoring { .. } => "StartMonitoring",
            Payload::StopMonitoring { .. } => "StopMonitoring",
            Payload::SessionStart { .. } => "SessionStart",
            Payload::SessionEnd { .. } => "SessionEnd",
            Payload::QueryLogs { .. } => "QueryLogs",
            Payload::LogBatch { .. } => "LogBatch",
            Payload::Authenticate { .. } => "Authenticate",
            Payload::GetStatus => "GetStatus",
            Payload::Ping => "Ping",
            Payload::ListMonitoring => "ListMonitoring",
            Payload::Acknowledgment { .. } => "Acknowledgment",
            Payload::LogResults { .. } => "LogResults",
            Payload::Error { .. } => "Error",
            Payload::Status { .. } => "Status",
            Payload::Monitoring { .. } => "Monitoring",
        }
    }

    /// True for variants only the daemon sends.
    pub fn is_answer(&self) -> bool {
        matches!(
            self,
            Payload::Acknowledgment { .. }
                | Payload::LogResults { .. }
                | Payload::Error { .. }
                | Payload::Status { .. }
                | Payload::Monitoring { .. }
        )
    }
}

/// The fields of one log, in `LogEntry` and in each `LogBatch` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogFields {
    /// Severity.
    pub level: LogLevel,
    /// Which part of the caller wrote it.
    pub component: String,
    /// The text.
    pub message: String,
    /// Any MessagePack value, or nil.
    #[serde(default)]
    pub metadata: Option<rmpv::Value>,
    /// Extension: the session; absent means the connection's session.
    #[serde(default)]
    pub session_id: Option<String>,
}

/// Filters of `QueryLogs`; every key optional, all given keys must match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogFilter {
    /// Only logs at this level or more severe.
    #[serde(default)]
    pub min_level: Option<LogLevel>,
    /// Only this component.
    #[serde(default)]
    pub component: Option<String>,
    /// Only this session.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Only logs stamped at or after this time.
    #[serde(default)]
    pub since: Option<Timestamp>,
    /// Only logs stamped before this time.
    #[serde(default)]
    pub until: Option<Timestamp>,
    /// Only messages containing this substring.
    #[serde(default)]
    pub contains: Option<String>,
    /// Extension for follow mode: only rows stored after this row id; the
    /// answer then holds the *oldest* `limit` such rows (see PROTOCOL.md).
    #[serde(default)]
    pub after_id: Option<i64>,
    /// Extension: only logs written by this uid. A client that may not see
    /// other users' logs gets only its own whatever it asks (PROTOCOL.md).
    #[serde(default)]
    pub uid: Option<u32>,
}

/// A stored log as `QueryLogs` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredLog {
    /// Row id: increases with storage order.
    pub id: i64,
    /// The id of the message that carried the log.
    #[serde(with = "uuid_bin")]
    pub uuid: Uuid,
    /// The sender's timestamp.
    pub timestamp: Timestamp,
    /// Severity.
    pub level: LogLevel,
    /// Which part of the caller wrote it.
    pub component: String,
    /// The log's session, if any.
    pub session_id: Option<String>,
    /// The text.
    pub message: String,
    /// The metadata as stored (JSON-shaped), or nil.
    pub metadata: Option<rmpv::Value>,
    /// Extension: the uid of the Unix client (or standalone `codi2`) that
    /// wrote it; nil over TCP and for logs stored before it was recorded.
    #[serde(default)]
    pub uid: Option<u32>,
}

/// One component's health in a `Status` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentStatus {
    /// Component name (`ipc`, `writer`, `storage`, ...).
    pub name: String,
    /// `healthy`, `degraded` or `failed`.
    pub status: String,
    /// A readable summary with the component's key figures.
    pub message: String,
    /// Extension: why the component is not healthy (nil when it is).
    #[serde(default)]
    pub reason: Option<String>,
    /// Extension: since when it is not healthy (nil when it is).
    #[serde(default)]
    pub since: Option<Timestamp>,
}

/// Severity of a log, least to most severe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LogLevel {
    /// Finest detail.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected.
    Warn,
    /// A failure.
    Error,
}

impl LogLevel {
    /// Every level, least severe first.
    pub const ALL: [LogLevel; 5] = [
        LogLevel::Trace,
        LogLevel::Debug,
        LogLevel::Info,
        LogLevel::Warn,
        LogLevel::Error,
    ];

    /// The wire (and database) name.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "Trace",
            LogLevel::Debug => "Debug",
            LogLevel::Info => "Info",
            LogLevel::Warn => "Warn",
            LogLevel::Error => "Error",
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogLevel {
    type Err = String;

    /// Case-insensitive; `warning` is accepted for `Warn`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "trace" => Ok(LogLevel::Trace),
            "debug" => Ok(LogLevel::Debug),
            "info" => Ok(LogLevel::Info),
            "warn" | "warning" => Ok(LogLevel::Warn),
            "error" => Ok(LogLevel::Error),
            _ => Err(format!(
                "unknown level `{s}` (expected trace, debug, info, warn or error)"
            )),
        }
    }
}

/// What became of an acknowledged request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckStatus {
    /// Done; for logs: committed to the database.
    Accepted,
    /// Taken but not yet durable (fire-and-forget mode only).
    Queued,
    /// Nothing was stored; the reason says why.
    Rejected(String),
}

/// The class of an `Error` answer, a string on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame's declared length exceeds 1 MiB.
    FrameTooLarge,
    /// The frame's declared length is zero.
    InvalidFrame,
    /// The body is not a valid `Message`.
    InvalidMessage,
    /// Authentication missing or wrong.
    Unauthorized,
    /// The client sends faster than allowed.
    RateLimited,
    /// The daemon cannot serve this now (shutting down, storage down).
    Unavailable,
    /// A valid message the daemon does not handle (yet).
    Unsupported,
    /// A well-formed request with invalid arguments.
    InvalidRequest,
    /// A bug or unexpected failure inside the daemon.
    Internal,
    /// A code this version does not know.
    Other(String),
}

impl ErrorCode {
    /// The wire name.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::Other(s) => s,
            named => named.static_name(),
        }
    }

    /// The wire name of a code this version names; `"Other"` for the rest.
    pub fn static_name(&self) -> &'static str {
        match self {
            ErrorCode::Other(_) => "Other",
            ErrorCode::FrameTooLarge => "FrameTooLarge",
            ErrorCode::InvalidFrame => "InvalidFrame",
            ErrorCode::InvalidMessage => "InvalidMessage",
            ErrorCode::Unauthorized => "Unauthorized",
            ErrorCode::RateLimited => "RateLimited",
            ErrorCode::Unavailable => "Unavailable",
            ErrorCode::Unsupported => "Unsupported",
            ErrorCode::InvalidRequest => "InvalidRequest",
            ErrorCode::Internal => "Internal",
        }
    }

    fn from_wire(s: &str) -> Self {
        match s {
            "FrameTooLarge" => ErrorCode::FrameTooLarge,
            "InvalidFrame" => ErrorCode::InvalidFrame,
            "InvalidMessage" => ErrorCode::InvalidMessage,
            "Unauthorized" => ErrorCode::Unauthorized,
            "RateLimited" => ErrorCode::RateLimited,
            "Unavailable" => ErrorCode::Unavailable,
            "Unsupported" => ErrorCode::Unsupported,
            "InvalidRequest" => ErrorCode::InvalidRequest,
            "Internal" => ErrorCode::Internal,
            other => ErrorCode::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(ErrorCode::from_wire(&s))
    }
}

/// A UTC instant with microsecond precision, an RFC 3339 string on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    micros: i64,
}

/// The earliest instant a timestamp may name: 0000-01-01T00:00:00Z.
pub const MIN_TIMESTAMP_MICROS: i64 = -62_167_219_200_000_000;
/// How far ahead of the daemon's clock a log may be stamped; later ones
/// are `Rejected` (they would sort above every real log for years).
pub const MAX_FUTURE_SKEW_MICROS: i64 = 24 * 3600 * 1_000_000;
/// The latest instant a timestamp may name: 9999-12-31T23:59:59.999999Z.
/// Later instants would format with a five-digit year, which RFC 3339
/// cannot express.
pub const MAX_TIMESTAMP_MICROS: i64 = 253_402_300_799_999_999;

impl Timestamp {
    /// The earliest instant RFC 3339 can write in UTC,
    /// `0000-01-01T00:00:00Z`.
    pub const MIN: Timestamp = Timestamp {
        micros: MIN_TIMESTAMP_MICROS,
    };
    /// The latest instant RFC 3339 can write in UTC,
    /// `9999-12-31T23:59:59.999999Z`.
    pub const MAX: Timestamp = Timestamp {
        micros: MAX_TIMESTAMP_MICROS,
    };

    /// The current time.
    pub fn now() -> Self {
        Timestamp::from_micros(Utc::now().timestamp_micros())
    }

    /// From microseconds since the Unix epoch, clamped to years 0000-9999
    /// so that every timestamp formats as valid RFC 3339 (rows stored
    /// before the range was enforced are shown at its edge).
    pub fn from_micros(micros: i64) -> Self {
        Timestamp {
            micros: micros.clamp(MIN_TIMESTAMP_MICROS, MAX_TIMESTAMP_MICROS),
        }
    }

    /// Microseconds since the Unix epoch (the database's representation).
    pub const fn as_micros(self) -> i64 {
        self.micros
    }

    /// Parses RFC 3339 with any offset; the result is UTC and must fall
    /// within years 0000-9999 (`9999-12-31T23:59:59-01:00` is year 10000 in
    /// UTC and is refused).
    pub fn parse_rfc3339(s: &str) -> Result<Self, String> {
        let t = DateTime::parse_from_rfc3339(s)
            .map_err(|e| format!("invalid RFC 3339 timestamp `{s}`: {e}"))?;
        let micros = t.timestamp_micros();
        if !(MIN_TIMESTAMP_MICROS..=MAX_TIMESTAMP_MICROS).contains(&micros) {
            return Err(format!(
                "timestamp `{s}` falls outside years 0000-9999 in UTC"
            ));
        }
        Ok(Timestamp { micros })
    }

    /// Formats as RFC 3339 UTC with microseconds, e.g.
    /// `2026-11-26T22:34:56.123456Z`.
    pub fn to_rfc3339(self) -> String {
        DateTime::<Utc>::from_timestamp_micros(self.micros)
            .map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true))
            .unwrap_or_else(|| "invalid-timestamp".to_owned())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TsVisitor;
        impl de::Visitor<'_> for TsVisitor {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an RFC 3339 timestamp string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Timestamp, E> {
                Timestamp::parse_rfc3339(v).map_err(E::custom)
            }
        }
        d.deserialize_str(TsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_must_fall_within_years_0000_to_9999_in_utc() {
        for ok in [
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999Z",
            "2026-12-03T10:00:00+02:00",
        ] {
            let t = Timestamp::parse_rfc3339(ok).unwrap();
            assert_eq!(Timestamp::parse_rfc3339(&t.to_rfc3339()), Ok(t), "{ok}");
        }
        for bad in ["9999-12-31T23:59:59-01:00", "0000-01-01T00:00:00+01:00"] {
            let e = Timestamp::parse_rfc3339(bad).unwrap_err();
            assert!(e.contains("outside years 0000-9999"), "{bad}: {e}");
        }
    }

    #[test]
    fn every_timestamp_formats_as_parseable_rfc3339() {
        for micros in [i64::MIN, -1, 0, i64::MAX] {
            let text = Timestamp::from_micros(micros).to_rfc3339();
            assert!(Timestamp::parse_rfc3339(&text).is_ok(), "{micros}: {text}");
        }
    }
}
