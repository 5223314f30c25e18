//! `[monitor]`'s listeners and token: file, environment
//! (`CODI_MONITOR_MODE`, `CODI_MONITOR_PORT`, `CODI_MONITOR_TOKEN`) and
//! flags, by precedence.

use super::defaults::*;
use super::error::invalid;
use super::paths;
use super::resolve::{Host, Purpose};
use super::values::non_empty;
use super::{ConfigError, Overrides, RawMonitor};
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

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
pub(super) struct TcpChoice {
    pub(super) addr: SocketAddr,
    pub(super) origin: String,
}

pub(super) fn resolve_listeners(
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
pub(super) fn resolve_token(
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
