//! `codi2`: send logs and sessions to codi-monitor and read them back.
//!
//! Thin by design: arguments -> [`codi_monitor::client::Client`] -> exit
//! code. When no daemon runs, writes and queries go straight to the SQLite
//! database (standalone mode), said once on stderr.
//!
//! Exit codes:
//! - 0: success (also when stdout is a closed pipe)
//! - 1: usage error (bad arguments, invalid config, a log larger than one
//!   frame, unparsable stdin lines)
//! - 2: rejected by the daemon (a `Rejected` acknowledgment or an `Error`
//!   answer, including a refused token)
//! - 3: cannot deliver (daemon unreachable and standalone mode failed or not
//!   possible, or retries used up)
//! - 4: protocol or internal error (an answer that makes no sense)
//! - 5: no daemon, and the database is damaged or being recovered: nothing
//!   was stored (start the daemon, which salvages it)

use argh::FromArgs;
use codi_monitor::client::discover::{self, Explicit};
use codi_monitor::client::follow::{Cursor, Step};
use codi_monitor::client::hub_query::{
    self, HubClient, HubFilter, HubLog, HubQueryError, HubTarget,
};
use codi_monitor::client::input::{self, LineDefaults};
use codi_monitor::client::output;
use codi_monitor::client::stream;
use codi_monitor::client::{Client, ClientError, ClientOptions, RetryPolicy};
use codi_monitor::config::paths;
use codi_monitor::config::{read_password_file, Config, Overrides};
use codi_monitor::fsperm::{self, TrustedUsers};
use codi_monitor::health::report::Report;
use codi_monitor::proto::{
    AckStatus, LogFields, LogFilter, LogLevel, Message, Payload, StoredLog, Timestamp,
};
use codi_monitor::store::query::MAX_QUERY_LIMIT;
use codi_monitor::store::StoreError;
use codi_monitor::text::escape_controls;
use std::collections::HashMap;
use std::io::{self, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

/// Pause between follow-mode polls that found nothing new.
const FOLLOW_POLL: Duration = Duration::from_millis(50);
/// Rows per follow-mode query.
const FOLLOW_PAGE: u64 = 1000;

#[derive(FromArgs)]
/// Send logs and sessions to codi-monitor, and read them back.
struct Cli {
    /// config file (default: $CODI_CONFIG, else /etc/codi/monitor.toml if it exists)
    #[argh(option)]
    config: Option<PathBuf>,
    /// use only this daemon Unix socket
    #[argh(option)]
    socket: Option<PathBuf>,
    /// use only this daemon TCP address, e.g. 127.0.0.1:9847
    #[argh(option)]
    tcp: Option<String>,
    /// database for standalone mode (default: from the config)
    #[argh(option)]
    db: Option<PathBuf>,
    /// connect, read and write timeout (default 5s)
    #[argh(option, default = "Duration::from_secs(5)", from_str_fn(parse_timeout))]
    timeout: Duration,
    #[argh(subcommand)]
    command: Command,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Log(LogCmd),
    Session(SessionCmd),
    Logs(LogsCmd),
    Status(StatusCmd),
    Ping(PingCmd),
    Watch(WatchCmd),
}

#[derive(FromArgs)]
/// Store one log, or one log per stdin line with MESSAGE `-`.
#[argh(subcommand, name = "log")]
struct LogCmd {
    /// level: trace, debug, info, warn, error (default info)
    #[argh(option, short = 'l', default = "LogLevel::Info")]
    level: LogLevel,
    /// component name (default codi2)
    #[argh(option, short = 'c', default = "String::from(\"codi2\")")]
    component: String,
    /// session id (default $CODI_SESSION)
    #[argh(option, short = 's')]
    session: Option<String>,
    /// metadata as JSON
    #[argh(option, short = 'm')]
    metadata: Option<String>,
    /// metadata entry KEY=VALUE (repeatable; numbers and booleans stay typed)
    #[argh(option)]
    meta: Vec<String>,
    /// the message, or `-` to read one log per line from stdin
    #[argh(positional)]
    message: String,
}

#[derive(FromArgs)]
/// Start or end an agent session.
#[argh(subcommand, name = "session")]
struct SessionCmd {
    #[argh(subcommand)]
    action: SessionAction,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum SessionAction {
    Start(SessionStartCmd),
    End(SessionEndCmd),
}

#[derive(FromArgs)]
/// Record that a session starts.
#[argh(subcommand, name = "start")]
struct SessionStartCmd {
    /// who runs the session (default $USER)
    #[argh(option)]
    identity: Option<String>,
    /// kind of agent
    #[argh(option)]
    agent_type: Option<String>,
    /// workspace directory (default: the current directory)
    #[argh(option)]
    workspace: Option<PathBuf>,
    /// the session id
    #[argh(positional)]
    session_id: String,
}

#[derive(FromArgs)]
/// Record that a session ends.
#[argh(subcommand, name = "end")]
struct SessionEndCmd {
    /// the session id
    #[argh(positional)]
    session_id: String,
}

#[derive(FromArgs)]
/// Show stored logs, newest last.
#[argh(subcommand, name = "logs")]
struct LogsCmd {
    /// only this level and more severe
    #[argh(option)]
    level: Option<LogLevel>,
    /// only this component
    #[argh(option)]
    component: Option<String>,
    /// only this session
    #[argh(option)]
    session: Option<String>,
    /// only logs written by USER (a name or a uid); without the right to
    /// see other users' logs, only your own are shown whatever you ask
    #[argh(option)]
    user: Option<String>,
    /// only logs at or after T (RFC 3339, or a duration like 10m meaning ago)
    #[argh(option)]
    since: Option<String>,
    /// only logs before T (RFC 3339, or a duration like 10m meaning ago)
    #[argh(option)]
    until: Option<String>,
    /// only messages containing TEXT (case-sensitive)
    #[argh(option)]
    contains: Option<String>,
    /// how many of the newest matches to show (default 100)
    #[argh(option, default = "100")]
    limit: u64,
    /// keep printing new logs until interrupted
    #[argh(switch, short = 'f')]
    follow: bool,
    /// one JSON object per line
    #[argh(switch)]
    json: bool,
    /// query the ClickHouse hub, every host's logs, instead of this host's
    /// (docs/HUB.md); adds each log's host to the output
    #[argh(switch)]
    hub: bool,
    /// with --hub: only logs of this host (its server_hub.host_id)
    #[argh(option)]
    host: Option<String>,
    /// with --hub: the hub's URL (default $CODI_HUB_URL, else server_hub.url)
    #[argh(option)]
    hub_url: Option<String>,
    /// with --hub: the hub user (default $CODI_HUB_USER, else server_hub.user)
    #[argh(option)]
    hub_user: Option<String>,
    /// with --hub: file holding the hub user's password, mode 0600 (default
    /// $CODI_HUB_PASSWORD_FILE, else server_hub.password_file)
    #[argh(option)]
    hub_password_file: Option<PathBuf>,
}

#[derive(FromArgs)]
/// Show the daemon's health: overall state, version, uptime and each component.
#[argh(subcommand, name = "status")]
struct StatusCmd {
    /// print the health as JSON, the same document as the daemon's GET /health
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Watch directories for export files (needs the daemon).
#[argh(subcommand, name = "watch")]
struct WatchCmd {
    #[argh(subcommand)]
    action: WatchAction,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum WatchAction {
    Add(WatchAddCmd),
    Remove(WatchRemoveCmd),
    List(WatchListCmd),
}

#[derive(FromArgs)]
/// Start watching a directory (and its subdirectories) for exports.
#[argh(subcommand, name = "add")]
struct WatchAddCmd {
    /// glob pattern of export files, repeatable (default: the daemon's
    /// monitor.export_patterns)
    #[argh(option)]
    pattern: Vec<String>,
    /// watch only this directory, not its subdirectories
    #[argh(switch)]
    no_recursive: bool,
    /// the session every export found here belongs to
    #[argh(option)]
    session: Option<String>,
    /// the directory
    #[argh(positional)]
    path: PathBuf,
}

#[derive(FromArgs)]
/// Stop watching a directory.
#[argh(subcommand, name = "remove")]
struct WatchRemoveCmd {
    /// the directory
    #[argh(positional)]
    path: PathBuf,
}

#[derive(FromArgs)]
/// List the watched directories.
#[argh(subcommand, name = "list")]
struct WatchListCmd {}

#[derive(FromArgs)]
/// Measure round trips to the daemon.
#[argh(subcommand, name = "ping")]
struct PingCmd {
    /// how many pings (default 1)
    #[argh(option, default = "1")]
    count: u32,
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("timeout must be longer than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("invalid timeout `{text}`: {e}")),
    }
}

/// A failure with its exit code.
struct Exit {
    code: u8,
    message: String,
}

impl Exit {
    fn usage(message: impl Into<String>) -> Exit {
        Exit {
            code: 1,
            message: message.into(),
        }
    }
    fn rejected(message: impl Into<String>) -> Exit {
        Exit {
            code: 2,
            message: message.into(),
        }
    }
    fn protocol(message: impl Into<String>) -> Exit {
        Exit {
            code: 4,
            message: message.into(),
        }
    }
    /// Stdout went away (e.g. `codi2 logs | head`): success, quietly.
    fn closed_stdout() -> Exit {
        Exit {
            code: 0,
            message: String::new(),
        }
    }
}

impl From<ClientError> for Exit {
    fn from(e: ClientError) -> Exit {
        let code = match &e {
            ClientError::Standalone { source, .. } | ClientError::Store(source)
                if matches!(**source, StoreError::Damaged { .. }) =>
            {
                5
            }
            ClientError::Unsendable(_) => 1,
            ClientError::AuthRefused { .. } => 2,
            ClientError::Protocol(_) => 4,
            ClientError::Unreachable { .. }
            | ClientError::Standalone { .. }
            | ClientError::GaveUp { .. }
            | ClientError::Store(_) => 3,
        };
        Exit {
            code,
            message: e.to_string(),
        }
    }
}

fn stdout_error(e: io::Error) -> Exit {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Exit::closed_stdout()
    } else {
        Exit::protocol(format!("cannot write to stdout: {e}"))
    }
}

/// Stands for a lone `-` argument, which argh would take for an option.
/// Command-line arguments cannot contain NUL, so no real argument collides.
const DASH: &str = "\0-";

/// Undoes the [`DASH`] substitution in an argument value.
fn undash(s: String) -> String {
    if s == DASH {
        "-".to_owned()
    } else {
        s
    }
}

/// Parses the command line like `argh::from_env`, but lets `-` through as a
/// value.
fn parse_args() -> Result<Cli, ExitCode> {
    let args: Vec<String> = std::env::args().collect();
    let name = args
        .first()
        .map_or("codi2", |a| a.rsplit('/').next().unwrap_or(a));
    let rest: Vec<&str> = args
        .iter()
        .skip(1)
        .map(|a| if a == "-" { DASH } else { a.as_str() })
        .collect();
    Cli::from_args(&[name], &rest).map_err(|early| {
        if early.status.is_ok() {
            println!("{}", early.output);
            ExitCode::SUCCESS
        } else {
            eprintln!("{}\nRun {name} --help for more information.", early.output);
            ExitCode::from(1)
        }
    })
}

fn main() -> ExitCode {
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(exit) => {
            if !exit.message.is_empty() {
                eprintln!("codi2: error: {}", escape_controls(&exit.message));
            }
            ExitCode::from(exit.code)
        }
    }
}

/// One line on stderr. Every message may quote the daemon or a path, so
/// controls in it are shown escaped, as on stdout.
fn notice(sentence: &str) {
    eprintln!("codi2: {}", escape_controls(sentence));
}

fn run(cli: Cli) -> Result<(), Exit> {
    let overrides = Overrides {
        config: cli.config.clone(),
        db: cli.db.clone(),
        ..Overrides::default()
    };
    let config = Config::load_client_with_env(&overrides, &paths::process_env)
        .map_err(|e| Exit::usage(e.to_string()))?;
    let tcp = match &cli.tcp {
        Some(a) => Some(a.parse::<SocketAddr>().map_err(|_| {
            Exit::usage(format!("--tcp `{a}` is not an address like 127.0.0.1:9847"))
        })?),
        None => None,
    };
    let explicit = Explicit {
        socket: cli.socket.clone(),
        tcp,
    };
    let endpoints = discover::endpoints(
        &config,
        &explicit,
        &paths::process_env,
        paths::current_euid(),
        &|p| p.exists(),
    );
    let needs_daemon = matches!(
        cli.command,
        Command::Status(_) | Command::Ping(_) | Command::Watch(_)
    );
    let service = config.monitor.service_user.as_deref().and_then(|user| {
        let uid = fsperm::lookup_user(user);
        if uid.is_none() {
            notice(&format!(
                "monitor.service_user `{user}` is no user here; trusting only this user and root"
            ));
        }
        uid
    });
    let opts = ClientOptions {
        endpoints,
        token: config.monitor.token.clone(),
        trusted: TrustedUsers::current(service),
        timeout: cli.timeout,
        retry: RetryPolicy::default(),
        standalone_db: (!needs_daemon).then(|| config.storage.sqlite_path.clone()),
        notice,
    };
    match cli.command {
        Command::Logs(cmd) if cmd.hub => hub_logs(cmd, &config, cli.timeout),
        Command::Log(cmd) => log(cmd, opts),
        Command::Session(cmd) => session(cmd, opts),
        Command::Logs(cmd) => logs(cmd, opts),
        Command::Status(cmd) => status(cmd, opts),
        Command::Ping(cmd) => ping(cmd, opts),
        Command::Watch(cmd) => watch(cmd, opts),
    }
}

/// `path` made absolute against this process's directory: the daemon runs
/// elsewhere.
fn absolute(path: &std::path::Path) -> Result<String, Exit> {
    std::path::absolute(path)
        .map(|p| p.display().to_string())
        .map_err(|e| Exit::usage(format!("cannot resolve `{}`: {e}", path.display())))
}

fn watch(cmd: WatchCmd, opts: ClientOptions) -> Result<(), Exit> {
    let payload = match cmd.action {
        WatchAction::Add(a) => Payload::StartMonitoring {
            path: absolute(&a.path)?,
            recursive: !a.no_recursive,
            patterns: a.pattern.into_iter().map(undash).collect(),
            session_id: a.session.map(undash),
        },
        WatchAction::Remove(r) => Payload::StopMonitoring {
            path: absolute(&r.path)?,
        },
        WatchAction::List(_) => Payload::ListMonitoring,
    };
    let mut client = Client::connect(opts)?;
    let answer = client.request(Message::new(payload))?;
    let Payload::Monitoring { paths } = answer.payload else {
        return expect_ack(&answer);
    };
    let mut out = io::stdout().lock();
    for p in paths {
        writeln!(out, "{}", output::watch_line(&p)).map_err(stdout_error)?;
    }
    Ok(())
}

/// Checks an acknowledgment-style answer.
fn expect_ack(answer: &Message) -> Result<(), Exit> {
    match &answer.payload {
        Payload::Acknowledgment {
            status: AckStatus::Accepted | AckStatus::Queued,
            ..
        } => Ok(()),
        Payload::Acknowledgment {
            status: AckStatus::Rejected(why),
            ..
        } => Err(Exit::rejected(format!("rejected: {why}"))),
        Payload::Error { code, message, .. } => Err(Exit::rejected(format!("{code}: {message}"))),
        other => Err(Exit::protocol(format!(
            "unexpected {} answer",
            other.name()
        ))),
    }
}

fn log(cmd: LogCmd, opts: ClientOptions) -> Result<(), Exit> {
    let meta: Vec<String> = cmd.meta.into_iter().map(undash).collect();
    let json = cmd.metadata.map(undash);
    let metadata = match (&json, meta.is_empty()) {
        (Some(_), false) => return Err(Exit::usage("use either -m JSON or --meta, not both")),
        (Some(json), true) => Some(input::parse_json_metadata(json).map_err(Exit::usage)?),
        (None, false) => Some(input::parse_meta_pairs(&meta).map_err(Exit::usage)?),
        (None, true) => None,
    };
    let defaults = LineDefaults {
        level: cmd.level,
        component: undash(cmd.component),
        session_id: cmd
            .session
            .map(undash)
            .or_else(|| std::env::var("CODI_SESSION").ok().filter(|s| !s.is_empty())),
        metadata,
    };
    if cmd.message == DASH {
        return log_stdin(defaults, opts);
    }
    let entry = LogFields {
        level: defaults.level,
        component: defaults.component,
        message: cmd.message,
        metadata: defaults.metadata,
        session_id: defaults.session_id,
    };
    let mut client = Client::connect(opts)?;
    let answer = client.request(Message::new(Payload::LogEntry(entry)))?;
    expect_ack(&answer)
}

fn log_stdin(defaults: LineDefaults, opts: ClientOptions) -> Result<(), Exit> {
    let input = io::BufReader::with_capacity(64 * 1024, io::stdin());
    let rx = stream::spawn_reader(input, defaults);
    let mut warn = |w: &str| notice(w);
    let report = stream::send_lines(&rx, || Client::connect(opts), stream::WINDOW, &mut warn)?;
    if report.rejected > 0 {
        return Err(Exit::rejected(format!(
            "{} of {} logs were rejected",
            report.rejected,
            report.rejected + report.accepted
        )));
    }
    if report.bad_lines > 0 {
        return Err(Exit::usage(format!(
            "{} input lines were not sent",
            report.bad_lines
        )));
    }
    Ok(())
}

fn session(cmd: SessionCmd, opts: ClientOptions) -> Result<(), Exit> {
    let payload = match cmd.action {
        SessionAction::Start(s) => {
            let identity = s
                .identity
                .or_else(|| paths::process_env("USER"))
                .or_else(|| paths::process_env("LOGNAME"))
                .unwrap_or_else(|| format!("uid-{}", paths::current_euid()));
            let workspace = match s.workspace {
                Some(w) => w,
                None => std::env::current_dir()
                    .map_err(|e| Exit::usage(format!("cannot tell the current directory: {e}")))?,
            };
            Payload::SessionStart {
                session_id: undash(s.session_id),
                identity: undash(identity),
                agent_type: s.agent_type.map(undash),
                workspace: Some(workspace.display().to_string()),
            }
        }
        SessionAction::End(s) => Payload::SessionEnd {
            session_id: undash(s.session_id),
        },
    };
    let mut client = Client::connect(opts)?;
    let answer = client.request(Message::new(payload))?;
    expect_ack(&answer)
}

fn query(
    client: &mut Client,
    filter: LogFilter,
    limit: u64,
) -> Result<(Vec<StoredLog>, u64), Exit> {
    let answer = client.request(Message::new(Payload::QueryLogs { filter, limit }))?;
    match answer.payload {
        Payload::LogResults {
            entries,
            total_count,
        } => Ok((entries, total_count)),
        Payload::Error { code, message, .. } => Err(Exit::rejected(format!("{code}: {message}"))),
        other => Err(Exit::protocol(format!(
            "unexpected {} answer to QueryLogs",
            other.name()
        ))),
    }
}

/// Parses `--since`/`--until` values (RFC 3339, or a duration meaning
/// that long before `now`).
fn time_parser(now: Timestamp) -> impl Fn(&Option<String>) -> Result<Option<Timestamp>, Exit> {
    move |t| {
        t.as_deref()
            .map(|t| input::parse_time(t, now).map_err(Exit::usage))
            .transpose()
    }
}

fn logs(cmd: LogsCmd, opts: ClientOptions) -> Result<(), Exit> {
    let hub_only = [
        ("--host", cmd.host.is_some()),
        ("--hub-url", cmd.hub_url.is_some()),
        ("--hub-user", cmd.hub_user.is_some()),
        ("--hub-password-file", cmd.hub_password_file.is_some()),
    ];
    if let Some((flag, _)) = hub_only.iter().find(|(_, given)| *given) {
        return Err(Exit::usage(format!("{flag} needs --hub")));
    }
    let time = time_parser(Timestamp::now());
    let filter = LogFilter {
        min_level: cmd.level,
        component: cmd.component.map(undash),
        session_id: cmd.session.map(undash),
        since: time(&cmd.since)?,
        until: time(&cmd.until)?,
        contains: cmd.contains.map(undash),
        after_id: None,
        uid: cmd
            .user
            .as_deref()
            .map(|u| {
                fsperm::lookup_user(u).ok_or_else(|| Exit::usage(format!("no such user: {u}")))
            })
            .transpose()?,
    };
    let stdout = io::stdout();
    let tty = stdout.is_terminal();
    let mut out = Printer {
        out: io::BufWriter::new(stdout.lock()),
        json: cmd.json,
        colour: tty && paths::process_env("NO_COLOR").is_none(),
        names: HashMap::new(),
    };
    let mut client = Client::connect(opts)?;
    // With --follow and --limit 0, one row tells where "now" is.
    let first_limit = if cmd.follow {
        cmd.limit.max(1)
    } else {
        cmd.limit
    };
    let (entries, total) = query(&mut client, filter.clone(), first_limit)?;
    let shown = if cmd.limit == 0 {
        &entries[..0]
    } else {
        &entries[..]
    };
    if tty && !cmd.json && (!shown.is_empty() || cmd.follow) {
        out.line(&output::table_header())?;
    }
    out.rows(shown)?;
    if !cmd.follow {
        if cmd.limit == 0 {
            out.line(&format!("{total} matching logs"))?;
        } else if total > shown.len() as u64 {
            // Fewer than asked for: the rest did not fit in one answer.
            let hint = if (shown.len() as u64) < cmd.limit.min(MAX_QUERY_LIMIT) {
                "older ones did not fit in one answer; narrow the filter or use --until"
            } else {
                "see --limit"
            };
            eprintln!(
                "codi2: showing the newest {} of {total} matching logs ({hint})",
                shown.len()
            );
        }
        return out.flush();
    }
    out.flush()?;
    let mut cursor = Cursor::after(&entries);
    let mut skipping = false;
    loop {
        let page = LogFilter {
            after_id: Some(cursor.after_id),
            ..filter.clone()
        };
        let (entries, total) = query(&mut client, page, FOLLOW_PAGE)?;
        match cursor.advance(&entries, total) {
            Step::Skipped => {
                if !skipping {
                    eprintln!(
                        "codi2: the daemon sent no log after id {} although {total} wait \
                         (one too large to send?); stepping past it",
                        cursor.after_id - 1
                    );
                }
                skipping = true;
                continue;
            }
            Step::Moved | Step::Idle => skipping = false,
        }
        out.rows(&entries)?;
        out.flush()?;
        // Wait only once nothing more is waiting (a page may stop short of
        // FOLLOW_PAGE when the answer frame is full).
        if entries.len() as u64 >= total {
            thread::sleep(FOLLOW_POLL);
        }
    }
}

/// A hub setting: the flag, else the environment variable `env`, else the
/// config's value; an empty flag or variable counts as unset.
fn hub_setting(flag: Option<String>, env: &str, config: Option<&str>) -> Option<String> {
    flag.map(undash)
        .filter(|v| !v.is_empty())
        .or_else(|| paths::process_env(env).filter(|v| !v.is_empty()))
        .or_else(|| config.map(str::to_owned))
}

impl From<HubQueryError> for Exit {
    fn from(e: HubQueryError) -> Exit {
        let code = match &e {
            HubQueryError::Config(_) => 1,
            HubQueryError::Refused { .. } => 2,
            HubQueryError::Unreachable { .. } => 3,
            HubQueryError::BadAnswer(_) => 4,
        };
        Exit {
            code,
            message: e.to_string(),
        }
    }
}

/// `codi2 logs --hub`: the same filters and output as [`logs`], over every
/// host's logs on the hub, with each log's host.
fn hub_logs(cmd: LogsCmd, config: &Config, connect: Duration) -> Result<(), Exit> {
    if cmd.follow {
        return Err(Exit::usage(
            "--follow does not work with --hub (hosts ship their logs in batches, \
             seconds apart); run the query again, or use --since",
        ));
    }
    if cmd.user.is_some() {
        return Err(Exit::usage(
            "--user does not work with --hub: a uid names different users on different \
             hosts; use --host",
        ));
    }
    let time = time_parser(Timestamp::now());
    let filter = HubFilter {
        min_level: cmd.level,
        component: cmd.component.map(undash),
        session_id: cmd.session.map(undash),
        since: time(&cmd.since)?,
        until: time(&cmd.until)?,
        contains: cmd.contains.map(undash),
        host: cmd.host.map(undash),
    };
    let hub = &config.server_hub;
    let url =
        hub_setting(cmd.hub_url, hub_query::ENV_HUB_URL, hub.url.as_deref()).ok_or_else(|| {
            Exit::usage(format!(
                "no hub to ask: set server_hub.url in the config, {} or --hub-url",
                hub_query::ENV_HUB_URL
            ))
        })?;
    let user = hub_setting(cmd.hub_user, hub_query::ENV_HUB_USER, hub.user.as_deref());
    let password_file = hub_setting(
        cmd.hub_password_file.map(|p| p.display().to_string()),
        hub_query::ENV_HUB_PASSWORD_FILE,
        hub.password_file.as_deref().and_then(|p| p.to_str()),
    );
    let password = password_file
        .map(|file| read_password_file(std::path::Path::new(&file)))
        .transpose()
        .map_err(|e| Exit::usage(e.to_string()))?;
    let target = HubTarget::new(
        &url,
        &hub.database,
        &hub.tables.logs,
        user.as_deref(),
        password.as_deref(),
    )?;
    let tls = hub
        .ca_file
        .as_deref()
        .map(codi_monitor::hub::transport::tls_config)
        .transpose()
        .map_err(Exit::usage)?;
    let client = HubClient::new(target, connect, hub_query::QUERY_TIMEOUT, tls);
    let answer = client.query_logs(&filter, cmd.limit)?;

    let stdout = io::stdout();
    let tty = stdout.is_terminal();
    let mut out = Printer {
        out: io::BufWriter::new(stdout.lock()),
        json: cmd.json,
        colour: tty && paths::process_env("NO_COLOR").is_none(),
        names: HashMap::new(),
    };
    if cmd.limit == 0 {
        out.line(&format!("{} matching logs", answer.total))?;
        return out.flush();
    }
    if tty && !cmd.json && !answer.logs.is_empty() {
        out.line(&output::hub_table_header())?;
    }
    out.hub_rows(&answer.logs)?;
    let shown = answer.logs.len() as u64;
    if answer.total > shown {
        let hint = if answer.cut_short || shown < cmd.limit.min(MAX_QUERY_LIMIT) {
            "older ones did not fit in one answer; narrow the filter or use --until"
        } else {
            "see --limit"
        };
        eprintln!(
            "codi2: showing the newest {shown} of {} matching logs ({hint})",
            answer.total
        );
    }
    out.flush()
}

/// Writes logs to stdout as a table or JSON lines.
struct Printer<W: Write> {
    out: W,
    json: bool,
    colour: bool,
    /// User names already looked up, by uid.
    names: HashMap<u32, Option<String>>,
}

impl<W: Write> Printer<W> {
    fn line(&mut self, text: &str) -> Result<(), Exit> {
        writeln!(self.out, "{text}").map_err(stdout_error)
    }

    fn rows(&mut self, entries: &[StoredLog]) -> Result<(), Exit> {
        for e in entries {
            let line = if self.json {
                output::json_row(e)
            } else {
                let names = &mut self.names;
                let user = output::user_cell(e.uid, |uid| {
                    names
                        .entry(uid)
                        .or_insert_with(|| fsperm::user_name(uid))
                        .clone()
                });
                output::table_row(e, &user, self.colour)
            };
            self.line(&line)?;
        }
        Ok(())
    }

    /// Hub logs: the host added; the user column shows the uid, since a
    /// name looked up here may not be whom the uid names on the log's host.
    fn hub_rows(&mut self, entries: &[HubLog]) -> Result<(), Exit> {
        for e in entries {
            let line = if self.json {
                output::hub_json_row(&e.log, &e.host)
            } else {
                let user = output::user_cell(e.log.uid, |_| None);
                output::hub_table_row(&e.log, &e.host, &user, self.colour)
            };
            self.line(&line)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Exit> {
        self.out.flush().map_err(stdout_error)
    }
}

fn status(cmd: StatusCmd, opts: ClientOptions) -> Result<(), Exit> {
    let mut client = Client::connect(opts)?;
    let answer = client.request(Message::new(Payload::GetStatus))?;
    match answer.payload {
        status @ Payload::Status { .. } => {
            let report = Report::from_payload(status).expect("a Status payload");
            let mut out = io::stdout().lock();
            if cmd.json {
                writeln!(out, "{}", report.to_json_line()).map_err(stdout_error)?;
                return Ok(());
            }
            if let Some(e) = client.endpoint() {
                let at = e.to_string();
                writeln!(out, "daemon at {}", escape_controls(&at)).map_err(stdout_error)?;
            }
            for line in output::status_lines(&report) {
                writeln!(out, "{line}").map_err(stdout_error)?;
            }
            Ok(())
        }
        Payload::Error { code, message, .. } => Err(Exit::rejected(format!("{code}: {message}"))),
        other => Err(Exit::protocol(format!(
            "unexpected {} answer to GetStatus",
            other.name()
        ))),
    }
}

fn ping(cmd: PingCmd, opts: ClientOptions) -> Result<(), Exit> {
    let mut client = Client::connect(opts)?;
    let endpoint = client
        .endpoint()
        .map(|e| escape_controls(&e.to_string()).into_owned())
        .ok_or_else(|| Exit::protocol("ping needs a daemon"))?;
    let mut out = io::stdout().lock();
    for _ in 0..cmd.count.max(1) {
        let started = Instant::now();
        let answer = client.request(Message::new(Payload::Ping))?;
        let rtt = started.elapsed();
        expect_ack(&answer)?;
        writeln!(out, "pong from {endpoint} in {}", output::round_trip(rtt))
            .map_err(stdout_error)?;
    }
    Ok(())
}
