//! Where to look for the daemon, in order.
//!
//! Unix sockets first (the fast path), then TCP. Explicit `--socket` /
//! `--tcp` flags are taken literally: only the endpoints given are tried.
//! Otherwise `$CODI_SOCKET` replaces the Unix candidates; else the config's
//! socket (whose default follows the same root/per-user rules as the daemon,
//! see [`crate::config::paths`]) and, for a non-root user, the system
//! daemon's socket if it exists. TCP comes last, and only when the user
//! asked for it: the config's listener if on (a config file's
//! `tcp_address`/`tcp_port` or `$CODI_MONITOR_MODE`), else
//! `127.0.0.1:$CODI_MONITOR_PORT` if that is set.
//!
//! There is deliberately no TCP default: any local user may listen on a
//! free loopback port, and a client that tried `127.0.0.1:9847` on its own
//! would hand such a listener its logs and its token whenever the daemon is
//! down.

use super::conn::Endpoint;
use crate::config::paths::{self, EnvLookup};
use crate::config::{Config, DEFAULT_TCP_HOST, ENV_PORT};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// Environment variable naming the one Unix socket to try.
pub const ENV_SOCKET: &str = "CODI_SOCKET";

/// Endpoints given on the command line; when any is set, only they are tried.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Explicit {
    /// `--socket PATH`.
    pub socket: Option<PathBuf>,
    /// `--tcp ADDR`.
    pub tcp: Option<SocketAddr>,
}

/// The endpoints to try, in order, without duplicates.
///
/// `euid` and `exists` are parameters so the rules can be tested without
/// being root or creating `/run/codi`.
pub fn endpoints(
    cfg: &Config,
    explicit: &Explicit,
    env: EnvLookup,
    euid: u32,
    exists: &dyn Fn(&Path) -> bool,
) -> Vec<Endpoint> {
    let mut out = Vec::new();
    if explicit.socket.is_some() || explicit.tcp.is_some() {
        out.extend(explicit.socket.clone().map(Endpoint::Unix));
        out.extend(explicit.tcp.map(Endpoint::Tcp));
        return out;
    }
    if let Some(socket) = env(ENV_SOCKET) {
        out.push(Endpoint::Unix(PathBuf::from(socket)));
    } else {
        out.extend(cfg.monitor.unix_socket_path.clone().map(Endpoint::Unix));
        let system = Path::new(paths::SYSTEM_SOCKET_PATH);
        if euid != 0 && exists(system) {
            push_unique(&mut out, Endpoint::Unix(system.to_path_buf()));
        }
    }
    let tcp = match cfg.monitor.tcp_listen {
        Some(addr) => Some(connectable(addr)),
        None => env(ENV_PORT)
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|&p| p > 0)
            .map(|port| SocketAddr::new(DEFAULT_TCP_HOST, port)),
    };
    if let Some(tcp) = tcp {
        push_unique(&mut out, Endpoint::Tcp(tcp));
    }
    out
}

fn push_unique(out: &mut Vec<Endpoint>, e: Endpoint) {
    if !out.contains(&e) {
        out.push(e);
    }
}

/// A listen address as a client reaches it: the unspecified address
/// (`0.0.0.0`, `::`) means loopback of the same family.
fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};

    fn env_of<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn config(text: &str) -> Config {
        let env = env_of(&[
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
            ("CODI_MONITOR_TOKEN", "0123456789abcdef"),
        ]);
        let mut c = Config::from_toml_str_with_env(text, &Overrides::default(), &env).unwrap();
        // The default socket depends on who runs the tests; pin it.
        if text.is_empty() {
            c.monitor.unix_socket_path = Some("/run/user/1000/codi/monitor.sock".into());
        }
        c
    }

    fn unix(p: &str) -> Endpoint {
        Endpoint::Unix(p.into())
    }

    fn tcp(a: &str) -> Endpoint {
        Endpoint::Tcp(a.parse().unwrap())
    }

    const USER: u32 = 1000;

    #[test]
    fn user_tries_own_socket_then_system_socket_and_no_tcp_unless_asked() {
        let got = endpoints(
            &config(""),
            &Explicit::default(),
            &env_of(&[]),
            USER,
            &|_| true,
        );
        assert_eq!(
            got,
            [
                unix("/run/user/1000/codi/monitor.sock"),
                unix("/run/codi/monitor.sock"),
            ]
        );
    }

    #[test]
    fn tcp_only_when_the_config_or_the_environment_names_it() {
        // CODI_MONITOR_MODE turns the listener on in the config itself.
        let env = env_of(&[
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
            ("CODI_MONITOR_MODE", "both"),
            ("CODI_MONITOR_TOKEN", "0123456789abcdef"),
        ]);
        let c = Config::from_toml_str_with_env("", &Overrides::default(), &env).unwrap();
        let got = endpoints(&c, &Explicit::default(), &env_of(&[]), USER, &|_| false);
        assert_eq!(got.last(), Some(&tcp("127.0.0.1:9847")));
        // CODI_MONITOR_PORT alone names a loopback port.
        let env = env_of(&[("CODI_MONITOR_PORT", "4000")]);
        let got = endpoints(&config(""), &Explicit::default(), &env, USER, &|_| false);
        assert_eq!(
            got,
            [
                unix("/run/user/1000/codi/monitor.sock"),
                tcp("127.0.0.1:4000")
            ]
        );
        // Nothing at all: no endpoint, so standalone mode.
        let mut c = config("");
        c.monitor.unix_socket_path = None;
        let got = endpoints(&c, &Explicit::default(), &env_of(&[]), USER, &|_| true);
        assert_eq!(got, [unix("/run/codi/monitor.sock")]);
        let got = endpoints(&c, &Explicit::default(), &env_of(&[]), 0, &|_| true);
        assert_eq!(got, []);
    }

    #[test]
    fn system_socket_only_if_it_exists_and_not_twice_for_root() {
        let got = endpoints(
            &config(""),
            &Explicit::default(),
            &env_of(&[]),
            USER,
            &|_| false,
        );
        assert_eq!(got, [unix("/run/user/1000/codi/monitor.sock")]);
        let mut root = config("");
        root.monitor.unix_socket_path = Some("/run/codi/monitor.sock".into());
        let got = endpoints(&root, &Explicit::default(), &env_of(&[]), 0, &|_| true);
        assert_eq!(got, [unix("/run/codi/monitor.sock")]);
    }

    #[test]
    fn codi_socket_replaces_unix_candidates() {
        let env = env_of(&[("CODI_SOCKET", "/x/y.sock")]);
        let got = endpoints(&config(""), &Explicit::default(), &env, USER, &|_| true);
        assert_eq!(got, [unix("/x/y.sock")]);
        let env = env_of(&[("CODI_SOCKET", "/x/y.sock"), ("CODI_MONITOR_PORT", "4000")]);
        let got = endpoints(&config(""), &Explicit::default(), &env, USER, &|_| true);
        assert_eq!(got, [unix("/x/y.sock"), tcp("127.0.0.1:4000")]);
    }

    #[test]
    fn config_tcp_listener_is_used_and_wildcard_means_loopback() {
        let c = config("[monitor]\nunix_socket_path = \"/s.sock\"\ntcp_port = 5000\n");
        let got = endpoints(&c, &Explicit::default(), &env_of(&[]), USER, &|_| false);
        assert_eq!(got, [unix("/s.sock"), tcp("127.0.0.1:5000")]);
        let mut c = config("");
        c.monitor.unix_socket_path = None;
        c.monitor.tcp_listen = Some("0.0.0.0:6000".parse().unwrap());
        let got = endpoints(&c, &Explicit::default(), &env_of(&[]), USER, &|_| false);
        assert_eq!(got, [tcp("127.0.0.1:6000")]);
        c.monitor.tcp_listen = Some("[::]:6000".parse().unwrap());
        let got = endpoints(&c, &Explicit::default(), &env_of(&[]), USER, &|_| false);
        assert_eq!(got, [tcp("[::1]:6000")]);
    }

    #[test]
    fn explicit_flags_are_exact() {
        let env = env_of(&[("CODI_SOCKET", "/x/y.sock")]);
        let only_socket = Explicit {
            socket: Some("/a.sock".into()),
            tcp: None,
        };
        let got = endpoints(&config(""), &only_socket, &env, USER, &|_| true);
        assert_eq!(got, [unix("/a.sock")]);
        let only_tcp = Explicit {
            socket: None,
            tcp: Some("10.0.0.1:1".parse().unwrap()),
        };
        let got = endpoints(&config(""), &only_tcp, &env, USER, &|_| true);
        assert_eq!(got, [tcp("10.0.0.1:1")]);
    }
}
