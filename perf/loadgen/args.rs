//! Command line: raw `argh` structs, then a validated [`RunConfig`].
//!
//! Every bound lives here, so the driver can trust what it is given: the
//! load generator is bounded in clients, connections and time, and only ever
//! talks to a daemon on this machine.

use argh::FromArgs;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// Most load clients (`--clients`).
pub const MAX_CLIENTS: usize = 10_000;
/// Most idle connections (`--idle`).
pub const MAX_IDLE: usize = 10_000;
/// Longest run (`--duration`), in seconds.
pub const MAX_DURATION_SECS: f64 = 3600.0;
/// Most driver threads (`--threads`): a few threads drive every connection.
pub const MAX_THREADS: usize = 16;
/// Most entries per `LogBatch` (`--batch`).
pub const MAX_BATCH: usize = 10_000;
/// Largest answer window per client (`--window`).
pub const MAX_WINDOW: usize = 100_000;
/// How long the run waits for outstanding answers after `--duration`.
pub const DRAIN_WAIT: Duration = Duration::from_secs(10);
/// Default entries per frame.
pub const DEFAULT_BATCH: usize = 1;
/// Default message text size in bytes.
pub const DEFAULT_MESSAGE_SIZE: usize = 150;
/// Default answers outstanding per client.
pub const DEFAULT_WINDOW: usize = 8;
/// Default driver threads.
pub const DEFAULT_THREADS: usize = 2;
/// Default rows per transaction in the ceiling (the daemon's own largest
/// group commit, `storage.batch_max_rows`).
pub const DEFAULT_CEILING_BATCH: usize = codi_monitor::config::DEFAULT_BATCH_MAX_ROWS;

/// codi-loadgen: drives codi-monitor with many clients on a few mio threads
/// (open loop, latency from the scheduled send time), checks that every
/// acknowledged log is stored, and measures SQLite's raw insert ceiling.
#[derive(FromArgs, Debug)]
pub struct Args {
    #[argh(subcommand)]
    /// what to do
    pub command: Command,
}

/// The subcommands.
#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Command {
    /// Drive a running daemon.
    Run(RunArgs),
    /// Measure the raw SQLite ceiling.
    Ceiling(CeilingArgs),
    /// Measure export detection.
    Files(FilesArgs),
}

/// write export files under a watched tree on a schedule and measure how
/// fast and how completely the daemon archives them
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "files")]
pub struct FilesArgs {
    /// the daemon's Unix socket
    #[argh(option)]
    pub socket: PathBuf,
    /// the daemon's database, read to find the archive rows
    #[argh(option)]
    pub db: PathBuf,
    /// where the watched tree is created (default: the temp directory)
    #[argh(option, default = "crate::files::default_dir()")]
    pub dir: PathBuf,
    /// export files per second, open loop (default 1000)
    #[argh(option, default = "1000")]
    pub rate: u64,
    /// seconds of writing, at most 3600 (default 10)
    #[argh(option, default = "10.0")]
    pub duration: f64,
    /// subdirectories the files are spread over (default 16)
    #[argh(option, default = "16")]
    pub subdirs: u64,
    /// bytes of each file (default 200)
    #[argh(option, default = "200")]
    pub size: usize,
    /// write every number as JSON to this file
    #[argh(option)]
    pub json: Option<PathBuf>,
    /// keep the tree and the watch afterwards
    #[argh(switch)]
    pub keep: bool,
    /// afterwards, write and archive the same files without the daemon
    /// (two threads, the daemon's copy routine) for the raw ceiling
    #[argh(switch)]
    pub ceiling: bool,
    /// the daemon's pid: report its CPU per export from /proc
    #[argh(option)]
    pub daemon_pid: Option<u32>,
}

/// drive a running daemon and report throughput and latency
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "run")]
pub struct RunArgs {
    /// the daemon's Unix socket
    #[argh(option)]
    pub socket: Option<PathBuf>,
    /// the daemon's TCP address (loopback only), e.g. 127.0.0.1:9847
    #[argh(option)]
    pub tcp: Option<String>,
    /// which endpoint to use: unix or tcp (default: unix if --socket is given)
    #[argh(option)]
    pub transport: Option<String>,
    /// the daemon's database, opened read-only at the end to count stored rows
    #[argh(option)]
    pub db: Option<PathBuf>,
    /// load connections, 1 to 10000 (default 100)
    #[argh(option, default = "100")]
    pub clients: usize,
    /// total logs per second over all clients, on a schedule; 0 = closed loop (default 10000)
    #[argh(option, default = "10_000.0")]
    pub rate: f64,
    /// seconds of load, at most 3600 (default 10)
    #[argh(option, default = "10.0")]
    pub duration: f64,
    /// entries per LogBatch; 1 sends plain LogEntry frames (default 1)
    #[argh(option, default = "DEFAULT_BATCH")]
    pub batch: usize,
    /// answers a client may have outstanding (default 8)
    #[argh(option, default = "DEFAULT_WINDOW")]
    pub window: usize,
    /// bytes of message text per log (default 150)
    #[argh(option, default = "DEFAULT_MESSAGE_SIZE")]
    pub message_size: usize,
    /// round-trip Ping probes per second in total, on their own connections (default 0)
    #[argh(option, default = "0.0")]
    pub ping_rate: f64,
    /// extra connections that connect and stay idle (default 0)
    #[argh(option, default = "0")]
    pub idle: usize,
    /// one extra connection sends QueryLogs (limit 100) every this many milliseconds
    #[argh(option)]
    pub query_interval: Option<u64>,
    /// mio driver threads (default 2)
    #[argh(option, default = "DEFAULT_THREADS")]
    pub threads: usize,
    /// the daemon's pid: report its CPU and RSS from /proc
    #[argh(option)]
    pub daemon_pid: Option<u32>,
    /// after the run, insert this many rows straight into SQLite (temp db beside --db) and report daemon / ceiling
    #[argh(option)]
    pub ceiling_rows: Option<u64>,
    /// rows per transaction for --ceiling-rows (default 8192)
    #[argh(option, default = "DEFAULT_CEILING_BATCH")]
    pub ceiling_batch: usize,
    /// the ceiling never restarts its WAL (checkpointer only; the WAL grows without bound, unlike the daemon)
    #[argh(switch)]
    pub ceiling_passive_only: bool,
    /// write every number as JSON to this file
    #[argh(option)]
    pub json: Option<PathBuf>,
    /// write each histogram as an HdrHistogram log (.hlog) and a percentile table (.hgrm) here
    #[argh(option)]
    pub hist_dir: Option<PathBuf>,
    /// no live progress line
    #[argh(switch)]
    pub quiet: bool,
}

/// insert rows straight into SQLite from one thread: the storage ceiling
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "ceiling")]
pub struct CeilingArgs {
    /// database to create (must not exist yet); its directory must be private (0700)
    #[argh(option)]
    pub db: PathBuf,
    /// rows to insert (default 200000)
    #[argh(option, default = "200_000")]
    pub rows: u64,
    /// rows per IMMEDIATE transaction (default 8192)
    #[argh(option, default = "DEFAULT_CEILING_BATCH")]
    pub batch: usize,
    /// bytes of message text per row (default 150)
    #[argh(option, default = "DEFAULT_MESSAGE_SIZE")]
    pub message_size: usize,
    /// sessions the rows are spread over, round robin, as that many clients would (default 1000)
    #[argh(option, default = "1000")]
    pub sessions: usize,
    /// never restart the WAL from the writer (checkpointer only; the WAL grows without bound, unlike the daemon)
    #[argh(switch)]
    pub passive_only: bool,
    /// keep the database afterwards (default: delete it)
    #[argh(switch)]
    pub keep: bool,
    /// write the result as JSON to this file
    #[argh(option)]
    pub json: Option<PathBuf>,
}

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A loopback TCP address.
    Tcp(SocketAddr),
}

impl Endpoint {
    /// `unix` or `tcp`.
    pub fn transport(&self) -> &'static str {
        match self {
            Endpoint::Unix(_) => "unix",
            Endpoint::Tcp(_) => "tcp",
        }
    }
}

/// A validated `run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Where to connect.
    pub endpoint: Endpoint,
    /// The database to check, if any.
    pub db: Option<PathBuf>,
    /// Load connections.
    pub clients: usize,
    /// Logs per second in total; `None` is closed loop.
    pub rate: Option<f64>,
    /// Length of the load phase.
    pub duration: Duration,
    /// Entries per frame (1 = `LogEntry`).
    pub batch: usize,
    /// Answers outstanding per client.
    pub window: usize,
    /// Message text bytes.
    pub message_size: usize,
    /// Pings per second in total (0 = none).
    pub ping_rate: f64,
    /// Idle connections.
    pub idle: usize,
    /// Period of the query connection, if any.
    pub query_interval: Option<Duration>,
    /// Driver threads.
    pub threads: usize,
    /// The daemon's pid, for /proc sampling.
    pub daemon_pid: Option<u32>,
    /// Rows for the ceiling after the run, its batch, and whether it may
    /// TRUNCATE the WAL as the daemon does.
    pub ceiling: Option<(u64, usize, bool)>,
    /// JSON output file.
    pub json: Option<PathBuf>,
    /// Histogram output directory.
    pub hist_dir: Option<PathBuf>,
    /// No progress line.
    pub quiet: bool,
}

impl RunConfig {
    /// Connections the run opens in all.
    pub fn connections(&self) -> usize {
        let pings = if self.ping_rate > 0.0 {
            self.threads
        } else {
            0
        };
        self.clients + self.idle + pings + usize::from(self.query_interval.is_some())
    }
}

/// Resolves `addr` and refuses anything that is not loopback.
pub fn loopback_addr(addr: &str) -> Result<SocketAddr, String> {
    let resolved: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("--tcp `{addr}`: {e}"))?
        .collect();
    match resolved.first() {
        None => Err(format!("--tcp `{addr}` resolves to no address")),
        Some(a) if resolved.iter().all(|a| a.ip().is_loopback()) => Ok(*a),
        Some(_) => Err(format!(
            "--tcp `{addr}` is not a loopback address; the load generator only drives a daemon on this machine"
        )),
    }
}

fn check_range<T: PartialOrd + std::fmt::Display>(
    name: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), String> {
    if value < min || value > max {
        return Err(format!(
            "--{name} must be between {min} and {max} (got {value})"
        ));
    }
    Ok(())
}

impl RunArgs {
    /// Checks every bound and picks the endpoint.
    pub fn validate(&self) -> Result<RunConfig, String> {
        let endpoint = match (self.transport.as_deref(), &self.socket, &self.tcp) {
            (Some("unix") | None, Some(path), _) => Endpoint::Unix(path.clone()),
            (Some("tcp") | None, _, Some(addr)) => Endpoint::Tcp(loopback_addr(addr)?),
            (Some("unix"), None, _) => return Err("--transport unix needs --socket".into()),
            (Some("tcp"), _, None) => return Err("--transport tcp needs --tcp".into()),
            (Some(other), _, _) => {
                return Err(format!("--transport must be unix or tcp (got `{other}`)"))
            }
            (None, None, None) => return Err("give --socket PATH or --tcp ADDR".into()),
        };
        check_range("clients", self.clients, 1, MAX_CLIENTS)?;
        check_range("idle", self.idle, 0, MAX_IDLE)?;
        check_range("threads", self.threads, 1, MAX_THREADS)?;
        check_range("batch", self.batch, 1, MAX_BATCH)?;
        check_range("window", self.window, 1, MAX_WINDOW)?;
        check_range(
            "message-size",
            self.message_size,
            0,
            codi_monitor::proto::MAX_FRAME_LEN,
        )?;
        check_range("ceiling-batch", self.ceiling_batch, 1, 1_000_000)?;
        if !self.duration.is_finite() || self.duration <= 0.0 || self.duration > MAX_DURATION_SECS {
            return Err(format!(
                "--duration must be more than 0 and at most {MAX_DURATION_SECS} seconds (got {})",
                self.duration
            ));
        }
        if !self.rate.is_finite() || self.rate < 0.0 || self.rate > 1e8 {
            return Err(format!(
                "--rate must be between 0 and 1e8 (got {})",
                self.rate
            ));
        }
        if !self.ping_rate.is_finite() || self.ping_rate < 0.0 || self.ping_rate > 1e6 {
            return Err(format!(
                "--ping-rate must be between 0 and 1e6 (got {})",
                self.ping_rate
            ));
        }
        let query_interval = match self.query_interval {
            Some(0) => return Err("--query-interval must be at least 1 ms".into()),
            Some(ms) => Some(Duration::from_millis(ms)),
            None => None,
        };
        if let Some(rows) = self.ceiling_rows {
            if self.db.is_none() {
                return Err("--ceiling-rows needs --db (the ceiling runs beside it)".into());
            }
            check_range("ceiling-rows", rows, 1, 100_000_000)?;
        }
        Ok(RunConfig {
            endpoint,
            db: self.db.clone(),
            clients: self.clients,
            rate: (self.rate > 0.0).then_some(self.rate),
            duration: Duration::from_secs_f64(self.duration),
            batch: self.batch,
            window: self.window,
            message_size: self.message_size,
            ping_rate: self.ping_rate,
            idle: self.idle,
            query_interval,
            threads: self.threads,
            daemon_pid: self.daemon_pid,
            ceiling: self
                .ceiling_rows
                .map(|rows| (rows, self.ceiling_batch, !self.ceiling_passive_only)),
            json: self.json.clone(),
            hist_dir: self.hist_dir.clone(),
            quiet: self.quiet,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<RunConfig, String> {
        let Command::Run(run) = Args::from_args(&["codi-loadgen"], args)
            .map_err(|e| e.output)?
            .command
        else {
            panic!("not run")
        };
        run.validate()
    }

    #[test]
    fn endpoint_choice_and_loopback_only() {
        let c = run(&["run", "--socket", "/tmp/s"]).unwrap();
        assert_eq!(c.endpoint, Endpoint::Unix("/tmp/s".into()));
        let c = run(&[
            "run",
            "--socket",
            "/tmp/s",
            "--tcp",
            "127.0.0.1:9",
            "--transport",
            "tcp",
        ])
        .unwrap();
        assert_eq!(c.endpoint.transport(), "tcp");
        assert!(run(&["run", "--tcp", "10.1.2.3:9"])
            .unwrap_err()
            .contains("loopback"));
        assert!(run(&["run", "--tcp", "[::1]:9"]).is_ok());
        assert!(run(&["run"]).is_err());
        assert!(run(&["run", "--socket", "/s", "--transport", "tcp"]).is_err());
    }

    #[test]
    fn bounds_are_enforced() {
        let base = ["run", "--socket", "/tmp/s"];
        for extra in [
            &["--clients", "0"][..],
            &["--clients", "10001"],
            &["--duration", "3601"],
            &["--duration", "0"],
            &["--rate", "-1"],
            &["--threads", "0"],
            &["--query-interval", "0"],
            &["--ceiling-rows", "10"],
        ] {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            assert!(run(&args).is_err(), "{extra:?} accepted");
        }
        let c = run(&["run", "--socket", "/s", "--rate", "0", "--ping-rate", "10"]).unwrap();
        assert_eq!(c.rate, None, "rate 0 is closed loop");
        assert_eq!(c.connections(), 100 + 2);
    }
}
