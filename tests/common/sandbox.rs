//! The temporary directory a test's daemons live in, and how to start one.

use std::ffi::OsString;
use std::fs::{self};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tempfile::TempDir;

use super::*;

/// Environment variables the daemon and codi2 read; cleared so the tests
/// see only what they set themselves.
const ISOLATED_ENV: &[&str] = &[
    "CODI_CONFIG",
    "CODI_MONITOR_MODE",
    "CODI_MONITOR_PORT",
    "CODI_MONITOR_TOKEN",
    "CODI_DB",
    "CODI_SESSION",
    "CODI_SOCKET",
    "CODI_MONITOR_SOCKET",
    "CODI_HUB_URL",
    "CODI_HUB_USER",
    "CODI_HUB_PASSWORD_FILE",
    // Set when the tests themselves run under systemd: a test daemon must
    // neither notify the real service manager nor log in journal style.
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
];

/// A temporary directory holding one daemon's socket, database, config and
/// logs; shared by successive daemons of one test (restarts).
pub struct Sandbox {
    dir: TempDir,
    spawned: AtomicUsize,
}

impl Sandbox {
    /// A fresh, empty sandbox.
    pub fn new() -> Arc<Sandbox> {
        Arc::new(Sandbox {
            dir: tempfile::Builder::new()
                .prefix("codi-it")
                .tempdir()
                .expect("create temp dir"),
            spawned: AtomicUsize::new(0),
        })
    }

    /// The sandbox's root.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh path for the next daemon's stderr.
    pub fn next_stderr(&self) -> PathBuf {
        let n = self.spawned.fetch_add(1, Ordering::Relaxed);
        self.path().join(format!("daemon-{n}.stderr"))
    }

    /// The default socket path, `<tmp>/run/m.sock`.
    pub fn socket(&self) -> PathBuf {
        self.path().join("run/m.sock")
    }

    /// The default database path, `<tmp>/data/codi.db`.
    pub fn db(&self) -> PathBuf {
        self.path().join("data/codi.db")
    }

    /// The config file path, `<tmp>/monitor.toml`.
    pub fn config(&self) -> PathBuf {
        self.path().join("monitor.toml")
    }

    /// Writes the config file.
    pub fn write_config(&self, toml: &str) {
        fs::write(self.config(), toml).expect("write config");
    }

    /// Opens the database for inspection.
    pub fn open_db(&self) -> Db {
        Db::open(&self.db())
    }

    /// A `codi2` command with an isolated environment.
    pub fn codi2(&self) -> Command {
        let mut cmd = Command::new(codi2_binary());
        for key in ISOLATED_ENV {
            cmd.env_remove(key);
        }
        cmd.env("HOME", self.path())
            .env("XDG_RUNTIME_DIR", self.path().join("xdg-run"))
            .env("XDG_DATA_HOME", self.path().join("xdg-data"))
            .env("XDG_CONFIG_HOME", self.path().join("xdg-config"))
            .current_dir(self.path());
        cmd
    }
}

/// How to start a daemon.
#[derive(Clone)]
pub struct Opts {
    /// Pass `--socket <tmp>/run/m.sock`.
    pub socket_flag: bool,
    /// Pass `--db <tmp>/data/codi.db`.
    pub db_flag: bool,
    /// `--tcp` value; `None` leaves TCP off.
    pub tcp: Option<String>,
    /// `--workers` value.
    pub workers: usize,
    /// Pass `--config <tmp>/monitor.toml` (write it first).
    pub config: bool,
    /// Extra arguments.
    pub args: Vec<OsString>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Token given through `$CODI_MONITOR_TOKEN` (before `env`, which may
    /// override it); `None` gives none.
    pub token: Option<String>,
    /// `--admin` value (default `127.0.0.1:0`, so that parallel daemons
    /// never fight over the default port); `None` passes no flag.
    pub admin: Option<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            socket_flag: true,
            db_flag: true,
            tcp: Some("127.0.0.1:0".into()),
            workers: 2,
            config: false,
            args: Vec::new(),
            env: Vec::new(),
            token: Some(TEST_TOKEN.into()),
            admin: Some("127.0.0.1:0".into()),
        }
    }
}

impl Opts {
    /// Adds an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Adds an argument after the standard ones.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Sets the `--tcp` value (or turns TCP off).
    pub fn tcp(mut self, addr: Option<&str>) -> Self {
        self.tcp = addr.map(str::to_owned);
        self
    }

    /// Sets the token (or none).
    pub fn token(mut self, token: Option<&str>) -> Self {
        self.token = token.map(str::to_owned);
        self
    }

    /// The token the daemon will hold: the last `$CODI_MONITOR_TOKEN` set,
    /// unless a token file on the command line wins.
    pub fn effective_token(&self) -> Option<String> {
        if self.args.iter().any(|a| a == "--token-file") {
            return None;
        }
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == "CODI_MONITOR_TOKEN")
            .map(|(_, v)| v.trim().to_owned())
            .or_else(|| self.token.clone())
    }

    /// Passes the sandbox's config file.
    pub fn with_config(mut self) -> Self {
        self.config = true;
        self
    }

    /// The daemon command for `sandbox`.
    pub fn command(&self, sandbox: &Sandbox) -> Command {
        let mut cmd = Command::new(daemon_binary());
        for key in ISOLATED_ENV {
            cmd.env_remove(key);
        }
        cmd.env("HOME", sandbox.path())
            .env("XDG_RUNTIME_DIR", sandbox.path().join("xdg-run"))
            .env("XDG_DATA_HOME", sandbox.path().join("xdg-data"))
            .env("XDG_CONFIG_HOME", sandbox.path().join("xdg-config"))
            .current_dir(sandbox.path());
        if self.socket_flag {
            cmd.arg("--socket").arg(sandbox.socket());
        }
        if self.db_flag {
            cmd.arg("--db").arg(sandbox.db());
        }
        if let Some(tcp) = &self.tcp {
            cmd.arg("--tcp").arg(tcp);
        }
        cmd.arg("--workers").arg(self.workers.to_string());
        if let Some(admin) = &self.admin {
            cmd.arg("--admin").arg(admin);
        }
        if self.config {
            cmd.arg("--config").arg(sandbox.config());
        }
        cmd.args(&self.args);
        if let Some(token) = &self.token {
            cmd.env("CODI_MONITOR_TOKEN", token);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs the daemon expecting it to fail before READY; returns its exit
    /// status and stderr (hang-protected).
    pub fn run_expecting_failure(&self, sandbox: &Sandbox) -> (ExitStatus, String) {
        let mut child = self
            .command(sandbox)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn codi-monitor");
        let mut status = None;
        let exited = wait_until(START_DEADLINE, || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        });
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
            panic!("codi-monitor kept running although it should have refused to start");
        }
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(
            !out.contains("READY"),
            "daemon said READY although it should refuse to start: {out}"
        );
        (status.unwrap(), err)
    }
}
