//! Configuration shared by the daemon and `codi2`.
//!
//! Two stages, so that every mistake is caught in one place with a sentence
//! that names the key: [`RawConfig`] is the TOML file exactly as written
//! (every field optional, unknown keys are errors), and [`Config`] is the
//! validated result after defaults, the environment and command-line flags
//! were applied (precedence: defaults < file < environment < flags).
//!
//! The environment is a parameter ([`paths::EnvLookup`]) rather than read
//! directly, so tests never touch the process environment. docs/CONFIG.md
//! describes every key for users.

pub mod paths;

use crate::export::ArchiveMode;
use log::LevelFilter;
use paths::EnvLookup;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;
use thiserror::Error;

/// `general.log_level` when unset.
pub const DEFAULT_LOG_LEVEL: LevelFilter = LevelFilter::Info;
/// `general.session_timeout` when unset: an open session with no activity
/// for this long is ended by the daemon (`store::retention`).
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// `storage.cache_size_mb` when unset (SQLite page cache per connection).
pub const DEFAULT_CACHE_SIZE_MB: u32 = 64;
/// `storage.retention_days` when unset: 0 keeps logs, ended sessions and
/// export rows forever (`store::retention` deletes older ones otherwise).
pub const DEFAULT_RETENTION_DAYS: u32 = 0;
/// `storage.max_db_size_mb` when unset: 0 sets no cap (`store::retention`
/// rotates the oldest logs out of a database above a cap otherwise).
pub const DEFAULT_MAX_DB_SIZE_MB: u64 = 0;
/// The largest `storage.max_db_size_mb`: 16 TiB, about SQLite's own limit
/// with 4 KiB pages.
pub const MAX_DB_SIZE_MB: u64 = 16 << 20;
/// `storage.reader_threads` when unset.
pub const DEFAULT_READER_THREADS: usize = 2;
/// `storage.batch_max_rows` when unset: most rows in one group commit.
pub const DEFAULT_BATCH_MAX_ROWS: usize = 8192;
/// `storage.inflight_bytes` when unset: bytes of accepted-but-unanswered
/// requests across all connections.
pub const DEFAULT_INFLIGHT_BYTES: usize = 64 * 1024 * 1024;
/// TCP port when TCP is on and no port is given (the seed's port).
pub const DEFAULT_TCP_PORT: u16 = 9847;
/// TCP host when TCP is turned on by a port alone.
pub const DEFAULT_TCP_HOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// `monitor.workers` when unset: 0 means one event loop per core.
pub const DEFAULT_WORKERS: usize = 0;
/// Most event loops `monitor.workers` may ask for.
pub const MAX_WORKERS: usize = 256;
/// `monitor.rate_limit` when unset: logs per second per connection, 0 means
/// unlimited.
pub const DEFAULT_RATE_LIMIT: u32 = 0;
/// `monitor.rate_burst` when unset: logs a connection may send at once before
/// the rate applies.
pub const DEFAULT_RATE_BURST: u32 = 10_000;
/// `monitor.max_connections` when unset.
pub const DEFAULT_MAX_CONNECTIONS: usize = 2048;
/// `monitor.max_pending_per_connection` when unset: unanswered requests per
/// connection before the daemon stops reading it.
pub const DEFAULT_MAX_PENDING_PER_CONNECTION: usize = 1024;
/// `monitor.file_batch_size` when unset (export files handled per round).
pub const DEFAULT_FILE_BATCH_SIZE: usize = 100;
/// `monitor.export_patterns` when unset.
pub const DEFAULT_EXPORT_PATTERNS: &[&str] = &["*.md", "*.txt", "*.json"];
/// `monitor.scan_interval` when unset: full rescan of watched directories.
pub const DEFAULT_SCAN_INTERVAL: Duration = Duration::from_secs(30);
/// `server_hub.enabled` when unset.
pub const DEFAULT_SERVER_HUB_ENABLED: bool = false;
/// `server_hub.batch_size` when unset.
pub const DEFAULT_SERVER_HUB_BATCH_SIZE: usize = 100_000;
/// `server_hub.sync_interval` when unset.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// `server_hub.batch_bytes` when unset: most bytes of one batch's body.
pub const DEFAULT_SERVER_HUB_BATCH_BYTES: usize = 64 << 20;
/// `server_hub.database` when unset.
pub const DEFAULT_HUB_DATABASE: &str = "codi";
/// `server_hub.logs_table`, `sessions_table` and `exports_table` when unset.
pub const DEFAULT_HUB_TABLES: [&str; 3] = ["logs", "sessions", "export_archive"];
/// `server_hub.backoff_min` when unset: the first wait after a failed send.
pub const DEFAULT_HUB_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// `server_hub.backoff_max` when unset: the longest wait between retries.
pub const DEFAULT_HUB_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Where `server_hub.host_id` comes from when unset (the hostname if it
/// cannot be read).
pub const MACHINE_ID_PATH: &str = "/etc/machine-id";
/// Longest `server_hub.host_id`, in bytes.
pub const MAX_HOST_ID_LEN: usize = 128;
/// Longest Unix socket path the kernel accepts (`sun_path` less its NUL).
pub const MAX_SOCKET_PATH_BYTES: usize = 107;
/// `monitor.auth_timeout` when unset: how long a TCP connection may take to
/// authenticate before it is closed.
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// `monitor.max_unauthenticated` when unset: TCP connections that may wait
/// for their `Authenticate` at once.
pub const DEFAULT_MAX_UNAUTHENTICATED: usize = 64;
/// `monitor.reserved_unix_connections` when unset: connection slots TCP
/// clients can never take.
pub const DEFAULT_RESERVED_UNIX_CONNECTIONS: usize = 64;
/// `monitor.idle_timeout` when unset: a connection that sends no request
/// and is owed nothing for this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// `monitor.write_timeout` when unset: a connection whose answers have
/// waited unread for this long is closed, releasing their memory.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// `monitor.max_watches_per_root` when unset: inotify watches one watched
/// tree may use; deeper trees are covered by the periodic scan.
pub const DEFAULT_MAX_WATCHES_PER_ROOT: usize = 10_000;
/// Shortest token the daemon accepts, in bytes: a short token is guessed.
pub const MIN_TOKEN_LEN: usize = 16;
/// `admin.enabled` when unset: the metrics and health endpoint is on.
pub const DEFAULT_ADMIN_ENABLED: bool = true;
/// `admin.listen` when unset (the seed's TCP port plus one, on loopback).
pub const DEFAULT_ADMIN_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9848);
/// `health.disk_min_free_mb` when unset.
pub const DEFAULT_DISK_MIN_FREE_MB: u64 = 256;
/// `health.disk_min_free_percent` when unset.
pub const DEFAULT_DISK_MIN_FREE_PERCENT: u32 = 5;
/// `health.failing_for` when unset.
pub const DEFAULT_FAILING_FOR: Duration = Duration::from_secs(30);

/// Environment variable naming the config file.
pub const ENV_CONFIG: &str = "CODI_CONFIG";
/// Environment variable choosing the listeners: `unix`, `tcp` or `both`.
pub const ENV_MODE: &str = "CODI_MONITOR_MODE";
/// Environment variable with the TCP port.
pub const ENV_PORT: &str = "CODI_MONITOR_PORT";
/// Environment variable with the shared token.
pub const ENV_TOKEN: &str = "CODI_MONITOR_TOKEN";
/// Environment variable with the database path.
pub const ENV_DB: &str = "CODI_DB";

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrong types.
    #[error("invalid config file {origin}: {message}")]
    Parse {
        /// The file, or `<text>` for a string.
        origin: String,
        /// The TOML parser's explanation (with line and column).
        message: String,
    },
    /// A value is out of range or the combination is unsafe.
    #[error("{0}")]
    Invalid(String),
}

fn invalid<T>(message: String) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid(message))
}

/// Values from the command line; each wins over file and environment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// `--config PATH`.
    pub config: Option<PathBuf>,
    /// `--socket PATH`: Unix listener at PATH (an empty path turns it off).
    pub socket: Option<PathBuf>,
    /// `--tcp ADDR`: TCP listener at ADDR (port 0 allowed).
    pub tcp: Option<String>,
    /// `--db PATH`.
    pub db: Option<PathBuf>,
    /// `--workers N` (0: one per core).
    pub workers: Option<usize>,
    /// `--log-level L`.
    pub log_level: Option<String>,
    /// `--token-file PATH`.
    pub token_file: Option<PathBuf>,
    /// `--admin ADDR`: the admin endpoint at ADDR (port 0 allowed; an
    /// empty value turns it off).
    pub admin: Option<String>,
}

/// The config file as written: every key optional, unknown keys refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[general]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub general: Option<RawGeneral>,
    /// `[storage]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<RawStorage>,
    /// `[monitor]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<RawMonitor>,
    /// `[server_hub]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_hub: Option<RawServerHub>,
    /// `[admin]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<RawAdmin>,
    /// `[health]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<RawHealth>,
}

/// `[general]` as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGeneral {
    /// Default workspace directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// `off`, `error`, `warn`, `info`, `debug` or `trace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// Humantime duration, e.g. `"24h"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_timeout: Option<String>,
}

/// `[storage]` as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    /// Database file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sqlite_path: Option<String>,
    /// WAL journal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_mode: Option<bool>,
    /// Page cache per connection, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_size_mb: Option<u32>,
    /// Days logs are kept; 0 forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_days: Option<u32>,
    /// Size cap of the main database, MiB; 0 none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_db_size_mb: Option<u64>,
    /// Query threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reader_threads: Option<usize>,
    /// Most rows per group commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_max_rows: Option<usize>,
    /// Global in-flight byte budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inflight_bytes: Option<usize>,
}

/// `[monitor]` as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMonitor {
    /// Unix socket path; `""` turns the Unix listener off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_socket_path: Option<String>,
    /// Group that may use the socket (mode 0660 then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    /// The seed's key: TCP on at 127.0.0.1:port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_port: Option<u16>,
    /// TCP on at this address, e.g. `"0.0.0.0:9847"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_address: Option<String>,
    /// Event loops; 0 one per core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// File holding the shared token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// Logs per second per connection; 0 unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u32>,
    /// Burst allowance of the rate limit, in logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_burst: Option<u32>,
    /// Most simultaneous connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Most unanswered requests per connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_per_connection: Option<usize>,
    /// Export files per round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_batch_size: Option<usize>,
    /// Glob patterns of export files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_patterns: Option<Vec<String>>,
    /// Humantime duration between rescans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan_interval: Option<String>,
    /// `copy` (default) or `move` exports into the archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_mode: Option<String>,
    /// Listen on loopback TCP without a token (every local user may connect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_unauthenticated_tcp: Option<bool>,
    /// Humantime duration a TCP connection has to authenticate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_timeout: Option<String>,
    /// Most TCP connections waiting to authenticate at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unauthenticated: Option<usize>,
    /// Connection slots kept for the Unix socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_unix_connections: Option<usize>,
    /// Humantime duration after which an idle connection is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// Humantime duration after which a connection that leaves its answers
    /// unread is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_timeout: Option<String>,
    /// The user the system daemon runs as (name or uid), which `codi2`
    /// trusts besides root and itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_user: Option<String>,
    /// Users (names or uids) whose queries see every user's logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_all_users: Option<Vec<String>>,
    /// Groups (names or gids) whose members' queries see every user's logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_all_groups: Option<Vec<String>>,
    /// Most inotify watches one watched tree may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_watches_per_root: Option<usize>,
}

/// `[server_hub]` as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerHub {
    /// Sync to the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Hub URL (`http://` or `https://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Logs per sync request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Humantime duration between syncs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_interval: Option<String>,
    /// Most bytes of one batch's body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_bytes: Option<usize>,
    /// The hub's database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// The hub's table of logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs_table: Option<String>,
    /// The hub's table of sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions_table: Option<String>,
    /// The hub's table of export records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exports_table: Option<String>,
    /// The hub user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// A file holding the hub user's password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// This host's name on the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    /// Humantime duration: the first wait after a failed send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_min: Option<String>,
    /// Humantime duration: the longest wait between retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_max: Option<String>,
    /// What the hub is: `"clickhouse"` or `"ndjson"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// A PEM file of the CA certificates trusted for an `https://` hub,
    /// instead of the built-in web roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// The `Content-Type` of a batch: `"application/x-ndjson"` or
    /// `"application/json"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

/// `[admin]` as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Serve `/metrics` and `/health`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// `"IP:PORT"` of the HTTP listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Listen beyond loopback (no authentication; firewall it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_remote: Option<bool>,
}

/// `[health]` as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// Nearly full below this many free MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_min_free_mb: Option<u64>,
    /// Nearly full below this percentage free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_min_free_percent: Option<u32>,
    /// Humantime duration of failing writes before the daemon is unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_for: Option<String>,
}

impl RawConfig {
    /// Parses TOML text; `origin` names it in errors. The error gives the
    /// line, column and key but never the line's value: a token typed into
    /// the file by mistake (`token = "..."`) must not reach the log.
    pub fn parse(text: &str, origin: &str) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let before = e.span().and_then(|span| text.get(..span.start));
            let at = before.map_or(String::new(), |before| {
                let line = before.matches('\n').count() + 1;
                let start = before.rfind('\n').map_or(0, |i| i + 1);
                let column = before[start..].chars().count() + 1;
                let whole = text[start..].lines().next().unwrap_or("").trim();
                let shown = match whole.split_once('=') {
                    Some((key, _)) => format!(" (`{} = ...`)", key.trim()),
                    None if whole.starts_with('[') => format!(" (`{whole}`)"),
                    None => String::new(),
                };
                format!("line {line}, column {column}{shown}: ")
            });
            ConfigError::Parse {
                origin: origin.to_owned(),
                message: format!("{at}{}", e.message().trim_end()),
            }
        })
    }
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[general]`.
    pub general: GeneralConfig,
    /// `[storage]`.
    pub storage: StorageConfig,
    /// `[monitor]`.
    pub monitor: MonitorConfig,
    /// `[server_hub]`.
    pub server_hub: ServerHubConfig,
    /// `[admin]`.
    pub admin: AdminConfig,
    /// `[health]`.
    pub health: HealthConfig,
    /// The file loaded, if any.
    pub source: Option<PathBuf>,
    /// What the daemon says at start about this configuration: keys that
    /// are accepted but not yet in effect, and unsafe choices made on
    /// purpose.
    pub warnings: Vec<String>,
}

/// Process-wide settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneralConfig {
    /// Default workspace directory, if any.
    pub workspace: Option<PathBuf>,
    /// The daemon's own log verbosity.
    pub log_level: LevelFilter,
    /// An open session with no activity for this long is ended.
    pub session_timeout: Duration,
}

/// The database.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageConfig {
    /// The SQLite file.
    pub sqlite_path: PathBuf,
    /// SQLite page cache per connection, MiB.
    pub cache_size_mb: u32,
    /// Days logs, ended sessions and export rows are kept; 0 keeps them
    /// forever.
    pub retention_days: u32,
    /// Size cap of the main database, MiB: above it (or with its
    /// filesystem nearly full) the oldest logs are rotated out; 0 sets no
    /// cap.
    pub max_db_size_mb: u64,
    /// Threads answering queries, each with its own read-only connection.
    pub reader_threads: usize,
    /// Most rows the writer puts in one transaction.
    pub batch_max_rows: usize,
    /// Bytes of requests accepted but not yet answered, all connections.
    pub inflight_bytes: usize,
}

/// Listeners and per-connection limits.
#[derive(Clone, PartialEq)]
pub struct MonitorConfig {
    /// The Unix socket; `None`: Unix listener off.
    pub unix_socket_path: Option<PathBuf>,
    /// Group given access to the socket (mode 0660), if any.
    pub socket_group: Option<String>,
    /// The TCP address; `None`: TCP off.
    pub tcp_listen: Option<SocketAddr>,
    /// Event loops, resolved (at least 1).
    pub workers: usize,
    /// The resolved shared secret, if any.
    pub token: Option<String>,
    /// The configured token file, if any.
    pub token_file: Option<PathBuf>,
    /// Logs per second per connection; 0 is unlimited.
    pub rate_limit: u32,
    /// Logs a connection may send at once before the rate applies.
    pub rate_burst: u32,
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// Most unanswered requests per connection.
    pub max_pending_per_connection: usize,
    /// Export files handled per round.
    pub file_batch_size: usize,
    /// Glob patterns of export files.
    pub export_patterns: Vec<String>,
    /// Time between full rescans of watched directories.
    pub scan_interval: Duration,
    /// Copy or move exports into the archive.
    pub archive_mode: ArchiveMode,
    /// Loopback TCP without a token was asked for explicitly.
    pub allow_unauthenticated_tcp: bool,
    /// How long a TCP connection may take to authenticate.
    pub auth_timeout: Duration,
    /// Most TCP connections waiting to authenticate at once.
    pub max_unauthenticated: usize,
    /// Connection slots TCP clients never take (0 without a Unix socket).
    pub reserved_unix_connections: usize,
    /// A connection idle this long is closed.
    pub idle_timeout: Duration,
    /// A connection whose answers wait unread this long is closed.
    pub write_timeout: Duration,
    /// The user (name or uid) the system daemon runs as, if configured.
    pub service_user: Option<String>,
    /// Users whose queries see every user's logs (besides root and the
    /// daemon's own and service user).
    pub query_all_users: Vec<String>,
    /// Groups whose members' queries see every user's logs.
    pub query_all_groups: Vec<String>,
    /// Most inotify watches one watched tree may use.
    pub max_watches_per_root: usize,
}

impl fmt::Debug for MonitorConfig {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("MonitorConfig")
            .field("unix_socket_path", &self.unix_socket_path)
            .field("socket_group", &self.socket_group)
            .field("tcp_listen", &self.tcp_listen)
            .field("workers", &self.workers)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("rate_limit", &self.rate_limit)
            .field("rate_burst", &self.rate_burst)
            .field("max_connections", &self.max_connections)
            .field(
                "max_pending_per_connection",
                &self.max_pending_per_connection,
            )
            .field("file_batch_size", &self.file_batch_size)
            .field("export_patterns", &self.export_patterns)
            .field("scan_interval", &self.scan_interval)
            .field("archive_mode", &self.archive_mode)
            .field("allow_unauthenticated_tcp", &self.allow_unauthenticated_tcp)
            .field("auth_timeout", &self.auth_timeout)
            .field("max_unauthenticated", &self.max_unauthenticated)
            .field("reserved_unix_connections", &self.reserved_unix_connections)
            .field("idle_timeout", &self.idle_timeout)
            .field("write_timeout", &self.write_timeout)
            .field("service_user", &self.service_user)
            .field("query_all_users", &self.query_all_users)
            .field("query_all_groups", &self.query_all_groups)
            .field("max_watches_per_root", &self.max_watches_per_root)
            .finish()
    }
}

/// Upstream synchronisation to a ClickHouse hub (docs/HUB.md). The
/// password itself is never held here: only the file it is read from when
/// a batch is sent, so no configuration dump or log line can show it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerHubConfig {
    /// Whether logs are synced to the hub.
    pub enabled: bool,
    /// The hub's URL (its HTTP interface).
    pub url: Option<String>,
    /// Rows per batch.
    pub batch_size: usize,
    /// Most bytes of one batch's body.
    pub batch_bytes: usize,
    /// Time between syncs.
    pub sync_interval: Duration,
    /// The hub's database.
    pub database: String,
    /// The hub's tables of logs, sessions and export records.
    pub tables: HubTables,
    /// The hub user; `None`: ClickHouse's `default`.
    pub user: Option<String>,
    /// The file holding the user's password, if any.
    pub password_file: Option<PathBuf>,
    /// This host's name on the hub (`/etc/machine-id` by default, else the
    /// hostname).
    pub host_id: String,
    /// The first wait after a failed send; it doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// The longest wait between retries.
    pub backoff_max: Duration,
    /// What the hub is, hence how a batch is sent.
    pub kind: HubKind,
    /// The PEM file of CA certificates trusted for an `https://` hub
    /// instead of the built-in web roots; `None`: those roots.
    pub ca_file: Option<PathBuf>,
    /// The `Content-Type` a batch is sent with (one of
    /// [`HUB_CONTENT_TYPES`]).
    pub content_type: &'static str,
}

/// The values `server_hub.content_type` may take, the default first:
/// Fluent Bit's `http` input takes only `application/json`.
pub const HUB_CONTENT_TYPES: [&str; 2] = ["application/x-ndjson", "application/json"];

/// What the hub is (`server_hub.kind`), hence how a batch is sent
/// (docs/HUB.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubKind {
    /// ClickHouse's HTTP interface: an `INSERT ... FORMAT JSONEachRow`.
    ClickHouse,
    /// A generic receiver of NDJSON over HTTP (Vector, Fluent Bit): the
    /// same body POSTed to the URL as written, with `X-Codi-*` headers.
    Ndjson,
}

impl HubKind {
    /// The name `server_hub.kind` takes.
    pub fn name(self) -> &'static str {
        match self {
            HubKind::ClickHouse => "clickhouse",
            HubKind::Ndjson => "ndjson",
        }
    }
}

/// The hub's table names, one per kind of row shipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubTables {
    /// Logs.
    pub logs: String,
    /// Sessions.
    pub sessions: String,
    /// Export records.
    pub exports: String,
}

/// The metrics and health endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// Whether it runs.
    pub enabled: bool,
    /// Where it listens.
    pub listen: SocketAddr,
    /// Listening beyond loopback was asked for explicitly.
    pub allow_remote: bool,
}

impl AdminConfig {
    /// The address to listen on, if the endpoint is on.
    pub fn listen_on(&self) -> Option<SocketAddr> {
        self.enabled.then_some(self.listen)
    }
}

/// Thresholds of the health evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// The database's filesystem is nearly full below this many free MiB.
    pub disk_min_free_mb: u64,
    /// ... or below this percentage of its size.
    pub disk_min_free_percent: u32,
    /// Every write failing this long makes the daemon unhealthy.
    pub failing_for: Duration,
}

/// Who the configuration is for: the daemon checks everything, `codi2` only
/// what it needs to find the daemon and the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Daemon,
    Client,
}

/// Everything outside the file that resolution depends on.
struct Host<'a> {
    env: EnvLookup<'a>,
    euid: u32,
    purpose: Purpose,
}

impl Config {
    /// Loads the daemon's configuration from the process environment.
    pub fn load(o: &Overrides) -> Result<Config, ConfigError> {
        Config::load_with_env(o, &paths::process_env)
    }

    /// Loads the daemon's configuration with `env` as the environment.
    pub fn load_with_env(o: &Overrides, env: EnvLookup) -> Result<Config, ConfigError> {
        let host = Host {
            env,
            euid: paths::current_euid(),
            purpose: Purpose::Daemon,
        };
        load_from(o, &host, Path::new(paths::SYSTEM_CONFIG_PATH))
    }

    /// Loads the configuration as `codi2` needs it: an unreadable system
    /// config file or token file is skipped rather than an error (they
    /// usually belong to the daemon's user), and the listener safety checks,
    /// which only concern the daemon, are not applied.
    pub fn load_client_with_env(o: &Overrides, env: EnvLookup) -> Result<Config, ConfigError> {
        let host = Host {
            env,
            euid: paths::current_euid(),
            purpose: Purpose::Client,
        };
        load_from(o, &host, Path::new(paths::SYSTEM_CONFIG_PATH))
    }

    /// Validates TOML text as the daemon would, with the process environment.
    pub fn from_toml_str(text: &str, o: &Overrides) -> Result<Config, ConfigError> {
        Config::from_toml_str_with_env(text, o, &paths::process_env)
    }

    /// Validates TOML text as the daemon would, with `env` as the environment.
    pub fn from_toml_str_with_env(
        text: &str,
        o: &Overrides,
        env: EnvLookup,
    ) -> Result<Config, ConfigError> {
        let host = Host {
            env,
            euid: paths::current_euid(),
            purpose: Purpose::Daemon,
        };
        resolve(RawConfig::parse(text, "<text>")?, o, &host, None)
    }

    /// The effective configuration as TOML (for `config check`); the token
    /// itself is never written, only whether one is set.
    pub fn to_toml(&self) -> String {
        let raw = RawConfig {
            general: Some(RawGeneral {
                workspace: self
                    .general
                    .workspace
                    .as_ref()
                    .map(|p| p.display().to_string()),
                log_level: Some(self.general.log_level.as_str().to_ascii_lowercase()),
                session_timeout: Some(format_duration(self.general.session_timeout)),
            }),
            storage: Some(RawStorage {
                sqlite_path: Some(self.storage.sqlite_path.display().to_string()),
                wal_mode: Some(true),
                cache_size_mb: Some(self.storage.cache_size_mb),
                retention_days: Some(self.storage.retention_days),
                max_db_size_mb: Some(self.storage.max_db_size_mb),
                reader_threads: Some(self.storage.reader_threads),
                batch_max_rows: Some(self.storage.batch_max_rows),
                inflight_bytes: Some(self.storage.inflight_bytes),
            }),
            monitor: Some(RawMonitor {
                unix_socket_path: Some(
                    self.monitor
                        .unix_socket_path
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                ),
                socket_group: self.monitor.socket_group.clone(),
                tcp_port: None,
                tcp_address: self.monitor.tcp_listen.map(|a| a.to_string()),
                workers: Some(self.monitor.workers),
                token_file: self
                    .monitor
                    .token_file
                    .as_ref()
                    .map(|p| p.display().to_string()),
                rate_limit: Some(self.monitor.rate_limit),
                rate_burst: Some(self.monitor.rate_burst),
                max_connections: Some(self.monitor.max_connections),
                max_pending_per_connection: Some(self.monitor.max_pending_per_connection),
                file_batch_size: Some(self.monitor.file_batch_size),
                export_patterns: Some(self.monitor.export_patterns.clone()),
                scan_interval: Some(format_duration(self.monitor.scan_interval)),
                archive_mode: Some(
                    match self.monitor.archive_mode {
                        ArchiveMode::Copy => "copy",
                        ArchiveMode::Move => "move",
                    }
                    .into(),
                ),
                allow_unauthenticated_tcp: Some(self.monitor.allow_unauthenticated_tcp),
                auth_timeout: Some(format_duration(self.monitor.auth_timeout)),
                max_unauthenticated: Some(self.monitor.max_unauthenticated),
                reserved_unix_connections: Some(self.monitor.reserved_unix_connections),
                idle_timeout: Some(format_duration(self.monitor.idle_timeout)),
                write_timeout: Some(format_duration(self.monitor.write_timeout)),
                service_user: self.monitor.service_user.clone(),
                query_all_users: Some(self.monitor.query_all_users.clone()),
                query_all_groups: Some(self.monitor.query_all_groups.clone()),
                max_watches_per_root: Some(self.monitor.max_watches_per_root),
            }),
            server_hub: Some(RawServerHub {
                enabled: Some(self.server_hub.enabled),
                url: self.server_hub.url.clone(),
                batch_size: Some(self.server_hub.batch_size),
                sync_interval: Some(format_duration(self.server_hub.sync_interval)),
                batch_bytes: Some(self.server_hub.batch_bytes),
                database: Some(self.server_hub.database.clone()),
                logs_table: Some(self.server_hub.tables.logs.clone()),
                sessions_table: Some(self.server_hub.tables.sessions.clone()),
                exports_table: Some(self.server_hub.tables.exports.clone()),
                user: self.server_hub.user.clone(),
                password_file: self
                    .server_hub
                    .password_file
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned()),
                host_id: Some(self.server_hub.host_id.clone()),
                backoff_min: Some(format_duration(self.server_hub.backoff_min)),
                backoff_max: Some(format_duration(self.server_hub.backoff_max)),
                kind: Some(self.server_hub.kind.name().into()),
                ca_file: self
                    .server_hub
                    .ca_file
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned()),
                content_type: Some(self.server_hub.content_type.into()),
            }),
            admin: Some(RawAdmin {
                enabled: Some(self.admin.enabled),
                listen: Some(self.admin.listen.to_string()),
                allow_remote: Some(self.admin.allow_remote),
            }),
            health: Some(RawHealth {
                disk_min_free_mb: Some(self.health.disk_min_free_mb),
                disk_min_free_percent: Some(self.health.disk_min_free_percent),
                failing_for: Some(format_duration(self.health.failing_for)),
            }),
        };
        let source = match &self.source {
            Some(p) => p.display().to_string(),
            None => "built-in defaults".to_owned(),
        };
        let token = if self.monitor.token.is_some() {
            "set (redacted)"
        } else {
            "none"
        };
        let body = toml::to_string(&raw).expect("a RawConfig always serializes");
        let warnings: String = self
            .warnings
            .iter()
            .map(|w| format!("# warning: {w}\n"))
            .collect();
        format!("# Effective configuration (file: {source})\n# token: {token}\n{warnings}\n{body}")
    }
}

fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Finds and reads the config file (flag, then `$CODI_CONFIG`, then the
/// system file if it exists), then resolves it.
fn load_from(o: &Overrides, host: &Host, system_config: &Path) -> Result<Config, ConfigError> {
    let (path, explicit) = match (&o.config, (host.env)(ENV_CONFIG)) {
        (Some(p), _) => (Some(p.clone()), true),
        (None, Some(p)) => (Some(PathBuf::from(p)), true),
        (None, None) if system_config.exists() => (Some(system_config.to_path_buf()), false),
        (None, None) => (None, false),
    };
    let Some(path) = path else {
        return resolve(RawConfig::default(), o, host, None);
    };
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(_) if !explicit && host.purpose == Purpose::Client => {
            // The system file may be readable by the daemon's group only;
            // codi2 then works with defaults.
            return resolve(RawConfig::default(), o, host, None);
        }
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    let raw = RawConfig::parse(&text, &path.display().to_string())?;
    resolve(raw, o, host, Some(path))
}

/// Parses a humantime duration of `key` (or takes `default`), refusing
/// zero and values outside `range`.
fn duration(
    key: &str,
    value: Option<&String>,
    default: Duration,
    range: std::ops::RangeInclusive<Duration>,
) -> Result<Duration, ConfigError> {
    let Some(text) = value else {
        return Ok(default);
    };
    let d = match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => return invalid(format!("{key} must be longer than zero")),
        Ok(d) => d,
        Err(e) => {
            return invalid(format!(
                "{key} `{text}` is not a duration like \"30s\" or \"24h\": {e}"
            ))
        }
    };
    if !range.contains(&d) {
        return invalid(format!(
            "{key} is {text} but must be between {} and {}",
            format_duration(*range.start()),
            format_duration(*range.end())
        ));
    }
    Ok(d)
}

/// `value` or `default`, refusing values outside `range`.
fn in_range<T: PartialOrd + Copy + fmt::Display>(
    key: &str,
    value: Option<T>,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError> {
    let v = value.unwrap_or(default);
    if v < *range.start() {
        return invalid(format!(
            "{key} is {v} but must be at least {}",
            range.start()
        ));
    }
    if v > *range.end() {
        return invalid(format!("{key} is {v} but must be at most {}", range.end()));
    }
    Ok(v)
}

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// A ClickHouse database or table name of `key` (or `default`): letters,
/// digits and `_`, not starting with a digit, at most 64 bytes, so it can
/// go into a query unquoted.
fn identifier(key: &str, value: Option<String>, default: &str) -> Result<String, ConfigError> {
    let name = non_empty(value).unwrap_or_else(|| default.to_owned());
    let ok = name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if !ok {
        return invalid(format!(
            "{key} `{name}` must be letters, digits and _ (not first), at most 64"
        ));
    }
    Ok(name)
}

/// `server_hub.host_id`, or this machine's id (`/etc/machine-id`), or its
/// hostname: at most [`MAX_HOST_ID_LEN`] printable bytes.
fn host_id(value: Option<String>) -> Result<String, ConfigError> {
    let id = value.or_else(|| {
        std::fs::read_to_string(MACHINE_ID_PATH)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
            })
    });
    match id {
        Some(id) if id.len() <= MAX_HOST_ID_LEN && !id.chars().any(char::is_control) => Ok(id),
        Some(_) => invalid(format!(
            "server_hub.host_id must be at most {MAX_HOST_ID_LEN} printable bytes"
        )),
        None => invalid(format!(
            "server_hub.host_id is not set and neither {MACHINE_ID_PATH} nor the hostname gives one"
        )),
    }
}

/// Longest password file read, in bytes.
const MAX_PASSWORD_FILE_LEN: u64 = 4096;

/// Checks a hub URL as `server_hub.url` (named `key` in errors) must be:
/// `http://` or `https://`, and no user, password, query or fragment in it
/// (they would be logged with it: `server_hub.user` and `password_file`
/// keep credentials out).
pub fn check_hub_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        return invalid(format!(
            "{key} `{}` must start with http:// or https://",
            crate::text::escape_controls(url)
        ));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains('@') || rest.contains('?') || rest.contains('#') {
        return invalid(format!(
            "{key} must not hold a user, a password or a query: set the user and the \
             password file instead"
        ));
    }
    if authority.is_empty() || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return invalid(format!(
            "{key} `{}` names no host, or holds spaces or controls",
            crate::text::escape_controls(url)
        ));
    }
    Ok(())
}

/// Reads the hub password from `path` (trailing line ends removed),
/// refusing a file that is not a regular file, is empty or longer than
/// 4 KiB, or that users other than its owner may read (the password would
/// not be secret). The mode is checked on the opened file, so the file
/// read is the file checked. Errors name the file, never its content.
pub fn read_password_file(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let fail = |e: io::Error| ConfigError::Invalid(format!("password file `{shown}`: {e}"));
    let file = fs::File::open(path).map_err(fail)?;
    let meta = file.metadata().map_err(fail)?;
    if !meta.is_file() {
        return invalid(format!("password file `{shown}` is not a regular file"));
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return invalid(format!(
            "password file `{shown}` may be read by others (mode {:o}): chmod 600 it",
            mode & 0o777
        ));
    }
    let mut text = String::new();
    file.take(MAX_PASSWORD_FILE_LEN + 1)
        .read_to_string(&mut text)
        .map_err(fail)?;
    if text.len() as u64 > MAX_PASSWORD_FILE_LEN {
        return invalid(format!(
            "password file `{shown}` is longer than {MAX_PASSWORD_FILE_LEN} bytes"
        ));
    }
    let password = text.trim_end_matches(['\n', '\r']);
    if password.trim().is_empty() {
        return invalid(format!("password file `{shown}` is empty"));
    }
    Ok(password.to_owned())
}

/// Refuses a `server_hub.password_file` that [`read_password_file`] refuses.
fn check_password_file(path: &Path) -> Result<(), ConfigError> {
    read_password_file(path)
        .map(drop)
        .map_err(|e| ConfigError::Invalid(format!("server_hub.{e}")))
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

/// A list of user or group names: none empty, at most 1,000.
fn names(key: &str, list: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
    let list = list.unwrap_or_default();
    if list.iter().any(String::is_empty) {
        return invalid(format!("{key} contains an empty name"));
    }
    if list.len() > 1000 {
        return invalid(format!("{key} lists {} names, at most 1000", list.len()));
    }
    Ok(list)
}

fn parse_level(key: &str, text: &str) -> Result<LevelFilter, ConfigError> {
    LevelFilter::from_str(text).or_else(|_| {
        invalid(format!(
            "{key} `{text}` is not one of off, error, warn, info, debug, trace"
        ))
    })
}

/// How `CODI_MONITOR_MODE` chooses the listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Unix,
    Tcp,
    Both,
}

fn parse_mode(text: &str) -> Result<Mode, ConfigError> {
    match text.to_ascii_lowercase().as_str() {
        "unix" => Ok(Mode::Unix),
        "tcp" => Ok(Mode::Tcp),
        "both" => Ok(Mode::Both),
        _ => invalid(format!("{ENV_MODE}={text} is not one of unix, tcp, both")),
    }
}

/// The TCP listener and the setting that chose its address (named in errors).
struct TcpChoice {
    addr: SocketAddr,
    origin: String,
}

fn resolve_listeners(
    m: &RawMonitor,
    o: &Overrides,
    host: &Host,
) -> Result<(Option<PathBuf>, Option<TcpChoice>), ConfigError> {
    let default_socket = || paths::default_socket_path(host.euid, host.env);
    // File.
    let file_unix = match m.unix_socket_path.as_deref() {
        None => Some(default_socket()),
        Some("") => None,
        Some(p) => Some(PathBuf::from(p)),
    };
    let file_tcp = match (&m.tcp_address, m.tcp_port) {
        (Some(_), Some(_)) => {
            return invalid(
                "monitor.tcp_address and monitor.tcp_port are both set: set only one".to_owned(),
            )
        }
        (Some(a), None) => match a.parse::<SocketAddr>() {
            Ok(addr) if addr.port() == 0 => {
                return invalid(format!(
                    "monitor.tcp_address {a} has port 0, which clients cannot find; use --tcp for an ephemeral port"
                ))
            }
            Ok(addr) => Some(TcpChoice {
                addr,
                origin: format!("monitor.tcp_address {addr}"),
            }),
            Err(_) => {
                return invalid(format!(
                    "monitor.tcp_address `{a}` is not an address like \"127.0.0.1:9847\""
                ))
            }
        },
        (None, Some(0)) => {
            return invalid(
                "monitor.tcp_port is 0, which clients cannot find; use --tcp for an ephemeral port"
                    .to_owned(),
            )
        }
        (None, Some(port)) => Some(TcpChoice {
            addr: SocketAddr::new(DEFAULT_TCP_HOST, port),
            origin: format!("monitor.tcp_port {port}"),
        }),
        (None, None) => None,
    };
    // Environment.
    let env_port = match (host.env)(ENV_PORT) {
        None => None,
        Some(text) => match text.parse::<u16>() {
            Ok(p) if p > 0 => Some(p),
            _ => return invalid(format!("{ENV_PORT}={text} is not a TCP port (1 to 65535)")),
        },
    };
    let mode = (host.env)(ENV_MODE).map(|m| parse_mode(&m)).transpose()?;
    let with_env_port = |c: TcpChoice| match env_port {
        Some(port) => TcpChoice {
            addr: SocketAddr::new(c.addr.ip(), port),
            origin: c.origin,
        },
        None => c,
    };
    let tcp_on = || {
        let host_choice = file_tcp.as_ref().map(|c| (c.addr.ip(), c.origin.clone()));
        let (ip, origin) = host_choice.unwrap_or((DEFAULT_TCP_HOST, ENV_MODE.to_owned()));
        let port = env_port
            .or(file_tcp.as_ref().map(|c| c.addr.port()))
            .unwrap_or(DEFAULT_TCP_PORT);
        TcpChoice {
            addr: SocketAddr::new(ip, port),
            origin,
        }
    };
    let (mut unix, mut tcp) = match mode {
        None => (file_unix, file_tcp.map(with_env_port)),
        Some(Mode::Unix) => (Some(file_unix.unwrap_or_else(default_socket)), None),
        Some(Mode::Tcp) => (None, Some(tcp_on())),
        Some(Mode::Both) => (
            Some(file_unix.unwrap_or_else(default_socket)),
            Some(tcp_on()),
        ),
    };
    // Flags.
    if let Some(p) = &o.socket {
        unix = (!p.as_os_str().is_empty()).then(|| p.clone());
    }
    if let Some(a) = &o.tcp {
        let addr = a.parse::<SocketAddr>().or_else(|_| {
            invalid(format!(
                "--tcp `{a}` is not an address like \"127.0.0.1:9847\""
            ))
        })?;
        tcp = Some(TcpChoice {
            addr,
            origin: format!("--tcp {addr}"),
        });
    }
    Ok((unix, tcp))
}

/// Reads the token file: trimmed, non-empty, private to its owner.
fn read_token_file(path: &Path, key: &str) -> Result<String, ConfigError> {
    let shown = path.display();
    let meta =
        fs::metadata(path).or_else(|e| invalid(format!("{key} {shown} cannot be read: {e}")))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return invalid(format!(
            "{key} {shown} is accessible by group or others (mode {mode:04o}): run `chmod 600 {shown}`"
        ));
    }
    let text = fs::read_to_string(path)
        .or_else(|e| invalid(format!("{key} {shown} cannot be read: {e}")))?;
    let token = text.trim();
    if token.is_empty() {
        return invalid(format!("{key} {shown} is empty"));
    }
    Ok(token.to_owned())
}

/// The token by precedence: `--token-file`, `$CODI_MONITOR_TOKEN`,
/// `monitor.token_file`. Returns the token and the configured file.
fn resolve_token(
    m: &RawMonitor,
    o: &Overrides,
    host: &Host,
) -> Result<(Option<String>, Option<PathBuf>), ConfigError> {
    let file_key = non_empty(m.token_file.clone()).map(PathBuf::from);
    let (file, key) = match (&o.token_file, file_key) {
        (Some(p), _) => (Some(p.clone()), "--token-file"),
        (None, f) => (f, "monitor.token_file"),
    };
    let env_token = (host.env)(ENV_TOKEN).map(|t| t.trim().to_owned());
    let flag_wins = o.token_file.is_some();
    let token = match (&file, env_token) {
        (Some(path), env) if flag_wins || env.is_none() => match host.purpose {
            Purpose::Daemon => Some(read_token_file(path, key)?),
            // A file codi2 cannot use falls back to the environment's
            // token, unless that is blank.
            Purpose::Client => fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .or(env.filter(|t| !t.is_empty())),
        },
        (_, Some(t)) if t.is_empty() => {
            return invalid(format!("{ENV_TOKEN} is set but blank"));
        }
        (_, env) => env,
    };
    Ok((token, file))
}

fn resolve(
    raw: RawConfig,
    o: &Overrides,
    host: &Host,
    source: Option<PathBuf>,
) -> Result<Config, ConfigError> {
    let g = raw.general.unwrap_or_default();
    let s = raw.storage.unwrap_or_default();
    let m = raw.monitor.unwrap_or_default();
    let h = raw.server_hub.unwrap_or_default();
    let admin = resolve_admin(&raw.admin.unwrap_or_default(), o, host)?;
    let hc = raw.health.unwrap_or_default();
    let health = HealthConfig {
        disk_min_free_mb: in_range(
            "health.disk_min_free_mb",
            hc.disk_min_free_mb,
            DEFAULT_DISK_MIN_FREE_MB,
            0..=1 << 30,
        )?,
        disk_min_free_percent: in_range(
            "health.disk_min_free_percent",
            hc.disk_min_free_percent,
            DEFAULT_DISK_MIN_FREE_PERCENT,
            0..=50,
        )?,
        failing_for: duration(
            "health.failing_for",
            hc.failing_for.as_ref(),
            DEFAULT_FAILING_FOR,
            SECOND..=DAY,
        )?,
    };

    let log_level = match (&o.log_level, &g.log_level) {
        (Some(l), _) => parse_level("--log-level", l)?,
        (None, Some(l)) => parse_level("general.log_level", l)?,
        (None, None) => DEFAULT_LOG_LEVEL,
    };
    let mut warnings = Vec::new();
    let general = GeneralConfig {
        workspace: non_empty(g.workspace).map(PathBuf::from),
        log_level,
        session_timeout: duration(
            "general.session_timeout",
            g.session_timeout.as_ref(),
            DEFAULT_SESSION_TIMEOUT,
            MINUTE..=365 * DAY,
        )?,
    };

    let sqlite_path = match (&o.db, (host.env)(ENV_DB), &s.sqlite_path) {
        (Some(p), _, _) if p.as_os_str().is_empty() => return invalid("--db is empty".into()),
        (Some(p), _, _) => p.clone(),
        (None, Some(p), _) => PathBuf::from(p),
        (None, None, Some(p)) if p.is_empty() => {
            return invalid("storage.sqlite_path is empty".into())
        }
        (None, None, Some(p)) => PathBuf::from(p),
        (None, None, None) => paths::default_db_path(host.euid, host.env),
    };
    let storage = StorageConfig {
        sqlite_path,
        cache_size_mb: in_range(
            "storage.cache_size_mb",
            s.cache_size_mb,
            DEFAULT_CACHE_SIZE_MB,
            1..=4096,
        )?,
        retention_days: in_range(
            "storage.retention_days",
            s.retention_days,
            DEFAULT_RETENTION_DAYS,
            0..=36_500,
        )?,
        max_db_size_mb: in_range(
            "storage.max_db_size_mb",
            s.max_db_size_mb,
            DEFAULT_MAX_DB_SIZE_MB,
            0..=MAX_DB_SIZE_MB,
        )?,
        reader_threads: in_range(
            "storage.reader_threads",
            s.reader_threads,
            DEFAULT_READER_THREADS,
            1..=64,
        )?,
        batch_max_rows: in_range(
            "storage.batch_max_rows",
            s.batch_max_rows,
            DEFAULT_BATCH_MAX_ROWS,
            1..=1_000_000,
        )?,
        inflight_bytes: in_range(
            "storage.inflight_bytes",
            s.inflight_bytes,
            DEFAULT_INFLIGHT_BYTES,
            crate::proto::MAX_FRAME_LEN..=4 << 30,
        )?,
    };
    if s.wal_mode == Some(false) {
        return invalid(
            "storage.wal_mode = false is not supported: the daemon always uses WAL (remove the key)"
                .into(),
        );
    }

    let (unix, tcp) = resolve_listeners(&m, o, host)?;
    let (token, token_file) = resolve_token(&m, o, host)?;
    let allow_unauthenticated_tcp = m.allow_unauthenticated_tcp.unwrap_or(false);
    let workers = match o.workers.or(m.workers).unwrap_or(DEFAULT_WORKERS) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n if n > MAX_WORKERS => {
            let key = if o.workers.is_some() {
                "--workers"
            } else {
                "monitor.workers"
            };
            return invalid(format!("{key} is {n} but must be at most {MAX_WORKERS}"));
        }
        n => n,
    };
    let rate_limit = m.rate_limit.unwrap_or(DEFAULT_RATE_LIMIT);
    let rate_burst = m.rate_burst.unwrap_or(DEFAULT_RATE_BURST);
    if rate_limit > 0 && rate_burst == 0 {
        return invalid(
            "monitor.rate_burst is 0 while monitor.rate_limit is on: no log could ever pass".into(),
        );
    }
    if host.purpose == Purpose::Daemon {
        if unix.is_none() && tcp.is_none() {
            return invalid(
                "no listener is on: monitor.unix_socket_path is empty and TCP is off (set monitor.unix_socket_path, monitor.tcp_address or CODI_MONITOR_MODE)".into(),
            );
        }
        if let Some(p) = &unix {
            let len = p.as_os_str().len();
            if len > MAX_SOCKET_PATH_BYTES {
                return invalid(format!(
                    "monitor.unix_socket_path {} is {len} bytes long but Unix sockets allow at most {MAX_SOCKET_PATH_BYTES}",
                    p.display()
                ));
            }
        }
        if let Some(c) = &tcp {
            match &token {
                None if !c.addr.ip().is_loopback() => {
                    return invalid(format!(
                        "{} is beyond loopback: refusing to listen without a token (set monitor.token_file or {ENV_TOKEN})",
                        c.origin
                    ));
                }
                None if !allow_unauthenticated_tcp => {
                    return invalid(format!(
                        "{} needs a token: every local user can reach loopback TCP (set monitor.token_file or {ENV_TOKEN}, or monitor.allow_unauthenticated_tcp = true to accept that)",
                        c.origin
                    ));
                }
                None => warnings.push(format!(
                    "{} listens without a token (monitor.allow_unauthenticated_tcp): every local user may write logs over TCP and read those sent over TCP",
                    c.origin
                )),
                Some(t) if t.len() < MIN_TOKEN_LEN => {
                    return invalid(format!(
                        "the token is {} bytes long but must be at least {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 32`)",
                        t.len()
                    ));
                }
                Some(_) => {}
            }
        }
    }
    let max_connections = in_range(
        "monitor.max_connections",
        m.max_connections,
        DEFAULT_MAX_CONNECTIONS,
        1..=1_000_000,
    )?;
    let reserved_default = if unix.is_some() && tcp.is_some() {
        DEFAULT_RESERVED_UNIX_CONNECTIONS.min(max_connections / 2)
    } else {
        0
    };
    let reserved_unix_connections = in_range(
        "monitor.reserved_unix_connections",
        m.reserved_unix_connections,
        reserved_default,
        0..=max_connections.saturating_sub(1),
    )?;
    let tcp_share = max_connections - reserved_unix_connections;
    let max_unauthenticated = in_range(
        "monitor.max_unauthenticated",
        m.max_unauthenticated,
        DEFAULT_MAX_UNAUTHENTICATED.min(tcp_share / 2).max(1),
        1..=max_connections,
    )?;
    let monitor = MonitorConfig {
        unix_socket_path: unix,
        socket_group: non_empty(m.socket_group),
        tcp_listen: tcp.map(|c| c.addr),
        workers,
        token,
        token_file,
        rate_limit,
        rate_burst,
        max_connections,
        max_pending_per_connection: in_range(
            "monitor.max_pending_per_connection",
            m.max_pending_per_connection,
            DEFAULT_MAX_PENDING_PER_CONNECTION,
            1..=65_536,
        )?,
        file_batch_size: in_range(
            "monitor.file_batch_size",
            m.file_batch_size,
            DEFAULT_FILE_BATCH_SIZE,
            1..=100_000,
        )?,
        export_patterns: match m.export_patterns {
            Some(p) if p.iter().any(String::is_empty) => {
                return invalid("monitor.export_patterns contains an empty pattern".into())
            }
            Some(p) => {
                if let Some(Err(e)) = p.iter().map(|g| globset::Glob::new(g)).find(Result::is_err) {
                    return invalid(format!("monitor.export_patterns: {e}"));
                }
                p
            }
            None => DEFAULT_EXPORT_PATTERNS
                .iter()
                .map(|&p| p.to_owned())
                .collect(),
        },
        scan_interval: duration(
            "monitor.scan_interval",
            m.scan_interval.as_ref(),
            DEFAULT_SCAN_INTERVAL,
            SECOND..=DAY,
        )?,
        archive_mode: match m.archive_mode.as_deref() {
            None | Some("copy") => ArchiveMode::Copy,
            Some("move") => ArchiveMode::Move,
            Some(other) => {
                return invalid(format!(
                    "monitor.archive_mode must be \"copy\" or \"move\", not `{other}`"
                ))
            }
        },
        allow_unauthenticated_tcp,
        auth_timeout: duration(
            "monitor.auth_timeout",
            m.auth_timeout.as_ref(),
            DEFAULT_AUTH_TIMEOUT,
            Duration::from_millis(100)..=5 * MINUTE,
        )?,
        max_unauthenticated,
        reserved_unix_connections,
        idle_timeout: duration(
            "monitor.idle_timeout",
            m.idle_timeout.as_ref(),
            DEFAULT_IDLE_TIMEOUT,
            SECOND..=30 * DAY,
        )?,
        write_timeout: duration(
            "monitor.write_timeout",
            m.write_timeout.as_ref(),
            DEFAULT_WRITE_TIMEOUT,
            SECOND..=DAY,
        )?,
        service_user: non_empty(m.service_user),
        query_all_users: names("monitor.query_all_users", m.query_all_users)?,
        query_all_groups: names("monitor.query_all_groups", m.query_all_groups)?,
        max_watches_per_root: in_range(
            "monitor.max_watches_per_root",
            m.max_watches_per_root,
            DEFAULT_MAX_WATCHES_PER_ROOT,
            1..=1_000_000,
        )?,
    };

    let enabled = h.enabled.unwrap_or(DEFAULT_SERVER_HUB_ENABLED);
    let url = non_empty(h.url);
    match &url {
        Some(u) => check_hub_url("server_hub.url", u)?,
        None if enabled => {
            return invalid("server_hub.enabled is true but server_hub.url is not set".into())
        }
        None => {}
    }
    let server_hub = ServerHubConfig {
        enabled,
        url,
        batch_size: in_range(
            "server_hub.batch_size",
            h.batch_size,
            DEFAULT_SERVER_HUB_BATCH_SIZE,
            1..=1_000_000,
        )?,
        sync_interval: duration(
            "server_hub.sync_interval",
            h.sync_interval.as_ref(),
            DEFAULT_SYNC_INTERVAL,
            Duration::from_millis(100)..=DAY,
        )?,
        batch_bytes: in_range(
            "server_hub.batch_bytes",
            h.batch_bytes,
            DEFAULT_SERVER_HUB_BATCH_BYTES,
            (64 << 10)..=(256 << 20),
        )?,
        database: identifier("server_hub.database", h.database, DEFAULT_HUB_DATABASE)?,
        tables: HubTables {
            logs: identifier("server_hub.logs_table", h.logs_table, DEFAULT_HUB_TABLES[0])?,
            sessions: identifier(
                "server_hub.sessions_table",
                h.sessions_table,
                DEFAULT_HUB_TABLES[1],
            )?,
            exports: identifier(
                "server_hub.exports_table",
                h.exports_table,
                DEFAULT_HUB_TABLES[2],
            )?,
        },
        user: match non_empty(h.user) {
            Some(u) if u.len() > 256 || u.chars().any(char::is_control) => {
                return invalid("server_hub.user must be at most 256 printable bytes".into())
            }
            u => u,
        },
        password_file: non_empty(h.password_file).map(PathBuf::from),
        host_id: host_id(non_empty(h.host_id))?,
        backoff_min: duration(
            "server_hub.backoff_min",
            h.backoff_min.as_ref(),
            DEFAULT_HUB_BACKOFF_MIN,
            Duration::from_millis(100)..=Duration::from_secs(3600),
        )?,
        backoff_max: duration(
            "server_hub.backoff_max",
            h.backoff_max.as_ref(),
            DEFAULT_HUB_BACKOFF_MAX,
            SECOND..=DAY,
        )?,
        kind: match h.kind.as_deref() {
            None | Some("clickhouse") => HubKind::ClickHouse,
            Some("ndjson") => HubKind::Ndjson,
            Some(other) => {
                return invalid(format!(
                    "server_hub.kind `{}` must be \"clickhouse\" or \"ndjson\"",
                    crate::text::escape_controls(other)
                ))
            }
        },
        ca_file: non_empty(h.ca_file).map(PathBuf::from),
        content_type: match h.content_type.as_deref() {
            None => HUB_CONTENT_TYPES[0],
            Some(t) => match HUB_CONTENT_TYPES.iter().find(|c| **c == t) {
                Some(c) => c,
                None => {
                    return invalid(format!(
                        "server_hub.content_type `{}` must be \"{}\" or \"{}\"",
                        crate::text::escape_controls(t),
                        HUB_CONTENT_TYPES[0],
                        HUB_CONTENT_TYPES[1]
                    ))
                }
            },
        },
    };
    if server_hub.backoff_min > server_hub.backoff_max {
        return invalid(format!(
            "server_hub.backoff_min ({}) is longer than server_hub.backoff_max ({})",
            format_duration(server_hub.backoff_min),
            format_duration(server_hub.backoff_max)
        ));
    }
    // Only the daemon reads it to sync; it is usually not codi2's to read.
    if let (true, Some(file), Purpose::Daemon) =
        (server_hub.enabled, &server_hub.password_file, host.purpose)
    {
        check_password_file(file)?;
    }
    if let (true, Some(file)) = (server_hub.enabled, &server_hub.ca_file) {
        crate::hub::transport::trust_roots(file).map_err(ConfigError::Invalid)?;
        if server_hub
            .url
            .as_deref()
            .is_some_and(|u| u.starts_with("http://"))
        {
            warnings.push(format!(
                "server_hub.ca_file `{}` is not used: server_hub.url is http://, not https://",
                file.display()
            ));
        }
    }
    // Sent in the X-Codi-Host header, which takes printable ASCII only.
    if server_hub.kind == HubKind::Ndjson
        && !server_hub
            .host_id
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b))
    {
        return invalid(
            "server_hub.host_id must be printable ASCII with server_hub.kind = \"ndjson\" \
             (it is sent in the X-Codi-Host header)"
                .into(),
        );
    }

    if let (Some(addr), Purpose::Daemon) = (admin.listen_on(), host.purpose) {
        if !addr.ip().is_loopback() {
            warnings.push(format!(
                "admin.listen {addr} is beyond loopback (admin.allow_remote): /metrics and /health answer anyone who reaches it, without authentication"
            ));
        }
    }

    Ok(Config {
        general,
        storage,
        monitor,
        server_hub,
        admin,
        health,
        source,
        warnings,
    })
}

/// `[admin]` and `--admin`: on or off, where, and whether beyond loopback
/// is allowed (only with `admin.allow_remote`).
fn resolve_admin(a: &RawAdmin, o: &Overrides, host: &Host) -> Result<AdminConfig, ConfigError> {
    let allow_remote = a.allow_remote.unwrap_or(false);
    let mut enabled = a.enabled.unwrap_or(DEFAULT_ADMIN_ENABLED);
    let (mut listen, mut origin) = match a.listen.as_deref() {
        None => (DEFAULT_ADMIN_LISTEN, "admin.listen".to_owned()),
        Some(text) => match text.parse::<SocketAddr>() {
            Ok(addr) if addr.port() == 0 => {
                return invalid(format!(
                    "admin.listen {text} has port 0, which scrapers cannot find; use --admin for an ephemeral port"
                ))
            }
            Ok(addr) => (addr, format!("admin.listen {addr}")),
            Err(_) => {
                return invalid(format!(
                    "admin.listen `{text}` is not an address like \"127.0.0.1:9848\""
                ))
            }
        },
    };
    if let Some(flag) = &o.admin {
        if flag.is_empty() {
            enabled = false;
        } else {
            listen = flag.parse::<SocketAddr>().or_else(|_| {
                invalid(format!(
                    "--admin `{flag}` is not an address like \"127.0.0.1:9848\""
                ))
            })?;
            enabled = true;
            origin = format!("--admin {listen}");
        }
    }
    if enabled && host.purpose == Purpose::Daemon && !listen.ip().is_loopback() && !allow_remote {
        return invalid(format!(
            "{origin} is beyond loopback: the admin endpoint has no authentication (set admin.allow_remote = true to accept that, and firewall the port)"
        ));
    }
    Ok(AdminConfig {
        enabled,
        listen,
        allow_remote,
    })
}

#[cfg(test)]
mod tests;
