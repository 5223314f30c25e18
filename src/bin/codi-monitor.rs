//! `codi-monitor`: the host daemon. Thin: arguments -> configuration -> run
//! -> exit code.
//!
//! Exit codes: 0 stopped cleanly (SIGTERM/SIGINT drained), 1 could not start
//! or failed while running, 2 invalid configuration or arguments, 3 stopped
//! (drained) to salvage a database file found corrupt while running: the
//! next start moves it aside and salvages it. `verify`:
//! 0 every check passed, 1 one failed, 2 the files could not be opened;
//! `backup`: 0 written, 1 failed. `recover`: 0 nothing to recover or
//! recovered (the report says what was salvaged and lost), 1 failed.

use argh::FromArgs;
use codi_monitor::config::{Config, Overrides};
use codi_monitor::store::{backup, recovery, verify};
use codi_monitor::{daemon, logger};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// codi-monitor: collects structured logs and agent sessions from codi2
/// clients into one SQLite database. Runs with no configuration file at all.
#[derive(FromArgs)]
struct Args {
    /// configuration file (default: $CODI_CONFIG, then /etc/codi/monitor.toml if present)
    #[argh(option)]
    config: Option<PathBuf>,
    /// unix socket path to listen on
    #[argh(option)]
    socket: Option<PathBuf>,
    /// TCP address to listen on, e.g. 127.0.0.1:9847 (port 0 picks one)
    #[argh(option)]
    tcp: Option<String>,
    /// SQLite database path
    #[argh(option)]
    db: Option<PathBuf>,
    /// number of event loops (default: one per core)
    #[argh(option)]
    workers: Option<usize>,
    /// log level: error, warn, info, debug or trace
    #[argh(option)]
    log_level: Option<String>,
    /// admin endpoint address for /metrics and /health, e.g. 127.0.0.1:9848 (port 0 picks one; "" turns it off)
    #[argh(option)]
    admin: Option<String>,
    /// file holding the TCP token (or set $CODI_MONITOR_TOKEN); never pass a secret as an argument
    #[argh(option)]
    token_file: Option<PathBuf>,
    /// print the version and exit
    #[argh(switch)]
    version: bool,
    #[argh(subcommand)]
    command: Option<Command>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Config(ConfigCommand),
    Verify(VerifyCommand),
    Backup(BackupCommand),
    Recover(RecoverCommand),
}

/// with the daemon stopped: check both database files fully and, if one is
/// damaged, move it aside as <name>.corrupt.<UTC time>, start fresh files
/// and salvage every readable row into them (the daemon does the same at
/// start-up); or acknowledge recoveries (daemon running or not)
#[derive(FromArgs)]
#[argh(subcommand, name = "recover")]
struct RecoverCommand {
    /// database to recover (default: the configured one)
    #[argh(option)]
    db: Option<PathBuf>,
    /// rebuild even if no damage is found
    #[argh(switch)]
    force: bool,
    /// mark every recorded recovery as seen, so health stops reporting it
    #[argh(switch)]
    acknowledge: bool,
}

/// check both database files, their id and merge marks and the archived
/// exports, without writing to them; exit 0 if every check passes, 1 if
/// any fails, 2 if the files cannot be opened
#[derive(FromArgs)]
#[argh(subcommand, name = "verify")]
struct VerifyCommand {
    /// database to check (default: the configured one)
    #[argh(option)]
    db: Option<PathBuf>,
    /// run SQLite's full integrity_check instead of quick_check
    #[argh(switch)]
    full: bool,
}

/// copy both database files into DIR with SQLite's online backup API, while
/// the daemon runs or not
#[derive(FromArgs)]
#[argh(subcommand, name = "backup")]
struct BackupCommand {
    /// directory to write the copies into (created if missing)
    #[argh(positional)]
    dir: PathBuf,
    /// database to copy (default: the configured one)
    #[argh(option)]
    db: Option<PathBuf>,
    /// replace copies already in DIR
    #[argh(switch)]
    force: bool,
}

/// inspect the configuration
#[derive(FromArgs)]
#[argh(subcommand, name = "config")]
struct ConfigCommand {
    #[argh(subcommand)]
    action: ConfigAction,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum ConfigAction {
    Check(CheckCommand),
}

/// validate the configuration (for ExecStartPre) and print the effective settings
#[derive(FromArgs)]
#[argh(subcommand, name = "check")]
struct CheckCommand {
    /// configuration file to check
    #[argh(option)]
    config: Option<PathBuf>,
    /// print nothing on success
    #[argh(switch, short = 'q')]
    quiet: bool,
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    if args.version {
        println!("codi-monitor {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let mut overrides = Overrides {
        config: args.config,
        socket: args.socket,
        tcp: args.tcp,
        db: args.db,
        workers: args.workers,
        log_level: args.log_level,
        token_file: args.token_file,
        admin: args.admin,
    };
    let command = match args.command {
        Some(Command::Verify(verify)) => {
            return match database(verify.db, &overrides) {
                Ok(db) => run_verify(&db, verify.full),
                Err(code) => code,
            };
        }
        Some(Command::Backup(backup)) => {
            return match database(backup.db, &overrides) {
                Ok(db) => run_backup(&db, &backup.dir, backup.force),
                Err(code) => code,
            };
        }
        Some(Command::Recover(recover)) => {
            return match database(recover.db, &overrides) {
                Ok(db) if recover.acknowledge => run_acknowledge(&db),
                Ok(db) => run_recover(&db, recover.force),
                Err(code) => code,
            };
        }
        other => other,
    };
    if let Some(Command::Config(ConfigCommand {
        action: ConfigAction::Check(check),
    })) = command
    {
        if check.config.is_some() {
            overrides.config = check.config;
        }
        return match Config::load(&overrides) {
            Ok(config) => {
                if !check.quiet {
                    match &config.source {
                        Some(path) => println!("# {} is valid", path.display()),
                        None => println!("# no configuration file; built-in defaults are valid"),
                    }
                    print!("{}", config.to_toml());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("codi-monitor: invalid configuration: {e}");
                ExitCode::from(2)
            }
        };
    }

    let config = match Config::load(&overrides) {
        Ok(config) => config,
        Err(e) => {
            logger::fatal(&format!("invalid configuration: {e}"));
            return ExitCode::from(2);
        }
    };
    logger::init(config.general.log_level);
    for warning in &config.warnings {
        log::warn!("configuration: {warning}");
    }
    match daemon::run(config, overrides) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ daemon::DaemonError::StoppedToSalvage) => {
            log::error!("{e}");
            ExitCode::from(recovery::EXIT_TO_SALVAGE)
        }
        Err(e) => {
            log::error!("{e}");
            logger::fatal(&e.to_string());
            ExitCode::from(1)
        }
    }
}

/// The database a maintenance command works on: its own `--db`, else the
/// configured one (`--db`, `$CODI_DB`, the file, the default).
fn database(db: Option<PathBuf>, overrides: &Overrides) -> Result<PathBuf, ExitCode> {
    if let Some(db) = db {
        return Ok(db);
    }
    match Config::load(overrides) {
        Ok(config) => Ok(config.storage.sqlite_path),
        Err(e) => {
            eprintln!("codi-monitor: invalid configuration: {e}");
            Err(ExitCode::from(2))
        }
    }
}

/// `verify`: prints one line per check; 0 all passed, 1 one failed, 2 the
/// files could not be opened.
fn run_verify(db: &Path, full: bool) -> ExitCode {
    match verify::verify(db, full) {
        Ok(report) => {
            println!("{report}");
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("codi-monitor: verify: {e}");
            ExitCode::from(2)
        }
    }
}

/// `backup`: prints each file written; 0 done, 1 failed.
fn run_backup(db: &Path, dir: &Path, force: bool) -> ExitCode {
    match backup::backup(db, dir, force) {
        Ok(copies) => {
            for c in copies {
                println!(
                    "wrote {} ({} bytes in {} ms)",
                    c.path.display(),
                    c.bytes,
                    c.took.as_millis()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("codi-monitor: backup: {e}");
            ExitCode::from(1)
        }
    }
}

/// `recover`: prints what each recovery salvaged and lost; 0 done (or
/// nothing to do), 1 failed.
fn run_recover(db: &Path, force: bool) -> ExitCode {
    match recovery::recover_offline(db, force) {
        Ok(done) if done.is_empty() => {
            println!("no damage found in {} or its ingest file", db.display());
            ExitCode::SUCCESS
        }
        Ok(done) => {
            for r in done {
                println!("{}", r.summary());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("codi-monitor: recover: {e}");
            ExitCode::from(1)
        }
    }
}

/// `recover --acknowledge`: marks every recorded recovery as seen.
fn run_acknowledge(db: &Path) -> ExitCode {
    let done =
        recovery::open_for_acknowledgment(db).and_then(|conn| Ok(recovery::acknowledge(&conn)?));
    match done {
        Ok(n) => {
            println!("{n} recoveries acknowledged");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("codi-monitor: recover --acknowledge: {e}");
            ExitCode::from(1)
        }
    }
}
