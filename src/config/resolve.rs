//! From the file, the environment and the flags to a validated [`Config`]:
//! finding the file, defaults and every check that spans keys.

use super::defaults::*;
use super::error::invalid;
use super::hub::resolve_server_hub;
use super::listeners::{resolve_listeners, resolve_token};
use super::paths::{self, EnvLookup};
use super::values::{duration, in_range, names, non_empty, parse_level, DAY, MINUTE, SECOND};
use super::*;
use crate::export::ArchiveMode;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// Who the configuration is for: the daemon checks everything, `codi2` only
/// what it needs to find the daemon and the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    Daemon,
    Client,
}

/// Everything outside the file that resolution depends on.
pub(super) struct Host<'a> {
    pub(super) env: EnvLookup<'a>,
    pub(super) euid: u32,
    pub(super) purpose: Purpose,
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
}

/// Finds and reads the config file (flag, then `$CODI_CONFIG`, then the
/// system file if it exists), then resolves it.
pub(super) fn load_from(
    o: &Overrides,
    host: &Host,
    system_config: &Path,
) -> Result<Config, ConfigError> {
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

pub(super) fn resolve(
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
        commit_delay_us: in_range(
            "storage.commit_delay_us",
            s.commit_delay_us,
            DEFAULT_COMMIT_DELAY_US,
            0..=10_000,
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

    let server_hub = resolve_server_hub(h, host, &mut warnings)?;

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
