//! Default locations of the socket, the database and the config file.
//!
//! The seed put the socket at `/tmp/codi-monitor.sock`, which its own
//! systemd unit hides: `PrivateTmp=true` gives the daemon a private `/tmp`, so
//! no client could ever see the socket. A system daemon (root) therefore uses
//! `/run/codi`, and a per-user daemon uses the XDG runtime directory, which is
//! private to the user and cleaned at logout. The daemon and `codi2` share
//! these rules so that both sides agree without any configuration.

use std::path::PathBuf;

/// The system-wide config file, read when it exists and no other is named.
pub const SYSTEM_CONFIG_PATH: &str = "/etc/codi/monitor.toml";
/// The socket of a daemon running as root.
pub const SYSTEM_SOCKET_PATH: &str = "/run/codi/monitor.sock";
/// The database of a daemon running as root.
pub const SYSTEM_DB_PATH: &str = "/var/lib/codi/codi.db";
/// Directory below the runtime or data directory that holds codi's files.
pub const APP_DIR: &str = "codi";
/// File name of the socket.
pub const SOCKET_FILE: &str = "monitor.sock";
/// File name of the database.
pub const DB_FILE: &str = "codi.db";

/// Reads an environment variable; a parameter so that tests need not touch
/// the process environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, treating unset, empty and non-UTF-8 values alike
/// as absent.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The effective user id of this process.
pub fn current_euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// An absolute directory from `var`, as the XDG spec demands (relative values
/// are ignored).
fn absolute_dir(env: EnvLookup, var: &str) -> Option<PathBuf> {
    env(var).map(PathBuf::from).filter(|p| p.is_absolute())
}

/// The default socket path for a daemon (or client) running as `euid`:
/// `/run/codi/monitor.sock` for root, else `$XDG_RUNTIME_DIR/codi/monitor.sock`,
/// else `/tmp/codi-<uid>/monitor.sock`.
pub fn default_socket_path(euid: u32, env: EnvLookup) -> PathBuf {
    if euid == 0 {
        return PathBuf::from(SYSTEM_SOCKET_PATH);
    }
    match absolute_dir(env, "XDG_RUNTIME_DIR") {
        Some(dir) => dir.join(APP_DIR).join(SOCKET_FILE),
        None => PathBuf::from(format!("/tmp/codi-{euid}")).join(SOCKET_FILE),
    }
}

/// The default database path for `euid`: `/var/lib/codi/codi.db` for root,
/// else `$XDG_DATA_HOME/codi/codi.db`, else `$HOME/.local/share/codi/codi.db`,
/// else (no home at all) `/tmp/codi-<uid>/codi.db`.
pub fn default_db_path(euid: u32, env: EnvLookup) -> PathBuf {
    if euid == 0 {
        return PathBuf::from(SYSTEM_DB_PATH);
    }
    if let Some(dir) = absolute_dir(env, "XDG_DATA_HOME") {
        return dir.join(APP_DIR).join(DB_FILE);
    }
    match absolute_dir(env, "HOME") {
        Some(home) => home.join(".local/share").join(APP_DIR).join(DB_FILE),
        None => PathBuf::from(format!("/tmp/codi-{euid}")).join(DB_FILE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn root_uses_system_paths_whatever_the_environment() {
        let env = env_of(&[("XDG_RUNTIME_DIR", "/run/user/0"), ("HOME", "/root")]);
        assert_eq!(
            default_socket_path(0, &env),
            Path::new("/run/codi/monitor.sock")
        );
        assert_eq!(default_db_path(0, &env), Path::new("/var/lib/codi/codi.db"));
    }

    #[test]
    fn user_paths_follow_xdg() {
        let env = env_of(&[
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
            ("XDG_DATA_HOME", "/data/me"),
            ("HOME", "/home/me"),
        ]);
        assert_eq!(
            default_socket_path(1000, &env),
            Path::new("/run/user/1000/codi/monitor.sock")
        );
        assert_eq!(
            default_db_path(1000, &env),
            Path::new("/data/me/codi/codi.db")
        );
    }

    #[test]
    fn user_paths_fall_back_without_xdg() {
        let env = env_of(&[("HOME", "/home/me")]);
        assert_eq!(
            default_socket_path(1000, &env),
            Path::new("/tmp/codi-1000/monitor.sock")
        );
        assert_eq!(
            default_db_path(1000, &env),
            Path::new("/home/me/.local/share/codi/codi.db")
        );
        let none = env_of(&[]);
        assert_eq!(default_db_path(7, &none), Path::new("/tmp/codi-7/codi.db"));
    }

    #[test]
    fn relative_xdg_values_are_ignored() {
        let env = env_of(&[
            ("XDG_RUNTIME_DIR", "run"),
            ("XDG_DATA_HOME", "data"),
            ("HOME", "/home/me"),
        ]);
        assert_eq!(
            default_socket_path(1000, &env),
            Path::new("/tmp/codi-1000/monitor.sock")
        );
        assert_eq!(
            default_db_path(1000, &env),
            Path::new("/home/me/.local/share/codi/codi.db")
        );
    }
}
