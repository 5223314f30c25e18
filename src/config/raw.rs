//! The config file exactly as written: every key optional, unknown keys
//! refused, and parse errors that never echo a value.

use super::ConfigError;
use serde::{Deserialize, Serialize};

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
    /// Group-commit delay in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_delay_us: Option<u64>,
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
