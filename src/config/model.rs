//! The validated configuration, section by section (the hub's section is
//! in [`super::hub`]).

use super::ServerHubConfig;
use crate::export::ArchiveMode;
use log::LevelFilter;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Longest a small batch waits for more rows under steady load, in
    /// microseconds; zero commits at once.
    pub commit_delay_us: u64,
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
