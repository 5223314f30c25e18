//! `[server_hub]`: the resolved hub settings and their checks (URL,
//! names, host id, password file, trust roots).

use super::defaults::*;
use super::error::invalid;
use super::resolve::{Host, Purpose};
use super::values::{duration, format_duration, in_range, non_empty, DAY, SECOND};
use super::{ConfigError, RawServerHub};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// `[server_hub]` resolved and checked; what is worth saying about it at
/// start goes to `warnings`.
pub(super) fn resolve_server_hub(
    h: RawServerHub,
    host: &Host,
    warnings: &mut Vec<String>,
) -> Result<ServerHubConfig, ConfigError> {
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
    Ok(server_hub)
}

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
pub(super) fn check_password_file(path: &Path) -> Result<(), ConfigError> {
    read_password_file(path)
        .map(drop)
        .map_err(|e| ConfigError::Invalid(format!("server_hub.{e}")))
}
