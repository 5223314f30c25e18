//! The built-in defaults, limits and environment variable names of the
//! configuration (docs/CONFIG.md lists them per key).

use log::LevelFilter;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

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
/// `storage.commit_delay_us` when unset: the longest a small batch waits
/// for more rows under steady load (group commit).
pub const DEFAULT_COMMIT_DELAY_US: u64 = 2_000;
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
