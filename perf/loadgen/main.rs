//! `codi-loadgen`: the capacity load generator for codi-monitor.
//!
//! `run` drives a running daemon with many clients on a few mio threads,
//! open loop on a schedule, measuring every latency from the frame's
//! scheduled send time so a stalled daemon cannot hide behind a lower offered
//! rate; at the end it checks that the database holds exactly the logs that
//! were acknowledged. `ceiling` inserts the same rows straight into SQLite to
//! give the storage's own limit on this machine. `files` measures export
//! detection: files written under a watched tree on a schedule, each checked
//! to be archived exactly once. See `perf/README.md`.
//!
//! Exit codes: 0 every check passed, 1 a check failed (stored != acknowledged,
//! protocol errors) or the run could not be done, 2 invalid arguments.
#![deny(missing_docs)]

mod args;
mod ceiling;
mod driver;
mod fifo;
mod files;
mod payload;
mod procstat;
mod report;
mod run;
mod schedule;

use args::{Args, CeilingArgs, Command};
use report::{fmt_count, fmt_us};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    match args.command {
        Command::Run(run_args) => match run_args.validate() {
            Err(e) => {
                eprintln!("codi-loadgen: {e}");
                ExitCode::from(2)
            }
            Ok(cfg) => match run::execute(cfg) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("codi-loadgen: {e}");
                    ExitCode::FAILURE
                }
            },
        },
        Command::Files(f) => {
            if f.duration > args::MAX_DURATION_SECS {
                eprintln!("codi-loadgen files: --duration is at most 3600");
                return ExitCode::from(2);
            }
            match files::execute(&f) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("codi-loadgen files: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ceiling(c) => match ceiling_command(&c) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("codi-loadgen ceiling: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn ceiling_command(c: &CeilingArgs) -> Result<(), String> {
    if c.rows == 0 || c.batch == 0 || c.sessions == 0 {
        return Err("--rows, --batch and --sessions must be at least 1".into());
    }
    if c.message_size > codi_monitor::proto::MAX_FRAME_LEN {
        return Err("--message-size is larger than a frame".into());
    }
    let result = ceiling::run(
        &c.db,
        c.rows,
        c.batch,
        c.message_size,
        c.sessions,
        !c.passive_only,
    );
    if !c.keep {
        // Only remove what this run created: run() refuses an existing db.
        if !matches!(&result, Err(e) if e.contains("already exists")) {
            ceiling::remove_db(&c.db);
        }
    }
    let r = result?;
    println!(
        "ceiling: {} rows of {} B text in transactions of {}: {} rows/s ({:.2} MB/s of text) \
         over {:.2} s in transactions ({:.2} s wall, {} checkpoints{}; longest transaction {}, \
         {} over {} ms)",
        fmt_count(r.rows),
        r.message_size,
        r.batch,
        fmt_count(r.rows_per_sec().round() as u64),
        r.payload_mb_per_sec(),
        r.busy.as_secs_f64(),
        r.wall.as_secs_f64(),
        r.checkpoints,
        if r.trim_wal { "" } else { ", PASSIVE only" },
        fmt_us(r.longest.as_micros() as u64),
        r.stalls,
        ceiling::STALL.as_millis()
    );
    if let Some(path) = &c.json {
        let doc = serde_json::to_string_pretty(&run::ceiling_json(&r)).expect("json");
        std::fs::write(path, doc + "\n")
            .map_err(|e| format!("cannot write `{}`: {e}", path.display()))?;
    }
    Ok(())
}
